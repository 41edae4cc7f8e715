"""The s3 storage backend end to end, against a real S3 server (SeaweedFS on loopback), the Temporal
dev server, the emulator, the shop and a real SMTP sink. The API and two `smi worker` processes
share no directory: each has its own empty SMI_STORAGE_DIR (for scratch copies only), so every
step reads what the step before stored in the bucket, whichever process ran it.

1. The whole path: an order for a shop image and one for an image uploaded to us complete (the
   worker downloading the shop job's result is stopped with SIGTERM, so the other validates and
   stores the object it left: one job's steps on two hosts); the email's link answers 303 to a
   presigned URL of the bucket that gives the right bytes (Range too); HEAD answers the size and
   counts nothing; the bucket holds the original and the result, no temporary object, no
   unfinished upload; no process keeps a scratch copy.
2. A worker SIGKILLed while it streams a result into a multipart upload: the other worker resumes
   the upload from the heartbeat (upload id and parts) with a `Range` request, so the CDN serves
   at most one heartbeat interval twice; one email, one ledger row, the stored bytes are the CDN's.
"""

from __future__ import annotations

import asyncio
import io
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
from PIL import Image
from sqlmodel import Session, create_engine, select

from smi.db import DownloadToken, Job
from smi.mailsink import text_of
from smi.settings import Settings
from smi.storage import PART_BYTES, PARTS_IN_FLIGHT
from tests import test_crash_and_reset
from tests.conftest import png_bytes
from tests.helpers import ledger_rows, mail_rows, order, wait_for_status
from tests.test_crash_and_reset import (
    Workers,
    download_attempts,
    emulator_counts,
    finished_run,
    pending_download,
    sha256,
)
from tests.test_workers import log_lines, stop
from workflows.upscale import UpscaleWorkflow

MB = 1024 * 1024
TERMINAL = {"completed", "failed", "manual_review"}
# The fixture of worker subprocesses (assigned, not imported: the tests take it by name as a parameter).
workers = test_crash_and_reset.workers


def start_workers(workers: Workers, settings: Settings, tmp_path: Path, count: int = 2) -> list[Path]:
    """`count` worker processes with the stack's settings, each with its own empty storage folder."""
    folders = []
    for n in range(1, count + 1):
        folder = tmp_path / f"worker-{n}-storage"
        folder.mkdir()
        workers.start(settings.model_copy(update={"storage_dir": folder}))
        folders.append(folder)
    return folders


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def bucket_prefix(settings: Settings) -> str:
    return settings.storage_url.split("/", 3)[3]


def db_job(database_url: str, job_id: str) -> tuple[Job, list[DownloadToken]]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            tokens = list(session.exec(select(DownloadToken).where(DownloadToken.job_id == job_id)).all())
            return session.get_one(Job, job_id), tokens
    finally:
        engine.dispose()


async def submit(client: httpx.Client, body: dict) -> str:
    created = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    return created.json()["job_id"]


async def completed(client, dev_env, workers: Workers, job_id: str, timeout: float = 90) -> dict:
    """The job once completed, its workflow ended (through the email and the clean-up)."""
    try:
        job = await wait_for_status(client, job_id, TERMINAL, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.logs()}") from None
    assert job["status"] == "completed", (job, workers.logs())
    state = await finished_run(dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}"))
    assert state.status == "completed"
    return job


async def download_worker(handle) -> str:
    """The identity (`<pid>@<host>`) of the worker the running download_result was given to."""
    description = await handle.describe()
    pending = description.raw_description.pending_activities
    return next((p.last_worker_identity for p in pending if p.activity_type.name == "download_result"), "")


def worker_of(workers: Workers, identity: str) -> subprocess.Popen:
    running = [proc for proc in workers.started if identity.startswith(f"{proc.pid}@")]
    assert len(running) == 1, (identity, [proc.pid for proc in workers.started])
    return running[0]


async def wait_for_download(handle, workers: Workers, timeout: float = 90) -> subprocess.Popen:
    """The worker process running the job's download, once it runs."""
    deadline = time.monotonic() + timeout
    while not (identity := await download_worker(handle)):
        assert all(proc.poll() is None for proc in workers.started), f"a worker died by itself\n{workers.logs()}"
        assert time.monotonic() < deadline, f"no download started\n{workers.logs()}"
        await asyncio.sleep(0.05)
    return worker_of(workers, identity)


# --- 1. the whole path ----------------------------------------------------------------------------


