"""HMAC signatures for the URLs the service hands out, and the download tokens.

All derive from SMI_WEBHOOK_SECRET with a distinct message per purpose (`webhook:`, `view:`,
`file:`, `download:`), so one kind of signature can never stand in for another.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlencode, urlsplit

HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
JOB_ID = re.compile(r"[0-9a-f]{32}")
NONCE = re.compile(r"[0-9a-f]{32}")  # a submit intent's nonce (smi.db.SubmitIntent), secrets.token_hex(16)
# Webhook URLs once signed the bare job id. Jobs created before this instant may still carry such
# a URL at Upsampler; later ones never do. Delete with `legacy_webhook_signature` once none is open.
LEGACY_WEBHOOK_SIGNATURES_BEFORE = datetime(2026, 12, 2, tzinfo=timezone.utc)


def sign(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def verify(secrets: str | list[str], message: str, signature: str | None) -> bool:
    """Constant-time check against each secret (a list during a rotation: current, previous).

    Anything but 64 lowercase hex digits is refused before comparing: a non-ASCII string would
    make `compare_digest` raise, which a caller would turn into a 500."""
    if not isinstance(signature, str) or not HEX_SHA256.fullmatch(signature):
        return False
    candidates = [secrets] if isinstance(secrets, str) else secrets
    matches = [hmac.compare_digest(sign(secret, message).encode(), signature.encode()) for secret in candidates]
    return any(matches)


def _webhook_message(job_id: str, nonce: str = "") -> str:
    return f"webhook:{job_id}:{nonce}" if nonce else f"webhook:{job_id}"


def webhook_url(public_base_url: str, secret: str, job_id: str, nonce: str = "") -> str:
    """`?job=<job_id>&sig=<hex HMAC-SHA256 of webhook:<job_id> under SMI_WEBHOOK_SECRET>` (README "Security").

    With a submit intent's `nonce` (32 lowercase hex digits) the URL is `?job=<job_id>&n=<nonce>&sig=<hex>`
    and the HMAC signs `webhook:<job_id>:<nonce>`: the webhook then says which POST caused the Upsampler job,
    even when its reply never reached us. URLs without a nonce keep their signature and keep working."""
    if nonce and not NONCE.fullmatch(nonce):
        raise ValueError("a webhook nonce is 32 lowercase hex digits")
    fields = {"job": job_id, "n": nonce} if nonce else {"job": job_id}
    query = urlencode({**fields, "sig": sign(secret, _webhook_message(job_id, nonce))})
    return f"{public_base_url.rstrip('/')}/smi-webhook/upsampler/?{query}"


def verify_webhook(secrets: str | list[str], job_id: str, signature: str | None, nonce: str = "") -> bool:
    """Whether `signature` signs this job's webhook URL, with that nonce ("" for a URL without one). A nonce
    that is not 32 lowercase hex digits is refused: no URL of ours carries one."""
    if nonce and not NONCE.fullmatch(nonce):
        return False
    return verify(secrets, _webhook_message(job_id, nonce), signature)


def legacy_webhook_signature(secrets: str | list[str], job_id: str, signature: str | None) -> bool:
    """The bare-job-id signature of URLs handed out before LEGACY_WEBHOOK_SIGNATURES_BEFORE. Only for
    ids of our own shape (32 hex digits, no prefix), so no other signature can pass for one."""
    return bool(JOB_ID.fullmatch(job_id)) and verify(secrets, job_id, signature)


def view_token(secret: str, job_id: str) -> str:
    """Opens that one job's status page, and so its download link once completed: as secret as that link."""
    return sign(secret, f"view:{job_id}")


def verify_view_token(secrets: str | list[str], job_id: str, token: str | None) -> bool:
    return verify(secrets, f"view:{job_id}", token)


def status_page_url(public_base_url: str, secret: str, job_id: str) -> str:
    """The customer's status page: the storefront shows or links it after payment."""
    return f"{public_base_url.rstrip('/')}/status/{job_id}?{urlencode({'v': view_token(secret, job_id)})}"


def _file_message(kind: str, name: str, expires: int) -> str:
    return f"file:{kind}/{name}:{expires}"


def signed_file_url(public_base_url: str, secret: str, kind: str, name: str, expires: int) -> str:
    """A temporary URL of a stored file (`kind` is "originals" or "uploads"), e.g. for Upsampler."""
    query = urlencode({"exp": expires, "sig": sign(secret, _file_message(kind, name, expires))})
    return f"{public_base_url.rstrip('/')}/files/{kind}/{name}?{query}"


def verify_file(secrets: str | list[str], kind: str, name: str, expires: int, signature: str | None) -> bool:
    return verify(secrets, _file_message(kind, name, expires), signature)


def download_token(secret: str, job_id: str, generation: int) -> str:
    """256 bits that only the holder of the secret can derive; the database keeps its hash.

    Deriving instead of drawing at random lets the email activity rebuild the link on a
    retry without the token ever being stored or passing through Temporal's history.
    """
    return sign(secret, f"download:{job_id}:{generation}")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_UPLOAD_PATH = re.compile(r"/files/uploads/([0-9a-f]{32})(?:[?#]|$)")


def own_upload_id(image_url: str, public_base_url: str, secrets: str | list[str], now: float) -> str | None:
    """The upload a signed, unexpired upload URL of ours (on our public address) names; else None."""
    try:
        parts = urlsplit(image_url)
    except ValueError:  # not a URL at all (a broken IPv6 literal): not ours; the fetch guard says why
        return None
    base = urlsplit(public_base_url)
    upload_id = upload_id_of(image_url)
    query = parse_qs(parts.query)
    if upload_id is None or (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
        return None
    if parts.path != f"{base.path.rstrip('/')}/files/uploads/{upload_id}":
        return None
    expires, signature = query.get("exp", [""])[0], query.get("sig", [""])[0]
    if (
        not expires.isdigit()
        or int(expires) < now
        or not verify_file(secrets, "uploads", upload_id, int(expires), signature)
    ):
        return None
    return upload_id


def upload_id_of(image_url: str | None) -> str | None:
    """The upload an image_url names when it is one of our signed upload URLs (whatever the host)."""
    found = _UPLOAD_PATH.search(image_url or "")
    return found.group(1) if found else None
