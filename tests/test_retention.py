"""Retention and GDPR erasure, with the real API and worker on the Temporal dev server.

The cleanup pass (RetentionWorkflow) deletes exactly what is due and nothing else, twice in a
row; the worker creates its daily schedule once; DELETE /v1/admin/customers/{email} erases a
customer's personal data and files and keeps the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from sqlmodel import Session, create_engine, select
from temporalio.client import ScheduleOverlapPolicy, ScheduleRange
from temporalio.service import RPCError, RPCStatusCode

import worker
from smi.db import DownloadToken, Job, LedgerEntry, Refund, SentMail, utcnow
from smi.vocabulary import RetentionReport, RetentionRequest
from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import eventually, job_row, order, wait_for_status
from worker import create_worker
from workflows.retention import RETENTION_SCHEDULE_ID, RetentionWorkflow, ensure_retention_schedule

FINAL = {"completed", "failed", "manual_review"}


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def db_rows(database_url: str, model, *where) -> list:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(model).where(*where)).all())
    finally:
        engine.dispose()


def db_edit(database_url: str, edit) -> None:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            edit(session)
            session.commit()
    finally:
        engine.dispose()


async def complete(stack, client, body: dict, dev_env, status: str = "completed") -> dict:
    reply = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    job = await wait_for_status(client, job_id, FINAL, timeout=90)
    assert job["status"] == status, job
    await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()  # through its email and clean-up
    return job


async def upload(client, data: bytes) -> dict:
    reply = await asyncio.to_thread(client.post, "/v1/uploads", content=data)
    assert reply.status_code == 201, reply.text
    return reply.json()


def busy_job(database_url: str, storage: Path, email: str, status: str) -> str:
    """A job that is not finished (no workflow behind it), with files and a long-expired token."""
    job_id = uuid.uuid4().hex
    now = utcnow()

    def add(session):
        session.add(
            job_row(
                job_id,
                status,
                now - timedelta(days=30),
                order_id=f"busy-{job_id[:8]}",
                image_url="https://shop.test/img.png",
                scale_factor=2,
                customer_email=email,
                customer_name=None,
                amount_paid_cents=500,
            )
        )
        session.add(
            DownloadToken(
                token_sha256=uuid.uuid4().hex * 2,
                job_id=job_id,
                purpose="run:1",
                generation=1,
                expires_at=now - timedelta(days=20),
                created_at=now - timedelta(days=21),
            )
        )

    db_edit(database_url, add)
    folder = storage / "jobs" / job_id
    (folder / "tmp").mkdir(parents=True)
    for name in ("original.png", "compressed_q85.jpg", "upscaled_10x10.png", "tmp/result-1"):
        (folder / name).write_bytes(b"x")
    return job_id


async def run_retention(dev_env, settings, as_of: datetime | None = None) -> RetentionReport:
    """One pass, as of `as_of` (default: the workflow's now)."""
    return await dev_env.client.execute_workflow(
        RetentionWorkflow.run,
        RetentionRequest(as_of),
        id=f"retention-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
        execution_timeout=timedelta(minutes=2),
    )


async def test_retention_pass_deletes_exactly_what_is_due(dev_env, stack_factory, faults):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    settings, client = stack.settings, stack.client()
    storage, db = settings.storage_dir, settings.database_url
    grace = timedelta(hours=settings.retention_grace_hours)
    assert grace == timedelta(hours=72)  # the default

    async with create_worker(dev_env.client, settings):
        stale = await complete(stack, client, order(stack.shop.publish(png_bytes(40, 30)), "ret-stale"), dev_env)
        uploaded = await upload(client, png_bytes(30, 20))
        fresh = await complete(stack, client, order(uploaded["image_url"], "ret-fresh", scale_factor=2), dev_env)

        # An upload nobody ordered, older than its URL's lifetime plus the grace; and a recent one.
        old_upload = storage / "uploads" / uuid.uuid4().hex
        old_upload.write_bytes(png_bytes(8, 8))
        past = time.time() - settings.original_url_ttl_seconds - grace.total_seconds() - 3600
        os.utime(old_upload, (past, past))
        recent_upload = await upload(client, png_bytes(8, 8))
        # A job still running and one in manual review: nothing of them is touched, not even old tokens.
        busy = [busy_job(db, storage, "busy@example.com", status) for status in ("processing", "manual_review")]

        # The stale job's link expired more than the grace ago (an hour more); the fresh one's is still valid.
        def expire(session):
            token = session.exec(select(DownloadToken).where(DownloadToken.job_id == stale["job_id"])).one()
            token.expires_at = utcnow() - grace - timedelta(hours=1)
            session.add(token)

        db_edit(db, expire)
        before = files_under(storage)
        assert {
            f"jobs/{stale['job_id']}/original.png",
            f"jobs/{stale['job_id']}/upscaled_160x120.png",
            f"jobs/{fresh['job_id']}/original.png",
            f"jobs/{fresh['job_id']}/upscaled_60x40.png",
            f"uploads/{uploaded['upload_id']}",
        } <= before

        report = await run_retention(dev_env, settings)
        assert (report.originals, report.compressed, report.results, report.uploads, report.tokens) == (2, 0, 1, 2, 1)
        gone = before - files_under(storage)
        assert gone == {
            f"jobs/{stale['job_id']}/original.png",
            f"jobs/{stale['job_id']}/upscaled_160x120.png",
            f"jobs/{fresh['job_id']}/original.png",
            f"uploads/{uploaded['upload_id']}",
            f"uploads/{old_upload.name}",
        }
        assert not (storage / "jobs" / stale["job_id"]).exists()  # its empty folder too
        assert (storage / "uploads" / recent_upload["upload_id"]).is_file()
        for job_id in busy:
            assert len(files_under(storage / "jobs" / job_id)) == 4
            assert len(db_rows(db, DownloadToken, DownloadToken.job_id == job_id)) == 1

        # Rows: the stale job's token is gone and its record no longer names a file; the fresh one keeps both.
        assert db_rows(db, DownloadToken, DownloadToken.job_id == stale["job_id"]) == []
        assert db_rows(db, Job, Job.job_id == stale["job_id"])[0].result_path is None
        assert len(db_rows(db, DownloadToken, DownloadToken.job_id == fresh["job_id"])) == 1
        assert len(db_rows(db, LedgerEntry, LedgerEntry.job_id == stale["job_id"])) == 3  # revenue, estimate, cost

        # The fresh job's result still downloads, whole and unchanged; the stale one's link is dead.
        download = httpx.get(fresh["download_url"])
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == fresh["output"]["sha256"]
        assert httpx.get(stale["download_url"]).status_code in (404, 410)
        admin = stack.client(ADMIN_KEY)
        resend = admin.post(f"/v1/admin/jobs/{stale['job_id']}/resend-email")
        assert resend.status_code == 409 and resend.json()["error"]["code"] == "result_deleted"
        assert client.get(f"/v1/jobs/{stale['job_id']}").json()["download_url"] is None

        # A second pass finds nothing more to delete.
        again = await run_retention(dev_env, settings)
        assert (again.originals, again.compressed, again.temporary, again.results, again.uploads, again.tokens) == (
            0,
            0,
            0,
            0,
            0,
            0,
        )
        assert before - files_under(storage) == gone


async def delete_schedule(dev_env) -> None:
    with contextlib.suppress(RPCError):
        await dev_env.client.get_schedule_handle(RETENTION_SCHEDULE_ID).delete()


async def test_schedule_created_once_daily_at_three_utc(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    await delete_schedule(dev_env)
    try:
        assert await ensure_retention_schedule(dev_env.client, stack.settings) is True
        handle = dev_env.client.get_schedule_handle(RETENTION_SCHEDULE_ID)
        first = await handle.describe()
        assert await ensure_retention_schedule(dev_env.client, stack.settings) is False  # idempotent
        second = await handle.describe()
        assert second.schedule.spec == first.schedule.spec and second.info.created_at == first.info.created_at

        spec = first.schedule.spec
        assert spec.time_zone_name == "UTC" and not spec.intervals and not spec.cron_expressions
        (calendar,) = spec.calendars
        assert list(calendar.hour) == [ScheduleRange(3, 3)] and list(calendar.minute) == [ScheduleRange(0)]
        assert list(calendar.second) == [ScheduleRange(0)]
        assert list(calendar.day_of_month) == [ScheduleRange(1, 31)] and list(calendar.day_of_week) == [
            ScheduleRange(0, 6)
        ]
        assert first.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = first.schedule.action
        assert action.workflow == "RetentionWorkflow" and action.task_queue == stack.settings.task_queue
        upcoming = first.info.next_action_times[0]
        assert (upcoming.hour, upcoming.minute, upcoming.second) == (3, 0, 0) and upcoming.utcoffset() == timedelta(0)
    finally:
        await delete_schedule(dev_env)


async def test_worker_start_creates_the_schedule(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    await delete_schedule(dev_env)
    running = asyncio.create_task(worker.run(stack.settings))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                described = await dev_env.client.get_schedule_handle(RETENTION_SCHEDULE_ID).describe()
                break
            except RPCError as exc:
                assert exc.status == RPCStatusCode.NOT_FOUND
                assert not running.done(), running
                assert time.monotonic() < deadline, "the worker did not create the schedule"
                await asyncio.sleep(0.2)
        assert described.schedule.action.task_queue == stack.settings.task_queue
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        await delete_schedule(dev_env)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


async def test_erase_customer(dev_env, stack_factory, faults, caplog):
    caplog.set_level(logging.DEBUG)
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    settings, client, admin = stack.settings, stack.client(), stack.client(ADMIN_KEY)
    storage, db = settings.storage_dir, settings.database_url
    email = "erase.me+shop@example.com"

    async with create_worker(dev_env.client, settings):
        other = await complete(stack, client, order(stack.shop.publish(png_bytes(30, 20)), "erase-other"), dev_env)
        uploaded = await upload(client, png_bytes(40, 30))
        done = await complete(
            stack,
            client,
            order(
                uploaded["image_url"],
                "erase-1",
                customer_email=email,
                customer_name="Erin Example",
                payment_reference="pi_erase",
            ),
            dev_env,
        )
        faults(refuse_with="unsupported image format", faulty_jobs=1)
        failed = await complete(
            stack,
            client,
            order(stack.shop.publish(png_bytes(30, 20)), "erase-2", customer_email=email, customer_name="Erin Example"),
            dev_env,
            status="failed",
        )
    assert failed["refund"]["status"] == "owed"
    # A third job of the address waits in manual review: all or nothing, so nothing is erased yet.
    waiting = busy_job(db, storage, email, "manual_review")
    ids = [done["job_id"], failed["job_id"], waiting]
    ledger_before = {job_id: len(db_rows(db, LedgerEntry, LedgerEntry.job_id == job_id)) for job_id in ids}
    files_before = {job_id: files_under(storage / "jobs" / job_id) for job_id in ids}
    refused = admin.delete(f"/v1/admin/customers/{email}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "customer_jobs_busy"
    assert refused.json()["error"]["details"] == {"busy_job_ids": [waiting]}
    assert {job_id: files_under(storage / "jobs" / job_id) for job_id in ids} == files_before
    assert all(job.customer_email == email for job in db_rows(db, Job, Job.job_id.in_(ids)))

    # Once that job has finished (here: by hand), the erasure goes through; the address in any case.
    def finish(session):
        job = session.get(Job, waiting)
        job.status = "failed"
        session.add(job)

    db_edit(db, finish)
    tokens = db_rows(db, DownloadToken, DownloadToken.job_id.in_(ids))
    mails = db_rows(db, SentMail, SentMail.job_id.in_(ids))
    files = sum(len(f) for f in files_before.values()) + 1  # and the upload
    assert len(tokens) == 2 and len(mails) >= 2 and files >= 7

    access = Records()
    access_logger = logging.getLogger("uvicorn.access")
    level = access_logger.level
    access_logger.addHandler(access)
    access_logger.setLevel(logging.INFO)  # the test servers log warnings only; `smi api` logs every request
    try:
        fresh_admin = stack.client(ADMIN_KEY)  # a new connection, which picks up the access log level
        erased = fresh_admin.delete(f"/v1/admin/customers/{email.upper()}")
        await eventually(
            lambda: any("/v1/admin/customers/" in line for line in access.lines), what="the erasure's access log line"
        )
    finally:
        access_logger.removeHandler(access)
        access_logger.setLevel(level)
    assert erased.status_code == 200, erased.text
    assert erased.json() == {"jobs": 3, "files": files, "tokens": 2, "emails": len(mails)}

    # Files gone, rows anonymous, the ledger and the refund kept.
    for job_id in ids:
        assert not (storage / "jobs" / job_id).exists()
    assert not (storage / "uploads" / uploaded["upload_id"]).exists()
    for job in db_rows(db, Job, Job.job_id.in_(ids)):
        assert job.customer_email == "erased@erased.invalid" and job.customer_name is None
        assert job.payment_reference is None and "upload" not in job.image_url and job.result_path is None
    assert db_rows(db, DownloadToken, DownloadToken.job_id.in_(ids)) == []
    assert db_rows(db, SentMail, SentMail.job_id.in_(ids)) == []
    assert {job_id: len(db_rows(db, LedgerEntry, LedgerEntry.job_id == job_id)) for job_id in ids} == ledger_before
    assert [r.status for r in db_rows(db, Refund, Refund.job_id == failed["job_id"])] == ["owed"]
    for job_id in ids:
        view = client.get(f"/v1/jobs/{job_id}")
        assert view.status_code == 200
        for personal in (email, "erase.me", "Erin", "pi_erase", uploaded["upload_id"]):
            assert personal.lower() not in view.text.lower()
    assert email not in admin.get("/v1/admin/jobs").text
    assert httpx.get(done["download_url"]).status_code == 404
    assert admin.post(f"/v1/admin/jobs/{done['job_id']}/retry").status_code == 409

    # The other customer is untouched.
    assert db_rows(db, Job, Job.job_id == other["job_id"])[0].customer_email == "ana@example.com"
    assert httpx.get(other["download_url"]).status_code == 200

    # Once is enough; bad calls change nothing and never echo the address.
    assert admin.delete(f"/v1/admin/customers/{email}").json() == {"jobs": 0, "files": 0, "tokens": 0, "emails": 0}
    assert admin.delete("/v1/admin/customers/nobody@example.com").json()["jobs"] == 0
    assert httpx.delete(f"{stack.api.url}/v1/admin/customers/ana@example.com").status_code == 401
    assert client.delete("/v1/admin/customers/ana@example.com").status_code == 401  # the storefront key is not enough
    malformed = admin.delete("/v1/admin/customers/not-an-address")
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_request"
    assert "not-an-address" not in malformed.text
    assert admin.delete("/v1/admin/customers/erased@erased.invalid").json()["jobs"] == 0  # the placeholder is no one
    assert db_rows(db, Job, Job.job_id == other["job_id"])[0].customer_email == "ana@example.com"

    # Never logged: not by the service, not in the access log (which names the request, masked).
    assert any("/v1/admin/customers/<redacted>" in line for line in access.lines), access.lines
    ours = [r for r in caplog.records if not r.name.startswith(("mail.log", "httpx", "httpcore"))]
    logged = "\n".join(r.getMessage() for r in ours) + "\n".join(access.lines)
    assert email not in logged and email.upper() not in logged
