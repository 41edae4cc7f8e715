"""Hostile clients against the real API on a loopback port (issue 10's rows, each seen failing on the
code before the fix): stalled downloads, bodies before keys, unbounded streams, range tricks,
malformed signatures, webhook floods, one key for two purposes."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import event
from sqlmodel import Session, create_engine, select
from temporalio.api.enums.v1 import EventType

from api import deps
from api.status import EVENTS_POLL_SECONDS
from smi import signing
from smi.db import Submission, make_engine
from smi.migrations import migrate
from tests.conftest import STOREFRONT_KEY, WEBHOOK_SECRET, database_url, png_bytes
from tests.helpers import RESULT_BYTES, event_count, order, raw_request, reply_status, stalled_download, wait_for_status
from worker import create_worker


@pytest.fixture
def big_result(tmp_path):
    path = tmp_path / "result.png"
    path.write_bytes(b"\x89PNG" + bytes(RESULT_BYTES))
    return path


def test_stalled_downloads_hold_no_database_connection(site_factory, big_result):
    """Row 1: 20 downloads left unread (more than the pool's 15 connections) and the API still answers."""
    site = site_factory(downloads_per_client=100)
    job_id = site.add_job("processing")
    link = site.complete(job_id, result_path=str(big_result))
    stalled = [stalled_download(link) for _ in range(20)]
    try:
        downloads, deadline = site.app.state.services.downloads, time.monotonic() + 10
        while downloads.open.total() < 20:  # every one past its database work, holding a download slot
            assert time.monotonic() < deadline, downloads.open
            time.sleep(0.02)
        started = time.monotonic()
        reply = httpx.get(
            f"{site.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}, timeout=10
        )
        assert reply.status_code == 200 and time.monotonic() - started < 3
    finally:
        for sock in stalled:
            sock.close()


def test_open_downloads_are_capped_per_client_and_released(site_factory, big_result):
    site = site_factory(downloads_per_client=2, downloads_total=50, download_max_count=3)
    link = site.complete(site.add_job("processing"), result_path=str(big_result))
    first, second = stalled_download(link), stalled_download(link)  # downloads 1 and 2 of the 3 allowed
    try:
        assert reply_status(first) == 200 and reply_status(second) == 200
        refused = httpx.get(link)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_connections"
        assert refused.headers["Retry-After"] == "60"
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 10
    while (again := httpx.head(link)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)  # the slots come back once the server sees the connections closed
    assert again.status_code == 200
    assert httpx.get(link).status_code == 200  # the third: the refused request counted no download


def test_every_range_spelling_of_the_whole_file_is_counted(site_factory, big_result):
    """Row 4: these served the whole file (or its first byte) without counting a download."""
    tricks = [
        "bytes=00-",
        "bytes=-99999999",
        "BYTES=0-",
        "bytes=0000-10239",
        "bytes = 0-",
        "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(101)),
    ]  # over 100 ranges: the whole file
    site = site_factory(download_max_count=len(tricks))
    link = site.complete(site.add_job("processing"), result_path=str(big_result))
    assert httpx.get(link, headers={"Range": "bytes=10-20"}).status_code == 206  # a resume: not counted
    assert httpx.get(link, headers={"Range": "bytes=oops"}).status_code == 400  # nothing served: not counted
    for trick in tricks:
        with httpx.stream("GET", link, headers={"Range": trick}) as reply:
            assert reply.status_code in (200, 206), trick
    used_up = httpx.get(link)
    assert used_up.status_code == 410 and used_up.json()["error"]["code"] == "download_limit"


def test_non_ascii_signatures_and_tokens_are_refused_not_500(site):
    """Row 5: `compare_digest` raised TypeError on non-ASCII text: a 500 on every signed URL."""
    job_id = site.add_job("processing")
    exp = int(time.time()) + 600
    answers = {
        "webhook": httpx.post(f"{site.url}/smi-webhook/upsampler/?job={job_id}&sig=%C3%A9", json={}),
        "status page": httpx.get(f"{site.url}/status/{job_id}?v=%C3%A9"),
        "status state": httpx.get(f"{site.url}/status/{job_id}/state?v=%C3%A9"),
        "status events": httpx.get(f"{site.url}/status/{job_id}/events?v=%C3%A9"),
        "signed file": httpx.get(f"{site.url}/files/originals/{job_id}?exp={exp}&sig=%C3%A9"),
        "dashboard": httpx.get(f"{site.url}/admin", headers=[(b"Cookie", f"smi_admin_session={exp}.ab.é".encode())]),
    }
    codes = {name: reply.status_code for name, reply in answers.items()}
    assert codes == {
        "webhook": 401,
        "status page": 404,
        "status state": 404,
        "status events": 404,
        "signed file": 403,
        "dashboard": 303,
    }


def test_unauthenticated_bodies_are_refused_before_they_are_read(site):
    """Row 2: a 300 MB body without a key was read (and parsed) before the 401. Here the body never comes:
    the answer must not wait for it."""
    for path in ("/v1/jobs", "/v1/quotes", "/v1/uploads", "/v1/admin/jobs/x/retry"):
        sock = raw_request(
            site.url,
            f"POST {path} HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\n"
            f"Content-Length: 300000000\r\n\r\n{{".encode(),
        )
        with sock:
            assert reply_status(sock) == 401, path
    with raw_request(
        site.url,
        f"POST /v1/admin/jobs/x/retry HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer "
        f"{STOREFRONT_KEY}\r\nContent-Length: 10\r\n\r\n".encode(),
    ) as sock:
        assert reply_status(sock) == 401  # the storefront's key is not the admin's


def test_bodies_are_capped_while_they_stream(site):
    """With the key: over the route's cap by Content-Length at once, and without one while streaming."""
    headers = {"Authorization": f"Bearer {STOREFRONT_KEY}", "Content-Type": "application/json"}
    with raw_request(
        site.url,
        f"POST /v1/jobs HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {STOREFRONT_KEY}\r\n"
        f"Content-Length: 300000000\r\n\r\n".encode(),
    ) as sock:
        assert reply_status(sock) == 413

    # Chunked, no length: the first 70 KB chunk is over the 64 KiB cap; the rest of the body never comes,
    # so the answer cannot have waited for it.
    first = b'{"order_id": "' + b"a" * 70_000
    with raw_request(
        site.url,
        f"POST /v1/jobs HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {STOREFRONT_KEY}\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{len(first):x}\r\n".encode()
        + first
        + b"\r\n",
    ) as sock:
        assert reply_status(sock) == 413
    uploads = site.settings.storage_dir / "uploads"
    big = httpx.post(f"{site.url}/v1/uploads", content=iter([b"x" * 1024 * 1024] * 60), headers=headers, timeout=30)
    assert big.status_code == 413 and not any(uploads.iterdir())  # the part file is gone too


def test_event_streams_are_capped_and_share_one_poller(site_factory):
    """Row 3: each stream polled the database on its own (500 streams: the API slowed 150-fold)."""
    site = site_factory(status_streams_per_client=40, status_streams_total=100)
    job_id = site.add_job("processing")
    events_url = f"{site.url}/status/{job_id}/events?v={signing.view_token(WEBHOOK_SECRET, job_id)}"
    queries = []
    event.listen(site.app.state.services.engine, "before_cursor_execute", lambda *args: queries.append(1))
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=100)) as client, ExitStack() as open_streams:
        streams = [open_streams.enter_context(client.stream("GET", events_url)) for _ in range(40)]
        assert all(s.status_code == 200 for s in streams)
        over = client.get(events_url)
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_connections"
        queries.clear()
        started = time.monotonic()
        while len(queries) < 3 * 10:  # ten ticks' worth of one poller's state reads (3 queries each)
            assert time.monotonic() - started < 60 * EVENTS_POLL_SECONDS, len(queries)
            time.sleep(EVENTS_POLL_SECONDS / 10)
        # One poller: they took about ten ticks; a poller per stream would have made them in the first.
        assert time.monotonic() - started >= 8 * EVENTS_POLL_SECONDS, len(queries)
        site.set_status(job_id, "downloading")
        for s in streams[:3]:
            assert any('"status":"downloading"' in line for line in s.iter_lines()), "the change reached it"


