"""Where one job's CPU goes in this process (API, worker, mail sink): py-spy over a throughput run.

    .venv/bin/python bench/profile_job.py [--jobs 100] [--concurrency 50] [--emulator-delay 0]
                                          [--rate 100] [--py-spy PATH] [--raw FILE]

The stack of bench/throughput.py (our API, worker and the bench's SMTP sink in this process, the
emulator in its own), warmed up, then `--jobs` orders at `--concurrency` in flight while py-spy
(`pip install py-spy`; not a project dependency; found on PATH, next to this Python, or given with
`--py-spy`) samples every Python thread of this process `--rate` times a second, idle threads left
out, so a thread's samples / rate are about its CPU seconds. Printed:

- this process's CPU per job (from /proc), split by thread kind: the Python threads py-spy sees,
  and the Temporal SDK's Rust core (its tokio threads), which no Python profiler sees;
- the cost groups (GROUPS below: the workflow sandbox, payload conversion, SQLite, httpx, ...)
  as CPU milliseconds per job, cumulative: a sample counts for every group one of its frames
  belongs to, so groups overlap (an SQLite commit inside a local activity counts for both);
- the same CPU split without overlaps (PARTS: SQLite, the Temporal SDK, the API's framework, our
  own code, ...): a sample counts once, for the part of its innermost frame, so the parts add up;
- the functions with the most cumulative and the most own CPU per job;
- SQL statements (by kind and table) and commits per job, from SQLAlchemy's events.

The bench's own part (its httpx client posting orders, its wait for each workflow's result, the
SMTP sink) is a group of its own, so it can be told from the service's.
`--raw` keeps py-spy's collapsed stacks for a closer look.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _harness import bytecode_note, children_cpu, cpu_delta, quiet, start_dev_server, thread_cpu
from throughput import Ours, run_ours, stack_arguments

HAND_OFF = (
    r"^(ThreadPoolExecutor\.submit|Thread\.start|BaseSelectorEventLoop\._write_to_self"
    r"|BaseEventLoop\.call_soon_threadsafe) "
)
BENCH = r"^(?!<module>).*\((throughput|profile_job|_harness)\.py:|\((aiosmtpd/|smi/mailsink\.py)"
# (group, regular expression over one frame "function (path:line)" as py-spy names it): a sample belongs to a
# group when any frame of its stack matches; indented groups lie inside the one above.
GROUPS: list[tuple[str, str]] = [
    ("workflow tasks: activations in the sandbox, all of it", r"\(temporalio/worker/_workflow\.py"),
    ("  of which a new sandboxed workflow instance (re-imports)", r"^_Instance\._create_instance "),
    ("    of which compiling modules from source (no .pyc)", r"^SourceLoader\.source_to_code "),
    ("local activities: our bookkeeping (activities/ledger.py)", r"\(activities/ledger\.py"),
    (
        "activities: storage, Upsampler calls, email, shop events",
        r"\(activities/(storage|upsampler|notify|shop_events)\.py",
    ),
    ("SQLAlchemy / SQLite, everywhere", r"\(sqlalchemy/|\(sqlmodel/"),
    (
        "  of which commits",
        r"^(Session\.commit|SessionTransaction\.commit|Connection\.commit|DefaultDialect\.do_commit) ",
    ),
    ("API server (uvicorn, starlette, fastapi), every route", r"\((uvicorn|starlette|fastapi)/"),
    ("  POST /v1/jobs (api/jobs.py)", r"\(api/jobs\.py"),
    ("  the webhook (api/webhook.py)", r"\(api/webhook\.py"),
    ("  files: the original fetched by us and Upsampler (api/files.py)", r"\(api/files\.py"),
    ("API handlers' steps in threads (anyio: database, probes)", r"^WorkerThread\.run \(anyio/"),
    ("httpx / httpcore: our HTTP requests", r"\((httpx|httpcore)/"),
    ("Temporal client (start a workflow, signal)", r"\(temporalio/client/"),
    ("Temporal bridge calls (poll, complete; protobuf to the Rust core)", r"\(temporalio/bridge/(worker|client)\.py"),
    (
        "payload visits (every activation and completion walked for codec/storage)",
        r"\(temporalio/(bridge/_visitor|worker/_command_aware_visitor)",
    ),
    ("payload conversion (JSON <-> our dataclasses)", r"\(temporalio/converter/"),
    ("pydantic", r"\(pydantic(_core)?/"),
    ("images: Pillow, libvips", r"\((PIL|pyvips)/"),
    ("SMTP client (smtplib, in send_email)", r"\((smtplib\.py|aiosmtplib/)"),
    ("email rendering (jinja2)", r"\(jinja2/"),
    ("thread hand-offs (executor submit, new threads, loop wake-ups)", HAND_OFF),
    ("logging", r"\(logging/"),
    ("the bench itself: its driver, the SMTP sink (aiosmtpd)", BENCH),
]
# A sample whose innermost frame is one of these waits: the thread was runnable but not working (py-spy's idle
# test reads the thread's state, and on a busy machine a woken thread waits a while for a core).
IDLE = re.compile(
    r"^(_worker \(concurrent/futures/thread\.py|EpollSelector\.select \(selectors\.py|Condition\.wait \(threading\.py"
    r"|SocketIO\.readinto \(socket\.py|$)"
)
OURS = re.compile(r"\((api|activities|workflows|smi)/|\(worker\.py")
# The split without overlaps: each sample counts once, for the bench when any of its frames is the bench's, else
# for the part its innermost frame belongs to (or, for a frame of none, e.g. the standard library or anyio's
# sockets, the next frame outwards that does), so the parts add up.
PARTS: list[tuple[str, str]] = [
    ("the bench itself (its driver, the SMTP sink)", BENCH),
    ("SQLAlchemy / SQLite", r"\((sqlalchemy|sqlmodel|sqlite3)/"),
    ("HTTP clients (httpx, httpcore)", r"\((httpx|httpcore)/"),
    ("images (libvips, Pillow)", r"\((PIL|pyvips)/"),
    ("SMTP client, email messages", r"\((smtplib\.py|email/)"),
    (
        "the API's framework and event loop (uvicorn, starlette, fastapi, pydantic)",
        r"\((uvicorn|starlette|fastapi|pydantic)",
    ),
    ("the Temporal SDK in Python (activations, bridge calls, payloads)", r"\(temporalio/"),
    ("our own code (api, activities, workflows, smi)", OURS.pattern),
]

FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def find_py_spy(given: str | None) -> str:
    candidates = [given] if given else [shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("py-spy not found: `pip install py-spy` (or --py-spy PATH)")


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's collapsed stacks: (frames outermost first, samples)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """'function (path:line)' as 'function (path)' with the path from site-packages or the repository."""
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["path"]
    for marker in ("site-packages/", "/lib/python3.11/", str(Path(__file__).resolve().parent.parent) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


HAND_OFF_PART = "thread hand-offs (executor submit, loop wake-ups)"
OTHER_PART = "the rest (asyncio's loop, the standard library)"


def part_of(frames: list[str], patterns: list[tuple[str, re.Pattern]], hand_off: re.Pattern) -> str:
    """The part of PARTS a sample belongs to: the bench's when any frame is the bench's (its HTTP client too);
    else of its innermost frame, or the next one outwards that has one."""
    bench_part, bench = patterns[0]
    if any(bench.search(frame) for frame in frames):
        return bench_part
    if hand_off.search(frames[-1]):
        return HAND_OFF_PART
    for frame in reversed(frames):
        for name, pattern in patterns:
            if pattern.search(frame):
                return name
    return OTHER_PART


def analyse(stacks: list[tuple[list[str], int]], rate: float, jobs: int) -> dict:
    """CPU ms per job: in all, by group (cumulative), by function (cumulative, and own), and our functions."""
    per_job = 1000 / rate / jobs  # ms of CPU per job that one sample stands for
    patterns = [(name, re.compile(expr)) for name, expr in GROUPS]
    groups: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    part_patterns = [(name, re.compile(expr)) for name, expr in PARTS]
    hand_off = re.compile(HAND_OFF)
    cumulative: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = idle = 0
    for frames, count in stacks:
        if IDLE.match(frames[-1]):
            idle += count
            continue
        total += count
        for name, pattern in patterns:
            if any(pattern.search(frame) for frame in frames):
                groups[name] += count
        for frame in {short(f) for f in frames}:
            cumulative[frame] += count
        own[short(frames[-1])] += count
        parts[part_of(frames, part_patterns, hand_off)] += count
    ours = [(f, c) for f, c in cumulative.most_common() if OURS.search(f)]
    return {
        "total": total * per_job,
        "idle": idle * per_job,
        "groups": {name: groups[name] * per_job for name, _ in GROUPS},
        "parts": {name: parts[name] * per_job for name in [*dict(PARTS), HAND_OFF_PART, OTHER_PART]},
        "cumulative": [(f, c * per_job) for f, c in cumulative.most_common(30)],
        "own": [(f, c * per_job) for f, c in own.most_common(25)],
        "ours": [(f, c * per_job) for f, c in ours[:25]],
    }


def report(found: dict, python_cpu: float | None = None) -> None:
    """The figures, as sampled and, given the Python threads' measured CPU per job, scaled to it: on a busy
    machine py-spy also counts threads that were runnable but waiting for a core."""
    scale = python_cpu / found["total"] if python_cpu else 1.0
    print(
        f"py-spy's samples of Python threads at work: {found['total']:.1f} ms per job "
        f"(left out as waiting: {found['idle']:.1f} ms)"
        + (f"; measured {python_cpu:.1f} ms, so the second column is the first x {scale:.2f}" if python_cpu else "")
    )
    sections = [
        ("cost groups, CPU ms per job, cumulative (groups overlap; indented ones lie inside the one above)", "groups"),
        ("the same CPU split without overlaps (PARTS: a sample counts once)", "parts"),
        ("functions, cumulative CPU ms per job", "cumulative"),
        ("our functions, cumulative CPU ms per job", "ours"),
        ("functions, own CPU ms per job", "own"),
    ]
    for title, key in sections:
        print(f"\n{title}:")
        rows = found[key].items() if key in ("groups", "parts") else found[key]
        for name, value in rows:
            print(f"  {value:7.1f}  {value * scale:7.1f}  {name}")


TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


@contextlib.contextmanager
def counting_sql():
    """SQL statements ("SELECT jobs", "INSERT ledger", ...) and commits ("COMMIT") of every engine in this process
    while the block runs, counted by SQLAlchemy's events."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counted: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def statement(conn, cursor, text: str, *_) -> None:
        table = TABLE.search(text)
        with lock:
            counted[f"{text.split(None, 1)[0].upper()} {table[1] if table else ''}".rstrip()] += 1

    def commit(conn) -> None:
        with lock:
            counted["COMMIT"] += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Engine, "commit", commit)
    try:
        yield counted
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
        event.remove(Engine, "commit", commit)


