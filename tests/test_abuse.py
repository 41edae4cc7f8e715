"""Keys, rotation, webhook size, download limits and per-client rate limits, against the running API."""

from __future__ import annotations

import asyncio

import httpx

from smi import signing
from tests.conftest import STOREFRONT_KEY, WEBHOOK_SECRET, database_url, png_bytes
from tests.helpers import clear_of_minute_boundary, order, wait_for_status
from worker import create_worker


async def test_rotated_keys_and_secrets_are_both_accepted(dev_env, stack_factory):
    stack = stack_factory(
        dev_env,
        storefront_api_keys="new-key-1, new-key-2",
        webhook_secret="new-secret",
        webhook_secret_previous=WEBHOOK_SECRET,
    )
    quote = {"width": 10, "height": 10, "scale_factor": 2}
    for key in (STOREFRONT_KEY, "new-key-1", "new-key-2"):
        assert stack.client(key).post("/v1/quotes", json=quote).status_code == 200, key
    for key in ("new-key-3", STOREFRONT_KEY + "x", "test-admin-key"):
        reply = stack.client(key).post("/v1/quotes", json=quote)
        assert reply.status_code == 401 and key not in reply.text
    job = "c" * 32
    body = {"id": "u1", "status": "SUCCESS"}
    for secret in ("new-secret", WEBHOOK_SECRET):  # the previous secret still verifies during the rotation
        signed = signing.webhook_url(stack.settings.public_base_url, secret, job)
        assert httpx.post(signed, json=body).status_code == 200
    stale = signing.webhook_url(stack.settings.public_base_url, "retired-secret", job)
    assert httpx.post(stale, json=body).status_code == 401


async def test_oversized_webhooks_are_refused(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, "d" * 32)
    big = b'{"id": "x", "status": "SUCCESS", "pad": "' + b"a" * (1024 * 1024) + b'"}'
    assert httpx.post(hook, content=big).status_code == 413

    def chunks():  # no Content-Length: the cap holds while streaming
        for _ in range(20):
            yield b"a" * 100_000

    reply = httpx.post(hook, content=chunks())
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "too_large"


async def test_download_count_limit_and_per_client_rate_limit(dev_env, stack_factory, faults, tmp_path):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env, download_max_count=2)
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        job_id = (
            await asyncio.to_thread(
                client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(20, 20)), "abuse-1")
            )
        ).json()["job_id"]
        link = (await wait_for_status(client, job_id, {"completed"}))["download_url"]
    assert httpx.get(link, headers={"Range": "bytes=10-20"}).status_code == 206  # a resumed part: not counted
    assert httpx.head(link).status_code == 200
    assert httpx.get(link).status_code == 200
    assert httpx.get(link).status_code == 200
    used_up = httpx.get(link)
    assert used_up.status_code == 410 and used_up.json()["error"]["code"] == "download_limit"

    # Its own database: APIs on one database are replicas that share their counts (tests/test_replicas.py),
    # and the requests above were counted.
    limited = stack_factory(dev_env, public_rate_limit_per_minute=5, database_url=database_url(tmp_path / "limited"))
    clear_of_minute_boundary()  # the 7 requests must fall into one counted minute
    answers = [httpx.get(f"{limited.api.url}/downloads/{'e' * 64}") for _ in range(7)]
    assert [a.status_code for a in answers] == [404] * 5 + [429] * 2
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
    assert answers[-1].json()["error"]["code"] == "rate_limited"
    # Each public endpoint has its own window; the storefront API has none.
    assert httpx.post(f"{limited.api.url}/smi-webhook/upsampler/?job=x&sig=y", json={}).status_code == 401
    assert limited.client().post("/v1/quotes", json={"width": 1, "height": 1, "scale_factor": 2}).status_code == 200
