"""What the benchmarks share: a Temporal dev server, our stack on loopback, the bare job's steps;
for the download benchmarks a static server standing for the CDN, the test file and the verdicts.

The stack is assembled as tests/conftest.py does (make_settings, stack_factory): the API and
an SMTP sink served on loopback ports in this process, SQLite in a temporary folder, quotas
and rate limits set high so that nothing waits on them. The emulator stands for Upsampler, a
service elsewhere: it runs in a process of its own, so its CPU (it really upscales) is not
charged to our process's interpreter lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devstack  # noqa: E402 (after the path)
from devstack import BIN, STOREFRONT_KEY, UPSAMPLER_KEY, make_settings, png_bytes, settings_variables  # noqa: E402, F401

EAGER_ACTIVITIES = "system.enableActivityEagerExecution=true"  # the dev server's dynamic config for eager dispatch


def quiet() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("emulator", "smi", "httpx", "uvicorn", "uvicorn.access", "mail.log", "temporalio"):
        logging.getLogger(name).setLevel(logging.ERROR)


EMULATOR_RUNNER = """
import json, logging, sys, uvicorn
from emulator.app import Faults, create_app
logging.basicConfig(level=logging.WARNING)
logging.getLogger("emulator").setLevel(logging.ERROR)
key, faults, storage, port = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
uvicorn.run(create_app(key, faults=Faults(**faults), storage_dir=storage), host="127.0.0.1", port=port,
            log_level="warning")
"""


async def start_dev_server(eager: bool = True):
    """The Temporal dev server as `smi dev` and the tests start it (devstack.start_dev_server, cli.TEMPORAL_DEV_FLAGS);
    with eager=False the same flags without eager activity dispatch, to measure what it gives (`--no-eager`).
    Prints which it is."""
    from unittest import mock

    flags = list(getattr(devstack, "TEMPORAL_DEV_FLAGS", []))  # absent before 5075544: no eager dispatch then
    if not eager and EAGER_ACTIVITIES in flags:
        at = flags.index(EAGER_ACTIVITIES)
        del flags[at - 1 : at + 1]  # "--dynamic-config-value", then the value
    with mock.patch.object(devstack, "TEMPORAL_DEV_FLAGS", flags, create=True):
        env = await devstack.start_dev_server()
    print(f"dev server: eager activity dispatch {'on' if EAGER_ACTIVITIES in flags else 'off'}", flush=True)
    return env


def server_argument(parser: argparse.ArgumentParser) -> None:
    """--no-eager: the dev server without eager activity dispatch (start_dev_server(eager=False))."""
    parser.add_argument(
        "--no-eager",
        dest="eager",
        action="store_false",
        help="start the dev server without eager activity dispatch (the flags of smi dev minus "
        f"--dynamic-config-value {EAGER_ACTIVITIES})",
    )


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError as exc:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from exc
            time.sleep(0.05)


class EmulatorProcess:
    """The Upsampler emulator (emulator/app.py) served by uvicorn in a child process."""

    def __init__(self, storage_dir: Path, faults: dict | None = None):
        from smi.serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                EMULATOR_RUNNER,
                UPSAMPLER_KEY,
                json.dumps(faults or {}),
                str(storage_dir),
                str(self.port),
            ],
            cwd=ROOT,
        )
        wait_for_port(self.port, process=self.process)

    def get(self, path: str):
        import httpx

        answer = httpx.get(f"{self.url}{path}", timeout=60)
        answer.raise_for_status()
        return answer.json()

    def set_faults(self, **faults) -> None:
        import httpx

        httpx.put(f"{self.url}/_emulator/faults", json=faults, timeout=30).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


STATIC_SERVER = """
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

