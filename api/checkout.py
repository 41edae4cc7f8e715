"""Selling from any web page: the quote a page shows, Stripe Checkout, and Stripe's webhook starting the job.

- `POST /v1/checkout/quote` and `POST /v1/checkout`: a page's publishable key from one of its origins
  (api/guard.py checks both before the body is read), or the storefront key from a shop's server. The image's
  host must be bound to the publishable key; the price is always the server's own quote.
- `POST /v1/checkout` creates a Stripe Checkout Session with the official `stripe` library and records it in
  checkout_sessions (status `created`); nothing reaches Stripe for a request refused here.
- `POST /stripe/webhook` verifies Stripe-Signature (the current secret, then the previous one; 300 s of
  tolerance), reads the session back from Stripe and, once it is paid, starts its job exactly once: the job's
  unique order_id is the session's, and the job starts through api/service.start_workflow as POST /v1/jobs does.
- `GET /checkout/return/{order_id}`: where Stripe sends the customer back; it redirects to the job's status page
  as soon as the webhook has started the job (the page refreshes itself until then).

The funnel reads the stages from checkout_sessions (created_at, paid_at, status) and may hook `on_stage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from typing import Any, cast

import stripe
from fastapi import APIRouter, Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from stripe.params.checkout import SessionCreateParams

from api import deps
from api.errors import ApiError
from api.guard import CHECKOUT_PATHS, checkout_caller
from api.openapi import errors, merged
from api.service import EMAIL, HTTP_URL, IMAGE_PROBLEMS, probe_image, quote_for, start_workflow, status_page_url
from smi.db import CheckoutSession, Job, JobEvent, LedgerEntry, utcnow
from smi.settings import PublishableKey, Settings
from smi.vocabulary import ErrorCode, JobStatus

log = logging.getLogger("smi.api.checkout")

PUBLISHABLE = HTTPBearer(
    scheme_name="publishable",
    description="A key of SMI_PUBLISHABLE_KEYS, from a page of one of its origins (or the storefront key)",
    auto_error=False,
)
PLAIN_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")
SCALE_FACTORS = (2, 4, 8, 16)  # the options a page offers, those the image allows
WEBHOOK_TOLERANCE_SECONDS = 300
PAID_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
ENDED_EVENTS = {"checkout.session.async_payment_failed": "failed", "checkout.session.expired": "expired"}
CALLER_ERRORS = {
    401: ["unauthorized"],
    403: ["origin_not_allowed", "image_host_not_allowed"],
    413: ["too_large"],
    429: ["rate_limited"],
}

router = APIRouter(tags=["checkout"])


# --- the hook the funnel wires ------------------------------------------------------------------------


def _no_stage(stage: str, row: CheckoutSession) -> None:
    pass


stage_hook: Callable[[str, CheckoutSession], None] = _no_stage


def on_stage(stage: str, row: CheckoutSession) -> None:
    """Called once per session as it enters `created` and `paid` (and `failed`/`expired`); a no-op until
    something sets `stage_hook`. The same stages are in checkout_sessions for SQL. Never raises."""
    try:
        stage_hook(stage, row)
    except Exception:
        log.exception("the checkout stage hook failed (stage %s)", stage)


# --- who calls -----------------------------------------------------------------------------------------


def caller(request: Request, _: Any = Security(PUBLISHABLE)) -> PublishableKey | None:
    """The publishable key used (None: the storefront key); checked by api/guard.py first, again here."""
    return checkout_caller(
        request.headers.get("authorization", ""), request.headers.get("origin"), services_of(request).settings
    )


def services_of(request: Request) -> deps.Services:
    return request.app.state.services


class CheckoutCors:
    """CORS for the checkout routes, for the origins of the publishable key used only: a preflight
    (which carries no key) is answered for any origin some key allows; a reply carries
    Access-Control-Allow-Origin when its key is bound to the request's Origin."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in CHECKOUT_PATHS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = (headers.get("origin") or "").rstrip("/").lower()
        keys = self.settings.publishable_key_map().values()
        if scope["method"] == "OPTIONS":
            if origin and any(origin in key.origins for key in keys):
                answer = Response(status_code=204, headers=preflight_headers(headers.get("origin", "")))
            else:
                answer = JSONResponse(
                    {
                        "error": {
                            "code": "origin_not_allowed",
                            "message": "no publishable key is bound to this origin",
                            "details": None,
                        }
                    },
                    status_code=403,
                    headers={"Vary": "Origin"},
                )
            return await answer(scope, receive, send)
        token = deps.bearer(headers.get("authorization", ""))
        allowed = bool(origin) and any(origin in k.origins and k.key == token for k in keys)

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out.append("Vary", "Origin")
                if allowed:
                    out["Access-Control-Allow-Origin"] = headers.get("origin", "")
            await send(message)

        await self.app(scope, receive, with_cors)


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


