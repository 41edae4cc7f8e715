"""Several `smi worker` processes on one task queue, on the Temporal dev server.

1. Two workers share the load: ten jobs complete and each process ran activities of them
   (counted from its own structured log, where every activity line carries the job_id);
   SIGTERM then stops both at once with exit code 0.
2. SIGTERM in the middle of a slow download: the worker stops polling, gives the download
   its grace period (SMI_WORKER_SHUTDOWN_SECONDS), cancels it and exits 0; the other worker
   resumes the file from the heartbeat with a `Range` request, and the job completes with the
   right bytes, one email and one ledger row.
3. SIGTERM with a grace period longer than the download: the download finishes on the
   stopping worker (one CDN request, no retry), which then exits 0; the other does the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import time

import httpx

from smi.settings import Settings
from tests import test_crash_and_reset
from tests.conftest import png_bytes
from tests.helpers import ledger_rows, mail_rows, order, wait_for_status
from tests.test_crash_and_reset import Workers, download_attempts, emulator_counts, pending_download
from workflows.upscale import UpscaleWorkflow

MB = 1024 * 1024
# The fixture of worker subprocesses, shared with test_crash_and_reset (assigned, not imported: the tests
# below take it by name as a parameter).
workers = test_crash_and_reset.workers


def log_lines(workers: Workers, proc: subprocess.Popen) -> list[dict]:
    """The JSON lines of one worker's log (worker-N.log, N its start order)."""
    path = workers.log_dir / f"worker-{workers.started.index(proc) + 1}.log"
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def wait_until_polling(workers: Workers, *procs: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        while not any(line["message"].startswith("worker polling") for line in log_lines(workers, proc)):
            assert proc.poll() is None, f"a worker died at start\n{workers.logs()}"
            assert time.monotonic() < deadline, f"a worker did not start polling\n{workers.logs()}"
            await asyncio.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds it took)."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - began


async def test_two_workers_share_the_jobs_and_stop_cleanly(dev_env, stack_factory, faults, workers):
    began = time.monotonic()
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=5)
    first, second = workers.start(stack.settings), workers.start(stack.settings)
    await wait_until_polling(workers, first, second)
    client = stack.client()

    async def submit(n: int) -> str:
        body = order(stack.shop.publish(png_bytes(40, 30)), f"wk-share-{n}", scale_factor=2)
        created = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        return created.json()["job_id"]

    job_ids = await asyncio.gather(*(submit(n) for n in range(10)))
    try:
        jobs = await asyncio.gather(
            *(
                wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=45)
                for job_id in job_ids
            )
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from None
    assert [job["status"] for job in jobs] == ["completed"] * 10
    finished = time.monotonic()

    # Both stop at once (nothing is running), exit 0, and say so.
    for proc in (first, second):
        code, took = stop(proc, timeout=15)
        assert code == 0 and took < 10, (code, took, workers.logs())

    # Each process ran activities, each line of them naming its job; together, all of every job's.
    ran = []
    for proc in (first, second):
        lines = log_lines(workers, proc)
        activity_lines = [line for line in lines if "activity" in line]
        assert all(line.get("job_id") in job_ids for line in activity_lines), activity_lines
        assert all(line["pid"] == proc.pid for line in lines)
        assert any(line["message"] == "worker stopped" for line in lines)
        ran.append({line["job_id"] for line in activity_lines})
    assert ran[0] and ran[1], f"one worker ran nothing: {[len(r) for r in ran]}"
    assert ran[0] | ran[1] == set(job_ids)
    for job_id in job_ids:
        assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    print(
        f"\ntwo workers: 10 jobs in {finished - began:.1f} s; jobs with activities on each worker: "
        f"{len(ran[0])} and {len(ran[1])}"
    )


