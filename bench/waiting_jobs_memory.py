"""Memory of one worker process holding 1,000 jobs that wait for Upsampler's webhook.

    .venv/bin/python bench/waiting_jobs_memory.py [--jobs 1000] [--no-bare]

Ours: `smi worker` in a process of its own (so its RSS is only the worker's), settings from
the environment, against the Temporal dev server; the API (in this process) takes the orders
and the emulator (its own process) accepts every submission and never finishes
(`never_finish`, no webhook). The policy keeps the jobs waiting quietly (first poll after a
day). A job is waiting once its Upsampler id is in the database (the last step before the
wait); then the worker's RSS (VmRSS) is read: before any job (idle, started), with all jobs
waiting, and the difference per job. The worker keeps every job in its workflow cache
(Temporal's default `max_cached_workflows` is 1,000: with more jobs than that, RSS stops
growing with them and the older ones are replayed when they wake).

Baselines: the same worker idle (above), and a bare worker process (bench/_bare.py) holding as
many bare workflows that ran our jobs' steps up to the wait (a no-op activity, two local ones,
a no-op on the Upsampler queue, one more local one) and wait for a signal. Target: under 512 MB
for the worker with 1,000 waiting jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _bare
from _harness import BIN, ROOT, STOREFRONT_KEY, Stack, order, png_bytes, quiet, rss_kib, start_dev_server, verdict

TARGET_MIB = 512
PREFIX = ["A", "L", "L", "U", "L", "S"]  # what one of our jobs runs before it waits (bench/throughput.py counts them)
POSTS = 8  # POST /v1/jobs at once: more than 15 stall the API (bench/throughput.py, POST_CONCURRENCY)

BARE_WORKER = """
import asyncio, sys
sys.path.insert(0, "bench")
import _bare
from temporalio.client import Client

async def main():
    client = await Client.connect(sys.argv[1])
    workers = _bare.bare_workers(client, sys.argv[2])
    await asyncio.gather(*(w.run() for w in workers))
