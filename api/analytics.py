"""The sales funnel over HTTP: `POST /v1/funnel`, where the embed script counts buttons shown and modals opened,
and `GET /v1/admin/analytics`, the funnel per page and per image (JSON or CSV). The counting is smi/funnel.py.

`POST /v1/funnel` is called from any page that carries a publishable key, so it trusts nothing the page says:

- the key (api/guard.py checks it is one of SMI_PUBLISHABLE_KEYS before the body is read) and the browser's
  `Origin`, which must be one of the key's origins (a browser cannot forge it; a script outside one can);
- every event's page URL must lie on one of the key's origins and its image on one of the key's image hosts,
  else the whole batch is refused and nothing is counted;
- each client address, and each key over all clients, has a budget of batches per minute (the shared
  database rate limiter, api/deps.py): a batch over either is a 429 and counts nothing. At most 50 events a
  batch, each standing for at most 100 views, so one key's figures grow by at most
  SMI_FUNNEL_KEY_BATCHES_PER_MINUTE x 50 x 100 a minute whoever sends them, and one client's by its own budget.

No cookie is read or set, and nothing about the visitor is stored: not the address (the rate limiter keeps a
keyed hash of it for a minute or two), and the URLs without query or fragment.
"""

from __future__ import annotations

import hashlib
import math
from datetime import date, timedelta
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api import deps
from api.errors import ApiError
from api.openapi import INVALID, KEYED_ERRORS, PUBLISHABLE, errors, merged
from smi import funnel
from smi.db import utcnow
from smi.settings import PublishableKey

router = APIRouter(tags=["funnel"])
PREFLIGHT_SECONDS = 600


class FunnelEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["shown", "opened"] = Field(description="`shown`: the button was shown; `opened`: its modal opened")
    page_url: str = Field(max_length=4096, description="the page; its query and fragment are dropped")
    image_url: str = Field(
        max_length=4096, description="the image's URL (`img.currentSrc`); query and fragment dropped"
    )
    count: int = Field(1, ge=1, le=funnel.MAX_COUNT, description="how many views this event stands for (sampling)")


class FunnelBatch(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "stage": "shown",
                            "page_url": "https://blog.example/post/1",
                            "image_url": "https://blog.example/img/a.jpg",
                            "count": 10,
                        },
                        {
                            "stage": "opened",
                            "page_url": "https://blog.example/post/1",
                            "image_url": "https://blog.example/img/a.jpg",
                        },
                    ]
                }
            ]
        },
    )

    events: list[FunnelEvent] = Field(min_length=1, max_length=funnel.MAX_EVENTS)


class FunnelCounted(BaseModel):
    counted: int  # events added


class FunnelRow(BaseModel):
    url: str
    shown: int
    opened: int
    checkout_started: int
    paid: int
    delivered: int
    refunded: int
    revenue_cents: int
    conversion: float | None  # paid / opened; null when nothing was opened


class FunnelReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    pages: list[FunnelRow]
    images: list[FunnelRow]


def cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


async def _limit(svc: deps.Services, client: str, group: str, limit: int, message: str, origin: str = "") -> None:
    wait = await svc.limiter.check(client, group, limit)
    if wait is not None:
        headers = {"Retry-After": str(max(1, math.ceil(wait))), **(cors_headers(origin) if origin else {})}
        raise ApiError(429, "rate_limited", message, headers=headers)


async def publishable_client(
    request: Request, svc: deps.Services = Depends(deps.services), _: object = Security(PUBLISHABLE)
) -> tuple[PublishableKey, str]:
    """The key (401), this client's budget (429), the Origin (403), the key's budget (429), in that order:
    a browser on a foreign site spends no one's budget but its own."""
    cfg = svc.settings
    grant = cfg.publishable_key_map().get(deps.bearer(request.headers.get("authorization", "")))
    if grant is None:
        raise deps.unauthorized("publishable")
    await _limit(
        svc,
        deps.client_host(request),
        "funnel",
        cfg.funnel_batches_per_minute,
        "too many funnel batches from this address; try again later",
    )
    origin = request.headers.get("origin", "").rstrip("/").lower()
    if origin not in grant.origins:
        raise ApiError(
            403,
            "origin_not_allowed",
            "this page's origin may not use this publishable key; add it to the key's origins in SMI_PUBLISHABLE_KEYS",
        )
    key_id = hashlib.sha256(grant.key.encode()).hexdigest()[:32]
    await _limit(
        svc,
        f"key:{key_id}",
        "funnel-key",
        cfg.funnel_key_batches_per_minute,
        "too many funnel batches for this publishable key; try again later",
        origin,
    )
    return grant, origin


