"""Attacks against the running API that the other modules do not already make: path tricks in
every path parameter, and a validly signed webhook that names a result on someone else's host.
(Keys, forged and oversized webhooks, SSRF, hostile images and tokens: test_abuse.py,
test_end_to_end.py, test_fetch_guard.py, test_failures.py.)"""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from temporalio.api.enums.v1 import EventType

from smi import signing
from smi.serve import ServerThread
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, UPSAMPLER_KEY, WEBHOOK_SECRET, png_bytes
from tests.helpers import eventually, ledger_rows, order, wait_for_status
from worker import create_worker

TRICKS = [
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "..",
    "%00",
    "a" * 300,
    "%2Fetc%2Fpasswd",
    "x%20OR%201%3D1",
    "0" * 31 + "%2F",
    "%252e%252e%252f",
]
SECRETS = [STOREFRONT_KEY, ADMIN_KEY, WEBHOOK_SECRET, UPSAMPLER_KEY]


async def _waiting_again_after_a_signal(handle) -> bool:
    """Woken by the webhook's signal, the workflow asked Upsampler and started a new poll timer."""
    events = [(event.event_id, event.event_type) async for event in handle.fetch_history_events()]
    signalled = [n for n, kind in events if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED]
    timers = [n for n, kind in events if kind == EventType.EVENT_TYPE_TIMER_STARTED]
    return bool(signalled and timers) and timers[-1] > signalled[0]


def test_path_tricks_in_every_path_parameter(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    (stack.settings.storage_dir / "jobs").mkdir(parents=True)
    (stack.settings.storage_dir / "secret.txt").write_text("do not serve me")
    storefront = {"Authorization": f"Bearer {STOREFRONT_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    expires = int(time.time()) + 600
    for trick in TRICKS:
        sig = signing.sign(WEBHOOK_SECRET, f"file:originals/{trick}:{expires}")
        attempts = [
            ("GET", f"/v1/jobs/{trick}", storefront, {404}),
            ("POST", f"/v1/admin/jobs/{trick}/retry", admin, {404}),
            ("POST", f"/v1/admin/jobs/{trick}/refund", admin, {404}),
            ("POST", f"/v1/admin/jobs/{trick}/resend-email", admin, {404}),
            ("GET", f"/downloads/{trick}", {}, {404}),
            ("HEAD", f"/downloads/{trick}", {}, {404}),
            ("GET", f"/files/originals/{trick}?exp={expires}&sig={sig}", {}, {404}),
            ("GET", f"/files/{trick}/{'a' * 32}?exp={expires}&sig={sig}", {}, {404}),
            ("DELETE", f"/v1/admin/customers/{trick}", admin, {404, 422}),
        ]
        for method, path, headers, expected in attempts:
            if trick.endswith("%2F"):  # decoded to a trailing slash: the router redirects to the same path without it
                expected = expected | {307}
            reply = httpx.request(method, stack.api.url + path, headers=headers)
            assert reply.status_code in expected, (method, path, reply.status_code)
            assert "do not serve me" not in reply.text
            for secret in SECRETS:
                assert secret not in reply.text
    assert httpx.get(f"{stack.api.url}/openapi.json").status_code == 200  # the API is still up


async def test_signed_webhook_naming_another_host_fetches_nothing_from_it(dev_env, stack_factory, faults):
    """The signature only proves the URL came from us; the body is Upsampler's word, so any
    result URL in it is ignored: the status endpoint's (on Upsampler's host) is used."""
    hits: list[str] = []
    evil = FastAPI()

    @evil.get("/{path:path}")
    def anything(path: str, request: Request):
        hits.append(path)
        return Response(png_bytes(256, 192), media_type="image/png")

    faults(webhook="drop", polls_until_done=1000)  # Upsampler stays silent until our forged hint
    stack = stack_factory(dev_env)
    client = stack.client()
    with ServerThread(evil) as server:
        async with create_worker(dev_env.client, stack.settings):
            job_id = (
                await asyncio.to_thread(
                    client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(64, 48)), "attack-hook")
                )
            ).json()["job_id"]
            await wait_for_status(client, job_id, {"queued"})
            submitted = await eventually(
                lambda: httpx.get(f"{stack.emulator.url}/_emulator/jobs").json(), what="the submission at the emulator"
            )
            upsampler_id = submitted[0]["id"]
            hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id)
            lie = {
                "id": upsampler_id,
                "status": "SUCCESS",
                "creditCost": 0,
                "imageUrl": f"{server.url}/result.png",
                "compressedImageUrl": f"{server.url}/result.jpg",
            }
            assert (await asyncio.to_thread(httpx.post, hook, json=lie)).status_code == 200
            handle = dev_env.client.get_workflow_handle(f"upscale-{job_id}")
            await eventually(
                lambda: _waiting_again_after_a_signal(handle),
                timeout=30,
                what="the workflow woken by the hint and waiting again",
            )
            job = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()
    assert hits == []
    assert job["status"] in ("queued", "processing")  # Upsampler's status endpoint says not done: nothing moved
    assert job["output"] is None and ledger_rows(stack.settings.database_url, job_id) == []