asyncio.run(main())
"""


def mib(kib: int) -> float:
    return kib / 1024


def settle(pid: int, seconds: float = 5.0) -> int:
    """VmRSS once the process is quiet: the last of a few readings a second apart."""
    readings = []
    for _ in range(int(seconds)):
        time.sleep(1)
        readings.append(rss_kib(pid))
    return readings[-1]


async def measure_ours(client, target: str, jobs: int, log: Path) -> dict:
    import httpx

    day = 86_400
    with Stack(
        target,
        emulator_faults={"never_finish": True, "delay_seconds": 0},
        poll_initial_delay_seconds=day,
        poll_max_interval_seconds=day,
        processing_timeout_seconds=7 * day,
    ) as stack:
        image_url = stack.upload(png_bytes(32, 24))
        env = dict(os.environ, **stack.env, PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            worker = subprocess.Popen([str(BIN / "smi"), "worker"], env=env, cwd=log.parent, stdout=out, stderr=out)
        try:
            database = stack.settings.database_url.split(":///", 1)[1]
            time.sleep(3)  # connected, polling, the retention schedule made
            idle = settle(worker.pid)
            started = time.perf_counter()
            posting = asyncio.Semaphore(POSTS)
            async with httpx.AsyncClient(
                base_url=stack.api.url, timeout=120, headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}
            ) as http:

                async def one(index: int) -> None:
                    async with posting:
                        answer = await http.post("/v1/jobs", json=order(image_url, f"mem-{index}"))
                    if answer.status_code != 202:
                        raise RuntimeError(f"POST /v1/jobs answered {answer.status_code}: {answer.text}")

                await asyncio.gather(*(one(i) for i in range(jobs)))
            posted = time.perf_counter() - started
            waiting = 0
            deadline = time.monotonic() + 600
            while waiting < jobs:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{waiting} of {jobs} jobs waiting; worker log:\n{log.read_text()[-3000:]}")
                await asyncio.sleep(1)
                with sqlite3.connect(database) as db:
                    waiting = db.execute("SELECT count(*) FROM jobs WHERE upsampler_id IS NOT NULL").fetchone()[0]
            ready = time.perf_counter() - started
            full = settle(worker.pid)
            hwm = rss_kib(worker.pid, "VmHWM")
            with sqlite3.connect(database) as db:
                statuses = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
            emulated = stack.emulator.get("/_emulator/requests")
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    return {
        "idle": idle,
        "full": full,
        "hwm": hwm,
        "posted": posted,
        "ready": ready,
        "statuses": statuses,
        "emulator": emulated,
    }


async def measure_bare(client, target: str, jobs: int, log: Path) -> dict:
    queue = f"bare-{uuid.uuid4().hex[:8]}"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-c", BARE_WORKER, target, queue], cwd=ROOT, stdout=out, stderr=out)
    handles = []
    try:
        time.sleep(3)
        idle = settle(worker.pid)
        started = time.perf_counter()
        slots = asyncio.Semaphore(50)

        async def one(_: int) -> None:
            async with slots:
                handles.append(
                    await client.start_workflow(
                        _bare.BareJob.run, PREFIX, id=f"bare-{uuid.uuid4().hex}", task_queue=queue
                    )
                )

        await asyncio.gather(*(one(i) for i in range(jobs)))
        asking = asyncio.Semaphore(20)

        async def waits(handle) -> bool:
            async with asking:
                try:
                    return await handle.query(_bare.BareJob.waiting)
                except Exception:  # noqa: BLE001 - a query timing out under load: ask again later
                    return False

        pending = list(handles)
        deadline = time.monotonic() + 600
        while pending:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} bare workflows not waiting; log:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(1)
            states = await asyncio.gather(*(waits(h) for h in pending))
            pending = [h for h, waiting in zip(pending, states, strict=True) if not waiting]
        ready = time.perf_counter() - started
        full = settle(worker.pid)
        hwm = rss_kib(worker.pid, "VmHWM")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return {"idle": idle, "full": full, "hwm": hwm, "ready": ready}


async def main(args: argparse.Namespace) -> dict:
    quiet()
    began = time.perf_counter()
    env = await start_dev_server()
    target = env.client.service_client.config.target_host
    try:
        with tempfile.TemporaryDirectory(prefix="smi-bench-memory-") as tmp:
            n = args.jobs
            ours = await measure_ours(env.client, target, n, Path(tmp) / "worker.log")
            print(
                f"\nours: {n} jobs posted in {ours['posted']:.0f} s, all waiting after {ours['ready']:.0f} s; "
                f"job statuses {ours['statuses']}; emulator requests {ours['emulator']}"
            )
            print(
                f"ours: `smi worker` RSS idle {mib(ours['idle']):6.1f} MiB   with {n} waiting jobs "
                f"{mib(ours['full']):6.1f} MiB   (peak {mib(ours['hwm']):6.1f} MiB)   per job "
                f"{(ours['full'] - ours['idle']) / n:6.1f} KiB",
                flush=True,
            )
            bare = await measure_bare(env.client, target, n, Path(tmp) / "bare.log") if args.bare else None
    finally:
        await env.shutdown()

    if bare:
        print(
            f"bare: worker RSS idle {mib(bare['idle']):6.1f} MiB   with {n} waiting bare workflows "
            f"{mib(bare['full']):6.1f} MiB   (peak {mib(bare['hwm']):6.1f} MiB)   per workflow "
            f"{(bare['full'] - bare['idle']) / n:6.1f} KiB   (all waiting after {bare['ready']:.0f} s)"
        )
        print(
            f"ratio ours / bare: whole process {ours['full'] / bare['full']:.2f}, per waiting job "
            f"{(ours['full'] - ours['idle']) / max(1, bare['full'] - bare['idle']):.2f}"
        )
    total = mib(ours["full"])
    print(
        f"ours with {n} waiting jobs: {total:.0f} MiB   (target < {TARGET_MIB} MiB for 1,000)   "
        f"{verdict(total < TARGET_MIB)}"
    )
    print(f"run time {time.perf_counter() - began:.0f} s")
    return {"ours": ours, "bare": bare}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="waiting jobs (default 1000)")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare worker baseline")
    asyncio.run(main(parser.parse_args()))