async def rate_limit(request: Request, key: PublishableKey | None) -> None:
    """Per client address, and per publishable key (all its pages together)."""
    svc = services_of(request)
    cfg = svc.settings
    waits = [await svc.limiter.check(deps.client_host(request), "checkout", cfg.checkout_rate_limit_per_minute)]
    if key is not None:
        waits.append(await svc.limiter.check(f"key:{key.key}", "checkout-key", cfg.checkout_key_rate_limit_per_minute))
    wait = max((w for w in waits if w is not None), default=None)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            "too many checkouts from this address or this key; try again later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def image_host_allowed(key: PublishableKey | None, image_url: str) -> None:
    if key is None:
        return
    # The whole authority as the fetcher reads it: a plain host[:port], no user info, no escapes.
    host = re.sub(r"^https?://", "", image_url, flags=re.IGNORECASE).split("/")[0].split("?")[0].split("#")[0]
    if not PLAIN_HOST.fullmatch(host) or not key.sells_from(host):
        raise ApiError(
            403,
            "image_host_not_allowed",
            "this publishable key may not sell images from this host; add the host to its entry in "
            "SMI_PUBLISHABLE_KEYS",
        )


def page_allowed(key: PublishableKey | None, page_url: str) -> None:
    if key is None:
        return
    origin = "/".join(page_url.split("/")[:3]).lower()
    if origin not in key.origins:
        raise ApiError(422, "invalid_request", "page_url must be a page of one of the publishable key's origins")


# --- quotes ---------------------------------------------------------------------------------------------


async def image_size(svc: deps.Services, image_url: str) -> tuple[int, int]:
    found = await probe_image(svc, image_url)
    if found.problem:
        raise ApiError(422, found.problem, f"image_url: {found.detail}")
    if not found.width or not found.height:
        raise ApiError(502, "image_unreadable", "could not read the image's size from image_url; try again")
    return found.width, found.height


def cents(price: float) -> int:
    return int(round(price * 100))


class CheckoutQuoteRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image_url": "https://blog.example/media/poster.jpg"}]}
    )
    image_url: str = Field(max_length=2048, pattern=HTTP_URL)


class CheckoutOption(BaseModel):
    scale_factor: int
    price: float = Field(description="in `currency`, the server's own quote")
    price_cents: int
    currency: str
    output_width: int
    output_height: int


class CheckoutQuote(BaseModel):
    image_url: str
    width: int
    height: int
    options: list[CheckoutOption]


@router.post(
    "/v1/checkout/quote",
    response_model=CheckoutQuote,
    summary="The scale factors an image allows and their prices, for a page's Buy button",
    responses=errors(merged(CALLER_ERRORS, {422: ["invalid_request", *IMAGE_PROBLEMS], 502: ["image_unreadable"]})),
)
async def checkout_quote(
    body: CheckoutQuoteRequest, request: Request, key: PublishableKey | None = Depends(caller)
) -> CheckoutQuote:
    svc = services_of(request)
    cfg = svc.settings
    image_host_allowed(key, body.image_url)
    await rate_limit(request, key)
    width, height = await image_size(svc, body.image_url)
    options = []
    for factor in SCALE_FACTORS:
        q = quote_for(cfg, width, height, factor)
        if q.accepted:
            options.append(
                CheckoutOption(
                    scale_factor=factor,
                    price=q.price_usd,
                    price_cents=cents(q.price_usd),
                    currency=cfg.checkout_currency.lower(),
                    output_width=q.output_width,
                    output_height=q.output_height,
                )
            )
    if not options:
        raise ApiError(422, ErrorCode.OUTPUT_TOO_LARGE, "this image is too large to be upscaled 2x or more")
    return CheckoutQuote(image_url=body.image_url, width=width, height=height, options=options)


