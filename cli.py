"""`smi`: the service's commands (dev, worker, api, migrate, healthcheck, emulator, usage), and the operator's
(submit, jobs, retry, refund, resend, erase), clients of the running API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote, urlsplit

import httpx
from pydantic import SecretStr, ValidationError

from smi.settings import DEV_ENV_FILE, Settings, get_settings
from smi.vocabulary import FINISHED, JobStatus

log = logging.getLogger("smi")
BIN = Path(sys.executable).parent
# `temporal server start-dev` as `smi dev`, the tests and the benchmarks (devstack.py) run it: SQLite
# pragmas that make it fast enough, and the dynamic configuration compose's server reads from
# deploy/temporal/dynamicconfig.yaml (eager activity dispatch).
TEMPORAL_DEV_FLAGS = [
    "--sqlite-pragma",
    "journal_mode=WAL",
    "--sqlite-pragma",
    "synchronous=NORMAL",
    "--dynamic-config-value",
    "system.enableActivityEagerExecution=true",
]
TERMINAL = FINISHED | {JobStatus.MANUAL_REVIEW}  # where `smi submit` stops following


def _wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up on {host}:{port} within {timeout:.0f} s")


def _dev_keys() -> dict[str, str]:
    """Keys for development: generated once, kept in var/dev.env so restarts and `smi submit` reuse them."""
    values: dict[str, str] = {}
    if DEV_ENV_FILE.exists():
        for line in DEV_ENV_FILE.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.startswith("SMI_"):
                values[name] = value
    for name in ("SMI_STOREFRONT_API_KEY", "SMI_ADMIN_API_KEY", "SMI_WEBHOOK_SECRET", "SMI_EMULATOR_API_KEY"):
        values.setdefault(name, secrets.token_urlsafe(24))
    values["SMI_ENV"] = "dev"  # the only way a process becomes dev: running in the folder `smi dev` set up
    values.setdefault("SMI_PAYLOAD_KEY", secrets.token_urlsafe(32))  # base64url of 32 bytes: AES-256 (smi/codec.py)
    DEV_ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEV_ENV_FILE.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    DEV_ENV_FILE.chmod(0o600)
    return values


def cmd_dev(args: argparse.Namespace) -> None:
    """Temporal dev server with UI, worker, API, and (without an Upsampler key) emulator and mail sink."""
    from smi.mailsink import MailSink
    from smi.serve import ServerThread

    keys = _dev_keys()
    settings = get_settings()
    var = Path("var")
    env = dict(os.environ, SMI_ENV="dev", PYTHONUNBUFFERED="1")
    env.update({k: v for k, v in keys.items() if k not in os.environ and k != "SMI_EMULATOR_API_KEY"})
    temporal_host, temporal_port = settings.temporal_address.rsplit(":", 1)
    ui_port = int(temporal_port) + 1000
    env.setdefault("SMI_TEMPORAL_UI_URL", f"http://{temporal_host}:{ui_port}")  # the dashboard's workflow links
    # The UI decodes the encrypted payloads through our API's codec endpoint, from the browser.
    api_host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
    codec_endpoint = f"http://{api_host}:{settings.api_port}/codec"
    env.setdefault(
        "SMI_CODEC_CORS_ORIGINS",
        ",".join(dict.fromkeys(f"http://{host}:{ui_port}" for host in (temporal_host, "127.0.0.1", "localhost"))),
    )
    children: list[subprocess.Popen] = []
    threads: list = []

    def start(name: str, command: list[str]) -> None:
        log.info("starting %s", name)
        children.append(subprocess.Popen(command, env=env, start_new_session=False))

    try:
        start(
            "Temporal dev server",
            [
                str(BIN / "temporal"),
                "server",
                "start-dev",
                "--ip",
                temporal_host,
                "--port",
                temporal_port,
                "--ui-port",
                str(ui_port),
                "--db-filename",
                str(var / "temporal.db"),
                "--search-attribute",
                "UpscaleStatus=Keyword",
                "--ui-codec-endpoint",
                codec_endpoint,
                *TEMPORAL_DEV_FLAGS,
                "--log-level",
                "warn",
            ],
        )
        _wait_for_port(temporal_host, int(temporal_port), 60, "Temporal")

        emulated = settings.upsampler_api_key is None
        if emulated:
            from emulator.app import create_app as create_emulator

            emulator = ServerThread(
                create_emulator(keys["SMI_EMULATOR_API_KEY"], storage_dir=var / "emulator"),
                port=args.emulator_port,
                log_level="warning",
            ).start()
            threads.append(emulator)
            emulator_host = emulator.url.split("//")[1]
            env.update(
                SMI_UPSAMPLER_BASE_URL=f"{emulator.url}/api/v1", SMI_UPSAMPLER_API_KEY=keys["SMI_EMULATOR_API_KEY"]
            )
            env.setdefault("SMI_UPSAMPLER_RESULT_HOSTS", emulator_host)
            # The fetch guard lets through exactly the local services dev runs: the emulator and our API.
            env.setdefault("SMI_FETCH_ALLOW_HOSTS", f"{emulator_host},{settings.public_host}")
            sink = MailSink(settings.smtp_host, settings.smtp_port, outbox=var / "outbox").start()
            threads.append(sink)

        env.setdefault("SMI_WORKER_METRICS_ADDRESS", "127.0.0.1:9464")
        start("worker", [str(BIN / "smi"), "worker"])
        start("API", [str(BIN / "smi"), "api"])
        _wait_for_port(settings.api_host, settings.api_port, 60, "the API")

        api = f"http://{settings.api_host}:{settings.api_port}"
        lines = [
            "",
            "The upscale service is running. Ctrl-C stops everything.",
            f"  API            {api}   (docs: {api}/docs)",
            f"  Dashboard      {api}/admin   (log in with the admin key below)",
            f'  Temporal UI    http://{temporal_host}:{ui_port}   (filter: UpscaleStatus="manual_review")',
            f"  Temporal gRPC  {settings.temporal_address}",
            f"  Metrics        {api}/metrics (API), http://{env['SMI_WORKER_METRICS_ADDRESS']}/metrics (worker)",
            f"  Payload codec  {codec_endpoint}   "
            + (
                f"(payloads encrypted in Temporal, key id {settings.payload_key_id}; the UI decodes through it)"
                if settings.payload_key
                else "(encryption off: SMI_PAYLOAD_KEY is empty)"
            ),
        ]
        if emulated:
            lines += [
                f"  Upsampler      emulator at {env['SMI_UPSAMPLER_BASE_URL']}",
                f"  Mail           SMTP sink on {settings.smtp_host}:{settings.smtp_port}, messages in var/outbox/",
            ]
        lines += [
            f"  Storefront key {env['SMI_STOREFRONT_API_KEY']}",
            f"  Admin key      {env['SMI_ADMIN_API_KEY']}",
            f"  Webhook secret {env['SMI_WEBHOOK_SECRET']}",
            f"  (development keys, kept in {DEV_ENV_FILE})",
            "",
            "Try:  .venv/bin/smi submit path/to/image.png --scale 4 --email you@example.com",
            "",
        ]
        print("\n".join(lines), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        log.error("a component stopped; shutting down the rest")
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in reversed(children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        for thread in threads:
            thread.stop()
        print("stopped", flush=True)


def cmd_worker(_: argparse.Namespace) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully and exits 0 (worker.main)."""
    import worker

    worker.main(get_settings())


