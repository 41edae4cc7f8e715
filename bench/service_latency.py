"""The latency our service adds to a job, as the customer feels it, at 4 and at 50 jobs in flight.

    .venv/bin/python bench/service_latency.py [--jobs 100] [--concurrency 4 50] [--emulator-delay 0.5]

Per job, two spans on one clock (time.time() of this machine, read by this process and the emulator's):

  before Upsampler   the order accepted (our API's answer 202 to POST /v1/jobs has come back to the
                     shop, here the bench) -> Upsampler receives the submission (the emulator's
                     `submitted`, noted as its submit handler starts on the request);
  after Upsampler    Upsampler's webhook sent (the emulator's `webhook_sent`, just before it POSTs) ->
                     the customer's email accepted by the SMTP server (the bench's sink, in this
                     process: the moment it takes the message, before it answers 250).

Service-added latency = the two added up: the whole order minus Upsampler's own work (and minus the
shop's wait for our 202). Everything runs as in bench/throughput.py: our API, worker and the SMTP sink
in this process, the emulator in its own (`delay_seconds` --emulator-delay, default 0.5 s, so the
webhook comes while the workflow waits, as in life), SQLite in a temporary folder.

Baseline, interleaved at the same concurrency: the bare job (bench/_bare.py) with exactly our job's
steps as no-ops (counted from one of our job's histories), started through the Temporal client, its
signal sent --emulator-delay seconds after the no-op standing for the submission: (start returned ->
that no-op started) + (signal sent -> the no-op standing for the email started). That is Temporal's
floor for as many steps; what ours adds above it is our code and I/O.

Target (issue 15): p50 <= 350 ms at 4 in flight; the rest is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
import uuid

import _bare
from _harness import Stack, bytecode_note, job_steps, percentile, quiet, start_dev_server, verdict
from throughput import Ours, run_ours, stack_arguments

TARGET_P50_MS = 350.0
TARGET_CONCURRENCY = 4
ORDER_IN_MAIL = re.compile(r"your order (\S+) is ready")


async def our_jobs(ours: Ours, client, jobs: int, concurrency: int, posts: int, tag: str) -> list[dict]:
    """Our jobs, run as bench/throughput.py runs them: each one's final state with its job and order ids and
    the moment its order was accepted."""
    states: list[dict] = []
    await run_ours(ours.stack, client, ours.image_url, jobs, concurrency, posts, tag, states)
    return states


def stamp_mail(stack: Stack) -> dict[str, float]:
    """order_id -> the moment the sink took its completion email (a hook on the sink, in this process)."""
    from smi.mailsink import text_of

    sink, taken = stack.mailbox, {}
    keep = sink._keep  # called by the sink's DATA handler just before it answers "250 Message accepted"

    def stamped(message, raw: bytes) -> None:
        now = time.time()
        found = ORDER_IN_MAIL.search(text_of(message))
        if found:
            taken.setdefault(found[1], now)
        keep(message, raw)

    sink._keep = stamped
    return taken


async def run_bare(client, task_queue: str, steps: list[str], jobs: int, concurrency: int) -> list[tuple]:
    """The bare job: (before, after) per job, in seconds (see the docstring)."""
    slots = asyncio.Semaphore(concurrency)
    spans: list[tuple[float, float]] = []
    last = f"started:A{max(i for i, step in enumerate(steps) if step == 'A')}"

    async def one(_: int) -> None:
        async with slots:
            workflow_id = f"bare-{uuid.uuid4().hex}"
            handle = await client.start_workflow(_bare.BareJob.run, steps, id=workflow_id, task_queue=task_queue)
            started = time.time()
            await handle.result()
            stamps = _bare.STAMPS.pop(workflow_id)
            spans.append((stamps["started:U!"] - started, stamps[last] - stamps["signal_sent"]))

    await asyncio.gather(*(one(i) for i in range(jobs)))
    return spans


def line(name: str, values: list[float]) -> str:
    ms = [1000 * v for v in values]
    return (
        f"  {name:44s} p50 {percentile(ms, 0.5):7.1f} ms   p95 {percentile(ms, 0.95):7.1f} ms   "
        f"max {max(ms):7.1f} ms   (n={len(ms)})"
    )


async def main(args: argparse.Namespace) -> dict:
    quiet()
    began = time.perf_counter()
    env = await start_dev_server(args.eager)
    client = env.client
    _bare.CLIENT, _bare.RECORD, _bare.SIGNAL_DELAY = client, True, args.emulator_delay
    bare_queue = f"bare-{uuid.uuid4().hex[:8]}"
    ours = Ours("ours")
    measured: dict[int, dict[str, list]] = {c: {"before": [], "after": [], "bare": []} for c in args.concurrency}
    try:
        async with contextlib.AsyncExitStack() as exits:
            await ours.start(exits, client, args.emulator_delay)
            mails = stamp_mail(ours.stack)
            for bare_worker in _bare.bare_workers(client, bare_queue):
                await exits.enter_async_context(bare_worker)
            warm = await our_jobs(ours, client, args.warmup, 4, args.post_concurrency, "warm")
            steps, _ = await job_steps(client.get_workflow_handle(f"upscale-{warm[0]['job_id']}"))
            await run_bare(client, bare_queue, steps, args.warmup, 4)
            for r in range(args.rounds):
                for concurrency in args.concurrency:
                    jobs = max(1, args.jobs // args.rounds)
                    one = measured[concurrency]
                    one["bare"] += await run_bare(client, bare_queue, steps, jobs, concurrency)
                    done = await our_jobs(ours, client, jobs, concurrency, args.post_concurrency, f"r{r}c{concurrency}")
                    timeline = ours.stack.emulator.get("/_emulator/timeline")
                    await asyncio.sleep(0.2)  # a mail the sink took in its own thread is noted by now
                    for job in done:
                        moments = timeline[job["upsampler_id"]]
                        one["before"].append(moments["submitted"] - job["accepted"])
                        one["after"].append(mails[job["order_id"]] - moments["webhook_sent"])
                    print(f"round {r + 1}, {concurrency} in flight: {len(done)} jobs", flush=True)
    finally:
        await env.shutdown()

    print(
        f"\nour jobs run {len(steps)} steps ({' '.join(steps)}); emulator delay {args.emulator_delay} s; "
        f"{args.rounds} round(s), bare and ours interleaved; at most {args.post_concurrency} POST /v1/jobs at once; "
        f"{bytecode_note()}"
    )
    result = {}
    for concurrency, one in measured.items():
        total = [b + a for b, a in zip(one["before"], one["after"], strict=True)]
        bare_total = [b + a for b, a in one["bare"]]
        print(f"{concurrency} in flight:")
        print(line("order accepted -> Upsampler gets the submit", one["before"]))
        print(line("webhook sent -> customer's email accepted", one["after"]))
        print(line("service-added latency (the two added up)", total))
        print(line("bare floor: start -> submit no-op", [b for b, _ in one["bare"]]))
        print(line("bare floor: signal -> email no-op", [a for _, a in one["bare"]]))
        print(line("bare floor, the two added up", bare_total))
        p50, p95 = 1000 * percentile(total, 0.5), 1000 * percentile(total, 0.95)
        ratio = p50 / (1000 * percentile(bare_total, 0.5))
        target = (
            f"(target p50 <= {TARGET_P50_MS:.0f} ms)   {verdict(p50 <= TARGET_P50_MS)}"
            if concurrency == TARGET_CONCURRENCY
            else "(no target: reported)"
        )
        print(
            f"  service-added latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; {ratio:.1f} x the bare floor's p50   {target}"
        )
        result[concurrency] = {"p50": p50, "p95": p95, "ratio": ratio}
    print(f"run time {time.perf_counter() - began:.0f} s")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--jobs", type=int, default=100, help="jobs of ours and of the bare job per level (default 100)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[4, 50], help="jobs in flight, one level after the other"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds the jobs are split into (default 2)")
    stack_arguments(parser, warmup=5, emulator_delay=0.5)
    asyncio.run(main(parser.parse_args()))
