"""100 customers download one 50 MB result at once: the API's CPU per download, streamed vs offloaded.

    .venv/bin/python bench/download_offload.py [--megabytes 50] [--downloads 100] [--rounds 3]

Two APIs run side by side, each `smi api` (create_app served by uvicorn) in a process of its own,
with its own SQLite database, so its CPU time is read from /proc/<pid>/stat before and after:

- local: the local storage backend; GET /downloads/{token} streams the file itself (FileResponse);
- s3: the s3 backend on devstack.S3Server (SeaweedFS `weed mini` on loopback, signatures checked);
  GET /downloads/{token} answers 303 to a presigned GET and the client follows it to the S3 server.

In each, one finished job's result (random bytes) is put in storage through the backend as a
worker's store step leaves it (open_storage(settings).put), and its jobs row and download link
are written as the tests write them (devstack.Site: add_job, complete). SMI_DOWNLOAD_MAX_COUNT
is set (high), so every download is counted in the database as a capped link's would be, and the
per-client limits (SMI_DOWNLOADS_PER_CLIENT, SMI_DOWNLOADS_TOTAL, the public rate limit) are high
enough for every download to come from 127.0.0.1 at once.

A round: `--downloads` concurrent GETs of the link by one httpx.AsyncClient (a connection each,
redirects followed), each body read whole and counted, the first one's SHA-256 checked against
the file's. Before the first round each API serves one download, not measured (imports, first
presign). The rounds alternate (local, s3, ...); medians are reported: the API's CPU seconds
per download, wall time from the first request to the last byte, and for context the CPU of the
S3 server and of the client (this process), and the API's peak RSS.

Figures, 2026-12-01 18:23, on the 2 cores with no other session's load (load average 2.3 before, 2.6
after: the s3 download benchmark had just run):
    .venv/bin/python bench/download_offload.py --megabytes 50 --downloads 100 --rounds 3
    100 concurrent downloads of a 50 MB result from 127.0.0.1, 3 alternating rounds, medians
                                                API CPU s ms/download  wall s   MB/s S3 CPU s client CPU s API peak RSS
      local: FileResponse streamed by the API       14.26      142.60    13.6    367     0.08         8.16      160 MiB
      s3: 303 to a presigned GET, followed           0.66        6.60     9.9    503     1.93         9.40      161 MiB
    API CPU per download, s3 (303) / local (streamed): 0.046
Rounds: local 14.21, 14.26, 16.41 s of API CPU; s3 0.58, 0.66, 0.71 s. An earlier run that day,
under heavy load (load average 5 to 7), gave 118.8 and 5.7 ms a download (0.048). What is left in
s3 mode (6 to 7 ms a download) is the request itself: the public rate limit and the download
count written to SQLite, the token read, one presign, the access log line. The bytes cost the S3
server (Go, weed mini) about 1.9 s of CPU for the 5 GB. Wall times are bounded by the client here
(one Python process reading 5 GB, 8 to 9 s of CPU), not by either API.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BIN, cpu_seconds, make_file, rss_kib, wait_for_port  # noqa: E402

MODES = {
    "local": "local backend: FileResponse streamed by the API",
    "s3": "s3 backend: 303 to a presigned GET, followed",
}


class Api:
    """`smi api` in a child process for one storage backend, and the one job whose result it hands out."""

    def __init__(self, mode: str, folder: Path, args: argparse.Namespace, source: Path, s3_server):
        from devstack import Site, api_only_settings, free_ports, settings_environment
        from smi.db import make_engine
        from smi.storage import job_key, open_storage

        folder.mkdir()
        self.mode, self.port = mode, free_ports(1)[0]
        many = 10 * args.downloads
        self.settings = api_only_settings(
            folder,
            self.port,
            downloads_per_client=many,
            downloads_total=many,
            download_max_count=1_000_000,
            public_rate_limit_per_minute=1_000_000,
            **(s3_server.storage_settings if mode == "s3" else {}),
        )
        self.log = open(folder / "api.log", "wb")
        self.process = subprocess.Popen(
            [str(BIN / "smi"), "api"],
            env=settings_environment(self.settings),
            cwd=folder,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout=60, process=self.process)
        self.url = f"http://127.0.0.1:{self.port}"
        # The result as the store step leaves it, then the finished job and its link as the tests write them.
        site = Site(self.url, make_engine(self.settings.database_url), self.settings, app=None)
        job_id = site.add_job("storing")
        storage = open_storage(self.settings)
        key = job_key(job_id, "upscaled_7200x4800.png")
        scratch = storage.scratch(key)
        scratch.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, scratch)
        storage.put(scratch, key)
        self.link = site.complete(job_id, storage.location(key))
        site.set_status(job_id, "completed", output_bytes=source.stat().st_size)  # complete() writes a made-up size
        site.engine.dispose()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


async def download(http, link: str, digest=None) -> tuple[int, list[int]]:
    """One customer's download: the bytes received and the statuses on the way (303 then 200, or 200)."""
    size = 0
    async with http.stream("GET", link) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if digest is not None:
                digest.update(chunk)
    return size, [r.status_code for r in response.history] + [response.status_code]


