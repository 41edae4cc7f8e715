"""A soak of abuse, bounded in count and time, on loopback: while stalled downloads, huge bodies with
and without a key, hundreds of event streams and a flood of bad webhooks hit the API, real orders
go through the whole stack (dev server, worker, emulator, SMTP) and the storefront's reads stay fast."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
from sqlmodel import create_engine

from smi import signing
from tests.conftest import STOREFRONT_KEY, WEBHOOK_SECRET, png_bytes
from tests.helpers import RESULT_BYTES, Site, order, raw_request, reply_status, stalled_download, wait_for_status
from worker import create_worker

ORDERS = 6
STREAMS = 300  # attempted; the per-client cap lets 200 open, the rest get 429
BAD_WEBHOOKS = 400


async def test_real_orders_complete_and_reads_stay_fast_under_abuse(
    dev_env, stack_factory, faults, tmp_path, quick_early_webhooks
):
    faults(delay_seconds=0.5)
    stack = stack_factory(
        dev_env,
        max_input_bytes=4 * 1024 * 1024,
        status_streams_per_client=200,
        status_streams_total=250,
        downloads_per_client=40,
    )
    engine = create_engine(stack.settings.database_url)
    site = Site(stack.api.url, engine, stack.settings, app=None)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(RESULT_BYTES))
    victim = site.add_job("processing")
    link = site.complete(site.add_job("processing"), result_path=str(big))
    stop = threading.Event()
    outcomes: dict[str, list] = {"bodies": [], "streams": [], "webhooks": []}
    latencies: list[float] = []
    client = stack.client()

    def huge_bodies() -> None:
        for i in range(40):
            key = f"Authorization: Bearer {STOREFRONT_KEY}\r\n" if i % 2 else ""
            with raw_request(
                stack.api.url, f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 300000000\r\n\r\n".encode()
            ) as sock:
                outcomes["bodies"].append(reply_status(sock))
            chunks = iter([b"x" * 1024 * 1024] * 8)  # 8 MiB streamed upload, over the 4 MiB cap
            outcomes["bodies"].append(
                httpx.post(
                    f"{stack.api.url}/v1/uploads",
                    content=chunks,
                    timeout=30,
                    headers={"Authorization": f"Bearer {STOREFRONT_KEY}"},
                ).status_code
            )

    def bad_webhooks() -> None:
        hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, victim)
        forged = f"{stack.api.url}/smi-webhook/upsampler/?job={victim}&sig={'0' * 64}"

        def post(i: int) -> int:  # every 4th signed, but naming no submission of the job
            url, upsampler_id = (hook, uuid.uuid4().hex) if i % 4 == 0 else (forged, "x")
            return httpx.post(url, json={"id": upsampler_id, "status": "SUCCESS"}, timeout=30).status_code

        with ThreadPoolExecutor(16) as pool:
            outcomes["webhooks"] = list(pool.map(post, range(BAD_WEBHOOKS)))

    def reads() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get(f"/v1/jobs/{victim}").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    with ExitStack() as held, httpx.Client(timeout=30, limits=httpx.Limits(max_connections=STREAMS)) as streams:
        for _ in range(30):
            held.enter_context(stalled_download(link))
        events = f"{stack.api.url}/status/{victim}/events?v={signing.view_token(WEBHOOK_SECRET, victim)}"
        for _ in range(STREAMS):
            outcomes["streams"].append(held.enter_context(streams.stream("GET", events)).status_code)
        threads = [threading.Thread(target=fn) for fn in (huge_bodies, bad_webhooks, reads)]
        for thread in threads:
            thread.start()
        async with create_worker(dev_env.client, stack.settings):
            replies = [
                await asyncio.to_thread(
                    client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(32, 24)), f"soak-{i}")
                )
                for i in range(ORDERS)
            ]
            jobs = [
                await wait_for_status(client, r.json()["job_id"], {"completed", "failed", "manual_review"}, timeout=120)
                for r in replies
            ]
        for thread in threads[:2]:
            thread.join(timeout=120)
        stop.set()
        threads[2].join(timeout=30)
    engine.dispose()

    assert [job["status"] for job in jobs] == ["completed"] * ORDERS
    assert len(stack.mailbox.wait_for(ORDERS)) == ORDERS
    assert set(outcomes["bodies"]) == {401, 413} and len(outcomes["bodies"]) == 80
    assert outcomes["streams"].count(200) == 200 and outcomes["streams"].count(429) == STREAMS - 200
    assert set(outcomes["webhooks"]) <= {200, 401} and len(outcomes["webhooks"]) == BAD_WEBHOOKS
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(
        f"GET /v1/jobs under abuse: {len(latencies)} reads, p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p95 {p95 * 1000:.0f} ms"
    )
    assert p95 < 1.0
