"""Lost submit replies and orphaned Upsampler jobs, end to end (issue 16), on the real stack: the Temporal dev
server, the API on a loopback port, the emulator as an HTTP server (its own record of the jobs it holds and the
credits it charged), the SMTP sink and SQLite.

1. Upsampler accepts the submit and the connection drops before its reply (`drop_submit_replies`): the one job
   it holds is adopted from its webhook, nothing is submitted again, one email, one cost, as charged.
2. The same with the worker SIGKILLed while its POST waits for the reply (`hold_submit_replies`, `smi worker`
   processes): the next worker retries the submit after its 10-second heartbeat timeout (the submit heartbeats
   while its request is out), finds the intent without a reply and adopts the job the webhook named.
3. A second accepted job forced by faults (the first reply dropped and its webhook held by the emulator, `webhook:
   "held"`): the workflow gives up waiting for it, submits again and completes with the second job; only then is
   the first job's webhook released, which books it as an orphan, and the usage report then equals the
   emulator's charges to the cent.

Before issue 16 the submit's retry POSTed again (two jobs at the emulator, one booked): each test fails there.
"""

from __future__ import annotations

import asyncio
import io
import signal
import time
from collections import Counter
from datetime import datetime, timezone

import httpx
from PIL import Image
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import WorkflowHandle

from smi.db import Job, OrphanJob, Submission, SubmitIntent
from tests import test_crash_and_reset
from tests.conftest import ADMIN_KEY
from tests.helpers import eventually, ledger_rows, mail_rows, order, rows, wait_for_status
from tests.test_crash_and_reset import TERMINAL
from tests.test_reconciliation import db
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

# x4: 2400 x 1800 = 4.32 megapixels, 1.08 credits (0.25 a megapixel, rounded up to the cent): not a whole number.
W, H, SCALE, CREDITS = 600, 450, 4, 1.08
# `smi worker` processes, killed after the test (assigned, not imported: test 2 takes it by name).
workers = test_crash_and_reset.workers


