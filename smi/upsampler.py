"""The only module that speaks to Upsampler, in its real wire format (README "Architecture")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from smi.vocabulary import ErrorCode, JobStatus

STATUS_MAP = {
    "IN_QUEUE": JobStatus.QUEUED,
    "IN_PROGRESS": JobStatus.PROCESSING,
    "SUCCESS": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
}


class UpsamplerError(Exception):
    """Base of the typed errors; `kind` is what the retry policies and the workflow tell apart."""

    kind = ErrorCode.UPSAMPLER_ERROR
    retryable = False

    def __init__(self, message: str, *, retry_after: float | None = None, reply_lost: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        # The request may have reached Upsampler, but its reply did not reach us: for a submit, a job
        # may exist that we know nothing of. False when Upsampler answered, or the request never left.
        self.reply_lost = reply_lost


class UpsamplerUnauthorized(UpsamplerError):
    kind = ErrorCode.UPSAMPLER_UNAUTHORIZED


class UpsamplerInvalidInput(UpsamplerError):
    kind = ErrorCode.UPSAMPLER_INVALID_INPUT


class UpsamplerNotFound(UpsamplerError):
    kind = ErrorCode.UPSAMPLER_NOT_FOUND


class UpsamplerRateLimited(UpsamplerError):
    kind = ErrorCode.RATE_LIMITED
    retryable = True


class UpsamplerUnavailable(UpsamplerError):
    """5xx, network errors and timeouts: worth retrying."""

    kind = ErrorCode.TRANSIENT
    retryable = True


@dataclass(frozen=True)
class UpsamplerJob:
    id: str
    status: JobStatus  # queued, processing, completed or failed
    credit_cost: float | None = None
    image_url: str | None = None
    compressed_image_url: str | None = None
    error: str | None = None

    @classmethod
    def from_wire(cls, body: dict) -> "UpsamplerJob":
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or body.get("status") not in STATUS_MAP:
            raise ValueError("not an Upsampler job: needs a string 'id' and a known 'status'")
        if not UPSAMPLER_ID.fullmatch(body["id"]):
            raise ValueError("'id' must be 1 to 128 printable ASCII characters")
        cost = body.get("creditCost")
        return cls(
            id=body["id"],
            status=STATUS_MAP[body["status"]],
            credit_cost=float(cost) if isinstance(cost, (int, float)) else None,
            image_url=body.get("imageUrl"),
            compressed_image_url=body.get("compressedImageUrl"),
            error=body.get("error"),
        )


UPSAMPLER_ID = re.compile(r"[!-~]{1,128}")  # it travels into workflow histories: bounded


def failure_kind(error: str | None) -> str:
    """Upsampler states why a job JobStatus.FAILED only in words; sort them into the workflow's error kinds."""
    text = (error or "").lower()
    if any(word in text for word in ("too large", "too big", "exceed", "size limit", "megapixel")):
        return ErrorCode.TOO_LARGE
    if any(word in text for word in ("format", "unsupported", "not an image", "decode", "corrupt")):
        return ErrorCode.UNSUPPORTED_FORMAT
    return ErrorCode.UPSAMPLER_FAILED


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" parses to a naive datetime; HTTP dates are UTC
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = (body.get("error") or body.get("message") or body.get("detail")) if isinstance(body, dict) else None
    except ValueError:
        text = None
    return str(text or response.reason_phrase or "no detail")[:300]


class UpsamplerClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, transport=None):
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(self, image_url: str, upscale_factor: int, webhook_url: str | None, **options) -> UpsamplerJob:
        payload: dict = {
            "input": {"imageUrl": image_url, "upscaleFactor": upscale_factor, "inputImageType": "universal", **options}
        }
        if webhook_url:
            payload["webhook"] = webhook_url
        return await self._call("POST", "/precise-upscale", json=payload)

    async def status(self, upsampler_id: str) -> UpsamplerJob:
        return await self._call("GET", f"/status/{upsampler_id}")

    async def _call(self, method: str, path: str, **kwargs) -> UpsamplerJob:
        try:
            response = await self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:  # nothing was sent
            raise UpsamplerUnavailable(f"Upsampler unreachable: {type(exc).__name__}") from None
        except httpx.TimeoutException as exc:
            raise UpsamplerUnavailable(f"Upsampler timed out: {type(exc).__name__}", reply_lost=True) from None
        except httpx.TransportError as exc:
            raise UpsamplerUnavailable(f"Upsampler's reply was lost: {type(exc).__name__}", reply_lost=True) from None
        code = response.status_code
        if code == 401 or code == 403:
            raise UpsamplerUnauthorized(f"Upsampler refused the API key ({code})")
        if code == 400 or code == 422:
            raise UpsamplerInvalidInput(f"Upsampler rejected the input: {_error_text(response)}")
        if code == 404:
            raise UpsamplerNotFound(f"Upsampler does not know {path}")
        if code == 429:
            raise UpsamplerRateLimited("Upsampler rate limit reached", retry_after=_retry_after(response))
        if code >= 500 or code != 200:
            raise UpsamplerUnavailable(f"Upsampler answered {code}: {_error_text(response)}")
        try:
            return UpsamplerJob.from_wire(response.json())
        except ValueError as exc:
            raise UpsamplerUnavailable(f"Upsampler sent an unreadable reply: {exc}") from None
