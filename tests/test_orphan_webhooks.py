"""Orphaned Upsampler submissions (issue 16), from the webhook's side: the signed webhook URL with a submit
intent's nonce, and what a webhook naming an Upsampler job that is no submission of its job does."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import date, datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy
from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType

from api import webhook
from smi import orphans, signing
from smi.db import Job, LedgerEntry, OrphanJob, Reconciliation, SentMail, Submission, SubmitIntent, make_engine, utcnow
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import WEBHOOK_SECRET, event_count, order, wait_for_status
from worker import create_worker

JOB = "a" * 32
METRICS_TOKEN = "orphan-metrics-token"


def _query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def test_a_webhook_url_with_a_nonce_signs_the_nonce():
    nonce = secrets.token_hex(16)
    query = _query(signing.webhook_url("https://smi.example/", WEBHOOK_SECRET, JOB, nonce))
    assert list(query) == ["job", "n", "sig"] and query["job"] == JOB and query["n"] == nonce
    assert query["sig"] == signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}:{nonce}")
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], nonce)
    assert signing.verify_webhook(["new-secret", WEBHOOK_SECRET], JOB, query["sig"], nonce)  # during a rotation
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], secrets.token_hex(16))  # another nonce
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"])  # the nonce left out
    assert not signing.verify_webhook(WEBHOOK_SECRET, "b" * 32, query["sig"], nonce)  # another job


def test_webhook_urls_without_a_nonce_still_verify():
    url = signing.webhook_url("https://smi.example", WEBHOOK_SECRET, JOB)
    query = _query(url)
    assert url.startswith("https://smi.example/smi-webhook/upsampler/?") and list(query) == ["job", "sig"]
    assert query["sig"] == signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}")  # what URLs handed out so far carry
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"])
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], "")
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], secrets.token_hex(16))  # a nonce added


@pytest.mark.parametrize("nonce", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, " " + "a" * 31, "é" * 32, "0x" + "a" * 30])
def test_a_nonce_that_is_not_32_lowercase_hex_digits_is_refused(nonce):
    signature = signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}:{nonce}")  # even signed by us
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, signature, nonce)
    with pytest.raises(ValueError):
        signing.webhook_url("https://smi.example", WEBHOOK_SECRET, JOB, nonce)


# --- the webhook -------------------------------------------------------------------------------------


def _intent(engine, job_id: str, attempt: int, outcome: str | None) -> str:
    """A submit intent of the job, as activities/upsampler.py writes one; its nonce."""
    nonce = secrets.token_hex(16)
    with Session(engine) as session:
        session.add(SubmitIntent(nonce=nonce, job_id=job_id, attempt=attempt, outcome=outcome, created_at=utcnow()))
        session.commit()
    return nonce


def _rows(engine, model, job_id: str) -> list:
    with Session(engine) as session:
        return list(session.exec(select(model).where(model.job_id == job_id)).all())


def _metric(base_url: str, line_start: str) -> list[str]:
    scraped = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200
    return [line for line in scraped.text.splitlines() if line.startswith(line_start)]


async def test_a_late_orphan_of_a_finished_job_is_booked_once_and_changes_nothing_else(dev_env, stack_factory, faults):
    """Issue 16, 3: Upsampler's webhook for a job of ours that is no submission of the (finished) job, posted
    three times at once: upscale:<id> booked once, the job's cost grows by it, its status, result, links and
    emails stay as they were; the orphan is counted once. Also one from a submit the workflow abandoned."""
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, metrics_token=METRICS_TOKEN)
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        reply = await asyncio.to_thread(
            client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(40, 30)), "orphan-late")
        )
        job_id = reply.json()["job_id"]
        before = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=90)
        assert before["status"] == "completed", before
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()  # its emails all sent
    engine = make_engine(stack.settings.database_url)
    mails = [(m.purpose, m.status) for m in _rows(engine, SentMail, job_id)]
    assert len(stack.mailbox.messages) == 1 and mails
    charges = {e.purpose: e.credits for e in _rows(engine, LedgerEntry, job_id) if e.purpose.startswith("upscale:")}
    assert len(charges) == 1 and before["cost"]["credits"] == sum(charges.values())

    hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id)  # a URL without a nonce
    late = {"id": "orphan-late-1", "status": "SUCCESS", "creditCost": 2.5, "imageUrl": "http://127.0.0.1:9/x.png"}
    replies = await asyncio.gather(*[asyncio.to_thread(httpx.post, hook, json=late, timeout=30) for _ in range(3)])
    assert [(r.status_code, r.json()) for r in replies] == [(200, {"received": True, "delivered": False})] * 3
    abandoned = _intent(engine, job_id, attempt=7, outcome="abandoned")  # a submit given up on, answered late
    hook2 = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id, abandoned)
    failed = {"id": "orphan-late-2", "status": "FAILED", "creditCost": 4, "error": "boom"}  # Upsampler bills nothing
    assert httpx.post(hook2, json=failed).status_code == 200
    assert httpx.post(hook, json=late).status_code == 200  # again, later: still once

    orphan_rows = sorted((o.upsampler_id, o.credits, o.found_by) for o in _rows(engine, OrphanJob, job_id))
    assert orphan_rows == [("orphan-late-1", 2.5, "webhook"), ("orphan-late-2", 0.0, "webhook")]
    booked = {e.purpose: (e.credits, e.cost_usd) for e in _rows(engine, LedgerEntry, job_id)}
    assert booked["upscale:orphan-late-1"] == (2.5, 0.1) and booked["upscale:orphan-late-2"] == (0.0, 0.0)
    after = client.get(f"/v1/jobs/{job_id}").json()
    assert after["cost"] == {
        "credits": before["cost"]["credits"] + 2.5,
        "usd": round(before["cost"]["usd"] + 0.1, 6),
    }
    assert {**after, "cost": None} == {**before, "cost": None}  # status, result, link: all as they were
    assert [(m.purpose, m.status) for m in _rows(engine, SentMail, job_id)] == mails
    assert len(stack.mailbox.messages) == 1
    assert _metric(stack.api.url, "smi_db_orphan_jobs_total") == ['smi_db_orphan_jobs_total{found_by="webhook"} 2.0']
    engine.dispose()


async def test_a_webhook_for_a_submit_whose_reply_was_lost_is_reported_not_booked(
    dev_env, stack_factory, quick_early_webhooks
):
    """Issue 16, 2: the URL's nonce names an intent of the job without its reply: the intent learns the
    Upsampler id and the workflow gets the hint with the intent's attempt (it adopts the job after asking
    the status endpoint); nothing is booked, no orphan recorded. Duplicates: one signal."""
    stack = stack_factory(dev_env)
    client = stack.client()
    reply = client.post("/v1/jobs", json=order(stack.shop.publish(png_bytes(40, 30)), "orphan-adopt"))
    job_id = reply.json()["job_id"]  # no worker: the workflow waits, the job unfinished
    handle = dev_env.client.get_workflow_handle(f"upscale-{job_id}")
    engine = make_engine(stack.settings.database_url)
    try:
        nonce = _intent(engine, job_id, attempt=1, outcome=None)
        hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id, nonce)
        lost = {"id": "lost-reply-1", "status": "SUCCESS", "creditCost": 3}
        for _ in range(2):
            reply = await asyncio.to_thread(httpx.post, hook, json=lost, timeout=30)
            assert (reply.status_code, reply.json()) == (200, {"received": True, "delivered": True})
        with Session(engine) as session:
            intent = session.get_one(SubmitIntent, nonce)
            assert (intent.reported_id, intent.outcome) == ("lost-reply-1", None)
            assert orphans.known_upsampler_ids(session, job_id) == {"lost-reply-1"}
        assert _rows(engine, OrphanJob, job_id) == []
        assert [e.purpose for e in _rows(engine, LedgerEntry, job_id) if e.purpose.startswith("upscale:")] == []
        assert await event_count(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) == 1
        signalled = [
            e.workflow_execution_signaled_event_attributes
            async for e in handle.fetch_history_events()
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
        payload = signalled[0].input.payloads[0].data
        assert b'"lost-reply-1"' in payload and b'"attempt":1' in payload.replace(b" ", b"")
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "received" and job["cost"] is None
    finally:
        await handle.terminate()
        engine.dispose()


def test_only_a_url_signed_for_its_nonce_is_heard(site):
    """An unsigned or forged webhook, or one whose nonce is not the one signed, changes nothing (401, before
    the body is read); the URL as the service signed it books the finished job's orphan."""
    job_id = site.add_job("completed", cost_credits=1.0, cost_usd=0.04)
    with Session(site.engine) as session:
        session.add(LedgerEntry(job_id=job_id, purpose="upscale:u-1", credits=1.0, cost_usd=0.04, created_at=utcnow()))
        session.add(Submission(job_id=job_id, attempt=1, upsampler_id="u-1", credit_cost=1.0, created_at=utcnow()))
        session.commit()
    nonce = _intent(site.engine, job_id, attempt=1, outcome="accepted")
    good = signing.webhook_url(site.url, WEBHOOK_SECRET, job_id, nonce)
    query = _query(good)
    endpoint = f"{site.url}/smi-webhook/upsampler/"
    body = {"id": "orphan-x", "status": "SUCCESS", "creditCost": 5}
    forged = {
        "unsigned": {"job": job_id, "n": nonce},
        "zero signature": {**query, "sig": "0" * 64},
        "another nonce": {**query, "n": secrets.token_hex(16)},
        "nonce left out": {"job": job_id, "sig": query["sig"]},
        "the nonce-less signature": {**query, "sig": signing.sign(WEBHOOK_SECRET, f"webhook:{job_id}")},
        "another secret": _query(signing.webhook_url(site.url, "not-our-secret", job_id, nonce)),
        "upper-case nonce": {
            "job": job_id,
            "n": nonce.upper(),
            "sig": signing.sign(WEBHOOK_SECRET, f"webhook:{job_id}:{nonce.upper()}"),
        },
        "another job": {**query, "job": "f" * 32},
    }
    for name, params in forged.items():
        reply = httpx.post(endpoint, params=params, json=body)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "bad_signature", name
    assert _rows(site.engine, OrphanJob, job_id) == []
    assert [e.purpose for e in _rows(site.engine, LedgerEntry, job_id)] == ["upscale:u-1"]
    with Session(site.engine) as session:
        assert session.get_one(Job, job_id).cost_credits == 1.0

    assert httpx.post(good, json=body).json() == {"received": True, "delivered": False}
    assert [(o.upsampler_id, o.credits) for o in _rows(site.engine, OrphanJob, job_id)] == [("orphan-x", 5.0)]
    with Session(site.engine) as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.cost_credits, job.cost_usd) == ("completed", 6.0, 0.24)