async def test_the_rate_limiter_keeps_bounded_memory_and_counts_an_ipv6_64_as_one(tmp_path, monkeypatch):
    """Row 7: past 100k sources every check rebuilt the whole table (17.7 ms per request). The counts now live
    in the database (tests/test_replicas.py: shared by the API processes, old minutes deleted in batches); a
    process keeps only the clients refused this minute, at most MAX_BLOCKED (here 50), a set cleared when the
    minute turns."""
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    monkeypatch.setattr(deps.RateLimiter, "MAX_BLOCKED", 50)
    limiter = deps.RateLimiter(engine, WEBHOOK_SECRET, clock=lambda: 29_000_000 * 60.0)
    sources = [f"10.0.{i >> 8 & 255}.{i & 255}" for i in range(120)]
    assert [await limiter.check(host, "downloads", 1) for host in sources] == [None] * 120
    assert all([await limiter.check(host, "downloads", 1) for host in sources])  # all refused, 70 by the database
    assert len(limiter.blocked) == 50
    answers = [await limiter.check(f"2001:db8:1:2::{i:x}", "downloads", 3) for i in range(5)]
    assert answers[:3] == [None] * 3 and all(wait is not None for wait in answers[3:])  # one /64, one window
    assert await limiter.check("2001:db8:1:3::1", "downloads", 3) is None  # the next /64 is another client
    engine.dispose()


