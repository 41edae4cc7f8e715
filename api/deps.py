"""What the routers depend on: settings, the database, Temporal, and the two API keys."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from temporalio.client import Client

from api.errors import ApiError
from smi.codec import data_converter
from smi.mail import TEMPLATES
from smi.settings import Settings

pages = Jinja2Templates(directory=TEMPLATES)  # the HTML pages: status page and dashboard


@dataclass
class Services:
    settings: Settings
    engine: Engine
    temporal: Client | None = None
    # Redirects are not followed by httpx: the fetch guard follows them, checking each.
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10.0))
    limiter: "RateLimiter" = field(default_factory=lambda: RateLimiter())
    # api/webhook.py: webhooks waiting for their submission's record, and those delivered lately.
    early_webhooks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))
    webhooks_delivered: OrderedDict = field(default_factory=OrderedDict)
    status_hub: Any = None  # api.status.StatusHub, the event streams' one poller (set by create_app)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        cfg = self.settings
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
    """Requests per client and minute, in this API process (a sliding window).

    Clients are kept in least-recently-seen order, so forgetting idle ones costs O(1) per request
    however many sources an attacker uses; past MAX_CLIENTS the least recent is dropped.
    """

    MAX_CLIENTS = 100_000

    def __init__(self) -> None:
        self.seen: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def check(self, client: str, group: str, limit: int) -> float | None:
        """None when allowed, else the seconds until the client may ask again."""
        now = time.monotonic()
        self._forget_idle(now)
        key = (client_key(client), group)
        window = self.seen.pop(key, None) or deque()
        self.seen[key] = window  # moved to the end: the most recently seen
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= limit:
            return window[0] + 60 - now
        window.append(now)
        return None

    def _forget_idle(self, now: float) -> None:
        """From the least recently seen on, until one still counts (amortised O(1) a request)."""
        while self.seen:
            key, window = next(iter(self.seen.items()))
            if len(self.seen) < self.MAX_CLIENTS and window and window[-1] > now - 60:
                return
            del self.seen[key]


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


def public_rate_limit(request: Request) -> None:
    svc: Services = request.app.state.services
    group = request.url.path.split("/")[1]
    wait = svc.limiter.check(client_host(request), group, svc.settings.public_rate_limit_per_minute)
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


def storefront(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, cfg.storefront_keys(), "storefront")


def admin(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, [cfg.secret("admin_api_key")], "admin")