def test_book_orphan_books_once_at_the_jobs_own_price(site):
    """What the webhook and the reconciliation both call: the orphan row and its charge once, priced like the
    job's estimate; a submission of the job is no orphan; an amount that is no number books 0."""
    job_id = site.add_job("completed")
    with Session(site.engine) as session:
        session.add(LedgerEntry(job_id=job_id, purpose="estimate", credits=2.0, cost_usd=0.1, created_at=utcnow()))
        session.add(Submission(job_id=job_id, attempt=1, upsampler_id="sub-1", created_at=utcnow()))
        session.commit()
    book = orphans.book_orphan
    assert book(site.engine, job_id, "o-1", 4.0, 0.04, "reconciliation") is True  # $0.05 a credit, the job's
    assert book(site.engine, job_id, "o-1", 9.0, 0.04, "webhook") is False  # found again: as first booked
    assert book(site.engine, job_id, "sub-1", 1.0, 0.04, "webhook") is False
    assert book(site.engine, job_id, "o-2", float("nan"), 0.04, "webhook") is True
    with pytest.raises(ValueError):
        book(site.engine, job_id, "o-3", 1.0, 0.04, "someone")
    charges = {e.purpose: (e.credits, e.cost_usd) for e in _rows(site.engine, LedgerEntry, job_id)}
    assert charges == {"estimate": (2.0, 0.1), "upscale:o-1": (4.0, 0.2), "upscale:o-2": (0.0, 0.0)}
    with Session(site.engine) as session:
        job = session.get_one(Job, job_id)
        assert (job.cost_credits, job.cost_usd) == (4.0, 0.2)
        assert orphans.known_upsampler_ids(session, job_id) == {"sub-1", "o-1", "o-2"}


