"""The daily reconciliation (ReconciliationWorkflow) on the real stack: the Temporal dev server, the real
worker and API, the emulator (its own record of what it charged) and an SMTP sink.

A cost the ledger missed is booked once, with the credits Upsampler charged, and the admin is told once;
a day where everything matches sends nothing; an Upsampler job the service never heard of again (an
orphan named only by a lost reply's webhook) is found and booked, a page at a time across continue-as-new;
the daily schedule is created once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest
from sqlmodel import Session, create_engine, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import ScheduleOverlapPolicy, ScheduleRange, WorkflowFailureError
from temporalio.service import RPCError

from activities.reconciliation import ReconciliationReport, ReconciliationRequest
from smi.db import Job, LedgerEntry, OrphanJob, Reconciliation, SubmitIntent, utcnow
from smi.mailsink import text_of
from smi.upsampler import UpsamplerClient
from tests.conftest import ADMIN_KEY, UPSAMPLER_KEY, png_bytes
from tests.helpers import eventually, order, wait_for_status
from worker import create_worker
from workflows.reconciliation import RECONCILIATION_SCHEDULE_ID, ReconciliationWorkflow, ensure_reconciliation_schedule


def db(database_url: str, work):
    """`work(session)` on the test's database, committed; its result."""
    engine = create_engine(database_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            result = work(session)
            session.commit()
            return result
    finally:
        engine.dispose()


def ledger(database_url: str, job_id: str, purpose: str) -> list[LedgerEntry]:
    return db(
        database_url,
        lambda s: list(s.exec(select(LedgerEntry).where(LedgerEntry.job_id == job_id, LedgerEntry.purpose == purpose))),
    )


def charges(stack) -> dict:
    return httpx.get(f"{stack.emulator.url}/_emulator/charges").json()


def admin_mail(stack) -> list:
    return [m for m in stack.mailbox.messages if m["To"] == stack.settings.admin_email]


async def complete(stack, dev_env, order_id: str) -> dict:
    """A real job through POST /v1/jobs, to its end (email and clean-up included)."""
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(40, 30)), order_id, scale_factor=2)
    reply = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    job = await wait_for_status(client, reply.json()["job_id"], {"completed", "failed", "manual_review"}, timeout=90)
    assert job["status"] == "completed", job
    await dev_env.client.get_workflow_handle(f"upscale-{job['job_id']}").result()
    return job


async def reconcile(dev_env, settings, day: str | None, **options) -> ReconciliationReport:
    return await dev_env.client.execute_workflow(
        ReconciliationWorkflow.run,
        ReconciliationRequest(day, **options),
        id=f"reconciliation-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
        execution_timeout=timedelta(minutes=3),
    )


def row(database_url: str, day: str) -> Reconciliation:
    found = db(database_url, lambda s: s.get(Reconciliation, date.fromisoformat(day)))
    assert found is not None, f"no reconciliation row for {day}"
    return found


