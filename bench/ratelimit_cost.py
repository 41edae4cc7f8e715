"""What the shared rate limit (api/deps.py RateLimiter) costs per request, on SQLite and on PostgreSQL.

    .venv/bin/python bench/ratelimit_cost.py [--checks 3000] [--postgres-url URL | --no-postgres]

Without --postgres-url (or SMI_TEST_POSTGRES_URL) a throwaway PostgreSQL is started with
`.ci/start-postgres`, as `make test-postgres` does, and stopped at the end (that cluster runs with
fsync=off: a production server's commit costs more). For each database, on a fresh migrated one:

- the check as a request makes it (`await RateLimiter.check`: a keyed hash, the threadpool hop, one
  upsert-increment in its own transaction), one after another, over 200 clients;
- the same with 32 checks in flight at once (threadpool and connection pool shared, as in the API);
- a client already refused this minute (the in-process first filter: no query);
- deleting one batch of minutes gone by (PRUNE_BATCH rows; once a minute per process);
- for scale, a whole request that carries a check: `GET /downloads/<unknown token>` (a 404 after the
  check and one token lookup) through the real API on loopback, one connection, one after another.

Prints mean and percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _harness import ROOT, make_settings, quiet
from sqlalchemy import insert

from api.app import create_app
from api.deps import RateLimiter
from devstack import database_url
from smi.db import RateLimitCount, make_engine
from smi.migrations import migrate
from smi.serve import ServerThread, free_port

CLIENTS = 200


def figures(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return (
        f"mean {statistics.fmean(ms):.3f} ms, p50 {pick(0.5):.3f}, p95 {pick(0.95):.3f}, p99 {pick(0.99):.3f}"
        f" ({len(ms)} checks)"
    )


async def sequential(limiter: RateLimiter, checks: int) -> list[float]:
    took = []
    for i in range(checks):
        start = time.perf_counter()
        await limiter.check(f"198.51.100.{i % CLIENTS}", "downloads", 1_000_000)
        took.append(time.perf_counter() - start)
    return took


async def concurrent(limiter: RateLimiter, checks: int, in_flight: int) -> tuple[float, list[float]]:
    took: list[float] = []

    async def one_client(n: int) -> None:
        for i in range(checks // in_flight):
            start = time.perf_counter()
            await limiter.check(f"203.0.113.{(n * 7 + i) % CLIENTS}", "files", 1_000_000)
            took.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(in_flight)))
    return time.perf_counter() - start, took


async def refused(limiter: RateLimiter, checks: int) -> list[float]:
    while await limiter.check("192.0.2.1", "status", 1) is None:
        pass
    took = []
    for _ in range(checks):
        start = time.perf_counter()
        await limiter.check("192.0.2.1", "status", 1)
        took.append(time.perf_counter() - start)
    return took


def prune_batch(limiter: RateLimiter) -> float:
    minute = int(time.time() // 60)
    rows = [
        dict(minute=minute - 3, client=f"old{i}", route_group="downloads", requests=5)
        for i in range(RateLimiter.PRUNE_BATCH)
    ]
    with limiter.engine.begin() as connection:
        connection.execute(insert(RateLimitCount), rows)
    start = time.perf_counter()
    deleted = limiter.prune(minute)
    took = time.perf_counter() - start
    assert deleted == RateLimiter.PRUNE_BATCH, deleted
    return took


def http_requests(url: str, tmp: Path, checks: int) -> list[float]:
    port = free_port()
    settings = make_settings(
        tmp,
        temporal_address="127.0.0.1:9",
        api_port=port,
        smtp_port=9,
        emulator_url="http://127.0.0.1:9",
        database_url=url,
    )
    took = []
    with ServerThread(create_app(settings), port=port), httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(50):  # warm: connection, pools, first-minute prune
            client.get("/downloads/" + "e" * 64)
        for _ in range(checks):
            start = time.perf_counter()
            assert client.get("/downloads/" + "e" * 64).status_code == 404
            took.append(time.perf_counter() - start)
    return took


async def measure(name: str, url: str, checks: int, tmp: Path) -> None:
    engine = make_engine(url)
    migrate(engine)
    limiter = RateLimiter(engine, "bench secret")
    await sequential(limiter, 200)  # warm: connections, statement caches
    print(f"{name}:")
    print(f"  check, one at a time        {figures(await sequential(limiter, checks))}")
    wall, took = await concurrent(limiter, checks, 32)
    print(f"  check, 32 in flight         {figures(took)}; {len(took) / wall:,.0f} checks/s")
    print(f"  refused client (no query)   {figures(await refused(limiter, checks))}")
    batch = f"prune {RateLimiter.PRUNE_BATCH} old rows"
    print(f"  {batch:<28}{prune_batch(limiter) * 1000:.1f} ms (once a minute per process)")
    print(f"  GET /downloads/<unknown>    {figures(http_requests(url, tmp, checks))} (whole request, check included)")
    engine.dispose()


async def main(args: argparse.Namespace) -> None:
    quiet()
    server = args.postgres_url or os.environ.pop("SMI_TEST_POSTGRES_URL", None)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        await measure("SQLite (WAL, synchronous=NORMAL)", database_url(tmp), args.checks, tmp)
        if args.no_postgres:
            return
        stop = None
        if not server:
            started = subprocess.run(
                ["bash", str(ROOT / ".ci/start-postgres")], check=True, capture_output=True, text=True
            ).stdout.splitlines()
            server, stop = started[0], started[1]
        try:
            os.environ["SMI_TEST_POSTGRES_URL"] = server  # devstack.database_url: a fresh database on that server
            await measure("PostgreSQL (psycopg, loopback)", database_url(tmp), args.checks, tmp)
        finally:
            if stop:
                subprocess.run(stop, shell=True, check=False, capture_output=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=3000, help="checks per measurement (default 3000)")
    parser.add_argument("--postgres-url", help="a PostgreSQL server to create the bench database on")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    asyncio.run(main(parser.parse_args()))
