"""Operations on the Temporal dev server that tests in one process cannot show.

1. A worker process SIGKILLed in the middle of a large, throttled download: a new worker
   resumes the file from the last heartbeat with a `Range` request, and the job completes
   with the right bytes, one email and one ledger row.
2. `temporal workflow reset --type FirstWorkflowTask` of a finished job (completed, or
   failed and refunded): the new run replays every step against the records the first run
   left, so nothing is charged, submitted, mailed or refunded twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlmodel import Session, create_engine
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import WorkflowHandle

from devstack import settings_environment
from smi.db import Refund
from smi.serve import ServerThread
from smi.settings import Settings
from tests.conftest import UPSAMPLER_KEY, WEBHOOK_SECRET, png_bytes
from tests.helpers import ledger_rows, mail_rows, order, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

BIN = Path(sys.executable).parent
TERMINAL = {"completed", "failed", "manual_review"}
MB = 1024 * 1024


# --- fixtures ---------------------------------------------------------------------------------


class Workers:
    """`smi worker` processes started by one test; whatever still runs is killed afterwards."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(self, settings: Settings) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.started) + 1}.log", "wb")
        proc = subprocess.Popen(
            [str(BIN / "smi"), "worker"],
            env=settings_environment(settings),
            cwd=self.log_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.log_dir.glob("worker-*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path):
    log_dir = tmp_path / "workers"
    log_dir.mkdir()
    started = Workers(log_dir)
    yield started
    started.stop_all()


class RefundDesk:
    """The storefront's refund endpoint: records each signed POST and answers 200."""

    def __init__(self):
        self.received: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/refunds")
        async def refund(request: Request):
            body = await request.body()
            self.received.append({"body": json.loads(body), "raw": body, "headers": dict(request.headers)})
            return {"id": f"re_test_{len(self.received)}"}


@pytest.fixture
def refund_desk():
    desk = RefundDesk()
    with ServerThread(desk.app) as server:
        desk.url = f"{server.url}/refunds"
        yield desk


# --- helpers ----------------------------------------------------------------------------------


async def temporal_cli(address: str, *args: str) -> str:
    command = [
        str(BIN / "temporal"),
        *args,
        "--address",
        address,
        "--namespace",
        "default",
        "--disable-config-file",
        "--disable-config-env",
    ]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(args)} failed: {done.stdout}\n{done.stderr}"
    return done.stdout


async def reset_to_first_task(address: str, workflow_id: str) -> str:
    """Reset with the CLI and return the new run's ID."""
    out = await temporal_cli(
        address,
        "workflow",
        "reset",
        "--workflow-id",
        workflow_id,
        "--type",
        "FirstWorkflowTask",
        "--reason",
        "test: reset to the first workflow task",
        "--output",
        "json",
    )
    return json.loads(out)["runId"]


async def pending_download(handle: WorkflowHandle, converter) -> tuple[int | None, int]:
    """(bytes done in the last heartbeat the server holds, attempt) of the running download, if any."""
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name == "download_result":
            done = None
            if pending.HasField("heartbeat_details") and pending.heartbeat_details.payloads:
                done = (await converter.decode(pending.heartbeat_details.payloads))[0]
            return done, pending.attempt
    return None, 0


async def download_attempts(handle: WorkflowHandle) -> list[tuple[int, str]]:
    """(attempt, why the previous attempt ended) of each download_result in the history.

    The history records only the attempt that ended the activity, with the last failure before it."""
    scheduled = set()
    attempts = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if event.activity_task_scheduled_event_attributes.activity_type.name == "download_result":
                scheduled.add(event.event_id)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if started.scheduled_event_id in scheduled:
                failure = started.last_failure
                why = (
                    TimeoutType.Name(failure.timeout_failure_info.timeout_type)
                    if failure.HasField("timeout_failure_info")
                    else failure.message
                )
                attempts.append((started.attempt, why))
    return attempts


async def finished_run(handle: WorkflowHandle, timeout: float = 40.0):
    """The run's result (its JobState), through its clean-up; a run that hangs fails the test."""
    try:
        return await asyncio.wait_for(handle.result(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"workflow {handle.id} run {handle.run_id} did not finish in {timeout:.0f} s") from None


def refund_row(database_url: str, job_id: str) -> Refund | None:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return session.get(Refund, job_id)
    finally:
        engine.dispose()


def emulator_counts(url: str) -> tuple[list[dict], dict]:
    return httpx.get(f"{url}/_emulator/jobs").json(), httpx.get(f"{url}/_emulator/requests").json()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- 1. a worker killed in the middle of a large download ---------------------------------------


async def test_worker_killed_mid_download_resumes_with_range(dev_env, stack_factory, faults, workers):
    began = time.monotonic()
    # ~25 MB PNG at 2.5 MB/s: about 10 s for the whole file, so the kill lands in the middle.
    faults(delay_seconds=0.2, cdn_bytes_per_second=2.5 * MB)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=5)
    first = workers.start(stack.settings)
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(1200, 1200)), "wc-crash", scale_factor=4)
    created = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
    tmp = stack.settings.storage_dir / "jobs" / job_id / "tmp"

    # Wait until the .part file is a few MB long and the server holds a heartbeat with progress.
    deadline = time.monotonic() + 45
    while True:
        assert first.poll() is None, f"the worker died by itself\n{workers.logs()}"
        parts = list(tmp.glob("*.part")) if tmp.exists() else []
        size = parts[0].stat().st_size if parts else 0
        beat, attempt = await pending_download(handle, dev_env.client.data_converter) if size else (None, 0)
        if size > 4 * MB and beat:
            break
        assert time.monotonic() < deadline, f"no download in progress (part {size} bytes)\n{workers.logs()}"
        await asyncio.sleep(0.1)
    assert attempt == 1
    ready_at = time.monotonic()

    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    killed_at = time.monotonic()
    total = parts[0].stat().st_size
    assert beat <= total  # flushed before the heartbeat: the resume point is on disk
    # The rest, still throttled (so the Range goes through the throttled path), but faster.
    faults(delay_seconds=0.2, cdn_bytes_per_second=25 * MB)
    workers.start(stack.settings)

    try:
        job = await wait_for_status(client, job_id, TERMINAL, timeout=60)
    except AssertionError as exc:
        pending = (await handle.describe()).raw_description.pending_activities
        raise AssertionError(f"{exc}\npending: {pending}\n{workers.logs()}") from None
    finished = time.monotonic()
    assert job["status"] == "completed", (job, workers.logs())
    state = await finished_run(handle)
    assert state.status == "completed"

    # The second attempt started after the heartbeat timeout and asked only for the rest.
    assert await download_attempts(handle) == [(2, "TIMEOUT_TYPE_HEARTBEAT")]
    jobs, counts = emulator_counts(stack.emulator.url)
    assert len(jobs) == 1 and counts["submit"] == 1
    assert counts["cdn"] == 2 and counts["cdn_range"] == 1

    # The right bytes: what the emulator made, what its CDN serves, what we stored and hand out.
    upsampler_id = jobs[0]["id"]
    made = (stack.emulator.state.storage_dir / upsampler_id / "result.png").read_bytes()
    status = httpx.get(
        f"{stack.emulator.url}/api/v1/status/{upsampler_id}", headers={"Authorization": f"Bearer {UPSAMPLER_KEY}"}
    ).json()
    faults()  # unthrottled for the checks
    served = httpx.get(status["imageUrl"], timeout=60).content
    stored = (stack.settings.storage_dir / "jobs" / job_id / "upscaled_4800x4800.png").read_bytes()
    handed_out = httpx.get(job["download_url"], timeout=60).content
    assert len(made) > 20 * MB and beat < len(made) // 2
    assert job["output"]["sha256"] == sha256(made) == sha256(served) == sha256(stored) == sha256(handed_out)
    assert job["output"]["bytes"] == len(made)
    assert (job["output"]["width"], job["output"]["height"]) == (4800, 4800)
    assert not tmp.exists()

    # Once each: one email, one ledger row. The run has ended (finished_run above): no mail can follow.
    assert len(stack.mailbox.messages) == 1
    assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    print(
        f"\ncrash test: {beat / MB:.1f} MB heartbeated, {total / MB:.1f} MB on disk of {len(made) / MB:.1f} MB; "
        f"killed {ready_at - began:.1f} s after submit, completed {finished - killed_at:.1f} s "
        f"after the kill, {finished - began:.1f} s in all"
    )


