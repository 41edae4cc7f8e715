"""A client written by a standard generator (openapi-python-client, pinned in pyproject.toml) from the live
/openapi.json, at test time into tmp_path, drives one order from the upload to the downloaded file (issue 13):
if the document misdescribed a body, a reply or a key, the generated code would send the wrong request or fail
to read the answer. Nothing is downloaded: the generator runs from the installed package."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import STOREFRONT_KEY, png_bytes
from worker import create_worker

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "smi_generated_client"


@pytest.fixture
def generated(tmp_path):
    """generate(api_url) -> the package, imported from tmp_path; forgotten again after the test."""

    def generate(api_url: str):
        document = tmp_path / "openapi.json"
        document.write_bytes(httpx.get(f"{api_url}/openapi.json").content)
        config = tmp_path / "generator.yaml"
        config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")  # no formatter run on the output
        subprocess.run(
            [str(GENERATOR), "generate", "--path", str(document), "--output-path", str(tmp_path / "gen" / PACKAGE)]
            + ["--meta", "none", "--config", str(config), "--fail-on-warning"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        sys.path.insert(0, str(tmp_path / "gen"))
        return importlib.import_module(PACKAGE)

    yield generate
    if str(tmp_path / "gen") in sys.path:
        sys.path.remove(str(tmp_path / "gen"))
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


async def test_a_generated_client_takes_an_order_from_upload_to_download(dev_env, stack_factory, generated):
    stack = stack_factory(dev_env)
    client_package = generated(stack.api.url)
    from smi_generated_client import AuthenticatedClient, Client  # type: ignore[import-not-found]
    from smi_generated_client.api.files import download
    from smi_generated_client.api.storefront import create_job, read_job, upload_image
    from smi_generated_client.models import JobCreated, JobRequest, JobView, Upload
    from smi_generated_client.types import File

    assert client_package.AuthenticatedClient is AuthenticatedClient
    shop = AuthenticatedClient(base_url=stack.api.url, token=STOREFRONT_KEY, raise_on_unexpected_status=True)
    original = png_bytes(90, 60)

    async with create_worker(dev_env.client, stack.settings):
        uploaded = await asyncio.to_thread(upload_image.sync, client=shop, body=File(payload=io.BytesIO(original)))
        assert isinstance(uploaded, Upload) and uploaded.bytes_ == len(original)

        order = JobRequest(
            order_id="gen-client-1",
            image_url=uploaded.image_url,
            scale_factor=2,
            customer_email="ana@example.com",
            amount_paid_cents=1299,
            currency="USD",
        )
        started = await asyncio.to_thread(create_job.sync_detailed, client=shop, body=order)
        assert started.status_code == 202
        created = started.parsed
        assert isinstance(created, JobCreated) and created.status.value == "received"

        deadline = time.monotonic() + 90
        while True:
            job = await asyncio.to_thread(read_job.sync, created.job_id, client=shop)
            assert isinstance(job, JobView), job
            if job.status.value in ("completed", "failed", "manual_review") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert job.status.value == "completed", job

    # The customer's link, through the generated client (no key: a public route).
    token = job.download_url.rsplit("/", 1)[-1]
    fetched = await asyncio.to_thread(download.sync_detailed, token, client=Client(base_url=stack.api.url))
    assert fetched.status_code == 200
    data = fetched.parsed.payload.read()
    assert Image.open(io.BytesIO(data)).size == (180, 120)
    assert hashlib.sha256(data).hexdigest() == job.output.sha256 and len(data) == job.output.bytes_