def gradient_png() -> bytes:
    """A smooth image: small as PNG at 4.32 megapixels, so the emulator and the worker handle it quickly."""
    image = Image.linear_gradient("L").resize((W, H)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def place(dev_env, stack, order_id: str) -> tuple[str, WorkflowHandle]:
    """An order through POST /v1/jobs: its job id and workflow."""
    body = order(stack.shop.publish(gradient_png()), order_id, scale_factor=SCALE)
    created = await asyncio.to_thread(stack.client().post, "/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    return job_id, dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")


async def finished(stack, job_id: str, handle: WorkflowHandle, timeout: float, logs=lambda: "") -> dict:
    """The job once completed (its workflow through its clean-up); anything else fails the test."""
    try:
        job = await wait_for_status(stack.client(), job_id, TERMINAL, timeout=timeout)
        await asyncio.wait_for(handle.result(), 30)
    except (AssertionError, asyncio.TimeoutError) as exc:
        raise AssertionError(f"{exc!r}\nemulator jobs: {emulator(stack, 'jobs')}\n{logs()}") from None
    assert job["status"] == "completed", (job, logs())
    return job


def emulator(stack, what: str):
    """GET /_emulator/<what>: jobs, charges, requests, faults."""
    return httpx.get(f"{stack.emulator.url}/_emulator/{what}").json()


def row(database: str, model, key):
    """The row of `model` with primary key `key`, or None."""
    return db(database, lambda session: session.get(model, key))


def intents(database: str, job_id: str) -> list[tuple[int, str | None, str | None]]:
    """(attempt, outcome, reported_id) of the job's submit intents, by attempt."""
    return sorted((i.attempt, i.outcome, i.reported_id) for i in rows(database, SubmitIntent, job_id))


def submissions(database: str, job_id: str) -> list[tuple[int, str]]:
    return sorted((s.attempt, s.upsampler_id) for s in rows(database, Submission, job_id))


def charges_booked(database: str, job_id: str) -> dict[str, float]:
    """The job's ledger charges: Upsampler id -> credits (a purpose booked twice would fail the comparison)."""
    booked = [(entry.purpose.removeprefix("upscale:"), entry.credits) for entry in ledger_rows(database, job_id)]
    assert len({upsampler_id for upsampler_id, _ in booked}) == len(booked), booked
    return dict(booked)


def one_customer_email(stack, job_id: str) -> None:
    assert [m.purpose for m in mail_rows(stack.settings.database_url, job_id)] == ["completed:1"]
    assert [m["To"] for m in stack.mailbox.messages] == ["ana@example.com"]


async def activity_names(handle: WorkflowHandle) -> dict[int, str]:
    """The activities the workflow scheduled: event id -> activity type (a retry is another attempt of one)."""
    return {
        event.event_id: event.activity_task_scheduled_event_attributes.activity_type.name
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }


async def retried_after_timeouts(handle: WorkflowHandle) -> list[tuple[str, int, str]]:
    """(activity, attempt, timeout) of each attempt that followed one that timed out (the history records only
    the attempt that ended an activity, with the failure before it)."""
    names = await activity_names(handle)
    return [
        (names[started.scheduled_event_id], started.attempt, TimeoutType.Name(timeout.timeout_type))
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        for started in [event.activity_task_started_event_attributes]
        for timeout in [started.last_failure.timeout_failure_info]
        if started.last_failure.HasField("timeout_failure_info")
    ]


def adopted_once(stack, job_id: str) -> tuple[str, float]:
    """The checks of tests 1 and 2: Upsampler holds one job, adopted as attempt 1, booked once as charged.
    Returns its (id, credits)."""
    database = stack.settings.database_url
    jobs = emulator(stack, "jobs")
    assert len(jobs) == 1, f"Upsampler holds {len(jobs)} jobs for one order: {jobs}"
    assert emulator(stack, "requests")["submit"] == 1
    upsampler_id = jobs[0]["id"]
    assert row(database, Job, job_id).upsampler_id == upsampler_id
    assert intents(database, job_id) == [(1, "adopted", upsampler_id)]
    assert submissions(database, job_id) == [(1, upsampler_id)]
    charged = emulator(stack, "charges")
    assert charged == {"jobs": {upsampler_id: CREDITS}, "total_credits": CREDITS}
    assert charges_booked(database, job_id) == {upsampler_id: CREDITS}
    assert rows(database, OrphanJob, job_id) == []
    one_customer_email(stack, job_id)
    return upsampler_id, CREDITS


# --- 1. the connection drops before the submit's reply ------------------------------------------------------


async def test_a_dropped_submit_reply_is_adopted_not_submitted_again(
    dev_env, stack_factory, faults, quick_early_webhooks
):
    began = time.monotonic()
    faults(delay_seconds=0.1, drop_submit_replies=1)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1, processing_timeout_seconds=30)
    async with create_worker(dev_env.client, stack.settings):
        job_id, handle = await place(dev_env, stack, "orphans-drop")
        await finished(stack, job_id, handle, timeout=60)
    assert emulator(stack, "faults")["drop_submit_replies"] == 0  # the fault did happen
    adopted_once(stack, job_id)
    scheduled = Counter((await activity_names(handle)).values())
    assert (scheduled["submit_upscale"], scheduled["adopt_submission"]) == (1, 1)
    print(f"\ndropped reply adopted: {time.monotonic() - began:.1f} s")


# --- 2. the worker SIGKILLed with the submit's POST in flight ------------------------------------------------


async def test_a_worker_killed_with_its_submit_in_flight_leaves_one_job_adopted(
    dev_env, stack_factory, faults, workers, quick_early_webhooks
):
    began = time.monotonic()
    faults(delay_seconds=0.1, hold_submit_replies=1)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1, processing_timeout_seconds=60)
    database = stack.settings.database_url
    first = workers.start(stack.settings)
    job_id, handle = await place(dev_env, stack, "orphans-kill")

    # Upsampler accepted the job and holds its reply; the intent has no outcome: the POST is in flight.
    (held,) = await eventually(lambda: emulator(stack, "jobs"), timeout=60, what="the submit accepted")
    assert first.poll() is None, workers.logs()
    assert stack.emulator.server.server_state.connections, "the held POST's connection is gone"
    assert [(attempt, outcome) for attempt, outcome, _ in intents(database, job_id)] == [(1, None)]
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    killed = time.monotonic()
    # The job runs on and calls its webhook, whose nonce names the intent: the id is recorded for adoption.
    await eventually(
        lambda: intents(database, job_id) == [(1, None, held["id"])], timeout=30, what="the webhook's id recorded"
    )
    workers.start(stack.settings)

    await finished(stack, job_id, handle, timeout=90, logs=workers.logs)
    assert adopted_once(stack, job_id)[0] == held["id"]
    # The submit ran again once its heartbeats stopped (not after its minute-long start-to-close timeout),
    # and adopted instead of POSTing.
    assert await retried_after_timeouts(handle) == [("submit_upscale", 2, "TIMEOUT_TYPE_HEARTBEAT")]
    scheduled = Counter((await activity_names(handle)).values())
    assert (scheduled["submit_upscale"], scheduled["adopt_submission"]) == (1, 1)
    print(
        f"\nworker killed mid-submit: completed {time.monotonic() - killed:.1f} s after the kill, "
        f"{time.monotonic() - began:.1f} s in all"
    )


