"""A 200 MB result through our download activity vs a bare httpx streamed copy to a file.

    .venv/bin/python bench/download_200mb.py [--megabytes 200] [--rounds 5]

A small static server (its own process, `sendfile`) serves one file of random bytes on a
loopback port. Ours: `StorageActivities.download_result` (activities/storage.py: the fetch
guard, streaming to a temporary file, SHA-256 and writes in a thread while the next batch is
read, heartbeats, the rename), called through temporalio.testing.ActivityEnvironment so
heartbeats work, with settings allowing that one host as Upsampler's CDN. Baseline:
`httpx.AsyncClient.stream` and `aiter_bytes()` written to a file, nothing else. Each run is a
fresh subprocess, so its peak RSS (VmHWM) is its own; the growth is the peak minus the RSS after imports and set-up.
The rounds alternate (bare, ours, bare, ours, ...); medians are compared. Targets: ours >= 0.8
of the bare copy's throughput, peak RSS growth < 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, StaticServer, download_arguments, download_verdicts, make_file, speed_and_growth  # noqa: E402

COMMON = """
import asyncio, json, sys, time
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
URL, FOLDER = sys.argv[1], sys.argv[2]
"""

OURS = (
    COMMON
    + """
from pathlib import Path
from temporalio.testing import ActivityEnvironment
from activities.storage import StorageActivities
from smi.settings import Settings
from smi.vocabulary import DownloadRequest

host = URL.split("/")[2]
settings = Settings(env="dev", storage_dir=Path(FOLDER), fetch_allow_hosts=host, upsampler_result_hosts=host)
storage = StorageActivities(settings)
env = ActivityEnvironment()
beats = []
env.on_heartbeat = lambda *details: beats.append(details)

async def main():
    base = hwm()
    start = time.perf_counter()
    done = await env.run(storage.download_result, DownloadRequest("0" * 32, URL, 1))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "bytes": done.bytes, "sha256": done.sha256, "peak_kib": hwm(),
                      "base_kib": base, "heartbeats": len(beats)}))
asyncio.run(main())
"""
)

BARE = (
    COMMON
    + """
import httpx

async def main():
    async with httpx.AsyncClient(timeout=60) as http:
        base = hwm()
        start = time.perf_counter()
        size = 0
        async with http.stream("GET", URL) as response:
            response.raise_for_status()
            with open(FOLDER + "/copy", "wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
                    size += len(chunk)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "bytes": size, "sha256": None, "peak_kib": hwm(), "base_kib": base,
                      "heartbeats": 0}))
asyncio.run(main())
"""
)

CONTENDERS = {"bare": BARE, "ours": OURS}  # name: the code run in a fresh subprocess
LABELS = {
    "bare": "bare httpx stream -> file (baseline)",
    "ours": "ours: download_result (guard, hash, heartbeats)",
}


def run(code: str, url: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, url, str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=600
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for path in sorted(folder.rglob("*"), reverse=True):  # 200 MB each: do not keep them
            path.unlink() if path.is_file() else path.rmdir()


def main(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smi-bench-download-") as tmp:
        served = Path(tmp) / "served"
        served.mkdir()
        made = time.perf_counter()
        expected = make_file(served / "result.png", args.megabytes)
        print(f"test file: {args.megabytes} MB of random bytes (made in {time.perf_counter() - made:.1f} s)")
        server = StaticServer(served)
        try:
            url = server.url("result.png")
            names = list(CONTENDERS)
            results: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names:
                    results[name].append(run(CONTENDERS[name], url, Path(tmp) / name))
                line = [f"round {r + 1}:"]
                for name in names:
                    last = results[name][-1]
                    line.append(
                        f"{name} {last['bytes'] / 1e6 / last['seconds']:7.1f} MB/s "
                        f"+{(last['peak_kib'] - last['base_kib']) / 1024:5.1f} MiB"
                    )
                print("   ".join(line), flush=True)
        finally:
            server.stop()

    size = args.megabytes * 1_000_000
    for name, runs in results.items():
        for one in runs:
            if one["bytes"] != size or (one["sha256"] is not None and one["sha256"] != expected):
                raise RuntimeError(f"{name}: wrong bytes: {one}")
    speed, growth = speed_and_growth(results, size)
    peak = {name: max(one["peak_kib"] / 1024 for one in runs) for name, runs in results.items()}
    beats = [one["heartbeats"] for one in results["ours"]]
    print(
        f"\n{args.megabytes} MB over loopback, {args.rounds} alternating rounds, medians; the SHA-256 "
        f"our activity returns checked against the file's each time; heartbeats per download: {beats}"
    )
    for name in results:
        print(
            f"{LABELS[name]:47s} {speed[name]:7.1f} MB/s   peak RSS growth {growth[name]:5.1f} MiB "
            f"(process peak {peak[name]:5.1f} MiB)"
        )
    return download_verdicts(speed, growth, "bare", time.perf_counter() - began, below=True)


if __name__ == "__main__":
    main(download_arguments(__doc__))