# --- checkout -------------------------------------------------------------------------------------------


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://blog.example/media/poster.jpg",
                    "scale_factor": 4,
                    "page_url": "https://blog.example/posts/harbour",
                    "email": "ana@example.com",
                }
            ]
        },
    )
    image_url: str = Field(max_length=2048, pattern=HTTP_URL)
    scale_factor: StrictInt = Field(ge=2, le=16)
    page_url: str = Field(max_length=2048, pattern=HTTP_URL, description="where Stripe sends a cancelled payment")
    email: str | None = Field(None, max_length=254, description="prefills Checkout, which collects it otherwise")

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not EMAIL.match(value):
            raise ValueError("must be an e-mail address like name@example.com")
        return value


class CheckoutCreated(BaseModel):
    checkout_url: str = Field(description="Stripe Checkout: send the browser there")
    session_id: str
    order_id: str


def not_configured(what: str) -> ApiError:
    """A 404, not a 5xx: a server that does not sell through Stripe has no checkout, as if the route were absent."""
    return ApiError(404, "checkout_not_configured", f"this server does not sell through Stripe Checkout ({what} unset)")


def stripe_client(cfg: Settings) -> stripe.StripeClient:
    if cfg.stripe_api_key is None:
        raise not_configured("SMI_STRIPE_MODE and its secret key (or SMI_STRIPE_API_KEY)")
    return stripe.StripeClient(
        cfg.stripe_api_key.get_secret_value(), base_addresses={"api": cfg.stripe_api_base}, max_network_retries=2
    )


def return_url(cfg: Settings, order_id: str) -> str:
    return f"{cfg.public_base_url.rstrip('/')}/checkout/return/{order_id}"


def _record_created(svc: deps.Services, row: CheckoutSession) -> None:
    with Session(svc.engine, expire_on_commit=False) as session:
        session.add(row)
        session.commit()


@router.post(
    "/v1/checkout",
    status_code=201,
    response_model=CheckoutCreated,
    summary="Start a Stripe Checkout for an image at a scale factor; answers the URL to send the browser to",
    responses=errors(
        merged(
            CALLER_ERRORS,
            {
                422: ["invalid_request", *IMAGE_PROBLEMS],
                404: ["checkout_not_configured"],
                502: ["image_unreadable", "stripe_error"],
            },
        )
    ),
)
async def create_checkout(
    body: CheckoutRequest, request: Request, key: PublishableKey | None = Depends(caller)
) -> CheckoutCreated:
    svc = services_of(request)
    cfg = svc.settings
    client = stripe_client(cfg)
    image_host_allowed(key, body.image_url)
    page_allowed(key, body.page_url)
    await rate_limit(request, key)
    width, height = await image_size(svc, body.image_url)
    q = quote_for(cfg, width, height, body.scale_factor)  # the price is ours, never the page's
    if not q.accepted:
        raise ApiError(
            422,
            ErrorCode.OUTPUT_TOO_LARGE,
            q.reason or "the output is too large",
            {"max_scale_factor": q.max_scale_factor},
        )
    order_id = f"co_{uuid.uuid4().hex}"
    currency = cfg.checkout_currency.lower()
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": currency,
                    "unit_amount": cents(q.price_usd),
                    "product_data": {
                        "name": f"High-resolution image, {q.output_width}×{q.output_height} ({body.scale_factor}×)"
                    },
                },
            }
        ],
        "success_url": return_url(cfg, order_id),
        "cancel_url": body.page_url,
        "client_reference_id": order_id,
        "metadata": {"order_id": order_id, "scale_factor": str(body.scale_factor)},
        "payment_intent_data": {"metadata": {"order_id": order_id}},
    }
    if body.email:
        params["customer_email"] = body.email
    try:
        created = await run_in_threadpool(
            client.v1.checkout.sessions.create,
            params=cast(SessionCreateParams, params),
            options={"idempotency_key": f"smi-{order_id}"},
        )
    except stripe.StripeError as exc:
        log.warning("Stripe refused to create a checkout session: %s", type(exc).__name__)
        raise ApiError(502, "stripe_error", "the payment provider did not answer; try again") from None
    now = utcnow()
    row = CheckoutSession(
        session_id=created.id,
        order_id=order_id,
        publishable_key=key.key if key else None,
        image_url=body.image_url,
        page_url=body.page_url,
        scale_factor=body.scale_factor,
        price_cents=cents(q.price_usd),
        currency=currency,
        status="created",
        created_at=now,
        updated_at=now,
    )
    await run_in_threadpool(_record_created, svc, row)
    on_stage("created", row)
    return CheckoutCreated(checkout_url=str(created.url), session_id=created.id, order_id=order_id)