def test_a_view_token_is_not_a_webhook_signature(site, quick_early_webhooks):
    """Row 10: both signed under one key; the bare-id webhook message let `view:<id>` pass as a job id."""
    job_id = site.add_job("processing")
    view = signing.view_token(WEBHOOK_SECRET, job_id)
    forged = httpx.post(
        f"{site.url}/smi-webhook/upsampler/",
        params={"job": f"view:{job_id}", "sig": view},
        json={"id": "u1", "status": "SUCCESS"},
    )
    assert forged.status_code == 401
    signed = signing.webhook_url(site.url, WEBHOOK_SECRET, job_id)
    assert "sig=" + signing.sign(WEBHOOK_SECRET, f"webhook:{job_id}") in signed  # the message has its own prefix
    assert httpx.post(signed, json={"id": "u1", "status": "SUCCESS"}).status_code == 200


def test_old_webhook_urls_work_for_jobs_from_before_the_cut_over(site, quick_early_webhooks):
    cut = signing.LEGACY_WEBHOOK_SIGNATURES_BEFORE
    before = site.add_job("processing", created_at=cut - timedelta(hours=1))
    after = site.add_job("processing", created_at=cut + timedelta(hours=1))
    body = {"id": "u1", "status": "SUCCESS"}
    for job_id, expected in ((before, 200), (after, 401)):
        legacy = {"job": job_id, "sig": signing.sign(WEBHOOK_SECRET, job_id)}  # what URLs carried until now
        assert httpx.post(f"{site.url}/smi-webhook/upsampler/", params=legacy, json=body).status_code == expected


def test_webhook_ids_are_bounded(site):
    """Row 9: a 1 MB `id` went into the workflow's history as a signal."""
    job_id = site.add_job("processing")
    hook = signing.webhook_url(site.url, WEBHOOK_SECRET, job_id)
    for bad in ("x" * 129, "", "has space", "é"):
        reply = httpx.post(hook, json={"id": bad, "status": "SUCCESS"})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "malformed_webhook", bad


async def test_webhooks_naming_no_submission_add_nothing_to_history(
    dev_env, stack_factory, faults, quick_early_webhooks
):
    """Row 9: only a webhook naming one of the job's submissions (or one recorded within a few seconds:
    Upsampler may call before our submit has its reply) becomes a signal; Upsampler's duplicates once."""
    faults(delay_seconds=8, webhook="drop")
    stack = stack_factory(dev_env, poll_initial_delay_seconds=60)
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        job_id = (
            await asyncio.to_thread(
                client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(16, 16)), "hostile-webhooks")
            )
        ).json()["job_id"]
        await wait_for_status(client, job_id, {"queued", "processing"})
        hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id)

        def post(upsampler_id: str) -> dict:
            return httpx.post(hook, json={"id": upsampler_id, "status": "IN_PROGRESS"}, timeout=10).json()

        strangers = await asyncio.gather(*[asyncio.to_thread(post, uuid.uuid4().hex) for _ in range(20)])
        assert all(reply == {"received": True, "delivered": False} for reply in strangers)
        engine = create_engine(stack.settings.database_url)
        with Session(engine) as session:
            real = session.exec(select(Submission.upsampler_id).where(Submission.job_id == job_id)).one()
        engine.dispose()
        assert [post(real)["delivered"] for _ in range(3)] == [True] * 3  # duplicates answered the same ...
        handle = dev_env.client.get_workflow_handle(f"upscale-{job_id}")
        assert await event_count(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) == 1  # ... signalled once
        await handle.terminate()
