"""Several API replicas behind a proxy (issue 12, part 5): the client address is the forwarded one only
from SMI_TRUSTED_PROXIES. Real APIs (uvicorn on loopback ports, no Temporal behind them); SQLite, or
PostgreSQL with SMI_TEST_POSTGRES_URL set."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from devstack import database_url, make_settings
from smi.serve import ServerThread, free_port
from smi.settings import Settings

UNKNOWN_LINK = "/downloads/" + "e" * 64  # a public route (rate limited) that answers 404 for this token


@pytest.fixture
def replicas(tmp_path):
    """Starts API processes' equivalents: each its own app (its own Services) on its own port, served with
    its settings' trusted proxies, as `smi api` serves them."""
    servers: list[ServerThread] = []

    def serve(database: str, **overrides) -> ServerThread:
        port = free_port()
        settings = make_settings(
            tmp_path,
            temporal_address="127.0.0.1:9",
            api_port=port,
            smtp_port=9,
            emulator_url="http://127.0.0.1:9",
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


def clear_of_minute_boundary(seconds: float = 15.0) -> None:
    """The limits count per UTC minute: a sequence of requests that must fall into one minute starts with at
    least `seconds` of it left (when less is left, this waits for the next minute to begin)."""
    deadline = time.monotonic() + seconds + 5
    while 60 - time.time() % 60 < seconds:
        assert time.monotonic() < deadline, "the minute did not turn"
        time.sleep(0.05)


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