class Handler(SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        self.connection.sendfile(source)  # the kernel copies; the server costs next to nothing

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), partial(Handler, directory=sys.argv[1])).serve_forever()
"""


class StaticServer:
    """The files of `folder` served on a loopback port by a small server in a process of its own (`sendfile`):
    it stands for Upsampler's CDN in the download benchmarks."""

    def __init__(self, folder: Path):
        from smi.serve import free_port

        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(folder), str(self.port)], cwd=ROOT)
        try:
            wait_for_port(self.port, process=self.process)
        except BaseException:
            self.stop()
            raise

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def make_file(path: Path, megabytes: int) -> str:
    """Random bytes (nothing compresses or repeats), written a MiB at a time; returns the SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(megabytes * 1_000_000 // (1 << 20)):
            block = os.urandom(1 << 20)
            digest.update(block)
            out.write(block)
        rest = os.urandom(megabytes * 1_000_000 % (1 << 20))
        digest.update(rest)
        out.write(rest)
    return digest.hexdigest()


def speed_and_growth(results: dict[str, list[dict]], size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per contender, from its runs of `size` bytes (each with seconds, peak_kib and base_kib): the median MB/s
    and the largest peak RSS growth in MiB."""
    speed = {n: statistics.median(size / 1e6 / one["seconds"] for one in runs) for n, runs in results.items()}
    growth = {n: max((one["peak_kib"] - one["base_kib"]) / 1024 for one in runs) for n, runs in results.items()}
    return speed, growth


def download_verdicts(speed: dict[str, float], growth: dict[str, float], baseline: str, seconds: float,
                      below: bool = False) -> dict:  # fmt: skip
    """A download benchmark's end: ours / `baseline` throughput against 0.8, ours' peak RSS growth against
    64 MiB (at most, or below it with `below`), and the run time, printed; the figures returned."""
    ratio = speed["ours"] / speed[baseline]
    print(f"throughput ratio ours / {baseline}: {ratio:.2f}   (target >= 0.8)   {verdict(ratio >= 0.8)}")
    ok, sign = (growth["ours"] < 64, "<") if below else (growth["ours"] <= 64, "<=")
    print(f"ours peak RSS growth: {growth['ours']:.1f} MiB   (target {sign} 64 MiB)   {verdict(ok)}")
    print(f"run time {seconds:.0f} s")
    return {"ratio": ratio, "growth": growth["ours"], "speed": speed}


