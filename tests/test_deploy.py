"""docker-compose.yml and the Dockerfile, checked without Docker.

The compose file is validated against the Compose Specification's JSON schema and read for what
the deployment needs (one image for our services, migrations before them, the search attribute,
the UI wired to our codec). Then every command our image runs there (each service's command, the
Dockerfile's CMD, the API's healthcheck) and the Temporal setup script run here as subprocesses,
with the environment compose would give them, pointed at loopback services: the Temporal dev
server, a database in a temporary folder (or PostgreSQL with SMI_TEST_POSTGRES_URL).

tests/schemas/compose-spec.json is compose-spec/compose-spec's schema/compose-spec.json (Apache-2.0,
LICENSE.compose-spec beside it) as vendored from that repository's master branch by the PyPI package
check-jsonschema 0.39.0 (2026-10-26); sha256 below. To update: copy the newer file, change the hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from sqlalchemy import create_engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from smi.migrations import current, head
from smi.serve import free_port
from smi.settings import SECRET_FIELDS, Settings
from tests.conftest import database_url
from workflows.types import UPSAMPLER_QUEUE_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # PyYAML resolves the `<<` merges
SERVICES = COMPOSE["services"]

# What an operator's .env holds (README "Production"): the variables the compose file interpolates.
DOT_ENV = {
    "POSTGRES_PASSWORD": "deploy-test-password",
    "SMI_STOREFRONT_API_KEY": "deploy-storefront-key",
    "SMI_ADMIN_API_KEY": "deploy-admin-key",
    "SMI_WEBHOOK_SECRET": "deploy-webhook-secret",
    "SMI_UPSAMPLER_API_KEY_TEST": "deploy-upsampler-test-key",
    "SMI_UPSAMPLER_API_KEY_LIVE": "deploy-upsampler-live-key",
    "SMI_PAYLOAD_KEY": base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("="),
}

VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?)([-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $VAR."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        dollar, name, colon, kind, word, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        unset = name not in env or (colon and env[name] == "")
        if kind == "-" and unset:
            return word
        if unset and (kind == "?" or name not in env):
            raise KeyError(f"docker-compose.yml needs {name} ({word or 'no default'}); add it to DOT_ENV and README")
        return env[name]

    return VARIABLE.sub(one, value)


RESOLVED = interpolate(COMPOSE, DOT_ENV)
OURS = {name: svc for name, svc in RESOLVED["services"].items() if "build" in svc}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def exec_form(instruction: str) -> list[str]:
    args = [a for i, a in dockerfile() if i == instruction]
    if not args:
        return []
    parsed = json.loads(args[-1])  # exec form: SIGTERM reaches our process, not a shell
    assert isinstance(parsed, list), f"{instruction} must be in exec form"
    return parsed


def our_commands() -> list[list[str]]:
    """Every command a container of our image runs: each service's (entrypoint +) command, and the image's default."""
    found = [list(svc.get("entrypoint", exec_form("ENTRYPOINT"))) + list(svc.get("command", exec_form("CMD")))
             for svc in OURS.values()]
    found.append(exec_form("ENTRYPOINT") + exec_form("CMD"))
    return [list(c) for c in dict.fromkeys(tuple(c) for c in found)]


# --- the files themselves -------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, "the vendored schema changed"
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    for document in (COMPOSE, RESOLVED):  # as written, and after interpolation
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema).iter_errors(document)]
        assert not errors, "\n".join(errors)
    broken = json.loads(json.dumps(COMPOSE))  # and the validator does refuse a mistake
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "done"
    assert list(validator(schema).iter_errors(broken))


def test_our_services_share_one_image_storage_and_start_order():
    assert {"migrate", "api", "worker"} <= set(OURS)
    images = {(json.dumps(svc["build"], sort_keys=True), svc.get("image")) for svc in OURS.values()}
    assert len(images) == 1, f"services of our Dockerfile differ in build/image: {images}"
    assert all(svc.get("image") != OURS["api"]["image"] for name, svc in RESOLVED["services"].items()
               if name not in OURS), "a service uses our image without building it"
    assert (ROOT / OURS["api"]["build"] / "Dockerfile").exists()

    assert OURS["migrate"]["command"] == ["smi", "migrate"] and OURS["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        depends = OURS[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["temporal-setup"] == {"condition": "service_completed_successfully"}
    assert OURS["api"]["volumes"] == OURS["worker"]["volumes"] == ["storage:/data"]
    assert OURS["api"]["environment"]["SMI_STORAGE_DIR"].startswith("/data/")
    assert int(OURS["worker"]["deploy"]["replicas"]) >= 2
    assert "/readyz" in " ".join(OURS["api"]["healthcheck"]["test"])


def test_settings_and_secrets_of_our_services():
    for name, svc in OURS.items():
        environment = svc["environment"]
        for key, value in environment.items():
            assert key.startswith("SMI_") and key[4:].lower() in Settings.model_fields, f"{name}: unknown setting {key}"
            if key.endswith("_FILE"):
                assert key[4:-5].lower() in SECRET_FIELDS, f"{name}: {key} names no secret"
                secret = value.removeprefix("/run/secrets/")
                assert secret in svc["secrets"] and secret in RESOLVED["secrets"], f"{name}: {key} -> {value}"
        assert environment["SMI_ENV"] == "production"
        assert environment["SMI_PAYLOAD_KEY_FILE"], "payloads must be encrypted in production"
        # Secrets travel as files (those left in the environment are empty unless an operator fills them).
        assert not [k for k in environment if k[4:].lower() in SECRET_FIELDS and environment[k]], environment


def test_temporal_on_postgresql_with_search_attribute_and_codec_ui():
    services = RESOLVED["services"]
    temporal = services["temporal"]["environment"]
    assert temporal["DB"] == "postgres12" and temporal["POSTGRES_SEEDS"] in services
    assert services[temporal["POSTGRES_SEEDS"]]["image"].startswith("postgres:")
    ours = urlsplit(OURS["api"]["environment"]["SMI_DATABASE_URL"])
    assert services[ours.hostname]["image"].startswith("postgres:") and ours.path == "/smi"

    setup = " ".join(services["temporal-setup"]["command"])
    assert "temporal operator search-attribute create" in setup and "--name UpscaleStatus --type Keyword" in setup
    assert services["temporal-setup"]["environment"]["TEMPORAL_NAMESPACE"] == \
        OURS["worker"]["environment"]["SMI_TEMPORAL_NAMESPACE"]

    ui = next(svc for svc in services.values() if svc["image"].startswith("temporalio/ui:"))
    api_env = OURS["api"]["environment"]
    assert ui["environment"]["TEMPORAL_CODEC_ENDPOINT"] == api_env["SMI_PUBLIC_BASE_URL"] + "/codec"
    ui_port = ui["ports"][0].split(":")[-2]  # host port of "127.0.0.1:8233:8080"
    assert any(origin.endswith(f":{ui_port}") for origin in api_env["SMI_CODEC_CORS_ORIGINS"].split(",")), \
        "the API must allow the UI's origin on /codec"


def test_dockerfile_installs_everything_at_build_time():
    instructions = dockerfile()
    assert exec_form("CMD") == ["smi", "api"]
    assert any(i == "RUN" and "pip install" in a for i, a in instructions)
    for command in our_commands():
        assert not {"pip", "curl", "wget", "apt-get"} & set(" ".join(command).split()), command
    copied = {src.rstrip("/") for i, a in instructions if i == "COPY" for src in a.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {p.split(".")[0] for p in project["packages"]} | {f"{m}.py" for m in project["py-modules"]}
    assert needed | {"pyproject.toml", "templates"} <= copied, f"not copied into the image: {needed - copied}"
    assert any(i == "USER" for i, _ in instructions), "the image should not run as root"


# --- the commands, run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def deployment(dev_env, tmp_path_factory):
    """A Temporal namespace set up by the compose file's own temporal-setup script, a database, and
    the environment compose gives our services, rewritten to point at this machine's test services."""
    folder = tmp_path_factory.mktemp("deploy")
    namespace = f"deploy-{uuid.uuid4().hex[:8]}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMI_", "TEMPORAL_"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `smi`, `temporal`, `python` of the venv

    setup = RESOLVED["services"]["temporal-setup"]
    script_env = {**base, **setup["environment"], "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
                  "TEMPORAL_NAMESPACE": namespace}
    for _ in range(2):  # a second run (compose up again) changes nothing and still succeeds
        ran = subprocess.run(setup["entrypoint"] + setup["command"], env=script_env, capture_output=True, text=True,
                             timeout=120)
        assert ran.returncode == 0, ran.stderr
    listed = await dev_env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace))
    assert listed.custom_attributes["UpscaleStatus"] == IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD

    port = free_port()
    overrides = {  # what names another container, or a path inside one
        "SMI_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "SMI_TEMPORAL_NAMESPACE": namespace,
        "SMI_TASK_QUEUE": f"deploy-{uuid.uuid4().hex[:8]}",  # not the other tests' workers' queue
        "SMI_DATABASE_URL": database_url(folder),
        "SMI_STORAGE_DIR": str(folder / "data" / "storage"),
        "SMI_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "SMI_API_HOST": "127.0.0.1",
        "SMI_API_PORT": str(port),
        "SMI_SMTP_HOST": "127.0.0.1",  # nothing is mailed: no job runs here
        "SMI_SMTP_PORT": str(free_port()),
    }
    hosts = re.compile(rf"(^|[/@])({'|'.join(map(re.escape, RESOLVED['services']))})([:/]|$)")

    def service_env(name: str) -> dict[str, str]:
        svc = OURS[name]
        env = {**svc["environment"], **overrides}
        for key, value in env.items():
            if value.startswith("/run/secrets/"):  # a compose secret: a file holding the variable's value
                secret = value.removeprefix("/run/secrets/")
                path = folder / "secrets" / secret
                path.parent.mkdir(exist_ok=True)
                path.write_text(DOT_ENV[RESOLVED["secrets"][secret]["environment"]])
                env[key] = str(path)
        left = {k: v for k, v in env.items() if hosts.search(v)}
        assert not left, f"{name}: still naming containers: {left}"
        return {**base, **env}

    yield {"env": service_env, "port": port, "cwd": folder}  # cwd: no var/dev.env of a developer is read


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def _service_of(command: list[str]) -> str:
    """The service whose environment a command gets: the one running it (the image's default: the API's)."""
    return next((name for name, svc in OURS.items() if svc.get("command") == command), "api")