async def one_round(api: Api, count: int, expected: tuple[int, str], s3_pid: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, follow_redirects=True, timeout=300) as http:
        digest = hashlib.sha256()
        cpu = {"api": cpu_seconds(api.process.pid), "s3": cpu_seconds(s3_pid), "client": cpu_seconds()}
        start = time.perf_counter()
        done = await asyncio.gather(*(download(http, api.link, digest if i == 0 else None) for i in range(count)))
        wall = time.perf_counter() - start
        cpu = {
            "api": cpu_seconds(api.process.pid) - cpu["api"],
            "s3": cpu_seconds(s3_pid) - cpu["s3"],
            "client": cpu_seconds() - cpu["client"],
        }
    path = [303, 200] if api.mode == "s3" else [200]
    wrong = [(size, statuses) for size, statuses in done if size != expected[0] or statuses != path]
    if wrong or digest.hexdigest() != expected[1]:
        raise RuntimeError(f"{api.mode}: {len(wrong)} downloads went wrong, e.g. {wrong[:3]}")
    return {"wall": wall, **cpu}


async def measure(args: argparse.Namespace, apis: dict[str, Api], expected: tuple[int, str], s3_pid: int) -> dict:
    for api in apis.values():  # imports, the first presign: not measured
        await one_round(api, 1, expected, s3_pid)
    results: dict[str, list[dict]] = {mode: [] for mode in apis}
    for r in range(args.rounds):
        line = [f"round {r + 1}:"]
        for mode, api in apis.items():
            one = await one_round(api, args.downloads, expected, s3_pid)
            results[mode].append(one)
            line.append(
                f"{mode} API {one['api']:6.2f} s CPU ({one['api'] / args.downloads * 1000:6.2f} ms/download), "
                f"wall {one['wall']:5.1f} s"
            )
        print("   ".join(line), flush=True)
    return results


def main(args: argparse.Namespace) -> dict:
    from devstack import S3Server

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smi-bench-offload-") as folder:
        tmp = Path(folder)
        source = tmp / "result.png"
        expected = (args.megabytes * 1_000_000, make_file(source, args.megabytes))
        s3_server = S3Server(tmp / "s3-server")
        apis: dict[str, Api] = {}
        try:
            for mode in MODES:
                apis[mode] = Api(mode, tmp / mode, args, source, s3_server)
            print(f"{args.megabytes} MB result; APIs: " + ", ".join(f"{m} {a.url}" for m, a in apis.items()))
            results = asyncio.run(measure(args, apis, expected, s3_server.process.pid))
            peak = {mode: rss_kib(api.process.pid, "VmHWM") / 1024 for mode, api in apis.items()}
        finally:
            for api in apis.values():
                api.stop()
            s3_server.stop()
    return report(args, results, peak, time.perf_counter() - began)


def report(args: argparse.Namespace, results: dict[str, list[dict]], peak: dict, seconds: float) -> dict:
    n = args.downloads
    med = {mode: {k: statistics.median(one[k] for one in runs) for k in runs[0]} for mode, runs in results.items()}
    print(
        f"\n{n} concurrent downloads of a {args.megabytes} MB result from 127.0.0.1, {args.rounds} alternating "
        "rounds, medians; CPU: user + system seconds over the round"
    )
    print(
        f"  {'':46s} {'API CPU s':>9s} {'ms/download':>11s} {'wall s':>7s} {'MB/s':>6s} {'S3 CPU s':>8s} "
        f"{'client CPU s':>12s} {'API peak RSS':>12s}"
    )
    for mode, label in MODES.items():
        m = med[mode]
        print(
            f"  {label:46s} {m['api']:9.2f} {m['api'] / n * 1000:11.2f} {m['wall']:7.1f} "
            f"{n * args.megabytes / m['wall']:6.0f} {m['s3']:8.2f} {m['client']:12.2f} {peak[mode]:8.0f} MiB"
        )
    ratio = med["s3"]["api"] / med["local"]["api"]
    print(f"API CPU per download, s3 (303) / local (streamed): {ratio:.3f}")
    print(f"run time {seconds:.0f} s")
    return {"median": med, "ratio": ratio, "peak_mib": peak}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=50, help="size of the result in MB (default 50)")
    parser.add_argument("--downloads", type=int, default=100, help="concurrent downloads per round (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    main(parser.parse_args())