def cmd_api(_: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app

    settings = get_settings()
    # log_config=None: uvicorn's loggers (the redacted access log too) write through ours. The client address is
    # the X-Forwarded-For one only from SMI_TRUSTED_PROXIES (uvicorn's own default trusts loopback peers).
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="info",
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxy_list(),
    )


def cmd_migrate(_: argparse.Namespace) -> None:
    """Brings the database to the newest schema (every process also does at start; this runs it first, alone)."""
    from smi.db import make_engine
    from smi.migrations import migrate

    engine = make_engine(get_settings().database_url)
    print(f"database at revision {migrate(engine)}", flush=True)
    engine.dispose()


def cmd_healthcheck(_: argparse.Namespace) -> None:
    """The worker container's healthcheck: the worker answers on its metrics port (SMI_WORKER_METRICS_ADDRESS)
    and its pollers of both task queues are there (the SDK's `temporal_num_pollers`: both of the process's
    workers started and not stopped). Exit 0, or 1 saying why."""
    import re

    from smi.vocabulary import UPSAMPLER_QUEUE_SUFFIX

    settings = get_settings()
    if not settings.worker_metrics_address:
        raise SystemExit("unhealthy: SMI_WORKER_METRICS_ADDRESS is empty, the worker serves nothing to check")
    host, _colon, port = settings.worker_metrics_address.rpartition(":")
    host = host.strip("[]")
    url = f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{port}/metrics"
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError as exc:
        raise SystemExit(f"unhealthy: {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise SystemExit(f"unhealthy: {url} answered {response.status_code}")
    polled = set()
    for labels in re.findall(r"^temporal_num_pollers\{([^}]*)\}", response.text, re.MULTILINE):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label.get("namespace") == settings.temporal_namespace:
            polled.add(label.get("task_queue"))
    queues = [settings.task_queue, settings.task_queue + UPSAMPLER_QUEUE_SUFFIX]
    missing = [queue for queue in queues if queue not in polled]
    if missing:
        raise SystemExit(f"unhealthy: no pollers of {', '.join(missing)} (namespace {settings.temporal_namespace})")
    print(f"healthy: the worker polls {' and '.join(queues)}", flush=True)


def cmd_emulator(args: argparse.Namespace) -> None:
    import uvicorn

    from emulator.app import create_app

    key = args.api_key or secrets.token_urlsafe(24)
    if not args.api_key:
        print(f"emulator API key: {key}", flush=True)
    uvicorn.run(
        create_app(key, storage_dir=Path("var/emulator")),
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=None,
    )


def cmd_usage(args: argparse.Namespace) -> None:
    from datetime import date, timedelta

    from smi import usage
    from smi.db import make_engine

    today = date.today()
    default_start = today - timedelta(days=30) if args.period == "day" else today.replace(month=1, day=1)
    start = usage.parse_day(args.start, default_start)
    end = usage.parse_day(args.end, today) + timedelta(days=1)
    print(usage.to_table(usage.report(make_engine(get_settings().database_url), args.period, start, end)))


# --- the operator's commands: jobs, retry, refund, resend, erase (the admin API), and submit ---------------------
# Each is a client of the running API at SMI_PUBLIC_BASE_URL (or --api). A failure (the API down, its 4xx, a
# missing setting, a bad argument) is one line on stderr and a non-zero exit, never a traceback.

SUBMIT_TIMEOUT = 1200.0  # past the 15 minutes after which a job still processing goes to manual review
STREAM_READ_SECONDS = 40.0  # the event stream sends a keep-alive every 15 s: longer silence is a dead connection
RECONNECT_SECONDS = 2.0  # the stream's own `retry:` advice


def _client_settings() -> Settings:
    """The settings as a client of the API reads them (SMI_* and their _FILE forms, var/dev.env in development).
    The keys only the server needs are not required here (env="dev" turns off that one check); each command asks
    for the one key it uses (_key)."""
    try:
        return Settings(_env_file=DEV_ENV_FILE if DEV_ENV_FILE.exists() else None, env="dev")
    except ValidationError as exc:
        problems = "; ".join(
            (f"SMI_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "") + e["msg"] for e in exc.errors()
        )
        raise SystemExit(f"smi: bad setting: {problems}") from None
    except (ValueError, OSError) as exc:  # e.g. an SMI_*_FILE naming a file that is not there
        raise SystemExit(f"smi: bad setting: {exc}") from None


def _key(value: SecretStr | None, name: str) -> str:
    if value is None or not value.get_secret_value():
        raise SystemExit(f"smi: {name} is not set (nor {name}_FILE); `smi dev` writes it to {DEV_ENV_FILE}")
    return value.get_secret_value()


def _api_url(args: argparse.Namespace, settings: Settings) -> str:
    return (args.api or settings.public_base_url).rstrip("/")


def _request(api: str, key: str, method: str, path: str, timeout: float = 60, **kwargs) -> dict:
    """One call of the API; its JSON answer, or a one-line exit saying what went wrong."""
    try:
        with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as client:
            response = client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        raise SystemExit(f"smi: the API at {api} did not answer within {timeout:.0f} s") from None
    except httpx.HTTPError as exc:  # refused, no such host, no scheme in the URL ...
        raise SystemExit(f"smi: cannot reach the API at {api}: {exc or type(exc).__name__}") from None
    _check(response)
    try:
        return response.json()
    except ValueError:
        raise SystemExit(f"smi: the API at {api} answered {response.status_code} with no JSON") from None


def _admin(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict:
    """A call of the admin API with SMI_ADMIN_API_KEY."""
    settings = _client_settings()
    return _request(_api_url(args, settings), _key(settings.admin_api_key, "SMI_ADMIN_API_KEY"), method, path, **kwargs)


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        raise SystemExit(f"smi: the API answered {response.status_code}: {' '.join(message.split())}")


def _job_id(value: str) -> str:
    """argparse type: a job id as the API issues them (32 hex digits)."""
    if not re.fullmatch(r"[0-9a-f]{32}", value.strip().lower()):
        raise argparse.ArgumentTypeError("a job id is 32 hex digits, like 3f2a...; `smi jobs` lists them")
    return value.strip().lower()


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 1000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 1000")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


def _day(value: str) -> str:
    """argparse type: a date as `smi usage` reads it (YYYY-MM-DD), checked here so a bad one is a one-line error."""
    try:
        date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2026-11-21") from None
    return value


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL, like http://127.0.0.1:8000")
    return value


def _money(value: float | int) -> str:
    return f"{value:.2f}" if value else "-"


def cmd_jobs(args: argparse.Namespace) -> None:
    params: dict[str, str | int] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    jobs = _admin(args, "GET", "/v1/admin/jobs", params=params)["jobs"]
    if not jobs:
        print(f"no {args.status + ' ' if args.status else ''}jobs")
        return
    header = ("JOB ID", "STATUS", "ORDER", "SCALE", "CREATED (UTC)", "PAID", "COST", "REFUND", "ERROR")
    rows = [
        (
            job["job_id"],
            job["status"],
            job["order_id"],
            f"{job['scale_factor']}x",
            job["created_at"][:16].replace("T", " "),
            _money(job["money"]["revenue_usd"]),
            _money(job["money"]["cost_usd"]),
            job["refund"]["status"] if job["refund"] else "-",
            job["error"]["code"] if job["error"] else "-",
        )
        for job in jobs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_action(args: argparse.Namespace) -> None:
    """retry, refund, resend: POST /v1/admin/jobs/{id}/<action>."""
    answer = _admin(args, "POST", f"/v1/admin/jobs/{args.job_id}/{args.action}")
    line = f"{args.action} {answer['job_id']}: {answer['how']}"
    if answer.get("download_expires_at"):
        line += f"; the new link is valid until {answer['download_expires_at']}"
    print(line)


def cmd_erase(args: argparse.Namespace) -> None:
    if "@" not in args.email or any(c.isspace() for c in args.email):
        raise SystemExit("smi: EMAIL must be an e-mail address like name@example.com")
    if not args.yes:
        question = "Erase this customer's personal data and files from every job? It cannot be undone. [y/N] "
        print(question, end="", flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise SystemExit("smi: not confirmed; nothing was erased (--yes skips the question)")
    erased = _admin(args, "DELETE", f"/v1/admin/customers/{quote(args.email, safe='@')}")
    if not erased["jobs"]:
        print("no job has this address (or it was erased before): nothing to erase")
        return
    print(
        f"erased: {erased['jobs']} jobs, {erased['files']} files, {erased['tokens']} download tokens, "
        f"{erased['emails']} sent-mail records"
    )


def cmd_submit(args: argparse.Namespace) -> None:
    settings = _client_settings()
    api = _api_url(args, settings)
    key = _key(next(map(SecretStr, settings.storefront_keys()), None), "SMI_STOREFRONT_API_KEY")
    if args.image.startswith(("http://", "https://")):
        image_url = args.image
    else:
        path = Path(args.image)
        if not path.is_file():
            raise SystemExit(f"smi: no such file: {path}")
        image_url = _request(api, key, "POST", "/v1/uploads", content=path.read_bytes())["image_url"]
    body = {
        "order_id": args.order_id or f"cli-{uuid.uuid4().hex[:12]}",
        "image_url": image_url,
        "scale_factor": args.scale,
        "format": args.format,
        "customer_email": args.email,
        "customer_name": args.name,
        "amount_paid_cents": 0,
        "currency": "USD",
        "payment_reference": None,
    }
    created = _request(api, key, "POST", "/v1/jobs", json=body)
    job_id = created["job_id"]
    print(f"job {job_id} (order {body['order_id']})", flush=True)
    events = f"{api}/status/{job_id}/events?{urlsplit(created['status_page_url']).query}"  # the view token
    started, seen = time.monotonic(), list[str]()  # the statuses shown, in order

    def show(state: dict) -> None:
        if not seen or state["status"] != seen[-1]:
            seen.append(state["status"])
            print(f"  {time.monotonic() - started:6.1f} s  {state['status']}", flush=True)

    try:
        asyncio.run(asyncio.wait_for(_follow(events, show), args.timeout))
    except KeyboardInterrupt:
        raise SystemExit(f"smi: stopped following job {job_id}; it goes on: `smi jobs` shows it") from None
    except asyncio.TimeoutError:
        raise SystemExit(
            f"smi: job {job_id} did not end within {args.timeout:g} s "
            f"(last status: {seen[-1] if seen else 'unknown'}); it goes on: `smi jobs` shows it"
        ) from None
    job = _request(api, key, "GET", f"/v1/jobs/{job_id}")
    if job["status"] == JobStatus.COMPLETED:
        out = job["output"]
        size = f"{out['width']}x{out['height']} {out['format']}, {out['bytes']} bytes"
        print(f"done: {size}, {job['cost']['credits']} credits")
        print(f"download: {job['download_url']}  (until {job['download_expires_at']})")
    else:
        error = job.get("error") or {}
        raise SystemExit(f"smi: job {job_id} ended {job['status']}: {error.get('code')}: {error.get('message')}")


async def _follow(url: str, show: Callable[[dict], None]) -> None:
    """Reads the job's status event stream (api/status.py) until its status is one where `smi submit` stops,
    handing each state to `show`; reconnects when the stream ends (the server closes it after 5 minutes) or the
    connection drops. The caller's deadline bounds it."""
    timeout = httpx.Timeout(10, read=STREAM_READ_SECONDS)
    async with httpx.AsyncClient(timeout=timeout) as client:
        while True:
            try:
                async with client.stream("GET", url) as response:
                    if response.status_code != 429:  # 429: too many streams open; try again shortly
                        if response.status_code >= 400:
                            await response.aread()
                        _check(response)
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                state = json.loads(line[len("data:") :])
                                show(state)
                                if state["status"] in TERMINAL:
                                    return
            except httpx.TransportError:
                pass  # the API restarting, or the connection lost: reconnect until the deadline
            await asyncio.sleep(RECONNECT_SECONDS)


class OneLineErrors(argparse.ArgumentParser):
    """A bad argument is one line (the usage is what --help shows), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return version("smi-upscale")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="smi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smi {_version()}", help="the installed version")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="the whole service on this machine, in the foreground")
    dev.add_argument("--emulator-port", type=int, default=8100, help="the emulator's port (default 8100)")
    dev.set_defaults(run=cmd_dev)
    commands.add_parser("worker", help="one worker").set_defaults(run=cmd_worker)
    commands.add_parser("api", help="the API server").set_defaults(run=cmd_api)
    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(run=cmd_migrate)
    commands.add_parser(
        "healthcheck", help="the worker container's healthcheck: exit 0 when its worker runs"
    ).set_defaults(run=cmd_healthcheck)

    emulator = commands.add_parser("emulator", help="the Upsampler emulator alone")
    emulator.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    emulator.add_argument("--port", type=int, default=8100, help="the port (default 8100)")
    emulator.add_argument("--api-key", help="the Bearer key it accepts (default: generated and printed)")
    emulator.set_defaults(run=cmd_emulator)

    client = OneLineErrors(add_help=False)  # what every client command of the API takes
    client.add_argument(
        "--api", type=_base_url, metavar="URL", help="the API's base URL (default: SMI_PUBLIC_BASE_URL)"
    )

    submit = commands.add_parser(
        "submit",
        parents=[client],
        help="a job from the command line, followed to its end over the status event stream",
        description="Places an order (key: SMI_STOREFRONT_API_KEY) and prints each status change until the job "
        "ends: exit 0 when completed, 1 when it failed, went to manual review or the deadline passed.",
    )
    submit.add_argument("image", help="a file path (uploaded first) or an http(s) URL")
    submit.add_argument("--scale", type=int, default=4, help="the scale factor (default 4)")
    submit.add_argument("--email", required=True, help="the customer's address: the completion email goes there")
    submit.add_argument("--name", help="the customer's name, in the email")
    submit.add_argument(
        "--format", default="auto", choices=["auto", "png", "jpg", "webp"], help="the result's format (default auto)"
    )
    submit.add_argument("--order-id", help="the shop's order id (default: cli-<random>)")
    submit.add_argument(
        "--timeout",
        type=_seconds,
        default=SUBMIT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up following after this long (default {SUBMIT_TIMEOUT:g}); the job itself goes on",
    )
    submit.set_defaults(run=cmd_submit)

    admin = "Calls the admin API with SMI_ADMIN_API_KEY (or SMI_ADMIN_API_KEY_FILE)."
    jobs = commands.add_parser(
        "jobs", parents=[client], help="the newest jobs, as a table", description=f"Jobs, newest first. {admin}"
    )
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only jobs with this status")
    jobs.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most N jobs, 1 to 1000 (default 50)")
    jobs.set_defaults(run=cmd_jobs)
    for name, action, what in (
        ("retry", "retry", "run the job again (a job in manual review goes on; a finished one runs anew)"),
        ("refund", "refund", "refund the job now (a running job stops; a refunded one is not paid twice)"),
        ("resend", "resend-email", "a fresh download link, with a new expiry, emailed to the customer again"),
    ):
        command = commands.add_parser(
            name, parents=[client], help=what, description=f"{what[0].upper()}{what[1:]}. {admin}"
        )
        command.add_argument(
            "job_id", type=_job_id, metavar="ID", help="the job id (32 hex digits, as `smi jobs` shows)"
        )
        command.set_defaults(run=cmd_action, action=action)
    erase = commands.add_parser(
        "erase",
        parents=[client],
        help="erase a customer's personal data and files (GDPR)",
        description="Every job of the address loses its files, download links and sent-mail records; address, "
        "name and payment reference are replaced. Nothing is erased while a job of the address still runs. " + admin,
    )
    erase.add_argument("email", metavar="EMAIL", help="the customer's address (compared case-insensitively)")
    erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase.set_defaults(run=cmd_erase)

    report = commands.add_parser("usage", help="jobs, credits, cost, revenue and margin per UTC day or month")
    report.add_argument(
        "--period", choices=["day", "month"], default="month", help="one row per day or month (default month)"
    )
    report.add_argument("--from", dest="start", type=_day, help="first day, YYYY-MM-DD")
    report.add_argument("--to", dest="end", type=_day, help="last day, YYYY-MM-DD (inclusive)")
    report.set_defaults(run=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> None:
    from smi.logs import setup_logging

    setup_logging(logging.INFO)  # JSON lines unless stderr is a terminal (smi/logs.py)
    for chatty in ("mail.log", "httpx", "alembic"):  # alembic: smi.migrations logs what it changes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
