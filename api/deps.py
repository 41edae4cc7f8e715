"""What the routers depend on: settings, the database, Temporal, and the two API keys."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client

from api.errors import ApiError
from smi.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    temporal: Client | None = None
    # Redirects are not followed by httpx: the fetch guard follows them, checking each.
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10.0))
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def temporal_client(self) -> Client:
        """Connect on first use, so the API can start before Temporal does."""
        async with self._lock:
            if self.temporal is None:
                try:
                    self.temporal = await Client.connect(
                        self.settings.temporal_address, namespace=self.settings.temporal_namespace
                    )
                except Exception:
                    raise ApiError(503, "temporal_unavailable", "the workflow service is not reachable; try again") from None
            return self.temporal


def services(request: Request) -> Services:
    return request.app.state.services


def settings(svc: Services = Depends(services)) -> Settings:
    return svc.settings


def db(svc: Services = Depends(services)) -> Iterator[Session]:
    with Session(svc.engine) as session:
        yield session


def _bearer(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _require(request: Request, expected: str, who: str) -> None:
    token = _bearer(request)
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", f"a valid {who} API key is required as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


def storefront(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, cfg.secret("storefront_api_key"), "storefront")


def admin(request: Request, cfg: Settings = Depends(settings)) -> None:
    _require(request, cfg.secret("admin_api_key"), "admin")