async def test_the_whole_path_in_s3_mode_with_two_workers_and_no_shared_folder(
    dev_env, stack_factory, faults, workers, s3_server, s3_settings, tmp_path
):
    began = time.monotonic()
    # Results of some 40-60 KB take a few seconds from the CDN: long enough to stop a worker mid-download.
    faults(delay_seconds=0.2, cdn_bytes_per_second=12_000)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=5, download_max_count=5, **s3_settings)
    worker_dirs = start_workers(workers, stack.settings, tmp_path)
    prefix = bucket_prefix(stack.settings)
    client = stack.client()

    # One image from the shop, one uploaded to us (stored in the bucket by the API).
    sources = {"s3-shop": png_bytes(64, 48), "s3-upload": png_bytes(50, 40)}
    shop_body = order(stack.shop.publish(sources["s3-shop"]), "s3-shop", scale_factor=2)
    reply = await asyncio.to_thread(client.post, "/v1/uploads", content=sources["s3-upload"])
    assert reply.status_code == 201, reply.text
    uploaded = reply.json()
    assert s3_server.keys(f"{prefix}/uploads/") == [f"{prefix}/uploads/{uploaded['upload_id']}"]
    upload_body = order(uploaded["image_url"], "s3-upload", scale_factor=3)
    expected = {"s3-shop": (128, 96), "s3-upload": (150, 120)}

    job_ids = {name: await submit(client, body) for name, body in (("s3-shop", shop_body), ("s3-upload", upload_body))}
    # Steps of one job run on one worker unless told otherwise (a workflow task stays with its worker and
    # starts the next activity there). So: SIGTERM the worker downloading the shop job's result; it
    # finishes that download in its grace period and takes no new task, so the other worker validates
    # and stores the object it left in the bucket, and sends the email.
    shop_handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_ids['s3-shop']}")
    stopping = await wait_for_download(shop_handle, workers)
    code, _ = await asyncio.to_thread(stop, stopping, 60)
    assert code == 0, workers.logs()
    jobs = {name: await completed(client, dev_env, workers, job_id) for name, job_id in job_ids.items()}
    finished = time.monotonic()
    other = next(proc for proc in workers.started if proc is not stopping)
    stopped_ran = [
        line.get("activity") for line in log_lines(workers, stopping) if line.get("job_id") == job_ids["s3-shop"]
    ]
    assert "download_result" in stopped_ran and "send_email" not in stopped_ran, workers.logs()
    assert any(
        line.get("activity") == "send_email" and line["job_id"] == job_ids["s3-shop"]
        for line in log_lines(workers, other)
    ), workers.logs()
    assert await download_attempts(shop_handle) == [(1, "")]  # downloaded once, by the stopping worker
    messages = await asyncio.to_thread(stack.mailbox.wait_for, 2)
    links = sorted(re.search(r"http://\S+/downloads/[0-9a-f]{64}", text_of(m)).group(0) for m in messages)
    assert links == sorted(job["download_url"] for job in jobs.values())

    http = httpx.Client(timeout=30)  # follows no redirect
    for name, job in jobs.items():
        job_id, link = job_ids[name], job["download_url"]
        width, height = expected[name]
        output = job["output"]
        assert (output["width"], output["height"]) == (width, height)

        # The link answers 303 to a presigned GET of the result in the bucket, named as the customer's file.
        redirect = http.get(link)
        assert redirect.status_code == 303, redirect.text
        presigned = redirect.headers["location"]
        object_url = f"{s3_server.endpoint}/{s3_server.bucket}/{prefix}/jobs/{job_id}/upscaled_{width}x{height}.png?"
        assert presigned.startswith(object_url), presigned
        assert "X-Amz-Signature=" in presigned and "response-content-disposition=attachment" in presigned
        got = http.get(presigned)
        assert got.status_code == 200, got.text
        filename = f"{name}-upscaled_{width}x{height}.png"
        assert got.headers["content-disposition"].startswith(f'attachment; filename="{filename}"')
        assert Image.open(io.BytesIO(got.content)).size == (width, height)
        assert len(got.content) == output["bytes"] and sha256(got.content) == output["sha256"]

        # Range on the presigned URL: the store answers it.
        part = http.get(presigned, headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == got.content[:100]
        assert part.headers["content-range"] == f"bytes 0-99/{len(got.content)}"

        # HEAD: the size from the API itself, and no download counted (the GET above counted one).
        head = http.head(link)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(got.content)
        row, tokens = db_job(stack.settings.database_url, job_id)
        assert [token.downloads for token in tokens] == [1]
        assert row.result_path == f"s3://{s3_server.bucket}/{prefix}/jobs/{job_id}/upscaled_{width}x{height}.png"

        # The bucket: the original (the bytes the shop served, or those uploaded) and the result; nothing
        # temporary, no unfinished upload.
        assert s3_server.keys(f"{prefix}/jobs/{job_id}/") == [
            f"{prefix}/jobs/{job_id}/original.png",
            f"{prefix}/jobs/{job_id}/upscaled_{width}x{height}.png",
        ]
        original = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/jobs/{job_id}/original.png")
        assert original["Body"].read() == sources[name]
        assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
        assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
    http.close()
    # Upsampler fetched each original by a presigned URL of the bucket, not from us.
    submitted = [job["imageUrl"] for job in emulator_counts(stack.emulator.url)[0]]
    assert len(submitted) == 2, submitted
    assert all(url.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/{prefix}/jobs/") for url in submitted)
    assert not [key for key in s3_server.keys(f"{prefix}/") if "/tmp/" in key]
    assert s3_server.unfinished_uploads(f"{prefix}/") == []
    # Scratch copies are gone from every process: the workers' folders and the API's hold no file.
    assert [files_in(folder) for folder in worker_dirs] == [[], []]
    assert not stack.settings.storage_dir.exists() or files_in(stack.settings.storage_dir) == []
    assert len(stack.mailbox.messages) == 2
    ran = [
        sorted({(line["job_id"][:6], line["activity"]) for line in log_lines(workers, proc) if "activity" in line})
        for proc in workers.started
    ]
    print(
        f"\ns3 whole path: two jobs completed {finished - began:.1f} s after the start; activities run by each "
        f"worker: {ran}"
    )


# --- 2. a worker killed in the middle of a multipart download --------------------------------------


async def test_a_worker_killed_mid_multipart_download_hands_it_to_the_other(
    dev_env, stack_factory, faults, workers, s3_server, s3_settings, tmp_path
):
    began = time.monotonic()
    rate = 4 * MB  # the first heartbeat (two parts read, one stored) about 4 s into the download
    faults(delay_seconds=0.2, cdn_bytes_per_second=rate)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=5, **s3_settings)
    worker_dirs = start_workers(workers, stack.settings, tmp_path)
    prefix = bucket_prefix(stack.settings)
    client = stack.client()
    # 1400x1400 noise x4: a valid 5600x5600 PNG of about 33 MiB, so five parts.
    job_id = await submit(client, order(stack.shop.publish(png_bytes(1400, 1400)), "s3-crash", scale_factor=4))
    handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")

    # Wait for a heartbeat with at least one part stored; then kill the worker running the download.
    deadline = time.monotonic() + 90
    while True:
        assert all(proc.poll() is None for proc in workers.started), f"a worker died by itself\n{workers.logs()}"
        beat, attempt = await pending_download(handle, dev_env.client.data_converter)
        if beat:
            break
        assert time.monotonic() < deadline, f"no download heartbeated\n{workers.logs()}"
        await asyncio.sleep(0.1)
    assert attempt == 1 and beat % PART_BYTES == 0, (beat, attempt)
    killed = worker_of(workers, await download_worker(handle))
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=10) == -signal.SIGKILL
    killed_at = time.monotonic()
    # The resume point: the last heartbeat the server holds (no attempt runs until the heartbeat timeout).
    resume_at, _ = await pending_download(handle, dev_env.client.data_converter)
    assert resume_at >= beat and resume_at % PART_BYTES == 0
    faults(delay_seconds=0.2, cdn_bytes_per_second=200 * MB)  # the rest: still the throttled path, faster

    job = await completed(client, dev_env, workers, job_id)
    finished = time.monotonic()
    assert await download_attempts(handle) == [(2, "TIMEOUT_TYPE_HEARTBEAT")]
    survivor = next(proc for proc in workers.started if proc is not killed)
    resumed = [
        line["message"]
        for line in log_lines(workers, survivor)
        if line.get("activity") == "download_result" and line["job_id"] == job_id
    ]
    assert f"resuming the result download at byte {resume_at}" in resumed, workers.logs()

    # The CDN: the first request from byte 0, then one Range request from the heartbeated offset; in all,
    # the result once plus at most what followed the heartbeat: the parts in flight and the part being read.
    jobs, counts = emulator_counts(stack.emulator.url)
    assert len(jobs) == 1 and counts["submit"] == 1
    made = (stack.emulator.state.storage_dir / jobs[0]["id"] / "result.png").read_bytes()
    size = len(made)
    served = [r for r in httpx.get(f"{stack.emulator.url}/_emulator/cdn").json() if r["name"] == "result.png"]
    assert [(r["method"], r["range"]) for r in served] == [("GET", None), ("GET", f"bytes={resume_at}-")]
    assert served[1]["bytes"] == size - resume_at
    total = sum(r["bytes"] for r in served)
    assert size > 4 * PART_BYTES and 0 < resume_at < size
    assert total <= size + (PARTS_IN_FLIGHT + 1) * PART_BYTES, (total, size)

    # The stored result is the CDN's bytes: the recorded hash, the object in the bucket.
    row, _ = db_job(stack.settings.database_url, job_id)
    assert row.output_sha256 == sha256(made) == job["output"]["sha256"] and row.output_bytes == size
    key = f"{prefix}/jobs/{job_id}/upscaled_5600x5600.png"
    stored = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert sha256(stored) == sha256(made)
    assert s3_server.keys(f"{prefix}/jobs/{job_id}/") == [f"{prefix}/jobs/{job_id}/original.png", key]
    assert s3_server.unfinished_uploads(f"{prefix}/") == []

    # Once each: one email, one ledger row (the workflow has ended: no mail can follow).
    assert len(stack.mailbox.messages) == 1
    assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    # No scratch copy left by either: the killed worker streamed its part of the result from memory.
    assert [files_in(folder) for folder in worker_dirs] == [[], []]
    print(
        f"\ns3 crash: killed at {beat / MB:.0f} MiB heartbeated, resumed at {resume_at / MB:.0f} MiB of "
        f"{size / MB:.1f} MiB; the CDN served {total / MB:.1f} MiB ({(total - size) / MB:.1f} MiB twice); "
        f"completed {finished - killed_at:.1f} s after the kill, {finished - began:.1f} s in all"
    )
