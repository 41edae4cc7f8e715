"""Webhook received -> download started: p50 and p95 over many jobs, vs the same path's floor.

    .venv/bin/python bench/webhook_latency.py [--jobs 100] [--concurrency 4] [--emulator-delay 0.5]

Ours: real orders through the API and the worker (both in this process) against the emulator
(its own process). The emulator notes, on one clock (`GET /_emulator/timeline`), the moment
just before it POSTs a job's webhook and the moment the first request for that job's result
arrives at its CDN. Their difference is what we measure: the webhook's way through the API
(signature, signal) and the workflow (wake up, status check, cost booking, `downloading`,
download activity, fetch guard) up to the first byte requested. "Sent" is at most earlier than
"received", so the figure errs on the high side. The emulator's delay (default 0.5 s) puts
the webhook where it comes in life: while the workflow waits.

Baselines, measured in the same run, interleaved with ours, at the same concurrency:
  floor       a bare workflow waiting for a signal, then a no-op activity: the bench's time
              just before `signal` to the activity's start (bench/_bare.py);
  same path   the same, with the steps ours ran in between as no-ops: signal -> activity on
              the Upsampler queue -> 3 local activities -> activity start (the path before
              issue 15's fewer bookkeeping rounds; kept so that figures stay comparable);
  our path    the steps our job runs now from the signal to the download, as no-ops (counted from
              a warm-up job's history: "S U A" since issue 15, the status check then the download):
              Temporal's own share of our figure.
Target (issue 15): ours p50 / the floor's p50 <= 4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid

import _bare
from _harness import (
    STOREFRONT_KEY,
    Stack,
    bytecode_note,
    job_steps,
    order,
    percentile,
    quiet,
    server_argument,
    start_dev_server,
    verdict,
)
from throughput import Ours

TARGET_RATIO = 4.0  # at most: ours p50 / the floor's p50
FLOOR = ["S", "A"]
SAME_PATH = ["S", "U", "L", "L", "L", "A"]


def webhook_path(steps: list[str]) -> list[str]:
    """Of a job's steps (bench/_harness.py job_steps), the signal up to the download: the first step with an
    activity on the job task queue after it, as one "A"."""
    start = steps.index("S")
    end = next(i for i in range(start, len(steps)) if "A" in steps[i].split("&"))
    return [*steps[start:end], "A"]


async def milestones(handle) -> dict[str, float]:
    """Server-recorded moments of the webhook's way through the workflow (the dev server's clock is ours)."""
    from temporalio.api.enums.v1 import EventType

    found: dict[str, float] = {}
    scheduled: dict[int, str] = {}
    async for event in handle.fetch_history_events():
        at = event.event_time.seconds + event.event_time.nanos / 1e9
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            found.setdefault("signaled", at)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = name
            found.setdefault(f"scheduled:{name}", at)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            name = scheduled[event.activity_task_started_event_attributes.scheduled_event_id]
            found.setdefault(f"started:{name}", at)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = scheduled[event.activity_task_completed_event_attributes.scheduled_event_id]
            found.setdefault(f"completed:{name}", at)
    return found


STAGES = [  # (label, from, to): the webhook's way, moment by moment
    ("webhook sent -> signal in history (API, signal RPC)", "webhook_sent", "signaled"),
    ("-> status check scheduled (workflow task)", "signaled", "scheduled:check_status"),
    ("-> status check started (matching, rate-limited queue)", "scheduled:check_status", "started:check_status"),
    ("-> status check completed (GET /status)", "started:check_status", "completed:check_status"),
    ("-> download scheduled (workflow task, local activities)", "completed:check_status", "scheduled:download_result"),
    ("-> download started (matching)", "scheduled:download_result", "started:download_result"),
    ("-> first CDN request (fetch guard, connect)", "started:download_result", "cdn_first"),
]


async def run_ours(
    stack: Stack,
    client,
    http,
    image_url: str,
    jobs: int,
    concurrency: int,
    tag: str,
) -> list[tuple[str, dict[str, float], str]]:
    slots = asyncio.Semaphore(concurrency)
    upsampler_ids: list[tuple[str, dict[str, float], str]] = []

    async def one(index: int) -> None:
        async with slots:
            answer = await http.post("/v1/jobs", json=order(image_url, f"lat-{tag}-{index}"))
            answer.raise_for_status()
            handle = client.get_workflow_handle(f"upscale-{answer.json()['job_id']}")
            state = await handle.result()
            if state["status"] != "completed" or state["polls"] != 1:
                raise RuntimeError(f"job ended {state['status']} after {state['polls']} status checks: {state}")
            upsampler_ids.append((state["upsampler_id"], await milestones(handle), handle.id))

    await asyncio.gather(*(one(i) for i in range(jobs)))
    return upsampler_ids


async def run_bare(client, task_queue: str, steps: list[str], jobs: int, concurrency: int, wait: float) -> list[float]:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    last = f"started:A{len(steps) - 1}"

    async def one(_: int) -> None:
        async with slots:
            workflow_id = f"bare-{uuid.uuid4().hex}"
            handle = await client.start_workflow(_bare.BareJob.run, steps, id=workflow_id, task_queue=task_queue)
            await asyncio.sleep(wait)  # like the emulator's delay: the workflow is waiting when the signal comes
            sent = time.time()
            await handle.signal(_bare.BareJob.hint, "done")
            await handle.result()
            latencies.append(_bare.STAMPS.pop(workflow_id)[last] - sent)

    await asyncio.gather(*(one(i) for i in range(jobs)))
    return latencies


def summary(values: list[float]) -> str:
    ms = [1000 * v for v in values]
    return (
        f"p50 {percentile(ms, 0.5):6.1f} ms   p95 {percentile(ms, 0.95):6.1f} ms   "
        f"min {min(ms):6.1f} ms   max {max(ms):7.1f} ms   (n={len(ms)})"
    )


class Measured:
    """One of our stacks and what its jobs measured."""

    def __init__(self, name: str, workflow_class=None):
        self.ours = Ours(name, workflow_class)
        self.name = name
        self.latency: list[float] = []
        self.api_part: list[float] = []
        self.stages: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}

    def add(self, timeline: dict, jobs: list[tuple[str, dict[str, float], str]]) -> None:
        for upsampler_id, history, _ in jobs:
            moments = timeline[upsampler_id] | history
            self.latency.append(moments["cdn_first"] - moments["webhook_sent"])
            self.api_part.append(moments["webhook_answered"] - moments["webhook_sent"])
            for label, start, end in STAGES:
                self.stages[label].append(moments[end] - moments[start])


async def main(args: argparse.Namespace) -> dict:
    import httpx

    quiet()
    began = time.perf_counter()
    env = await start_dev_server(args.eager)
    client = env.client
    _bare.CLIENT, _bare.RECORD = client, True
    bare_queue = f"bare-{uuid.uuid4().hex[:8]}"
    contenders = [Measured("ours")]
    floor: list[float] = []
    same_path: list[float] = []
    our_path: list[float] = []
    try:
        async with contextlib.AsyncExitStack() as exits:
            for one in contenders:
                await one.ours.start(exits, client, args.emulator_delay)
                one.http = await exits.enter_async_context(
                    httpx.AsyncClient(
                        base_url=one.ours.stack.api.url,
                        timeout=120,
                        headers={"Authorization": f"Bearer {STOREFRONT_KEY}"},
                    )
                )
            for bare_worker in _bare.bare_workers(client, bare_queue):
                await exits.enter_async_context(bare_worker)
            for one in contenders:
                warm = await run_ours(
                    one.ours.stack, client, one.http, one.ours.image_url, args.warmup, args.concurrency, "warm"
                )
            path = webhook_path((await job_steps(client.get_workflow_handle(warm[0][2])))[0])
            for steps in (FLOOR, SAME_PATH, path):
                await run_bare(client, bare_queue, steps, args.warmup, args.concurrency, args.emulator_delay)
            per_round = max(1, args.jobs // args.rounds)
            for r in range(args.rounds):
                floor += await run_bare(client, bare_queue, FLOOR, per_round, args.concurrency, args.emulator_delay)
                for one in contenders:
                    jobs = await run_ours(
                        one.ours.stack, client, one.http, one.ours.image_url, per_round, args.concurrency, f"r{r}"
                    )
                    one.add(one.ours.stack.emulator.get("/_emulator/timeline"), jobs)
                same_path += await run_bare(
                    client, bare_queue, SAME_PATH, per_round, args.concurrency, args.emulator_delay
                )
                our_path += await run_bare(client, bare_queue, path, per_round, args.concurrency, args.emulator_delay)
                print(
                    f"round {r + 1}: "
                    + "   ".join(f"{one.name} p50 {1000 * percentile(one.latency, 0.5):6.1f} ms" for one in contenders),
                    flush=True,
                )
    finally:
        await env.shutdown()

    print(
        f"\n{per_round * args.rounds} jobs of each, {args.concurrency} in flight, emulator delay "
        f"{args.emulator_delay} s, {args.rounds} interleaved rounds; {bytecode_note()}"
    )
    for one in contenders:
        print(f"{one.name}: webhook sent -> download started   {summary(one.latency)}")
        print(f"  of which webhook sent -> API answered 200   {summary(one.api_part)}")
        for label, values in one.stages.items():
            print(f"    {label:58s} p50 {1000 * percentile(values, 0.5):6.1f} ms")
    print(f"floor: signal -> no-op activity started        {summary(floor)}")
    print(f"same path as no-ops: signal -> U, 3 L -> A     {summary(same_path)}")
    print(f"{'our path as no-ops: ' + ' '.join(path):47s}{summary(our_path)}")
    result = {}
    floor_p50 = 1000 * percentile(floor, 0.5)
    for one in contenders:
        p50 = 1000 * percentile(one.latency, 0.5)
        ratio = p50 / floor_p50
        print(
            f"{one.name}: p50 {p50:.1f} ms / floor p50 {floor_p50:.1f} ms = {ratio:.1f}   "
            f"(target <= {TARGET_RATIO:.0f})   {verdict(ratio <= TARGET_RATIO)};  "
            f"to the same path: {p50 / (1000 * percentile(same_path, 0.5)):.1f}; "
            f"to our path as no-ops: {p50 / (1000 * percentile(our_path, 0.5)):.1f}"
        )
        result[one.name] = {"p50": p50, "p95": 1000 * percentile(one.latency, 0.95), "ratio": ratio}
    print(f"run time {time.perf_counter() - began:.0f} s")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs of ours and of each baseline (default 100)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the jobs are split into (default 4)")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs in flight (default 4)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed jobs of each first (default 5)")
    parser.add_argument(
        "--emulator-delay",
        type=float,
        default=0.5,
        help="the emulator's delay_seconds; the baselines wait as long before their signal (default 0.5)",
    )
    server_argument(parser)
    asyncio.run(main(parser.parse_args()))