# --- Stripe's webhook -----------------------------------------------------------------------------------


class WebhookAnswer(BaseModel):
    received: bool = True
    action: str = Field(description="ignored, not_ours, awaiting_payment, started, already_started, recorded")
    job_id: str | None = None


def verified_event(payload: bytes, signature: str, cfg: Settings) -> stripe.Event:
    secrets = cfg.stripe_webhook_secrets()
    if not secrets:
        raise not_configured("SMI_STRIPE_WEBHOOK_SECRET")
    for secret in secrets:
        try:
            return stripe.Webhook.construct_event(payload, signature, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS)
        except stripe.SignatureVerificationError:
            continue
        except ValueError:
            raise ApiError(400, "bad_payload", "the body is not a Stripe event") from None
    raise ApiError(400, "bad_signature", "Stripe-Signature does not verify (wrong secret, or older than 300 s)")


def _session_row(svc: deps.Services, session_id: str) -> CheckoutSession | None:
    with Session(svc.engine) as session:
        return session.get(CheckoutSession, session_id)


def _job(svc: deps.Services, job_id: str) -> Job:
    with Session(svc.engine) as session:
        return session.get_one(Job, job_id)


def _record_ended(svc: deps.Services, session_id: str, status: str) -> CheckoutSession | None:
    with Session(svc.engine, expire_on_commit=False) as session:
        row = session.get(CheckoutSession, session_id)
        if row is None or row.status != "created":
            return None
        row.status, row.updated_at = status, utcnow()
        session.add(row)
        session.commit()
        return row


def _record_paid(svc: deps.Services, session_id: str, paid: dict[str, Any]) -> tuple[Job, bool]:
    """The job of a paid session, created at most once (the job's order_id is unique), with the session
    marked paid in the same transaction: (job, True) when this call created it."""
    now = utcnow()
    with Session(svc.engine, expire_on_commit=False) as session:
        row = session.get_one(CheckoutSession, session_id)
        if row.job_id is not None:
            return session.get_one(Job, row.job_id), False
        order = {
            "order_id": row.order_id,
            "image_url": row.image_url,
            "scale_factor": row.scale_factor,
            "format": "auto",
            "customer_email": paid["email"],
            "customer_name": paid["name"],
            "amount_paid_cents": paid["amount"],
            "currency": paid["currency"],
            "payment_reference": paid["payment_intent"],
        }
        job = Job(
            job_id=uuid.uuid4().hex,
            request_sha256=hashlib.sha256(json.dumps(order, sort_keys=True).encode()).hexdigest(),
            status=JobStatus.RECEIVED,
            created_at=now,
            updated_at=now,
            **order,
        )
        session.add(job)
        session.add(JobEvent(job_id=job.job_id, status=JobStatus.RECEIVED, at=now))
        session.add(LedgerEntry(job_id=job.job_id, purpose="revenue", revenue_usd=paid["amount"] / 100, created_at=now))
        row.status, row.job_id, row.updated_at, row.paid_at = "paid", job.job_id, now, now
        row.customer_email, row.payment_intent = paid["email"], paid["payment_intent"]
        session.add(row)
        try:
            session.commit()
            return job, True
        except IntegrityError:  # another delivery of the same session won
            session.rollback()
            return session.exec(select(Job).where(Job.order_id == row.order_id)).one(), False


def paid_details(found: dict[str, Any]) -> dict[str, Any] | None:
    """What the job needs from a paid session (as Stripe answers it), or None while it is not paid."""
    if found.get("payment_status") not in ("paid", "no_payment_required"):
        return None
    details = found.get("customer_details") or {}
    email = details.get("email") or found.get("customer_email")
    intent = found.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    return {
        "email": email,
        "name": details.get("name"),
        "amount": int(found.get("amount_total") or 0),
        "currency": str(found.get("currency") or "usd").upper(),
        "payment_intent": intent,
    }