def check_migrate(command, env, cwd, **_):
    ran = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert f"database at revision {head()}" in ran.stdout
    with create_engine(env["SMI_DATABASE_URL"]).connect() as connection:
        assert current(connection) == head()


def check_api(command, env, cwd, port, healthcheck, **_):
    log = cwd / f"api-{uuid.uuid4().hex[:6]}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + 60, None
        while status != 200:
            assert process.poll() is None, f"`{' '.join(command)}` exited {process.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"/readyz answered {status}:\n{_tail(log)}"
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(0.3)
        probe = subprocess.run(healthcheck, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, f"the compose healthcheck failed: {probe.stderr}"
    finally:
        process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        code = process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status 143 in Docker).
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in _tail(log), \
        f"`{' '.join(command)}` exited {code} on SIGTERM:\n{_tail(log)}"


def _polling(env: dict[str, str], task_queue: str, pid: int) -> bool:
    """Whether the server sees process `pid` polling the queue (its identity is `<pid>@<host>`)."""
    described = subprocess.run(
        ["temporal", "task-queue", "describe", "--task-queue", task_queue, "--namespace", env["SMI_TEMPORAL_NAMESPACE"],
         "--address", env["SMI_TEMPORAL_ADDRESS"], "--output", "json"], env=env, capture_output=True, text=True, timeout=30)
    pollers = (json.loads(described.stdout or "{}").get("pollers") or []) if described.returncode == 0 else []
    return any(p.get("identity", "").startswith(f"{pid}@") for p in pollers)


