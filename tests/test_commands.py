"""The commands a user types: `smi dev` brings up the whole service, `smi submit` uses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from smi.serve import free_port

SMI = str(Path(sys.executable).parent / "smi")


def test_smi_dev_runs_the_whole_service_and_smi_submit_completes_a_job(tmp_path):
    ports = {name: free_port() for name in ("temporal", "api", "smtp", "emulator", "metrics")}
    env = dict(
        os.environ,
        SMI_TEMPORAL_ADDRESS=f"127.0.0.1:{ports['temporal']}",
        SMI_API_PORT=str(ports["api"]),
        SMI_PUBLIC_BASE_URL=f"http://127.0.0.1:{ports['api']}",
        SMI_SMTP_PORT=str(ports["smtp"]),
        SMI_WORKER_METRICS_ADDRESS=f"127.0.0.1:{ports['metrics']}",
    )
    for name in [k for k in env if k in ("SMI_UPSAMPLER_API_KEY", "SMI_STOREFRONT_API_KEY")]:
        del env[name]
    log = open(tmp_path / "dev.log", "w+")
    dev = subprocess.Popen(
        [SMI, "dev", "--emulator-port", str(ports["emulator"])],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while "The upscale service is running" not in (tmp_path / "dev.log").read_text():
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "smi dev did not come up"
            time.sleep(0.3)
        banner = (tmp_path / "dev.log").read_text()
        assert f"http://127.0.0.1:{ports['api']}" in banner and "Storefront key" in banner
        assert f"http://127.0.0.1:{ports['api']}/admin" in banner

        Image.effect_noise((90, 60), 40).convert("RGB").save(tmp_path / "photo.png")
        submit = subprocess.run(
            [SMI, "submit", "photo.png", "--scale", "3", "--email", "buyer@example.com"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "done: 270x180 png" in submit.stdout
        assert "/downloads/" in submit.stdout
        outbox = list((tmp_path / "var" / "outbox").glob("*.eml"))
        assert len(outbox) == 1 and b"buyer@example.com" in outbox[0].read_bytes()
        worker_metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics").text
        assert "smi_job_outcomes_total{" in worker_metrics and "temporal_workflow_completed_total" in worker_metrics
        _payloads_encrypted_and_the_ui_decodes_them(tmp_path, env, ports, submit.stdout)
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        code = dev.wait(timeout=60)
        log.close()
    assert code == 0
    assert "stopped" in (tmp_path / "dev.log").read_text()


def _payloads_encrypted_and_the_ui_decodes_them(tmp_path, env, ports, submitted: str) -> None:
    """`smi dev` generates a payload key: the job's history is ciphertext, and the dev UI is
    pointed at the API's codec endpoint, which answers the loopback UI without a key."""
    import asyncio
    import base64
    import re

    import httpx
    from google.protobuf import json_format
    from temporalio.client import Client

    assert "SMI_PAYLOAD_KEY=" in (tmp_path / "var" / "dev.env").read_text()
    job_id = re.search(r"job ([0-9a-f]{32})", submitted).group(1)

    async def first_input():
        client = await Client.connect(env["SMI_TEMPORAL_ADDRESS"])  # a plain client: sees what is stored
        history = await client.get_workflow_handle(f"upscale-{job_id}").fetch_history()
        return history.events[0].workflow_execution_started_event_attributes.input.payloads[0]

    stored = asyncio.run(first_input())
    assert stored.metadata["encoding"] == b"binary/encrypted" and job_id.encode() not in stored.data
    ui_settings = httpx.get(f"http://127.0.0.1:{ports['temporal'] + 1000}/api/v1/settings").json()
    assert ui_settings["Codec"]["Endpoint"] == f"http://127.0.0.1:{ports['api']}/codec"
    ui_origin = f"http://127.0.0.1:{ports['temporal'] + 1000}"
    decoded = httpx.post(
        f"{ui_settings['Codec']['Endpoint']}/decode",
        headers={"Origin": ui_origin, "X-Namespace": "default"},
        json={"payloads": [json_format.MessageToDict(stored)]},
    )
    assert decoded.status_code == 200, decoded.text
    assert decoded.headers["access-control-allow-origin"] == ui_origin
    assert job_id.encode() in base64.b64decode(decoded.json()["payloads"][0]["data"])
