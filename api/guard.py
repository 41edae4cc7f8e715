"""What every request passes before a route sees it, so no route can forget it:

- the API key of the audience a path belongs to, checked before a byte of the body is read
  (an unauthenticated 300 MB body costs us one header parse);
- a size cap on the body, enforced while it streams, whatever Content-Length claims.

The routes' own `Depends(deps.storefront)` / `Depends(deps.admin)` stay: they document the
security schemes in OpenAPI and check again.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import deps
from api.errors import error_response, response_of
from smi.settings import Settings

DEFAULT_BODY_CAP = 64 * 1024  # every other JSON or form body we take is far smaller


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reading passes it on (it turns other errors into 400s)."""

    def __init__(self, cap: int):
        super().__init__(413, f"the request body is limited to {cap} bytes here")


def audience(path: str) -> str | None:
    """Whose key a path needs before its body is read: the one table both checks follow."""
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
    if path.startswith("/smi-webhook/"):
        return 1024 * 1024  # an Upsampler status is a few hundred bytes
    return DEFAULT_BODY_CAP


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], Headers(scope=scope)
        who = audience(path)
        if who is not None and scope["method"] != "OPTIONS":
            keys = self.settings.storefront_keys() if who == "storefront" else [self.settings.secret("admin_api_key")]
            if not deps.key_matches(headers.get("authorization", ""), keys):
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