# --- 3. a second job forced by faults, booked from its webhook ------------------------------------------------

# The workflow waits PROCESSING seconds for the webhook of a submit whose reply was lost, after the submit's
# retry (2 s) found it lost; the first job's webhook is held at the emulator until the order has completed.
PROCESSING = 2.0


async def test_a_second_job_forced_by_faults_is_booked_from_its_webhook(
    dev_env, stack_factory, faults, quick_early_webhooks
):
    began = time.monotonic()
    # Job-level faults (the held webhook) for the first job only; the dropped reply is the first accepted submit.
    faults(delay_seconds=0.1, drop_submit_replies=1, webhook="held", faulty_jobs=1)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1, processing_timeout_seconds=PROCESSING)
    database = stack.settings.database_url
    async with create_worker(dev_env.client, stack.settings):
        job_id, handle = await place(dev_env, stack, "orphans-second")
        job = await finished(stack, job_id, handle, timeout=60)
        completed_at = time.monotonic()

        # Two jobs at Upsampler: the workflow gave up waiting for the first and completed with the second.
        jobs = emulator(stack, "jobs")
        assert len(jobs) == 2, (jobs, intents(database, job_id))
        second = row(database, Job, job_id).upsampler_id
        (first,) = [j["id"] for j in jobs if j["id"] != second]
        assert charges_booked(database, job_id) == {second: CREDITS}

        def first_job() -> dict:
            return next(j for j in emulator(stack, "jobs") if j["id"] == first)

        # The first job done at Upsampler (its webhook held, so none sent), then its webhook released.
        await eventually(lambda: first_job()["status"] == "SUCCESS", timeout=30, what="the first job done")
        assert first_job()["webhooks_sent"] == []
        released = httpx.post(f"{stack.emulator.url}/_emulator/webhooks/release")
        assert released.json() == {"released": 1}, released.text

        # The released webhook, answered once the API has booked what it must.
        hooks = await eventually(
            lambda: first_job()["webhooks_sent"], timeout=30, what="the first job's released webhook"
        )
        assert hooks == [{"status": "SUCCESS", "code_or_error": 200}]

    # Booked once with its creditCost: the ledger holds what Upsampler charged, job by job.
    charged = emulator(stack, "charges")
    assert charged == {"jobs": {first: CREDITS, second: CREDITS}, "total_credits": round(2 * CREDITS, 6)}
    assert charges_booked(database, job_id) == charged["jobs"]
    record = row(database, Job, job_id)
    assert record.cost_credits == charged["total_credits"]
    # Nothing else about the job changed: still completed with the second job, one email.
    assert (record.status, record.upsampler_id) == ("completed", second)
    one_customer_email(stack, job_id)

    # The usage report (GET /v1/admin/usage) equals what Upsampler charged, to the cent.
    today = datetime.now(timezone.utc).date().isoformat()
    usage = stack.client(ADMIN_KEY).get(
        "/v1/admin/usage", params={"period": "day", "from": job["created_at"][:10], "to": today}
    )
    assert usage.status_code == 200, usage.text
    reported = sum(r["credits"] for r in usage.json()["rows"])
    assert f"{reported:.2f}" == f"{charged['total_credits']:.2f}" == f"{2 * CREDITS:.2f}"

    # How it was booked: an orphan found by its webhook; the first submit's intent abandoned, no id reported for it.
    orphan = row(database, OrphanJob, first)
    assert orphan is not None and (orphan.job_id, orphan.credits, orphan.found_by) == (job_id, CREDITS, "webhook")
    assert [o.upsampler_id for o in rows(database, OrphanJob, job_id)] == [first]
    assert intents(database, job_id) == [(1, "abandoned", None), (2, "accepted", None)]
    assert submissions(database, job_id) == [(2, second)]
    print(
        f"\nsecond job booked as an orphan: completed in {completed_at - began:.1f} s, "
        f"orphan booked {time.monotonic() - completed_at:.1f} s later"
    )
