"""The emulator's cut-reply faults and its record of credits charged, with the real UpsamplerClient
over loopback HTTP (conftest's session emulator and shop; a webhook receiver of this module's own).

`drop_submit_replies`: Upsampler accepted the job (it runs, calls its webhook, is charged) but the
reply breaks off mid-way, so the client cannot know the id. `hold_submit_replies`: the reply never
comes while the client waits; a test kills the client (SIGKILL) with the POST in flight. The webhook mode
`held`: a job's webhooks wait for `POST /_emulator/webhooks/release`.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid

import httpx
import pytest
from fastapi import FastAPI, Request

from devstack import UPSAMPLER_KEY, png_bytes
from smi.serve import ServerThread
from smi.upsampler import UpsamplerClient, UpsamplerUnavailable
from tests.helpers import eventually

W, H = 40, 30  # 2x: 80 x 60 = 4,800 px, 1 credit


@pytest.fixture(scope="module")
def hooks():
    """A webhook receiver: what Upsampler POSTed, by the `t` of the URL."""
    received: list[dict] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request):
        received.append({"t": request.query_params.get("t"), "body": await request.json()})
        return {"ok": True}

    with ServerThread(app) as server:
        server.received = received
        yield server


class Emu:
    """The reset emulator, an image to upscale, a webhook URL of this test's own."""

    def __init__(self, emulator, set_faults, shop, hooks):
        self.url = emulator.url
        self.api = f"{emulator.url}/api/v1"
        self.server = emulator.server
        self.set_faults = set_faults
        self.image = shop.publish(png_bytes(W, H))
        self._hooks = hooks
        self.token = uuid.uuid4().hex
        self.webhook = f"{hooks.url}/hook?t={self.token}"

    def hooks(self) -> list[dict]:
        return [h["body"] for h in self._hooks.received if h["t"] == self.token]

    def jobs(self) -> list[dict]:
        return httpx.get(f"{self.url}/_emulator/jobs").json()

    def charges(self) -> dict:
        return httpx.get(f"{self.url}/_emulator/charges").json()

    def faults(self) -> dict:
        return httpx.get(f"{self.url}/_emulator/faults").json()

    def submit_body(self) -> dict:
        return {
            "input": {"imageUrl": self.image, "upscaleFactor": 2, "inputImageType": "universal"},
            "webhook": self.webhook,
        }


@pytest.fixture
def emu(emulator, faults, shop, hooks) -> Emu:
    return Emu(emulator, faults, shop, hooks)


@pytest.fixture
async def client(emu):
    c = UpsamplerClient(emu.api, UPSAMPLER_KEY, timeout=30)
    yield c
    await c.aclose()


def open_connections(emu) -> int:
    return len(emu.server.server_state.connections)


async def test_a_dropped_reply_is_a_transport_error_and_the_job_lives_on(emu, client):
    emu.set_faults(delay_seconds=0.1, drop_submit_replies=1)
    headers = {"Authorization": f"Bearer {UPSAMPLER_KEY}"}
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):  # a TransportError: the head came, the body did not
            await http.post(f"{emu.api}/precise-upscale", json=emu.submit_body(), headers=headers)
    (job,) = emu.jobs()
    assert emu.faults()["drop_submit_replies"] == 0
    (hook,) = await eventually(emu.hooks, what="the dropped job's webhook")
    assert (hook["id"], hook["status"], hook["creditCost"]) == (job["id"], "SUCCESS", 1.0)
    assert emu.charges() == {"jobs": {job["id"]: 1.0}, "total_credits": 1.0}
    # The next submit is answered whole.
    second = await client.submit(emu.image, 2, emu.webhook)
    assert second.status == "queued" and second.id != job["id"]


async def test_the_client_sees_a_dropped_reply_as_unavailable(emu, client):
    emu.set_faults(delay_seconds=0.1, drop_submit_replies=2)
    for _ in range(2):
        with pytest.raises(UpsamplerUnavailable, match="RemoteProtocolError"):
            await client.submit(emu.image, 2, emu.webhook)
    accepted = await client.submit(emu.image, 2, emu.webhook)
    assert len(emu.jobs()) == 3
    await eventually(lambda: len(emu.hooks()) == 3, what="three webhooks")
    charged = emu.charges()
    assert len(charged["jobs"]) == 3 and accepted.id in charged["jobs"] and charged["total_credits"] == 3.0


async def test_a_refused_submit_does_not_use_up_the_drop(emu, client):
    emu.set_faults(refuse_with="unsupported image format", faulty_jobs=1, drop_submit_replies=1)
    refused = await client.submit(emu.image, 2, emu.webhook)  # answered whole: nothing was accepted
    assert refused.status == "failed"
    assert emu.faults()["drop_submit_replies"] == 1
    with pytest.raises(UpsamplerUnavailable):
        await client.submit(emu.image, 2, emu.webhook)
    assert emu.faults()["drop_submit_replies"] == 0
    charged = emu.charges()
    assert refused.id not in charged["jobs"]
    await eventually(lambda: len(emu.charges()["jobs"]) == 1, what="the accepted job charged")


