"""Signed job events to the shop: the signature, and its check. Standard library only, so a shop
can copy this file into its own code base as it is.

Each delivery is a POST whose JSON body is the event, with the header

    SMI-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the shared secret>

(the scheme Stripe uses). During a rotation of the secret the header carries one `v1=` per
secret; `verify` accepts a body whose signature matches any of the secrets it is given.
A receiver checks the body's bytes as received, before parsing them:

    import os
    from shop_webhooks import SignatureError, verify  # this file, copied as it is

    def receive(body: bytes, signature: str | None) -> int:  # the raw body, the SMI-Signature header
        secrets = [os.environ["SMI_SECRET"], os.environ.get("SMI_SECRET_PREVIOUS", "")]
        try:
            event = verify(body, signature, secrets, tolerance=300)  # older than 5 minutes: a replay
        except SignatureError:
            return 400  # not ours, altered, or replayed
        if first_time(event["id"]):  # an event may arrive again if our 2xx was lost
            handle(event["type"], event["data"]["job"])
        return 200
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from typing import Any

HEADER = "SMI-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE = 300  # seconds: an older signature is refused as a replay


class SignatureError(ValueError):
    """The delivery is not ours, was altered, or is too old; the message says which."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of "<timestamp>.<body>" under `secret`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets: str | Iterable[str], timestamp: int | None = None) -> str:
    """The SMI-Signature header's value for `body`, signed at `timestamp` (now by default) with each secret."""
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    keys = [secrets] if isinstance(secrets, str) else [s for s in secrets if s]
    if not keys:
        raise ValueError("no secret to sign with")
    return ",".join([f"t={timestamp}"] + [f"{SCHEME}={signature(key, timestamp, body)}" for key in keys])


def parse_header(header: str | None) -> tuple[int, list[str]]:
    """(t, the v1 signatures) of an SMI-Signature header; SignatureError when it is not one."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME and value:
            signatures.append(value.strip().lower())
    if timestamp is None or not signatures:
        raise SignatureError(f"the {HEADER} header has no t=<unix time> or no {SCHEME}=<signature>")
    return timestamp, signatures


def verify(
    body: bytes | str,
    header: str | None,
    secrets: str | Iterable[str],
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """The event (the parsed body) when `header` signs `body` under one of `secrets` at a time within
    `tolerance` seconds of `now`; SignatureError otherwise. Pass the current and the previous secret
    during a rotation (empty ones are skipped)."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp, signatures = parse_header(header)
    keys = [secrets] if isinstance(secrets, str) else [s for s in secrets if s]
    if not any(
        hmac.compare_digest(signature(key, timestamp, raw).encode(), candidate.encode("ascii", "replace"))
        for key in keys
        if key
        for candidate in signatures
    ):
        raise SignatureError("the signature does not match the body under any of the secrets")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance:
        raise SignatureError(f"the signature was made {age:.0f} s from now, beyond the tolerance of {tolerance:.0f} s")
    try:
        return json.loads(raw)
    except ValueError:
        raise SignatureError("the body is not JSON") from None