# --- 2. reset to the first workflow task --------------------------------------------------------


async def test_reset_of_a_completed_job_charges_submits_and_mails_nothing_again(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2)
    # The reapplied webhook signal is ignored by the new run (it came before any submission
    # there), so the new run learns the result by polling after poll_initial_delay_seconds.
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1)
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(64, 48)), "wc-reset-ok", scale_factor=2)
    address = dev_env.client.service_client.config.target_host
    db = stack.settings.database_url

    async with create_worker(dev_env.client, stack.settings):
        job_id = (await asyncio.to_thread(client.post, "/v1/jobs", json=body)).json()["job_id"]
        workflow_id = f"upscale-{job_id}"
        first = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id)
        assert (await finished_run(first)).status == "completed"
        before = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()
        assert before["status"] == "completed"
        await asyncio.to_thread(stack.mailbox.wait_for, 1)
        first_run = (await first.describe()).run_id

        began = time.monotonic()
        new_run = await reset_to_first_task(address, workflow_id)
        assert new_run != first_run
        state = await finished_run(
            dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id, run_id=new_run)
        )
        took = time.monotonic() - began
        assert state.status == "completed"
        # The first run's webhook signal was reapplied to the new run before it had submitted
        # anything, so it was counted and ignored; one status poll found the result.
        assert state.webhooks == 1 and state.polls == 1 and state.attempt == 1
        after = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()

    # The job is as it was: same file, same link (generation 1), still working.
    assert after["status"] == "completed"
    for key in ("output", "download_url", "download_expires_at", "cost", "refund", "error"):
        assert after[key] == before[key], key
    assert after["refund"] is None and refund_row(db, job_id) is None
    assert httpx.get(after["download_url"]).status_code == 200

    # Upsampler saw one submission (the reset found it under (job, attempt 1)) and one status poll.
    jobs, counts = emulator_counts(stack.emulator.url)
    assert len(jobs) == 1 and counts["submit"] == 1
    assert jobs[0]["status_requests"] >= 1
    # One ledger row, one email: the completion mail is keyed by job and link generation.
    assert len(ledger_rows(db, job_id)) == 1
    # Both runs have ended (finished_run above): no mail can follow the one counted here.
    assert len(stack.mailbox.messages) == 1
    assert [(m.purpose, m.status) for m in mail_rows(db, job_id)] == [("completed:1", "sent")]
    print(f"\nreset of a completed job: new run done {took:.1f} s after the reset")