# --- what the admin sees -------------------------------------------------------------------------------


def test_the_admin_reads_a_days_reconciliation_and_its_orphans(site):
    day = date(2026, 11, 30)
    midnight = datetime(2026, 12, 1, tzinfo=timezone.utc)
    difference = {"job_id": "a" * 32, "upsampler_id": "u-9", "booked": None, "reported": 2.5, "action": "booked"}
    with Session(site.engine) as session:
        session.add(
            Reconciliation(
                day=day,
                checked_at=midnight + timedelta(hours=1),
                jobs=3,
                upsampler_ids=4,
                booked_credits=5.0,
                reported_credits=7.5,
                booked_now=1,
                differences=json.dumps([difference]),
            )
        )
        for upsampler_id, at, found_by in (
            ("u-9", midnight - timedelta(hours=2), "reconciliation"),
            ("u-8", midnight - timedelta(microseconds=1), "webhook"),
            ("u-7", midnight, "webhook"),  # the next UTC day's
            ("u-6", midnight - timedelta(days=1, microseconds=1), "webhook"),  # the day before's
        ):
            session.add(
                OrphanJob(upsampler_id=upsampler_id, job_id="a" * 32, credits=2.5, found_by=found_by, created_at=at)
            )
        session.commit()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reply = httpx.get(f"{site.url}/v1/admin/reconciliation", params={"day": "2026-11-30"}, headers=admin)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "day": "2026-11-30",
        "checked_at": "2026-12-01T01:00:00+00:00",
        "jobs": 3,
        "upsampler_ids": 4,
        "booked_credits": 5.0,
        "reported_credits": 7.5,
        "booked_now": 1,
        "differences": [difference],
        "orphans": [
            {
                "upsampler_id": "u-9",
                "job_id": "a" * 32,
                "credits": 2.5,
                "found_by": "reconciliation",
                "created_at": "2026-11-30T22:00:00+00:00",
            },
            {
                "upsampler_id": "u-8",
                "job_id": "a" * 32,
                "credits": 2.5,
                "found_by": "webhook",
                "created_at": "2026-11-30T23:59:59.999999+00:00",
            },
        ],
    }
    missing = httpx.get(f"{site.url}/v1/admin/reconciliation", params={"day": "2026-12-01"}, headers=admin)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_reconciled"
    yesterday = (utcnow().date() - timedelta(days=1)).isoformat()
    by_default = httpx.get(f"{site.url}/v1/admin/reconciliation", headers=admin)  # yesterday's, the last one checked
    explicit = httpx.get(f"{site.url}/v1/admin/reconciliation", params={"day": yesterday}, headers=admin)
    assert (by_default.status_code, by_default.json()) == (explicit.status_code, explicit.json())
    for bad in ("2026-13-01", "2026-11-31", "yesterday"):
        reply = httpx.get(f"{site.url}/v1/admin/reconciliation", params={"day": bad}, headers=admin)
        assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_request", bad
    for key in (STOREFRONT_KEY, "wrong"):
        reply = httpx.get(
            f"{site.url}/v1/admin/reconciliation",
            params={"day": "2026-11-30"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert reply.status_code == 401 and "u-9" not in reply.text


def test_the_webhook_reads_the_intent_before_the_submissions(site):
    """The submit activity commits an intent's outcome and its submission together. A webhook that read the
    submissions first and the intent after that commit saw a settled intent without its submission, and took a
    submission's webhook for an orphan's (seen once in 300 jobs by bench/throughput.py: the job waited for its
    poll). Here the commit lands between the handler's two reads, every time."""
    job_id = site.add_job("queued")
    nonce = _intent(site.engine, job_id, 1, None)
    reads: list[str] = []

    def commit_the_reply_after_the_first_read(conn, cursor, statement, *args) -> None:
        reads.append(statement)
        if len(reads) == 2:  # the job, then the first of the two reads: the reply commits now
            with Session(make_engine(site.settings.database_url)) as session:
                intent = session.get_one(SubmitIntent, nonce)
                intent.outcome = "accepted"
                session.add(intent)
                session.add(Submission(job_id=job_id, attempt=1, upsampler_id="up-1", created_at=utcnow()))
                session.commit()

    sqlalchemy.event.listen(site.engine, "after_cursor_execute", commit_the_reply_after_the_first_read)
    try:
        known = webhook._known(SimpleNamespace(engine=site.engine), job_id, nonce)
    finally:
        sqlalchemy.event.remove(site.engine, "after_cursor_execute", commit_the_reply_after_the_first_read)
    assert known is not None
    # Whatever the handler saw of the intent, an intent it saw settled has its submission seen: never rule 3.
    assert "up-1" in known.submissions or not known.settled