async def test_a_missed_cost_is_booked_once_and_the_admin_told_once(dev_env, stack_factory, faults):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    settings, database = stack.settings, stack.settings.database_url
    async with create_worker(dev_env.client, settings):
        job = await complete(stack, dev_env, "rec-missed")
        job_id, day = job["job_id"], job["created_at"][:10]
        ((upsampler_id, credits),) = charges(stack)["jobs"].items()
        purpose = f"upscale:{upsampler_id}"
        (booked,) = ledger(database, job_id, purpose)
        assert booked.credits == credits

        def miss(session):  # the ledger "missed" the charge: no row, no cost on the job
            session.delete(session.exec(select(LedgerEntry).where(LedgerEntry.id == booked.id)).one())
            record = session.get_one(Job, job_id)
            record.cost_credits = record.cost_usd = None
            session.add(record)

        db(database, miss)
        assert admin_mail(stack) == []

        report = await reconcile(dev_env, settings, day)
        assert (report.day, report.jobs, report.upsampler_ids, report.booked_now, report.differences) == (
            day,
            1,
            1,
            1,
            1,
        )
        assert (report.booked_credits, report.reported_credits, report.mailed) == (0.0, credits, True)
        (again_booked,) = ledger(database, job_id, purpose)
        assert (again_booked.credits, again_booked.cost_usd) == (credits, booked.cost_usd)
        record = db(database, lambda s: s.get_one(Job, job_id))
        assert (record.cost_credits, record.cost_usd) == (credits, booked.cost_usd)
        assert db(database, lambda s: s.get(OrphanJob, upsampler_id)) is None  # a submission's cost, no orphan

        (mail,) = admin_mail(stack)
        assert mail["Subject"] == f"[upscale] Reconciliation {day}: 1 missed cost booked"
        text = text_of(mail)
        assert f"- job {job_id}, Upsampler {upsampler_id}: booked nothing, charged {credits:.2f}: booked" in text
        assert f"/v1/admin/reconciliation?day={day}" in text
        stored = row(database, day)
        assert (stored.jobs, stored.upsampler_ids, stored.booked_now) == (1, 1, 1)
        assert (stored.booked_credits, stored.reported_credits) == (0.0, credits)
        assert json.loads(stored.differences) == [
            {"job_id": job_id, "upsampler_id": upsampler_id, "booked": None, "reported": credits, "action": "booked"}
        ]

        # The same day again: nothing to book, no second mail; the row still says what the first run booked.
        again = await reconcile(dev_env, settings, day)
        assert (again.booked_now, again.differences, again.mailed) == (0, 0, False)
        assert (again.booked_credits, again.reported_credits) == (credits, credits)
        assert len(ledger(database, job_id, purpose)) == 1
        assert len(admin_mail(stack)) == 1
        second = row(database, day)
        assert (second.booked_now, second.booked_credits, second.differences) == (1, 0.0, stored.differences)


async def test_a_day_that_matches_sends_nothing(dev_env, stack_factory, faults):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    settings = stack.settings
    async with create_worker(dev_env.client, settings):
        jobs = [await complete(stack, dev_env, f"rec-match-{n}") for n in range(2)]
        day = jobs[0]["created_at"][:10]
        total = charges(stack)["total_credits"]
        report = await reconcile(dev_env, settings, day)
        assert (report.jobs, report.upsampler_ids, report.booked_now, report.differences, report.mailed) == (
            2,
            2,
            0,
            0,
            False,
        )
        assert report.booked_credits == report.reported_credits == total
        stored = row(settings.database_url, day)
        assert (stored.booked_now, stored.differences) == (0, "[]")
        # An earlier day with no jobs is reconciled too (an empty row), and quietly.
        empty = await reconcile(dev_env, settings, (date.fromisoformat(day) - timedelta(days=40)).isoformat())
        assert (empty.jobs, empty.upsampler_ids, empty.mailed) == (0, 0, False)
    assert admin_mail(stack) == []