async def test_reset_of_a_refunded_job_refunds_and_mails_once(dev_env, stack_factory, faults, refund_desk):
    faults(refuse_with="unsupported image format")
    stack = stack_factory(
        dev_env, refund_adapter="webhook", refund_webhook_url=refund_desk.url, poll_initial_delay_seconds=1
    )
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(64, 48)), "wc-reset-refund", scale_factor=2)
    address = dev_env.client.service_client.config.target_host
    db = stack.settings.database_url

    async with create_worker(dev_env.client, stack.settings):
        job_id = (await asyncio.to_thread(client.post, "/v1/jobs", json=body)).json()["job_id"]
        workflow_id = f"upscale-{job_id}"
        first = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id)
        assert (await finished_run(first)).status == "failed"
        before = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()
        await asyncio.to_thread(stack.mailbox.wait_for, 2)  # the customer's and the admin's
        assert len(refund_desk.received) == 1
        submits_before = emulator_counts(stack.emulator.url)[1]["submit"]

        began = time.monotonic()
        new_run = await reset_to_first_task(address, workflow_id)
        state = await finished_run(
            dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id, run_id=new_run)
        )
        took = time.monotonic() - began
        assert state.status == "failed" and state.refund.status == "refunded"
        after = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()

    assert before["status"] == after["status"] == "failed"
    assert after["error"]["code"] == "unsupported_format"
    assert (
        after["refund"]
        == before["refund"]
        == {"status": "refunded", "amount_cents": 1299, "reason": "unsupported_format"}
    )
    # One refund request, signed; the reset's run found the refund row and paid nothing.
    assert len(refund_desk.received) == 1
    request = refund_desk.received[0]
    assert request["body"]["job_id"] == job_id and request["body"]["amount_cents"] == 1299
    expected = hmac.new(WEBHOOK_SECRET.encode(), request["raw"], hashlib.sha256).hexdigest()
    assert request["headers"]["x-smi-signature"] == f"sha256={expected}"
    row = refund_row(db, job_id)
    assert (row.status, row.external_id) == ("refunded", "re_test_1")
    # One failure email to the customer, one notice to the admin, none again; nothing booked. Both runs
    # have ended (finished_run above): no mail can follow those counted here.
    recipients = sorted(m["To"] for m in stack.mailbox.messages)
    assert recipients == ["admin@localhost", "ana@example.com"]
    assert sorted(m.purpose for m in mail_rows(db, job_id)) == ["admin:refund:1", "failed:1"]
    assert ledger_rows(db, job_id) == []
    # The refusal was recorded under its (job, attempt) key: the reset did not ask Upsampler again.
    assert emulator_counts(stack.emulator.url)[1]["submit"] == submits_before
    print(f"\nreset of a refunded job: new run done {took:.1f} s after the reset")
