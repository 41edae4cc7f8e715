"""A loopback HTTP server speaking the parts of Stripe's REST API the service uses, for the official `stripe`
library pointed at it (`api_base`): create and retrieve a Checkout Session, create a refund. Requests are
form-encoded with bracketed keys (`line_items[0][price_data][unit_amount]`), answers are Stripe's JSON objects,
errors Stripe's error shape; the secret key is checked; an Idempotency-Key replays the first answer.

`sign(payload, secret)` signs a webhook event exactly as Stripe does: `t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<payload>">`; `event(kind, session)` builds the event Stripe would send for a session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from smi.serve import ServerThread


def nested_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding back into objects: a[b][0][c]=v -> {"a": {"b": [{"c": "v"}]}}."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for part, after in zip(parts, parts[1:] + [None], strict=True):
            if after is None:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    signed = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={signed}"


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "code": code}}, status_code=status)


class StripeServer:
    """The server and what it saw: `requests` (method, path, form), `sessions` by id, `refunds`."""

    def __init__(self, secret_key: str):
        self.secret_key = secret_key
        self.requests: list[dict[str, Any]] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        self.refunds: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> first answer
        self.down = False  # True: every request answered 503, as during an outage
        self.app = self._app()
        self.thread = ServerThread(self.app)

    @property
    def url(self) -> str:
        return self.thread.url

    def start(self) -> StripeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.thread.stop()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            form = nested_form((await request.body()).decode())
            self.requests.append({"method": request.method, "path": request.url.path, "form": form})
            if self.down:
                return error(503, "Stripe is unavailable", "api_error")
            if request.headers.get("authorization") != f"Bearer {self.secret_key}":
                return error(401, "Invalid API Key provided", "invalid_request_error")
            key = request.headers.get("idempotency-key")
            if key and key in self.replies:
                return JSONResponse(self.replies[key])
            answer = await call_next(request)
            return answer

        @app.post("/v1/checkout/sessions")
        async def create_session(request: Request):
            form = nested_form((await request.body()).decode())
            [item] = form["line_items"]
            amount = int(item["price_data"]["unit_amount"]) * int(item.get("quantity", 1))
            session_id = "cs_test_" + secrets.token_hex(12)
            session = {
                "id": session_id,
                "object": "checkout.session",
                "amount_total": amount,
                "currency": item["price_data"]["currency"],
                "client_reference_id": form.get("client_reference_id"),
                "customer_details": None,
                "customer_email": form.get("customer_email"),
                "livemode": False,
                "metadata": form.get("metadata", {}),
                "mode": form["mode"],
                "payment_intent": None,
                "payment_status": "unpaid",
                "status": "open",
                "success_url": form["success_url"],
                "cancel_url": form.get("cancel_url"),
                "url": f"{self.url}/pay/{session_id}",
                "created": int(time.time()),
                "line_items_seen": form["line_items"],
            }
            self.sessions[session_id] = session
            key = request.headers.get("idempotency-key")
            if key:
                self.replies[key] = session
            return JSONResponse(session)

        @app.get("/v1/checkout/sessions/{session_id}")
        async def retrieve_session(session_id: str):
            if session_id not in self.sessions:
                return error(404, f"No such checkout.session: '{session_id}'", code="resource_missing")
            return JSONResponse(self.sessions[session_id])

        @app.post("/v1/refunds")
        async def create_refund(request: Request):
            form = nested_form((await request.body()).decode())
            refund = {
                "id": "re_test_" + secrets.token_hex(8),
                "object": "refund",
                "amount": int(form["amount"]),
                "currency": "usd",
                "payment_intent": form.get("payment_intent"),
                "status": "succeeded",
                "metadata": form.get("metadata", {}),
            }
            self.refunds.append(refund)
            return JSONResponse(refund)

        return app

    # --- what the customer does at Stripe, and the events Stripe then sends -----------------------------

    def complete(self, session_id: str, email: str, paid: bool = True) -> dict[str, Any]:
        """The customer finished Checkout: paid at once (a card), or not yet (a bank debit pending)."""
        session = self.sessions[session_id]
        session.update(
            status="complete",
            payment_status="paid" if paid else "unpaid",
            customer_details={"email": email, "name": None},
            payment_intent="pi_test_" + secrets.token_hex(8),
        )
        return session

    def settle(self, session_id: str) -> dict[str, Any]:
        """A delayed payment succeeded."""
        session = self.sessions[session_id]
        session["payment_status"] = "paid"
        return session

    def event(self, kind: str, session_id: str) -> bytes:
        """The event Stripe sends, as bytes: the payload signed and delivered as it is."""
        body = {
            "id": "evt_test_" + secrets.token_hex(10),
            "object": "event",
            "api_version": "2025-03-31.basil",
            "created": int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "type": kind,
            "data": {"object": dict(self.sessions[session_id])},
        }
        return json.dumps(body, indent=2).encode()