async def main(args: argparse.Namespace) -> dict:
    quiet()
    spy = find_py_spy(args.py_spy)
    began = time.perf_counter()
    env = await start_dev_server(args.eager)
    client = env.client
    ours = Ours("ours")
    raw = Path(args.raw) if args.raw else Path(tempfile.mkdtemp(prefix="smi-profile-")) / "stacks.txt"
    try:
        async with contextlib.AsyncExitStack() as exits:
            await ours.start(exits, client, args.emulator_delay)
            await run_ours(
                ours.stack, client, ours.image_url, args.warmup, args.concurrency, args.post_concurrency, "warm"
            )
            spying = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(os.getpid()),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],  # fmt: skip
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            await asyncio.sleep(2)  # attached and sampling (an idle process gives no samples)
            before, threads_before = children_cpu(), thread_cpu()
            with counting_sql() as sql:
                seconds = await run_ours(
                    ours.stack, client, ours.image_url, args.jobs, args.concurrency, args.post_concurrency, "p"
                )
            used, threads = cpu_delta(before, children_cpu()), cpu_delta(threads_before, thread_cpu())
            spying.send_signal(signal.SIGINT)
            _, err = spying.communicate(timeout=60)
    finally:
        await env.shutdown()
    if not raw.exists():
        sys.exit(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
    found = analyse(read_raw(raw), args.rate, args.jobs)
    ms = {name: 1000 * value / args.jobs for name, value in used.items()}
    print(
        f"\n{args.jobs} jobs, {args.concurrency} in flight, emulator delay {args.emulator_delay} s: "
        f"{args.jobs / seconds:.2f} jobs/s while sampled at {args.rate} Hz (py-spy slows the process a little); "
        f"{bytecode_note()}"
    )
    core = 1000 * threads.get("tokio", 0) / args.jobs
    print(
        f"CPU per job: this process {ms['self']:.1f} ms: the Temporal SDK's Rust core (tokio threads) {core:.1f} ms, "
        f"the rest (Python threads) {ms['self'] - core:.1f} ms; Temporal dev server {ms.get('temporal', 0):.1f} ms; "
        f"emulator {ms.get('emulator', 0):.1f} ms"
    )
    statements = sum(n for name, n in sql.items() if name != "COMMIT")
    print(
        f"SQL per job: {statements / args.jobs:.1f} statements and {sql['COMMIT'] / args.jobs:.1f} commits; "
        + ", ".join(f"{name} {n / args.jobs:.2g}" for name, n in sql.most_common() if name != "COMMIT")
    )
    report(found, ms["self"] - core)
    print(f"\nstacks: {raw}\nrun time {time.perf_counter() - began:.0f} s")
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="sampled jobs (default 100)")
    parser.add_argument("--concurrency", type=int, default=50, help="jobs in flight (default 50)")
    stack_arguments(parser, warmup=10, emulator_delay=0.0)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--py-spy", help="the py-spy executable (default: on PATH or next to this Python)")
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
    parser.add_argument(
        "--stacks", help="no run: group the stacks a former run kept (--raw), with its --jobs and --rate"
    )
    parser.add_argument("--python-cpu", type=float, help="with --stacks: that run's Python threads' CPU ms per job")
    arguments = parser.parse_args()
    if arguments.stacks:
        report(analyse(read_raw(Path(arguments.stacks)), arguments.rate, arguments.jobs), arguments.python_cpu)
    else:
        asyncio.run(main(arguments))