async def test_a_held_reply_waits_until_the_client_is_killed(emu):
    emu.set_faults(delay_seconds=0.1, hold_submit_replies=1)
    script = (
        "import httpx, sys; "
        f"httpx.post({emu.api + '/precise-upscale'!r}, json={emu.submit_body()!r}, "
        f"headers={{'Authorization': 'Bearer {UPSAMPLER_KEY}'}}, timeout=120); sys.exit(3)"
    )
    poster = subprocess.Popen([sys.executable, "-c", script])
    try:
        (job,) = await eventually(emu.jobs, timeout=30, what="the submit accepted")
        await eventually(emu.hooks, what="the held job's webhook")  # the job runs while its reply waits
        await asyncio.sleep(0.5)
        assert poster.poll() is None, "the POST got a reply while held"
        assert open_connections(emu) >= 1
        poster.send_signal(signal.SIGKILL)
        assert poster.wait(timeout=10) == -signal.SIGKILL
    finally:
        if poster.poll() is None:
            poster.kill()
    await eventually(lambda: open_connections(emu) == 0, what="the held connection closed")
    assert emu.charges() == {"jobs": {job["id"]: 1.0}, "total_credits": 1.0}
    assert emu.faults()["hold_submit_replies"] == 0


async def test_a_held_reply_ends_with_a_client_timeout_and_a_reset_lets_one_go(emu):
    emu.set_faults(delay_seconds=0.1, hold_submit_replies=2)
    quick = UpsamplerClient(emu.api, UPSAMPLER_KEY, timeout=1.0)
    try:
        with pytest.raises(UpsamplerUnavailable, match="timed out"):
            await quick.submit(emu.image, 2, emu.webhook)
    finally:
        await quick.aclose()
    await eventually(lambda: open_connections(emu) == 0, what="the timed-out connection closed")
    patient = UpsamplerClient(emu.api, UPSAMPLER_KEY, timeout=30)
    try:
        pending = asyncio.ensure_future(patient.submit(emu.image, 2, emu.webhook))
        await eventually(lambda: len(emu.jobs()) == 2, what="the second submit accepted")
        await asyncio.sleep(0.3)
        assert not pending.done()
        httpx.post(f"{emu.url}/_emulator/reset").raise_for_status()
        job = await asyncio.wait_for(pending, 10)
        assert job.status in ("queued", "processing")
    finally:
        await patient.aclose()


async def test_charges_count_successes_once(emu, client):
    emu.set_faults(delay_seconds=0.1, webhook="duplicate", fail_with="processing error", faulty_jobs=1)
    failed = await client.submit(emu.image, 2, emu.webhook)
    ok = await client.submit(emu.image, 4, emu.webhook)  # no faults left for it; 160 x 120: 1 credit
    await eventually(lambda: len(emu.hooks()) == 3, what="the failed job's two webhooks and the other's")
    assert (await client.status(failed.id)).status == "failed"
    assert emu.charges() == {"jobs": {ok.id: 1.0}, "total_credits": 1.0}

    emu.set_faults(polls_until_done=2)  # finished by concurrent polls: charged once all the same
    polled = await client.submit(emu.image, 2, None)
    await asyncio.gather(*(client.status(polled.id) for _ in range(4)))
    assert emu.charges()["jobs"] == {ok.id: 1.0, polled.id: 1.0} and emu.charges()["total_credits"] == 2.0

    httpx.post(f"{emu.url}/_emulator/reset").raise_for_status()
    assert emu.charges() == {"jobs": {}, "total_credits": 0}


def release(emu) -> dict:
    response = httpx.post(f"{emu.url}/_emulator/webhooks/release")
    response.raise_for_status()
    return response.json()


async def test_held_webhooks_go_when_released_in_order(emu, client):
    emu.set_faults(delay_seconds=0.1, webhook="held", webhook_on_progress=True, faulty_jobs=1)
    held = await client.submit(emu.image, 2, emu.webhook)
    delivered = await client.submit(emu.image, 2, emu.webhook)  # faulty_jobs spent: its webhook goes as usual

    def statuses() -> dict[str, str]:
        return {job["id"]: job["status"] for job in emu.jobs()}

    await eventually(lambda: statuses() == {held.id: "SUCCESS", delivered.id: "SUCCESS"}, what="both jobs done")
    await eventually(lambda: [h["id"] for h in emu.hooks()] == [delivered.id], what="the unheld job's webhook")
    assert [j["webhooks_sent"] for j in emu.jobs() if j["id"] == held.id] == [[]]
    assert emu.charges()["jobs"] == {held.id: 1.0, delivered.id: 1.0}  # held or not, a success is charged

    assert release(emu) == {"released": 2}  # IN_PROGRESS and SUCCESS, in that order
    hooks = await eventually(lambda: len(emu.hooks()) == 3 and emu.hooks(), what="the released webhooks")
    assert [(h["id"], h["status"]) for h in hooks[1:]] == [(held.id, "IN_PROGRESS"), (held.id, "SUCCESS")]
    assert hooks[2]["creditCost"] == 1.0 and "imageUrl" in hooks[2]
    assert release(emu) == {"released": 0}  # each goes once

    # A reset drops what is held: nothing left to release.
    emu.set_faults(delay_seconds=0.1, webhook="held")
    dropped = await client.submit(emu.image, 2, emu.webhook)
    await eventually(lambda: statuses().get(dropped.id) == "SUCCESS", what="the third job done")
    httpx.post(f"{emu.url}/_emulator/reset").raise_for_status()
    assert release(emu) == {"released": 0}
