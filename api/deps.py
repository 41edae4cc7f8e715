"""What the routers depend on: settings, the database, Temporal, and the two API keys."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlmodel import Session
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
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def temporal_client(self) -> Client:
        """Connect on first use, so the API can start before Temporal does."""
        async with self._lock:
            if self.temporal is None:
                try:
                    self.temporal = await Client.connect(
                        self.settings.temporal_address, namespace=self.settings.temporal_namespace,
                        data_converter=data_converter(self.settings),  # the worker's: same payload encryption
                    )
                except Exception:
                    raise ApiError(503, "temporal_unavailable", "the workflow service is not reachable; try again") from None
            return self.temporal


class RateLimiter:
    """Requests per client address and minute, in this API process (a sliding window)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], deque[float]] = {}

    def check(self, client: str, group: str, limit: int) -> float | None:
        """None when allowed, else the seconds until the client may ask again."""
        now = time.monotonic()
        window = self.seen.setdefault((client, group), deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= limit:
            return window[0] + 60 - now
        window.append(now)
        if len(self.seen) > 100_000:  # forget idle clients rather than grow without bound
            self.seen = {key: q for key, q in self.seen.items() if q and q[-1] > now - 60}
        return None


def public_rate_limit(request: Request) -> None:
    svc: Services = request.app.state.services
    client = request.client.host if request.client else "unknown"
    group = request.url.path.split("/")[1]
    wait = svc.limiter.check(client, group, svc.settings.public_rate_limit_per_minute)
    if wait is not None:
        raise ApiError(429, "rate_limited", "too many requests from this address; try again later",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})


def services(request: Request) -> Services:
    return request.app.state.services


def settings(svc: Services = Depends(services)) -> Settings:
    return svc.settings


def db(svc: Services = Depends(services)) -> Iterator[Session]:
    """For sync (`def`) handlers only, which FastAPI runs in its threadpool. An async handler would hold
    the pooled connection across its awaits (more such requests than the pool's connections and the
    API stalls) and block the event loop on every query: it runs small functions with
    `run_in_threadpool` instead, each opening `Session(svc.engine)` around its own reads and writes."""
    with Session(svc.engine) as session:
        yield session


def _bearer(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _require(request: Request, expected: list[str], who: str) -> None:
    token = _bearer(request).encode()
    matches = [hmac.compare_digest(token, key.encode()) for key in expected]  # every key compared: constant time
    if not token or not any(matches):
        raise ApiError(401, "unauthorized", f"a valid {who} API key is required as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


def storefront(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, cfg.storefront_keys(), "storefront")


def admin(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, [cfg.secret("admin_api_key")], "admin")
