"""Files leaving the service: the customer's download, and the signed temporary file URLs."""

from __future__ import annotations

import mimetypes
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import update
from sqlmodel import Session, col
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api import deps
from api.errors import ApiError
from api.openapi import INVALID, PUBLIC_ERRORS, errors, merged
from smi import signing
from smi.db import DownloadToken, Job, as_utc, rows_changed, utcnow
from smi.storage import LocalStorage, S3Storage, Storage, compressed_name, job_key, upload_key

router = APIRouter(tags=["files"])

TOKEN = re.compile(r"^[0-9a-f]{64}$")
NAME = re.compile(r"^(?P<id>[0-9a-f]{32})(?:-q(?P<quality>[0-9]{1,2}))?$")


class HeldFileResponse(deps.ReleasedWhenSent, FileResponse):
    """Gives its download slot back when the transfer ends."""


def serves_first_byte(method: str, headers, size: int) -> bool:
    """Whether the answer will carry the file's first byte: that is what a download counts as (a resumed
    transfer does not count again). Decided by the same parser FileResponse serves ranges with, so no
    spelling of a range (`bytes=00-`, `BYTES=0-`, a suffix, 101 ranges) gets the whole file uncounted."""
    if method != "GET":
        return False
    if "range" not in headers or "if-range" in headers:  # If-Range may fall back to the whole file
        return True
    try:
        ranges = FileResponse._parse_range_header(headers["range"], size)
    except (MalformedRangeHeader, RangeNotSatisfiable):  # 400 or 416: no byte goes out
        return False
    return not ranges or ranges[0][0] == 0  # merged ranges come sorted; none: the whole file


@dataclass
class Download:
    key: str  # in storage (smi/storage.py)
    filename: str  # what the customer's browser saves it as
    size: int
    expires: datetime  # the link's


def _checked_download(svc: deps.Services, token: str, method: str, headers) -> Download:
    """The file a download link gives, counted when this request takes the whole file; one short session."""
    cfg = svc.settings
    with Session(svc.engine) as session:
        row = session.get(DownloadToken, signing.token_sha256(token)) if TOKEN.match(token) else None
        if row is None:
            raise ApiError(404, "link_not_found", "this download link is not valid; check that it was copied whole")
        if row.revoked:
            raise ApiError(
                410, "link_replaced", "this download link was replaced by a newer one: use the link in the latest email"
            )
        expires = as_utc(row.expires_at)
        if expires <= utcnow():
            raise ApiError(
                410,
                "link_expired",
                f"this download link expired at {expires:%Y-%m-%d %H:%M} UTC; ask support for a fresh link",
            )
        job = session.get(Job, row.job_id)
        size = _stored_size(svc.storage, job.result_path, job.output_bytes) if job and job.result_path else None
        if job is None or job.result_path is None or size is None:
            raise ApiError(410, "file_gone", "the file is no longer stored; ask support for help")
        if cfg.download_max_count is not None and serves_first_byte(method, headers, size):
            # Counted in the database in one statement, so parallel requests cannot slip past the limit.
            counted = rows_changed(
                session,
                update(DownloadToken)
                .where(
                    col(DownloadToken.token_sha256) == row.token_sha256,
                    col(DownloadToken.downloads) < cfg.download_max_count,
                )
                .values(downloads=col(DownloadToken.downloads) + 1),
            )
            session.commit()
            if counted == 0:
                raise ApiError(
                    410,
                    "download_limit",
                    f"this link was used {cfg.download_max_count} times, its limit; ask support for a fresh link",
                )
        key = svc.storage.key_of(job.result_path)
        return Download(key, f"{job.order_id}-{key.rsplit('/', 1)[-1]}", size, expires)


def _stored_size(storage: Storage, location: str, recorded: int | None) -> int | None:
    """The result's size; None when it is gone. A bucket is not asked: retention clears the record."""
    if isinstance(storage, LocalStorage):
        path = Path(location)
        return path.stat().st_size if path.is_file() else None
    if not location.startswith(storage.location("")):  # stored by a former backend (a local path): not here
        return None
    return recorded


