"""`smi`: the service's commands (dev, worker, api, migrate, healthcheck, emulator, submit, usage)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from smi.settings import DEV_ENV_FILE, get_settings
from smi.vocabulary import FINISHED, JobStatus

log = logging.getLogger("smi")
BIN = Path(sys.executable).parent
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
                "--sqlite-pragma",
                "journal_mode=WAL",
                "--sqlite-pragma",
                "synchronous=NORMAL",
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


def cmd_submit(args: argparse.Namespace) -> None:
    settings = get_settings()
    api = args.api or f"http://{settings.api_host}:{settings.api_port}"
    headers = {"Authorization": f"Bearer {settings.secret('storefront_api_key')}"}
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        if args.image.startswith(("http://", "https://")):
            image_url = args.image
        else:
            path = Path(args.image)
            if not path.is_file():
                raise SystemExit(f"no such file: {path}")
            uploaded = client.post("/v1/uploads", content=path.read_bytes())
            _check(uploaded)
            image_url = uploaded.json()["image_url"]
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
        created = client.post("/v1/jobs", json=body)
        _check(created)
        job_id = created.json()["job_id"]
        print(f"job {job_id} (order {body['order_id']})", flush=True)
        started, last = time.monotonic(), None
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] != last:
                last = job["status"]
                print(f"  {time.monotonic() - started:6.1f} s  {last}", flush=True)
            if last in TERMINAL:
                break
            time.sleep(0.5)
    if last == JobStatus.COMPLETED:
        out = job["output"]
        size = f"{out['width']}x{out['height']} {out['format']}, {out['bytes']} bytes"
        print(f"done: {size}, {job['cost']['credits']} credits")
        print(f"download: {job['download_url']}  (until {job['download_expires_at']})")
    else:
        error = job.get("error") or {}
        raise SystemExit(f"job ended {last}: {error.get('code')}: {error.get('message')}")


def cmd_usage(args: argparse.Namespace) -> None:
    from datetime import date, timedelta

    from smi import usage
    from smi.db import make_engine

    today = date.today()
    default_start = today - timedelta(days=30) if args.period == "day" else today.replace(month=1, day=1)
    start = usage.parse_day(args.start, default_start)
    end = usage.parse_day(args.end, today) + timedelta(days=1)
    print(usage.to_table(usage.report(make_engine(get_settings().database_url), args.period, start, end)))


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise SystemExit(f"the API answered {response.status_code}: {message}")


def main(argv: list[str] | None = None) -> None:
    from smi.logs import setup_logging

    setup_logging(logging.INFO)  # JSON lines unless stderr is a terminal (smi/logs.py)
    for chatty in ("mail.log", "httpx", "alembic"):  # alembic: smi.migrations logs what it changes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="smi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="the whole service on this machine, in the foreground")
    dev.add_argument("--emulator-port", type=int, default=8100)
    dev.set_defaults(run=cmd_dev)
    commands.add_parser("worker", help="one worker").set_defaults(run=cmd_worker)
    commands.add_parser("api", help="the API server").set_defaults(run=cmd_api)
    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(run=cmd_migrate)
    commands.add_parser(
        "healthcheck", help="the worker container's healthcheck: exit 0 when its worker runs"
    ).set_defaults(run=cmd_healthcheck)

    emulator = commands.add_parser("emulator", help="the Upsampler emulator alone")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8100)
    emulator.add_argument("--api-key", help="the Bearer key it accepts (default: generated and printed)")
    emulator.set_defaults(run=cmd_emulator)

    submit = commands.add_parser("submit", help="a job from the command line, followed to its end")
    submit.add_argument("image", help="a file path or an http(s) URL")
    submit.add_argument("--scale", type=int, default=4)
    submit.add_argument("--email", required=True)
    submit.add_argument("--name")
    submit.add_argument("--format", default="auto", choices=["auto", "png", "jpg", "webp"])
    submit.add_argument("--order-id")
    submit.add_argument("--api", help="the API's base URL (default: SMI_API_HOST:SMI_API_PORT)")
    submit.set_defaults(run=cmd_submit)

    report = commands.add_parser("usage", help="jobs, credits, cost, revenue and margin per UTC day or month")
    report.add_argument("--period", choices=["day", "month"], default="month")
    report.add_argument("--from", dest="start", help="first day, YYYY-MM-DD")
    report.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (inclusive)")
    report.set_defaults(run=cmd_usage)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