async def start_slow_download(dev_env, stack_factory, faults, workers, grace: float, order_id: str):
    """A job whose ~6 MB result downloads at 1 MB/s on a first worker: (stack, job_id, handle, worker),
    once the server holds a heartbeat with progress."""
    faults(delay_seconds=0.2, cdn_bytes_per_second=1 * MB)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=5, worker_shutdown_seconds=grace)
    first = workers.start(stack.settings)
    await wait_until_polling(workers, first)
    body = order(stack.shop.publish(png_bytes(600, 600)), order_id, scale_factor=4)
    created = await asyncio.to_thread(stack.client().post, "/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
    deadline = time.monotonic() + 30
    while True:
        assert first.poll() is None, f"the worker died by itself\n{workers.logs()}"
        beat, attempt = await pending_download(handle, dev_env.client.data_converter)
        if beat:
            break
        assert time.monotonic() < deadline, f"no download in progress\n{workers.logs()}"
        await asyncio.sleep(0.1)
    assert attempt == 1
    return stack, job_id, handle, first


async def test_sigterm_mid_download_hands_the_rest_to_the_other_worker(dev_env, stack_factory, faults, workers):
    began = time.monotonic()
    grace = 1.0  # much shorter than the download
    stack, job_id, handle, first = await start_slow_download(
        dev_env, stack_factory, faults, workers, grace, "wk-sigterm"
    )
    client = stack.client()
    second = workers.start(stack.settings)  # takes over once the first is gone

    code, took = await asyncio.to_thread(stop, first, grace + 10)
    assert code == 0, workers.logs()
    assert took < grace + 5, f"shutdown took {took:.1f} s\n{workers.logs()}"
    stopped_at = time.monotonic()
    first_lines = log_lines(workers, first)
    assert any(line["message"].startswith("SIGTERM: stopping") for line in first_lines)
    assert not any(line["message"].startswith("result downloaded") for line in first_lines)

    faults(delay_seconds=0.2, cdn_bytes_per_second=25 * MB)  # the rest, still through the throttled path
    try:
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=45)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from None
    finished = time.monotonic()
    assert job["status"] == "completed", (job, workers.logs())

    # The cancelled attempt was reported failed, so the retry started at once (no heartbeat timeout) ...
    assert await download_attempts(handle) == [
        (2, "Worker is shutting down and this activity did not complete in time")
    ]
    # ... on the second worker, resuming the file where a heartbeat left it, with a Range request.
    resumed = [
        line
        for line in log_lines(workers, second)
        if line.get("activity") == "download_result" and line["message"].startswith("resuming")
    ]
    assert len(resumed) == 1 and resumed[0]["job_id"] == job_id and resumed[0]["attempt"] == 2, workers.logs()
    resumed_at = int(resumed[0]["message"].rsplit(" ", 1)[1])
    jobs, counts = emulator_counts(stack.emulator.url)
    assert len(jobs) == 1 and counts["submit"] == 1
    assert counts["cdn"] == 2 and counts["cdn_range"] == 1

    # The right bytes, once each: one email, one ledger row.
    made = (stack.emulator.state.storage_dir / jobs[0]["id"] / "result.png").read_bytes()
    faults()
    handed_out = httpx.get(job["download_url"], timeout=60).content
    assert 0 < resumed_at < len(made)
    assert job["output"]["sha256"] == hashlib.sha256(made).hexdigest() == hashlib.sha256(handed_out).hexdigest()
    await handle.result()  # through the email and the clean-up
    assert len(stack.mailbox.messages) == 1
    assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    print(
        f"\nSIGTERM mid-download: stopped in {took:.1f} s (grace {grace:.0f} s), resumed at "
        f"{resumed_at / MB:.1f} of {len(made) / MB:.1f} MB, completed {finished - stopped_at:.1f} s "
        f"after the stop, {finished - began:.1f} s in all"
    )


def test_the_shutdown_grace_period_is_a_setting():
    assert Settings(env="dev").worker_shutdown_seconds == 30
    assert Settings(env="dev", worker_shutdown_seconds=5).worker_shutdown_seconds == 5


async def test_sigterm_with_enough_grace_lets_the_download_finish_there(dev_env, stack_factory, faults, workers):
    grace = 30.0  # longer than the download
    stack, job_id, handle, first = await start_slow_download(dev_env, stack_factory, faults, workers, grace, "wk-grace")
    second = workers.start(stack.settings)
    code, took = await asyncio.to_thread(stop, first, grace)
    assert code == 0, workers.logs()
    # The first worker finished its download (attempt 1, one CDN request, no Range), then exited;
    # the second did the rest of the job.
    first_lines = log_lines(workers, first)
    assert [line["attempt"] for line in first_lines if line["message"].startswith("result downloaded")] == [1]
    job = await wait_for_status(stack.client(), job_id, {"completed", "failed", "manual_review"}, timeout=30)
    assert job["status"] == "completed", (job, workers.logs())
    assert await download_attempts(handle) == [(1, "")]
    counts = emulator_counts(stack.emulator.url)[1]
    assert counts["cdn"] == 1 and counts["cdn_range"] == 0
    await handle.result()  # "completed" is set before the email is sent: wait for the workflow's end
    assert any(line.get("activity") == "send_email" for line in log_lines(workers, second)), workers.logs()
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    print(f"\nSIGTERM with {grace:.0f} s grace: the download finished and the worker stopped in {took:.1f} s")