# A file's answers: the bytes (a range of them), or a redirect to the store (s3), or why not.
FILE = {"schema": {"type": "string", "format": "binary"}}
DOWNLOAD_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file", "content": {"application/octet-stream": FILE}},
    206: {"description": "The range asked for (Range)", "content": {"application/octet-stream": FILE}},
    303: {"description": "s3 storage: the file at a presigned URL of the store (Location)"},
    **errors(
        {
            404: ["link_not_found"],
            410: ["link_replaced", "link_expired", "file_gone", "download_limit"],
            429: ["rate_limited", "too_many_connections"],
        }
    ),
    416: {"description": "The Range is not satisfiable", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


@router.get(
    "/downloads/{token}",
    operation_id="download",
    summary="The customer's upscaled file",
    dependencies=[Depends(deps.public_rate_limit)],
    response_class=Response,
    responses=DOWNLOAD_ANSWERS,
)
@router.head(
    "/downloads/{token}",
    operation_id="download_head",
    summary="The file's headers alone",
    dependencies=[Depends(deps.public_rate_limit)],
    response_class=Response,
    responses=DOWNLOAD_ANSWERS,
)
def download(token: str, request: Request, svc: deps.Services = Depends(deps.services)) -> Response:
    release = svc.downloads.acquire(deps.client_host(request))  # first: a refused slot counts no download
    try:
        found = _checked_download(svc, token, request.method, request.headers)
        handed_off = _handed_off(svc, found, request.method)
    except BaseException:
        release()
        raise
    if handed_off is not None:  # the bytes go out elsewhere: the slot is free at once
        release()
        return handed_off
    # FileResponse streams the file and answers Range requests with 206; no database session is open.
    assert isinstance(svc.storage, LocalStorage)
    response = HeldFileResponse(
        svc.storage.path(found.key), filename=found.filename, content_disposition_type="attachment"
    )
    response.release = release  # held until the transfer ends
    return response


def _handed_off(svc: deps.Services, found: Download, method: str) -> Response | None:
    """s3: 303 to a presigned GET (HEAD: the headers, here); local behind nginx: X-Accel-Redirect.
    None: the API streams the file itself."""
    storage, cfg = svc.storage, svc.settings
    disposition = {"Content-Disposition": _attachment(found.filename)}
    if isinstance(storage, S3Storage):
        if method == "HEAD":
            media = mimetypes.guess_type(found.filename)[0] or "application/octet-stream"
            headers = {"Content-Length": str(found.size), "Accept-Ranges": "bytes", **disposition}
            return Response(status_code=200, headers=headers, media_type=media)
        lifetime = min(cfg.presigned_ttl_seconds, int((found.expires - utcnow()).total_seconds()))
        return RedirectResponse(storage.presigned_get(found.key, lifetime, found.filename), status_code=303)
    if cfg.accel_redirect_prefix and method == "GET":
        target = f"{cfg.accel_redirect_prefix.rstrip('/')}/{quote(found.key)}"
        return Response(status_code=200, headers={"X-Accel-Redirect": target, **disposition})
    return None


def _attachment(filename: str) -> str:
    return f"attachment; filename=\"{filename}\"; filename*=utf-8''{quote(filename)}"


@router.get(
    "/files/{kind}/{name}",
    summary="A stored original or upload, by a temporary signed URL",
    dependencies=[Depends(deps.public_rate_limit)],
    response_class=Response,
    responses={
        200: {"description": "The file", "content": {"application/octet-stream": FILE}},
        303: {"description": "s3 storage: the file at a presigned URL of the store (Location)"},
        **errors(merged(PUBLIC_ERRORS, INVALID, {403: ["bad_signature"], 404: ["not_found"]})),
    },
)
def signed_file(kind: str, name: str, exp: int, sig: str, svc: deps.Services = Depends(deps.services)) -> Response:
    cfg, storage = svc.settings, svc.storage
    match = NAME.match(name)
    if kind not in ("originals", "uploads") or not match or (kind == "uploads" and match["quality"]):
        raise ApiError(404, "not_found", "no such file")
    if exp < time.time() or not signing.verify_file(cfg.webhook_secrets(), kind, name, exp, sig):
        raise ApiError(403, "bad_signature", "this file link is expired or its signature is wrong")
    key: str | None
    if kind == "uploads":
        key = upload_key(name)
    elif match["quality"]:
        key = job_key(match["id"], compressed_name(int(match["quality"])))
    else:
        key = storage.original(match["id"])
    if key is None or not storage.exists(key):
        raise ApiError(404, "not_found", "no such file")
    if isinstance(storage, S3Storage):
        lifetime = min(cfg.presigned_ttl_seconds, exp - int(time.time()) + 1)
        return RedirectResponse(storage.presigned_get(key, lifetime), status_code=303)
    assert isinstance(storage, LocalStorage)
    return FileResponse(storage.path(key))
