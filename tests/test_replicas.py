"""Several API replicas behind a proxy (issue 12, part 5): the client address is the forwarded one only
from SMI_TRUSTED_PROXIES, the public rate limits are counted in the database by every replica alike, and
that table keeps only the current minute. Real APIs (uvicorn on loopback ports, no Temporal behind them);
SQLite, or PostgreSQL with SMI_TEST_POSTGRES_URL set."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, func, insert, select

from api.app import create_app
from api.deps import RateLimiter
from devstack import api_only_settings, database_url
from smi.db import RateLimitCount, make_engine
from smi.migrations import migrate
from smi.serve import ServerThread, free_port
from smi.settings import Settings
from tests.helpers import clear_of_minute_boundary

UNKNOWN_LINK = "/downloads/" + "e" * 64  # a public route (rate limited) that answers 404 for this token


@pytest.fixture
def replicas(tmp_path):
    """Starts API processes' equivalents: each its own app (its own Services) on its own port, served with
    its settings' trusted proxies, as `smi api` serves them."""
    servers: list[ServerThread] = []

    def serve(database: str, **overrides) -> ServerThread:
        port = free_port()
        settings = api_only_settings(
            tmp_path,
            port,
            database_url=database,
            **overrides,
        )
        server = ServerThread(create_app(settings), port=port, trusted_proxies=settings.trusted_proxy_list())
        servers.append(server.start())
        return server

    yield serve
    for server in servers:
        server.stop()


def own_database(tmp_path: Path, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    return database_url(folder)


def statuses(server: ServerThread, forwarded_for: list[str | None], path: str = UNKNOWN_LINK) -> list[int]:
    """One request per entry, with that X-Forwarded-For (None: no header)."""
    answers = []
    for value in forwarded_for:
        headers = {"X-Forwarded-For": value} if value is not None else {}
        answers.append(httpx.get(server.url + path, headers=headers, timeout=10).status_code)
    return answers


def test_a_trusted_proxy_forwards_the_client_address(replicas, tmp_path):
    clear_of_minute_boundary()
    # Trusted as a network (a CIDR): the peer, 127.0.0.1, is inside it.
    proxied = replicas(own_database(tmp_path, "a"), public_rate_limit_per_minute=3, trusted_proxies="127.0.0.0/8,::1")
    assert statuses(proxied, ["203.0.113.5"] * 4) == [404] * 3 + [429]  # limited by the forwarded address
    assert statuses(proxied, ["203.0.113.6"]) == [404]  # another client, its own count
    # What a client writes itself comes first; the proxy appends the address it saw, and that one counts.
    assert statuses(proxied, ["198.51.100.1, 203.0.113.5"]) == [429]
    assert statuses(proxied, [None]) == [404]  # the proxy's own request (no header) is the proxy's
    # An IPv6 client counts as its /64, forwarded too.
    assert statuses(proxied, [f"2001:db8:1:2::{i:x}" for i in range(1, 5)]) == [404] * 3 + [429]
    assert statuses(proxied, ["2001:db8:1:3::1"]) == [404]


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(replicas, tmp_path):
    clear_of_minute_boundary()
    exposed = replicas(own_database(tmp_path, "b"), public_rate_limit_per_minute=3)  # SMI_TRUSTED_PROXIES unset
    # Each request claims another address: all of them are the peer's own (127.0.0.1), one count.
    assert statuses(exposed, [f"203.0.113.{i}" for i in range(1, 5)]) == [404] * 3 + [429]
    # Trusting some other proxy changes nothing for this peer.
    elsewhere = replicas(own_database(tmp_path, "c"), public_rate_limit_per_minute=3, trusted_proxies="10.0.0.0/8")
    assert statuses(elsewhere, [f"203.0.113.{i}" for i in range(1, 5)]) == [404] * 3 + [429]


@pytest.mark.parametrize("value", ["10.0.0.1/8", "proxy.internal", "*"])
def test_a_malformed_trusted_proxy_stops_the_process_at_start(value):
    """uvicorn would take it as a host name no peer address ever equals: trusting nothing, silently."""
    with pytest.raises(ValueError, match="SMI_TRUSTED_PROXIES"):
        Settings(env="dev", trusted_proxies=value)


def test_two_replicas_share_one_limit(replicas, tmp_path):
    clear_of_minute_boundary()
    database = database_url(tmp_path)
    a = replicas(database, public_rate_limit_per_minute=6)
    b = replicas(database, public_rate_limit_per_minute=6)
    assert [statuses(server, [None])[0] for server in (a, b) * 3] == [404] * 6  # 3 + 3 of the 6
    for server in (a, b):  # the 7th and 8th: refused by either, though each has seen only 3 or 4
        refused = httpx.get(server.url + UNKNOWN_LINK, timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60  # the minute's end
    # Another group of routes has its own count, shared as well.
    signed_file = "/files/originals/x.png?exp=1&sig=" + "0" * 64
    assert statuses(a, [None] * 3, signed_file) + statuses(b, [None] * 4, signed_file) == [404] * 6 + [429]


CLOCK_START = 29_000_000 * 60.0  # a minute's first second


@pytest.fixture
def counted(tmp_path):
    """A limiter on a real (migrated) database, with its own clock, and the statements it runs."""
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    now = [CLOCK_START]
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    yield RateLimiter(engine, "a secret", clock=lambda: now[0]), now, statements
    engine.dispose()


async def test_a_refused_client_costs_no_query_until_the_minute_ends(counted):
    limiter, now, statements = counted
    assert [await limiter.check("10.0.0.1", "downloads", 2) for _ in range(3)] == [None, None, 60.0]
    queries = len(statements)
    now[0] += 50
    assert [await limiter.check("10.0.0.1", "downloads", 2) for _ in range(100)] == [10.0] * 100
    assert len(statements) == queries  # refused from memory
    now[0] += 10  # the next minute: counted afresh, in the database again
    assert await limiter.check("10.0.0.1", "downloads", 2) is None and len(statements) > queries
    # The database holds no address: the client is a keyed hash of it (of its /64 for IPv6).
    with limiter.engine.connect() as connection:
        clients = set(connection.scalars(select(RateLimitCount.client)))
    assert clients and not any("10.0.0.1" in client for client in clients)


def test_minutes_gone_by_are_deleted_in_bounded_batches(replicas, tmp_path):
    database = database_url(tmp_path)
    server = replicas(database)
    engine = make_engine(database)
    minute = int(time.time() // 60)
    old_rows = 2 * RateLimiter.PRUNE_BATCH + 500  # as after a flood from that many sources
    with engine.begin() as connection:  # three minutes gone by, each with its clients
        connection.execute(
            insert(RateLimitCount),
            [
                dict(minute=minute - 5 + i % 3, client=f"c{i}", route_group="downloads", requests=9)
                for i in range(old_rows)
            ],
        )

    def left() -> int:
        with engine.connect() as connection:
            return connection.scalar(select(func.count()).where(RateLimitCount.minute < minute - 1))

    remaining = []
    for _ in range(4):  # each request deletes one batch at most, oldest first, until none is left
        assert statuses(server, [None]) == [404]
        remaining.append(left())
    assert remaining == [old_rows - RateLimiter.PRUNE_BATCH, old_rows - 2 * RateLimiter.PRUNE_BATCH, 0, 0]
    with engine.connect() as connection:  # what is left: this minute's (or, past a minute's turn, the last one's)
        assert connection.scalar(select(func.count()).select_from(RateLimitCount)) <= 2
    engine.dispose()
