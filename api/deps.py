"""What the routers depend on: settings, the database, Temporal, and the two API keys."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.templating import Jinja2Templates
from sqlalchemy import Table, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from temporalio.client import Client

from api import openapi
from api.errors import ApiError
from smi.codec import data_converter
from smi.db import RateLimitCount
from smi.mail import TEMPLATES
from smi.settings import Settings
from smi.storage import Storage, open_storage

log = logging.getLogger("smi.api")
pages = Jinja2Templates(directory=TEMPLATES)  # the HTML pages: status page and dashboard


@dataclass
class Services:
    settings: Settings
    engine: Engine
    temporal: Client | None = None
    # Redirects are not followed by httpx: the fetch guard follows them, checking each.
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10.0))
    # api/webhook.py: webhooks waiting for their submission's record, and those delivered lately.
    early_webhooks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))
    webhooks_delivered: OrderedDict = field(default_factory=OrderedDict)
    status_hub: Any = None  # api.status.StatusHub, the event streams' one poller (set by create_app)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        cfg = self.settings
        # The key of the client pseudonyms: the webhook secret (the same in every replica) under its own prefix.
        self.storage: Storage = open_storage(cfg)
        self.limiter = RateLimiter(self.engine, cfg.webhook_secret.get_secret_value() if cfg.webhook_secret else "")
        self.downloads = ConnectionCaps("downloads", cfg.downloads_per_client, cfg.downloads_total)
        self.event_streams = ConnectionCaps("status streams", cfg.status_streams_per_client, cfg.status_streams_total)

    async def temporal_client(self) -> Client:
        """Connect on first use, so the API can start before Temporal does."""
        async with self._lock:
            if self.temporal is None:
                try:
                    self.temporal = await Client.connect(
                        self.settings.temporal_address,
                        namespace=self.settings.temporal_namespace,
                        data_converter=data_converter(
                            self.settings.payload_codec()
                        ),  # the worker's: same payload encryption
                    )
                except Exception:
                    raise ApiError(
                        503, "temporal_unavailable", "the workflow service is not reachable; try again"
                    ) from None
            return self.temporal


class RateLimiter:
    """Requests per client, route group and UTC minute, counted in the database, so that every API process
    behind a balancer counts into the same number (table rate_limit_counts).

    A check is one upsert that adds the request and returns the minute's count, in the threadpool. What
    this process keeps is a cheap first filter: the clients it saw refused this minute (refused they stay
    until the minute ends, counts only grow), answered without the database; at most MAX_BLOCKED, forgotten
    when the minute turns. The first check of each minute in each process also deletes minutes gone by, at
    most PRUNE_BATCH rows a check until none is left, so the table holds about two minutes of clients.
    """

    MAX_BLOCKED = 100_000
    PRUNE_BATCH = 1000

    def __init__(self, engine: Engine, secret: str, clock: Callable[[], float] = time.time) -> None:
        self.engine, self.clock = engine, clock
        self.secret = secret.encode()
        self.table = table = cast(Table, RateLimitCount.__table__)  # type: ignore[attr-defined]
        insert: Callable[[Table], postgresql.Insert | sqlite.Insert]
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self.upsert = (
            insert(table)
            .on_conflict_do_update(
                index_elements=[table.c.minute, table.c.client, table.c.route_group],
                set_={"requests": table.c.requests + 1},
            )
            .returning(table.c.requests)
        )
        self.blocked: set[tuple[str, str]] = set()
        self.blocked_minute = -1
        self.pruned_minute = -1  # minutes before this one are gone (as far as this process knows)
        self._pruning = threading.Lock()

    def pseudonym(self, host: str) -> str:
        """The client's key (an IPv6 /64 as one) under a keyed hash: the table holds no address, and every
        key has the same short length whatever a proxy forwarded."""
        return hmac.new(self.secret, b"ratelimit:" + client_key(host).encode(), hashlib.sha256).hexdigest()[:32]

    async def check(self, host: str, group: str, limit: int) -> float | None:
        """None when allowed, else the seconds until the client may ask again (the minute's end)."""
        now = self.clock()
        minute = int(now // 60)
        if minute != self.blocked_minute:
            self.blocked, self.blocked_minute = set(), minute
        key = (self.pseudonym(host), group)
        if key not in self.blocked:
            if await run_in_threadpool(self.count, minute, *key) <= limit:
                return None
            if len(self.blocked) < self.MAX_BLOCKED and self.blocked_minute == minute:
                self.blocked.add(key)
        return (minute + 1) * 60 - now

    def count(self, minute: int, client: str, group: str) -> int:
        """Adds one request to the minute's count and returns the count (blocking: run in a thread)."""
        with self.engine.begin() as connection:
            requests = connection.execute(
                self.upsert, {"minute": minute, "client": client, "route_group": group, "requests": 1}
            ).scalar_one()
        if self.pruned_minute < minute:
            self.prune(minute)
        return requests

    def prune(self, minute: int) -> int:
        """Deletes at most PRUNE_BATCH rows of minutes before `minute`, oldest first; how many."""
        if not self._pruning.acquire(blocking=False):
            return 0  # another thread of this process is at it
        try:
            table = self.table
            key = tuple_(table.c.minute, table.c.client, table.c.route_group)
            oldest = select(table.c.minute, table.c.client, table.c.route_group).where(table.c.minute < minute)
            batch = oldest.order_by(table.c.minute).limit(self.PRUNE_BATCH)
            with self.engine.begin() as connection:
                deleted = connection.execute(delete(table).where(key.in_(batch))).rowcount
            if deleted < self.PRUNE_BATCH:
                self.pruned_minute = max(self.pruned_minute, minute)
            return deleted
        except OperationalError as exc:  # another process deleting the same rows (a deadlock on PostgreSQL)
            log.info("rate limit counts not pruned this time: %s", type(exc).__name__)
            return 0
        finally:
            self._pruning.release()


class ConnectionCaps:
    """Open long-lived connections of one kind (downloads, event streams): at most `per_client` for
    one client and `total` in this API process, so a few clients holding them cannot starve the rest."""

    def __init__(self, kind: str, per_client: int, total: int):
        self.kind, self.per_client, self.total = kind, per_client, total
        self.open: Counter[str] = Counter()

    def acquire(self, host: str) -> Callable[[], None]:
        """A release function, to call exactly once when the connection ends; or ApiError 429."""
        client = client_key(host)
        if self.open.total() >= self.total or self.open[client] >= self.per_client:
            raise ApiError(
                429,
                "too_many_connections",
                f"too many open {self.kind} right now; close one or try again in a minute",
                headers={"Retry-After": "60"},
            )
        self.open[client] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[client] -= 1
                if self.open[client] <= 0:
                    del self.open[client]

        return release


class ReleasedWhenSent:
    """Mixed into a Response class: calls `self.release` when the response is done, however it ends
    (sent whole, client gone, cancelled); a generator's `finally` would not run if never started."""

    release: Callable[[], None]

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            self.release()


def client_host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def client_key(host: str) -> str:
    """An IPv6 client is its /64: one host gets a whole /64, so single addresses would be free to rotate."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and not address.ipv4_mapped:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else host


async def public_rate_limit(request: Request) -> None:
    svc: Services = request.app.state.services
    group = request.url.path.split("/")[1]
    wait = await svc.limiter.check(client_host(request), group, svc.settings.public_rate_limit_per_minute)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            "too many requests from this address; try again later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def services(request: Request) -> Services:
    return request.app.state.services


def settings(svc: Services = Depends(services)) -> Settings:
    return svc.settings


# No `Depends` yields a database session: its exit runs only after the response body is sent, so a
# client reading slowly (or not at all) would hold a pooled connection. Handlers open
# `Session(svc.engine)` around their reads and writes, in the threadpool, and close it before
# they return.


def bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def key_matches(authorization: str, expected: list[str]) -> bool:
    token = bearer(authorization).encode()
    matches = [hmac.compare_digest(token, key.encode()) for key in expected]  # every key compared: constant time
    return bool(token) and any(matches)


def unauthorized(who: str) -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        f"a valid {who} API key is required as 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _require(request: Request, expected: list[str], who: str) -> None:
    if not key_matches(request.headers.get("Authorization", ""), expected):
        raise unauthorized(who)


# `Security(...)`: each names its Bearer scheme in OpenAPI (the Authorize button of /docs); the check is ours.
def storefront(request: Request, cfg: Settings = Depends(settings), _: Any = Security(openapi.STOREFRONT)) -> None:
    _require(request, cfg.storefront_keys(), "storefront")


def admin(request: Request, cfg: Settings = Depends(settings), _: Any = Security(openapi.ADMIN)) -> None:
    _require(request, [cfg.secret("admin_api_key")], "admin")
