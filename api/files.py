"""Files leaving the service: the customer's download, and the signed temporary file URLs."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from sqlalchemy import update
from sqlmodel import Session, col
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api import deps
from api.errors import ApiError
from smi import signing
from smi.db import DownloadToken, Job, as_utc, rows_changed, utcnow
from smi.settings import Settings
from smi.storage import LocalStorage, compressed_name

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


def _checked_download(svc: deps.Services, token: str, method: str, headers) -> tuple[Path, str]:
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
        path = Path(job.result_path) if job and job.result_path else None
        if job is None or path is None or not path.is_file():
            raise ApiError(410, "file_gone", "the file is no longer stored; ask support for help")
        if cfg.download_max_count is not None and serves_first_byte(method, headers, path.stat().st_size):
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
        return path, f"{job.order_id}-{path.name}"


@router.get(
    "/downloads/{token}",
    operation_id="download",
    summary="The customer's upscaled file",
    dependencies=[Depends(deps.public_rate_limit)],
)
@router.head(
    "/downloads/{token}",
    operation_id="download_head",
    summary="The file's headers alone",
    dependencies=[Depends(deps.public_rate_limit)],
)
def download(token: str, request: Request, svc: deps.Services = Depends(deps.services)) -> FileResponse:
    release = svc.downloads.acquire(deps.client_host(request))  # first: a refused slot counts no download
    try:
        path, filename = _checked_download(svc, token, request.method, request.headers)
    except BaseException:
        release()
        raise
    # FileResponse streams the file and answers Range requests with 206; no database session is open.
    response = HeldFileResponse(path, filename=filename, content_disposition_type="attachment")
    response.release = release  # held until the transfer ends
    return response


@router.get(
    "/files/{kind}/{name}",
    summary="A stored original or upload, by a temporary signed URL",
    dependencies=[Depends(deps.public_rate_limit)],
)
def signed_file(kind: str, name: str, exp: int, sig: str, cfg: Settings = Depends(deps.settings)) -> FileResponse:
    match = NAME.match(name)
    if kind not in ("originals", "uploads") or not match or (kind == "uploads" and match["quality"]):
        raise ApiError(404, "not_found", "no such file")
    if exp < time.time() or not signing.verify_file(cfg.webhook_secrets(), kind, name, exp, sig):
        raise ApiError(403, "bad_signature", "this file link is expired or its signature is wrong")
    storage = LocalStorage(cfg.storage_dir)
    path: Path | None
    if kind == "uploads":
        path = storage.uploads_dir() / name
    elif match["quality"]:
        path = storage.job_dir(match["id"]) / compressed_name(int(match["quality"]))
    else:
        path = storage.original(match["id"])
    if path is None or not path.is_file() or path.suffix == ".part":
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(path)