@router.post(
    "/stripe/webhook",
    response_model=WebhookAnswer,
    summary="Stripe's events: a paid Checkout Session starts its job, exactly once",
    description="Signed by Stripe (Stripe-Signature, verified with SMI_STRIPE_WEBHOOK_SECRET or the previous "
    "secret). Events other than a Checkout Session's are answered 200 and ignored.",
    responses=errors(
        {
            400: ["bad_signature", "bad_payload"],
            404: ["checkout_not_configured"],
            413: ["too_large"],
            503: ["stripe_unavailable", "temporal_unavailable"],
        }
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": "a Stripe event"}}},
        }
    },
)
async def stripe_webhook(request: Request) -> WebhookAnswer:
    svc = services_of(request)
    cfg = svc.settings
    payload = await request.body()
    event = verified_event(payload, request.headers.get("stripe-signature", ""), cfg).to_dict()
    kind = event.get("type")
    data = event.get("data") or {}
    obj = data.get("object") or {}
    session_id = obj.get("id") if isinstance(obj, dict) else None
    if kind not in PAID_EVENTS and kind not in ENDED_EVENTS or not isinstance(session_id, str):
        return WebhookAnswer(action="ignored")
    row = await run_in_threadpool(_session_row, svc, session_id)
    if row is None:
        return WebhookAnswer(action="not_ours")
    if kind in ENDED_EVENTS:
        ended = await run_in_threadpool(_record_ended, svc, session_id, ENDED_EVENTS[kind])
        if ended is not None:
            on_stage(ended.status, ended)
        return WebhookAnswer(action="recorded")
    created = False
    if row.job_id is None:
        # The session as Stripe holds it now, not as the event saw it: events come in any order.
        client = stripe_client(cfg)
        try:
            found = (await run_in_threadpool(client.v1.checkout.sessions.retrieve, session_id)).to_dict()
        except stripe.StripeError as exc:
            log.warning("could not read checkout session back from Stripe: %s", type(exc).__name__)
            raise ApiError(503, "stripe_unavailable", "could not read the session from Stripe; deliver again") from None
        paid = paid_details(found)
        if paid is None:
            return WebhookAnswer(action="awaiting_payment")
        if not paid["email"]:
            log.error("paid checkout session %s has no customer e-mail", row.order_id)
            raise ApiError(503, "stripe_unavailable", "the session has no customer e-mail yet; deliver again")
        job, created = await run_in_threadpool(_record_paid, svc, session_id, paid)
    else:
        job = await run_in_threadpool(_job, svc, row.job_id)
    if created:
        paid_row = await run_in_threadpool(_session_row, svc, session_id)
        if paid_row is not None:
            on_stage("paid", paid_row)
    if job.status == JobStatus.RECEIVED:  # not yet picked up (or an earlier start failed): start, idempotently
        await start_workflow(await svc.temporal_client(), cfg, job)
    return WebhookAnswer(action="started" if created else "already_started", job_id=job.job_id)


# --- the page Stripe returns to -------------------------------------------------------------------------


def _job_of_order(svc: deps.Services, order_id: str) -> tuple[bool, str | None]:
    with Session(svc.engine) as session:
        row = session.exec(select(CheckoutSession).where(CheckoutSession.order_id == order_id)).first()
        return (row is not None, row.job_id if row else None)


WAITING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Payment received</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto; padding: 0 1rem">
<h1>Thank you</h1><p role="status">Your payment is being confirmed; your order's page opens in a moment.</p>
</body></html>
"""


@router.get(
    "/checkout/return/{order_id}",
    response_class=HTMLResponse,
    summary="Where Stripe sends the customer after paying: redirects to the order's status page",
    responses={
        200: {"description": "Payment not confirmed yet: the page refreshes itself"},
        303: {"description": "To the job's status page"},
        **errors({404: ["not_found"]}),
    },
)
async def checkout_return(order_id: str, request: Request) -> Response:
    svc = services_of(request)
    if not re.fullmatch(r"co_[0-9a-f]{32}", order_id):
        raise ApiError(404, "not_found", "no checkout has this order id")
    known, job_id = await run_in_threadpool(_job_of_order, svc, order_id)
    if not known:
        raise ApiError(404, "not_found", "no checkout has this order id")
    if job_id is None:
        return HTMLResponse(WAITING_PAGE, headers={"Cache-Control": "no-store"})
    return RedirectResponse(status_page_url(svc.settings, job_id), status_code=303)