async def test_an_orphan_is_found_and_booked_page_by_page(dev_env, stack_factory, faults):
    """Two jobs, a page each, a run each (continue-as-new): one's cost missed, the other with a second
    Upsampler job that only a lost reply's webhook named (SubmitIntent.reported_id). Both are booked; the
    usage report then equals what the emulator charged."""
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    settings, database = stack.settings, stack.settings.database_url
    async with create_worker(dev_env.client, settings):
        first, second = [await complete(stack, dev_env, f"rec-orphan-{n}") for n in range(2)]
        day = first["created_at"][:10]
        missed_id = db(database, lambda s: s.get_one(Job, first["job_id"])).upsampler_id
        db(database, lambda s: s.delete(ledger_row(s, first["job_id"], f"upscale:{missed_id}")))
        upsampler = UpsamplerClient(settings.upsampler_base_url, UPSAMPLER_KEY)
        try:
            lost = await upsampler.submit(stack.shop.publish(png_bytes(40, 30)), 2, None)
        finally:
            await upsampler.aclose()
        await eventually(lambda: lost.id in charges(stack)["jobs"], what="the lost submit's job charged")
        db(
            database,
            lambda s: s.add(
                SubmitIntent(
                    nonce=uuid.uuid4().hex,
                    job_id=second["job_id"],
                    attempt=9,
                    outcome="abandoned",
                    reported_id=lost.id,
                    created_at=utcnow(),
                )
            ),
        )

        handle = await dev_env.client.start_workflow(
            ReconciliationWorkflow.run,
            ReconciliationRequest(day, jobs_per_batch=1, batches_per_run=1, checks_per_minute=6000),
            id=f"reconciliation-test-{uuid.uuid4().hex[:8]}",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(minutes=3),
        )
        report = await handle.result()
        assert (report.jobs, report.upsampler_ids, report.booked_now, report.differences, report.mailed) == (
            2,
            3,
            2,
            2,
            True,
        )
        first_run = dev_env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
        events = [event async for event in first_run.fetch_history_events()]
        assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW

        orphan = db(database, lambda s: s.get_one(OrphanJob, lost.id))
        assert (orphan.job_id, orphan.found_by, orphan.credits) == (
            second["job_id"],
            "reconciliation",
            lost.credit_cost,
        )
        assert len(ledger(database, second["job_id"], f"upscale:{lost.id}")) == 1
        assert len(ledger(database, first["job_id"], f"upscale:{missed_id}")) == 1
        (mail,) = admin_mail(stack)
        assert mail["Subject"].endswith(": 2 missed costs booked")
        assert lost.id in text_of(mail) and missed_id in text_of(mail)

        # Money matches Upsampler's own record, to the cent.
        today = datetime.now(timezone.utc).date().isoformat()
        usage = stack.client(ADMIN_KEY).get("/v1/admin/usage", params={"period": "day", "from": day, "to": today})
        assert usage.status_code == 200, usage.text
        booked_credits = sum(r["credits"] for r in usage.json()["rows"])
        assert round(booked_credits, 2) == round(charges(stack)["total_credits"], 2) == 3.0


def ledger_row(session: Session, job_id: str, purpose: str) -> LedgerEntry:
    return session.exec(select(LedgerEntry).where(LedgerEntry.job_id == job_id, LedgerEntry.purpose == purpose)).one()


async def test_yesterday_by_default_and_a_bad_day_fails(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        report = await reconcile(dev_env, stack.settings, None)
        yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
        assert report.day in (yesterday, (date.fromisoformat(yesterday) + timedelta(days=1)).isoformat())
        assert (report.jobs, report.mailed) == (0, False)
        with pytest.raises(WorkflowFailureError) as failed:
            await reconcile(dev_env, stack.settings, "2026-13-01")
        assert "not a day" in str(failed.value.cause)


async def test_schedule_created_once_daily_at_four_utc(dev_env, stack_factory):
    stack = stack_factory(dev_env)

    async def delete() -> None:
        with contextlib.suppress(RPCError):
            await dev_env.client.get_schedule_handle(RECONCILIATION_SCHEDULE_ID).delete()

    await delete()
    try:
        assert await ensure_reconciliation_schedule(dev_env.client, stack.settings) is True
        assert await ensure_reconciliation_schedule(dev_env.client, stack.settings) is False  # idempotent
        described = await dev_env.client.get_schedule_handle(RECONCILIATION_SCHEDULE_ID).describe()
        spec = described.schedule.spec
        (calendar,) = spec.calendars
        assert spec.time_zone_name == "UTC" and list(calendar.hour) == [ScheduleRange(4, 4)]
        assert list(calendar.minute) == [ScheduleRange(0)] and list(calendar.second) == [ScheduleRange(0)]
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = described.schedule.action
        assert action.workflow == "ReconciliationWorkflow" and action.task_queue == stack.settings.task_queue
    finally:
        await delete()
