"""The admin dashboard in a browser: job counts, the manual-review queue with Retry and Refund,
error rate and stage times of the last 24 h, recent jobs linked to their workflows, and the sales funnel
(top pages and images by revenue, conversion from click to paid, over the last 30 days).

Login is the admin API key pasted once into a form; the browser then holds an HttpOnly,
SameSite=Strict cookie with an expiry signed under that key (changing the key logs every
browser out). Forms carry a CSRF token derived from the session. Retry and Refund call the
admin API's own functions (api/service.py).
"""

from __future__ import annotations

import hmac
import secrets
import time
from datetime import timedelta
from typing import Literal
from urllib.parse import parse_qs, quote, unquote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from api import dashboard, deps, service
from api.errors import ApiError
from smi import signing
from smi.db import as_utc, utcnow
from smi.settings import Settings
from smi.vocabulary import JobStatus

router = APIRouter(prefix="/admin", tags=["admin dashboard"], include_in_schema=False)

SESSION_COOKIE = "smi_admin_session"
NOTICE_COOKIE = "smi_admin_notice"  # the outcome of the last Retry or Refund, shown once after the redirect
SESSION_HOURS = 8
MAX_FORM_BYTES = 16 * 1024
STATUSES = list(JobStatus)  # the contract's statuses, in the order a job passes them
ACTIONS = {"retry": service.retry, "refund": service.refund}
FUNNEL_DAYS = 30  # the sales funnel panel: top pages and images of these last UTC days


def new_session(admin_key: str) -> str:
    """`<expiry>.<random>.<signature>`: the random part keeps two logins' sessions (and CSRF tokens) apart."""
    expiry, salt = int(time.time()) + SESSION_HOURS * 3600, secrets.token_hex(8)
    return f"{expiry}.{salt}.{signing.sign(admin_key, f'dashboard:{expiry}:{salt}')}"


def session_valid(admin_key: str, value: str | None) -> bool:
    expiry, _, rest = (value or "").partition(".")
    salt, _, signature = rest.partition(".")
    if not expiry.isdigit() or int(expiry) < time.time():
        return False
    return signing.verify(admin_key, f"dashboard:{expiry}:{salt}", signature)


def csrf_token(admin_key: str, session: str) -> str:
    return signing.sign(admin_key, f"csrf:{session}")


def _session(request: Request, cfg: Settings) -> str | None:
    value = request.cookies.get(SESSION_COOKIE)
    return value if session_valid(cfg.secret("admin_api_key"), value) else None


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (no python-multipart needed), first value of each field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ApiError(413, "too_large", "the form is too large")
    return {name: values[0] for name, values in parse_qs(body.decode(errors="replace")).items()}


def _require_session_and_csrf(request: Request, form: dict[str, str], cfg: Settings) -> None:
    session = _session(request, cfg)
    if session is None:
        raise ApiError(401, "login_required", "log in to the dashboard at /admin/login first")
    expected = csrf_token(cfg.secret("admin_api_key"), session)
    if not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
        raise ApiError(
            403, "csrf_failed", "the form is stale or came from another page; reload the dashboard and try again"
        )


def _cookie(response: Response, cfg: Settings, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/admin",
        httponly=True,
        samesite="strict",
        secure=cfg.public_base_url.startswith("https://"),
    )


def _page(request: Request, name: str, context: dict, status_code: int = 200) -> Response:
    nonce = secrets.token_urlsafe(16)
    headers = {
        "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return deps.pages.TemplateResponse(
        request, name, {**context, "nonce": nonce}, status_code=status_code, headers=headers
    )


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@router.get("/login")
def login_form(request: Request) -> Response:
    return _page(request, "pages/admin_login.html", {"error": None})


@router.post("/login", dependencies=[Depends(deps.public_rate_limit)])
async def login(request: Request, cfg: Settings = Depends(deps.settings)) -> Response:
    form = await _form(request)
    admin_key = cfg.secret("admin_api_key")
    if not hmac.compare_digest(form.get("key", "").strip().encode(), admin_key.encode()):
        return _page(request, "pages/admin_login.html", {"error": "That is not the admin API key."}, 401)
    response = RedirectResponse("/admin", status_code=303)
    _cookie(response, cfg, SESSION_COOKIE, new_session(admin_key), SESSION_HOURS * 3600)
    return response


@router.post("/logout")
async def logout(request: Request, cfg: Settings = Depends(deps.settings)) -> RedirectResponse:
    _require_session_and_csrf(request, await _form(request), cfg)
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/admin")
    return response


@router.get("")
def dashboard_page(request: Request, svc: deps.Services = Depends(deps.services)) -> Response:
    cfg = svc.settings
    session = _session(request, cfg)
    if session is None:
        return RedirectResponse("/admin/login", status_code=303)
    now = utcnow()
    day_ago = now - timedelta(hours=24)
    counts = dashboard.status_counts(svc.engine)
    troubled, created = dashboard.error_rate(svc.engine, day_ago)
    medians = dashboard.median_stage_seconds(svc.engine, day_ago)
    ui = cfg.temporal_ui_url.rstrip("/")
    context = {
        "counts": [(status, counts.get(status, 0)) for status in STATUSES],
        "review": [
            (item, duration((now - item.since).total_seconds())) for item in dashboard.manual_review_queue(svc.engine)
        ],
        "troubled": troubled,
        "created": created,
        "medians": [(status, duration(medians[status])) for status in STATUSES if status in medians],
        "recent": [
            (job, duration((now - as_utc(job.created_at)).total_seconds())) for job in dashboard.recent_jobs(svc.engine)
        ],
        "workflow_url": f"{ui}/namespaces/{quote(cfg.temporal_namespace)}/workflows/upscale-",
        "funnel": dashboard.funnel_top(svc.engine, now.date(), FUNNEL_DAYS),
        "funnel_days": FUNNEL_DAYS,
        "currency": cfg.checkout_currency.upper(),
        "csrf": csrf_token(cfg.secret("admin_api_key"), session),
        "notice": unquote(request.cookies.get(NOTICE_COOKIE, "")),
    }
    response = _page(request, "pages/admin.html", context)
    if context["notice"]:
        response.delete_cookie(NOTICE_COOKIE, path="/admin")
    return response


@router.post("/jobs/{job_id}/{action}")
async def act_on_job(
    job_id: str, action: Literal["retry", "refund"], request: Request, svc: deps.Services = Depends(deps.services)
) -> RedirectResponse:
    _require_session_and_csrf(request, await _form(request), svc.settings)
    try:
        reply = await ACTIONS[action](job_id, svc=svc)
        notice = f"{action.capitalize()} of job {job_id}: {reply.how}."
    except ApiError as exc:  # e.g. 409: the job is busy, or already refunded
        notice = f"{action.capitalize()} of job {job_id} refused: {exc.message}."
    response = RedirectResponse("/admin", status_code=303)
    _cookie(response, svc.settings, NOTICE_COOKIE, quote(notice), 60)
    return response