def checked(grant: PublishableKey, events: list[FunnelEvent]) -> list[funnel.Event]:
    """The events as counted, or a FunnelRefused for the first the key may not count (then none is counted)."""
    kept = []
    for number, event in enumerate(events):
        where = f"events[{number}]"
        page = funnel.stripped(event.page_url, f"{where}.page_url")
        image = funnel.stripped(event.image_url, f"{where}.image_url")
        if funnel.origin_of(page) not in grant.origins:
            raise funnel.FunnelRefused(
                403, "page_not_allowed", f"{where}.page_url is not on one of this publishable key's origins"
            )
        if not grant.sells_from(funnel.netloc_of(image)):
            raise funnel.FunnelRefused(
                403, "image_host_not_allowed", f"{where}.image_url is not on one of this publishable key's image hosts"
            )
        kept.append(funnel.Event(event.stage, page, image, event.count))
    return kept


@router.post(
    "/v1/funnel",
    response_model=FunnelCounted,
    summary="Count buttons shown and modals opened (the embed script, with a publishable key)",
    responses=errors(
        merged(
            KEYED_ERRORS,
            INVALID,
            {
                403: ["origin_not_allowed", "page_not_allowed", "image_host_not_allowed"],
                429: ["rate_limited"],
            },
        )
    ),
)
async def count_funnel(
    batch: FunnelBatch,
    response: Response,
    client: tuple[PublishableKey, str] = Depends(publishable_client),
    svc: deps.Services = Depends(deps.services),
) -> FunnelCounted:
    grant, origin = client
    try:
        events = checked(grant, batch.events)
    except funnel.FunnelRefused as refused:
        raise ApiError(refused.status, refused.code, refused.message, headers=cors_headers(origin)) from None
    counted = await run_in_threadpool(funnel.record, svc.engine, utcnow().date(), events)
    response.headers.update(cors_headers(origin))
    return FunnelCounted(counted=counted)


@router.options(
    "/v1/funnel",
    status_code=204,
    response_class=Response,
    summary="CORS preflight of the funnel: allowed for the origins of the publishable keys",
    responses={204: {"description": "Allowed when `Access-Control-Allow-Origin` is present"}},
)
def funnel_preflight(request: Request, svc: deps.Services = Depends(deps.services)) -> Response:
    """The browser asks before it sends `Authorization` from another origin; the key is not shown yet, so any
    key's origin is answered (the POST then checks the origin against its own key). No credentials: no cookie."""
    origin = request.headers.get("origin", "").rstrip("/").lower()
    headers = {"Vary": "Origin"}
    if origin and any(origin in grant.origins for grant in svc.settings.publishable_key_map().values()):
        headers.update(
            {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "authorization, content-type",
                "Access-Control-Max-Age": str(PREFLIGHT_SECONDS),
            }
        )
    return Response(status_code=204, headers=headers)


@router.get(
    "/v1/admin/analytics",
    response_model=FunnelReport,
    summary="The sales funnel per page and per image over UTC days (JSON, or CSV with format=csv)",
    dependencies=[Depends(deps.admin)],
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "JSON, or CSV rows (kind, url, the stages, revenue_cents, conversion) with format=csv",
        },
        **errors(merged(KEYED_ERRORS, INVALID)),
    },
)
def analytics(
    start: str | None = Query(None, alias="from", description="first UTC day, 2026-11-01 (default: 30 days ago)"),
    end: str | None = Query(None, alias="to", description="last UTC day, inclusive (default: today)"),
    format: Literal["json", "csv"] = "json",
    svc: deps.Services = Depends(deps.services),
) -> FunnelReport | PlainTextResponse:
    today = utcnow().date()
    try:
        first = date.fromisoformat(start) if start else today - timedelta(days=30)
        last = date.fromisoformat(end) if end else today
    except ValueError:
        raise ApiError(422, "invalid_request", "from and to must be dates like 2026-11-21") from None
    if last < first:
        raise ApiError(422, "invalid_request", "to must not be before from")
    if (last - first).days > 366:
        raise ApiError(422, "invalid_request", "from and to may be at most 366 days apart")
    report = funnel.report(svc.engine, first, last)
    if format == "csv":
        return PlainTextResponse(funnel.to_csv(report), media_type="text/csv")
    return FunnelReport.model_validate(
        {
            "from": first.isoformat(),
            "to": last.isoformat(),
            "pages": [vars(row) for row in report.pages],
            "images": [vars(row) for row in report.images],
        }
    )