def check_worker(command, env, cwd, **_):
    log = cwd / f"worker-{uuid.uuid4().hex[:6]}.log"
    queues = (env["SMI_TASK_QUEUE"], env["SMI_TASK_QUEUE"] + UPSAMPLER_QUEUE_SUFFIX)  # jobs, and Upsampler calls
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not all(_polling(env, queue, process.pid) for queue in queues):
            assert process.poll() is None, f"`{' '.join(command)}` exited {process.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the worker did not start polling:\n{_tail(log)}"
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, f"`{' '.join(command)}` exited {code} on SIGTERM:\n{_tail(log)}"


CHECKS = {("smi", "migrate"): check_migrate, ("smi", "api"): check_api, ("smi", "worker"): check_worker}
ORDER = list(CHECKS)  # migrate first, as compose starts them


@pytest.mark.parametrize("command", sorted(our_commands(), key=lambda c: ORDER.index(tuple(c)) if tuple(c) in ORDER
                                           else -1), ids=" ".join)
async def test_command_of_our_image_runs(command, deployment):
    check = CHECKS.get(tuple(command))
    assert check, f"docker-compose.yml or the Dockerfile runs `{' '.join(command)}`: add a check for it here"
    healthcheck = [a for a in OURS["api"]["healthcheck"]["test"] if a not in ("CMD",)]
    check(command, env=deployment["env"](_service_of(command)), cwd=deployment["cwd"], port=deployment["port"],
          healthcheck=healthcheck)