def download_arguments(doc: str | None) -> argparse.Namespace:
    """The command line of a download benchmark: --megabytes (default 200), --rounds (default 5)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200, help="size of the result in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    return parser.parse_args()


class Stack:
    """Emulator, mail sink and API on loopback ports in this process; settings for a worker."""

    def __init__(self, temporal_address: str, emulator_faults: dict | None = None, **overrides):
        self.temporal_address = temporal_address
        self.emulator_faults = emulator_faults or {}
        self.overrides = overrides

    def __enter__(self) -> "Stack":
        from api.app import create_app
        from smi.mailsink import MailSink
        from smi.serve import ServerThread, free_port

        self.folder = tempfile.TemporaryDirectory(prefix="smi-bench-")
        tmp = Path(self.folder.name)
        self.emulator = EmulatorProcess(tmp / "emulator", self.emulator_faults)
        self.mailbox = MailSink(port=free_port()).start()
        port = free_port()
        emulator_host = self.emulator.url.split("//")[1]
        self.settings = make_settings(  # as the tests assemble it, with nothing waiting on a quota or a limit
            tmp,
            temporal_address=self.temporal_address,
            api_port=port,
            smtp_port=self.mailbox.port,
            emulator_url=self.emulator.url,
            allow_hosts=(emulator_host, f"127.0.0.1:{port}"),
            **{
                "upsampler_requests_per_minute": 60_000,
                "upsampler_requests_per_hour": 1_000_000,
                "public_rate_limit_per_minute": 1_000_000,
                **self.overrides,
            },
        )
        self.api = ServerThread(create_app(self.settings), port=port).start()
        return self

    def __exit__(self, *exc) -> None:
        self.api.stop()
        self.emulator.stop()
        self.mailbox.stop()
        self.folder.cleanup()

    @property
    def env(self) -> dict[str, str]:
        """The settings as SMI_* environment variables, for a worker in a subprocess (`smi worker`)."""
        return settings_variables(self.settings)

    def upload(self, data: bytes) -> str:
        """POST /v1/uploads: the signed image_url jobs can be ordered from (fetched by the API and the emulator)."""
        import httpx

        answer = httpx.post(
            f"{self.api.url}/v1/uploads",
            content=data,
            timeout=30,
            headers={"Authorization": f"Bearer {STOREFRONT_KEY}"},
        )
        answer.raise_for_status()
        return answer.json()["image_url"]


def order(image_url: str, order_id: str, scale_factor: int = 2) -> dict:
    return {
        "order_id": order_id,
        "image_url": image_url,
        "scale_factor": scale_factor,
        "format": "auto",
        "customer_email": "ana@example.com",
        "customer_name": "Ana",
        "amount_paid_cents": 1299,
        "currency": "USD",
        "payment_reference": "pi_bench",
    }


async def job_steps(handle) -> tuple[list[str], int]:
    """A finished job's history as the bare job's steps: A, U (Upsampler queue), L (local), S (signal).

    The wait for the webhook sits before the Upsampler call that follows the submission (the
    status check the webhook triggers); the signal is sent after the submission ("U!").
    Activities one workflow task scheduled together (e.g. the cost booked beside the download)
    are one step, "A&A", that the bare job runs at once too.
    """
    from temporalio.api.enums.v1 import EventType

    steps: list[str] = []
    signals = 0
    task = None  # the workflow task that scheduled the previous step, when it was an activity
    async for event in handle.fetch_history_events():
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            step = "U" if attributes.task_queue.name.endswith("-upsampler") else "A"
            if task == attributes.workflow_task_completed_event_id:
                steps[-1] += "&" + step
            else:
                steps.append(step)
            task = attributes.workflow_task_completed_event_id
            continue
        if kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            steps.append("L")
            task = None
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signals += 1
    first_u = steps.index("U")
    steps[first_u] = "U!"
    second_u = next(i for i, step in enumerate(steps) if i > first_u and step.startswith("U"))
    steps.insert(second_u, "S")
    return steps, signals


def describe_steps(steps: list[str]) -> str:
    parts = [part for step in steps for part in step.split("&")]
    activities = sum(1 for s in parts if s[0] in "AU")
    local = parts.count("L")
    return f"{activities} activities + {local} local activities + 1 signal ({' '.join(steps)})"


def bytecode_note() -> str:
    """Whether workflows/upscale.py has a bytecode cache. The workflow sandbox imports the module afresh for every
    new workflow; without a .pyc (PYTHONDONTWRITEBYTECODE, or a folder the process may not write, as in our
    image) that compiles the source each time, about 6 ms of CPU per job here (README, Benchmarks)."""
    import importlib.util

    cached = Path(importlib.util.cache_from_source(str(ROOT / "workflows" / "upscale.py")))
    if cached.exists():
        return "workflows/upscale.py has a .pyc"
    return "no .pyc for workflows/upscale.py: the workflow sandbox compiles it for every job"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


os.environ.setdefault("PYTHONUNBUFFERED", "1")


def children_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of each child process, by name: 'self', 'temporal', ..."""
    found = {"self": cpu_seconds()}
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(f"/proc/{entry}/stat")) and stat[1][1] == me:  # its parent: us
            name = stat[0]
            label = "temporal" if name.startswith("temporal") else "emulator" if name.startswith("python") else name
            found[label] = found.get(label, 0.0) + _cpu_of(stat[1])
    return found


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads so far, by kind: 'tokio' (the Temporal SDK's Rust core) or
    'python' (every other)."""
    found: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        if stat := _stat(f"/proc/self/task/{tid}/stat"):
            kind = "tokio" if stat[0].startswith("tokio") else "python"
            found[kind] = found.get(kind, 0.0) + _cpu_of(stat[1])
    return found


def _stat(path: str) -> tuple[str, list[str]] | None:
    """A /proc stat file: the name, and the fields after it (None when the process or thread is gone)."""
    try:
        stat = open(path).read()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU seconds (user + system, every thread) one process has used so far, from /proc/<pid>/stat."""
    stat = _stat(f"/proc/{pid}/stat")
    if stat is None:
        raise RuntimeError(f"no process {pid}")
    return _cpu_of(stat[1])


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}
