"""What every request passes before a route sees it, so no route can forget it:

- the API key of the audience a path belongs to, checked before a byte of the body is read
  (an unauthenticated 300 MB body costs us one header parse);
- a size cap on the body, enforced while it streams, whatever Content-Length claims.

The routes' own `Depends(deps.storefront)` / `Depends(deps.admin)` stay: they document the
security schemes in OpenAPI and check again.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import deps
from api.errors import ApiError, error_response, response_of
from smi.settings import PublishableKey, Settings

DEFAULT_BODY_CAP = 64 * 1024  # every other JSON or form body we take is far smaller
FUNNEL_PATH = "/v1/funnel"  # a page's publishable key only; api/analytics.py checks its origin and hosts


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reading passes it on (it turns other errors into 400s)."""

    def __init__(self, cap: int):
        super().__init__(413, f"the request body is limited to {cap} bytes here")


CHECKOUT_PATHS = ("/v1/checkout", "/v1/checkout/quote")  # a page's publishable key, or the storefront key


def audience(path: str) -> str | None:
    """Whose key a path needs before its body is read: the one table both checks follow."""
    if path == FUNNEL_PATH:
        return "publishable"
    if path in CHECKOUT_PATHS:
        return "checkout"
    if path == "/v1/admin" or path.startswith("/v1/admin/"):
        return "admin"
    if path.startswith("/v1/"):
        return "storefront"
    return None


def body_cap(path: str, cfg: Settings) -> int:
    if path == "/v1/uploads":
        return cfg.max_input_bytes
    if path.startswith("/codec/"):
        return 8 * 1024 * 1024  # Temporal caps one payload at 2 MB; the UI sends a few at once
    if path == "/stripe/webhook":
        return 1024 * 1024  # a Checkout Session event is a few kilobytes
    if path.startswith("/smi-webhook/"):
        return 1024 * 1024  # an Upsampler status is a few hundred bytes
    return DEFAULT_BODY_CAP


def audience_keys(who: str, cfg: Settings) -> list[str]:
    if who == "publishable":
        return list(cfg.publishable_key_map())
    return cfg.storefront_keys() if who == "storefront" else [cfg.secret("admin_api_key")]


def checkout_caller(authorization: str, origin: str | None, cfg: Settings) -> PublishableKey | None:
    """Who may start a checkout: the storefront key (a shop's server: None, no Origin check), or a
    publishable key of SMI_PUBLISHABLE_KEYS from a page of one of its origins (that key). Else ApiError."""
    if deps.key_matches(authorization, cfg.storefront_keys()):
        return None
    published = cfg.publishable_key_map()
    token = deps.bearer(authorization)
    key = next((k for name, k in published.items() if hmac.compare_digest(name.encode(), token.encode())), None)
    if key is None:
        raise deps.unauthorized("publishable")
    if not origin or origin.rstrip("/").lower() not in key.origins:
        raise ApiError(
            403,
            "origin_not_allowed",
            "this publishable key is not bound to the page's origin; add the origin to its entry in "
            "SMI_PUBLISHABLE_KEYS (or call with the storefront key from a server)",
        )
    return key


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], Headers(scope=scope)
        who = audience(path)
        if who == "checkout" and scope["method"] != "OPTIONS":
            try:
                checkout_caller(headers.get("authorization", ""), headers.get("origin"), self.settings)
            except ApiError as refused:
                return await response_of(refused)(scope, receive, send)
        elif who is not None and scope["method"] != "OPTIONS":
            if not deps.key_matches(headers.get("authorization", ""), audience_keys(who, self.settings)):
                return await response_of(deps.unauthorized(who))(scope, receive, send)
        cap = body_cap(path, self.settings)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            exc = BodyTooLarge(cap)
            return await error_response(413, "too_large", exc.detail)(scope, receive, send)
        taken = 0

        async def capped() -> Message:
            nonlocal taken
            message = await receive()
            if message["type"] == "http.request":
                taken += len(message.get("body", b""))
                if taken > cap:
                    raise BodyTooLarge(cap)
            return message

        await self.app(scope, capped, send)
