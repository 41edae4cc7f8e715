"""Disk side effects: the original, the downloaded result, checks, conversion, clean-up.

Every write goes to a temporary name and is renamed into place when whole, so a retry
finds either nothing or a complete file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi import imaging, telemetry
from smi.fetch import FetchPolicy, FetchRefused, guarded_stream
from smi.settings import Settings
from smi.storage import LocalStorage, compressed_name
from smi.vocabulary import (
    CompressRequest,
    DownloadedFile,
    DownloadRequest,
    ErrorCode,
    FetchRequest,
    InventoryRequest,
    RetentionDeleted,
    RetentionPlan,
    StoredImage,
    StoredNames,
    StoreRequest,
    ValidateRequest,
)

CHUNK = 1024 * 1024
BATCH = 4 * CHUNK  # downloads: hashed and written at once, in a thread, while the next is read
HEARTBEAT_EVERY_SECONDS = 2.0


def _fail(code: str, message: str, retryable: bool = False) -> ApplicationError:
    return ApplicationError(message, type=code, non_retryable=not retryable)


def hash_file(path: Path, hasher, limit: int | None = None):
    """Feed the file (or its first `limit` bytes) to `hasher`, a chunk at a time."""
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return hasher


def _open_at(path: Path, start: int):
    """`path` for writing from byte `start` on (a resume keeps what is before), cut there."""
    out = open(path, "r+b" if start else "wb")
    out.seek(start)
    out.truncate()
    return out


def _hash_and_write(hasher, out, batch: list[bytes]) -> int:
    # Joined first: each call below gives up the GIL and must win it back from the event loop,
    # which can take a switch interval (5 ms); twice per batch, not twice per piece.
    data = b"".join(batch)
    hasher.update(data)
    out.write(data)
    out.flush()  # in the OS's hands: survives the process being killed
    return len(data)


def file_sha256(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


def _resumed_from(response: httpx.Response, start: int, limit: int, what: str) -> int:
    """Where the body starts: at `start` when the server honoured the Range request (206), at 0 when it
    sent everything (200); any other status fails, and so does a declared length over `limit`."""
    if response.status_code == 200:
        start = 0
    elif response.status_code != 206 or not start:
        raise _http_failure(response.status_code, what)
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and start + int(declared) > limit:
        raise _fail(ErrorCode.TOO_LARGE, f"the {what} is larger than {limit} bytes")
    return start


async def _copy_body(
    response: httpx.Response,
    on_disk: Callable[..., asyncio.Future],
    hasher: hashlib._Hash,
    out: BinaryIO,
    start: int,
    limit: int,
    what: str,
) -> int:
    """The body, which follows byte `start`, handed to the disk thread (`on_disk`) in batches to hash and
    write, capped at `limit` while streaming; heartbeats what is on disk. Returns the bytes written."""
    received = written = start  # written: hashed, written and flushed, all a heartbeat may claim
    batch: list[bytes] = []
    size = 0
    writing: asyncio.Future | None = None  # the batch in the thread; gives its length when done
    heartbeats, last_beat = activity.in_activity(), time.monotonic()
    async for chunk in response.aiter_bytes():  # as they come: re-chunking would copy them
        received += len(chunk)
        if received > limit:  # capped while streaming, not after
            raise _fail(ErrorCode.TOO_LARGE, f"the {what} is larger than {limit} bytes")
        batch.append(chunk)
        size += len(chunk)
        beat = heartbeats and time.monotonic() - last_beat > HEARTBEAT_EVERY_SECONDS
        if size >= BATCH or beat:
            if writing is not None:
                written += await writing
            writing = on_disk(_hash_and_write, hasher, out, batch)
            batch, size = [], 0
            if beat:  # once this batch too is on disk: a resume from the heartbeat skips nothing
                written += await writing
                writing = None
                activity.heartbeat(written)
                last_beat = time.monotonic()
    if writing is not None:
        written += await writing
    return written + await on_disk(_hash_and_write, hasher, out, batch)


class StorageActivities:
    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None):
        self.settings = settings
        self.storage = LocalStorage(settings.storage_dir)
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=60.0))

    async def _stream_to(
        self, url: str, part: Path, limit: int, what: str, policy: FetchPolicy, start: int = 0
    ) -> tuple[int, str]:
        """Stream `url` into `part` (resuming at `start` when the server allows), hashing as it goes.

        A thread of its own hashes and writes one batch (~BATCH bytes) while the event loop reads
        the next from the socket: hashlib and file writes release the GIL, so the two overlap. A
        single thread runs its jobs in the order given, and it is handed a batch only once the
        previous one is written, so the bytes land in order and memory stays at a few batches.
        """
        hasher = hashlib.sha256()
        headers = {"Range": f"bytes={start}-"} if start else {}
        disk = ThreadPoolExecutor(1, thread_name_prefix="smi-download")  # owns the file and the hasher

        def on_disk(fn, *args) -> asyncio.Future:
            return asyncio.wrap_future(disk.submit(fn, *args))

        try:
            async with guarded_stream(self.http, url, policy, headers) as response:
                start = _resumed_from(response, start, limit, what)
                if start:
                    await on_disk(hash_file, part, hasher, start)
                out = await on_disk(_open_at, part, start)
                try:
                    written = await _copy_body(response, on_disk, hasher, out, start, limit, what)
                finally:
                    await asyncio.shield(on_disk(out.close))  # runs after a batch still in the thread, if any
        except FetchRefused as exc:
            code = ErrorCode.RESULT_URL_REFUSED if what == "result" else ErrorCode.IMAGE_URL_REFUSED
            raise _fail(code, f"the {what} URL was refused: {exc}") from None
        except httpx.DecodingError:  # the server's Content-Encoding does not match its body: no retry mends that
            code = ErrorCode.INVALID_RESULT if what == "result" else ErrorCode.FETCH_FAILED
            raise _fail(
                code, f"the {what} could not be decoded: its Content-Encoding does not match its body"
            ) from None
        except httpx.HTTPError as exc:  # network trouble; FetchRefused covers what httpx cannot request
            raise _fail(
                ErrorCode.TRANSIENT, f"fetching the {what} failed: {type(exc).__name__}", retryable=True
            ) from None
        finally:
            disk.shutdown(wait=False)  # its queue, if any (an error), still runs: the close is last
        return written, hasher.hexdigest()

    @activity.defn
    async def fetch_original(self, request: FetchRequest) -> StoredImage:
        """1. Download the image the storefront named, check it is an image, keep it."""
        job_dir = self.storage.job_dir(request.job_id)
        existing = self.storage.original(request.job_id)
        if existing:  # a retry after the rename: the file is whole
            return _describe(existing, imaging.probe(existing))
        job_dir.mkdir(parents=True, exist_ok=True)
        part = job_dir / "original.part"
        await self._stream_to(
            request.image_url, part, self.settings.max_input_bytes, "original image", self.settings.image_fetch_policy
        )
        try:
            info = await asyncio.to_thread(imaging.probe, part)
            if info.width * info.height > imaging.MAX_INPUT_PIXELS:  # before decoding: a bomb stays unopened
                raise imaging.ImageError(
                    ErrorCode.OUTPUT_TOO_LARGE,
                    f"the image is {info.width}x{info.height}, too large to upscale within Upsampler's pixel limit",
                )
            await asyncio.to_thread(imaging.decode_fully, part, ErrorCode.UNSUPPORTED_FORMAT)
        except imaging.ImageError as exc:
            part.unlink(missing_ok=True)
            raise _fail(exc.code, str(exc)) from None
        final = job_dir / f"original.{imaging.EXTENSIONS[info.format]}"
        os.replace(part, final)
        activity.logger.info("original stored: %dx%d %s", info.width, info.height, info.format)
        return _describe(final, info)

    @activity.defn
    def compress_original(self, request: CompressRequest) -> StoredImage:
        """A JPEG copy of the original at a lower quality, same pixel size, for Upsampler's input limit."""
        final = self.storage.job_dir(request.job_id) / compressed_name(request.quality)
        if not final.exists():
            original = self.storage.original(request.job_id)
            if original is None:
                raise _fail(ErrorCode.FETCH_FAILED, "the original is gone")
            part = final.with_suffix(".part")
            imaging.convert(original, part, "jpg", quality=request.quality)
            os.replace(part, final)
        return _describe(final, imaging.probe(final))

    @activity.defn
    async def download_result(self, request: DownloadRequest) -> DownloadedFile:
        """4. Stream Upsampler's result to a temporary file; resume after a crash from the heartbeat."""
        tmp = self.storage.tmp_dir(request.job_id)
        tmp.mkdir(parents=True, exist_ok=True)
        final = tmp / f"result-{request.attempt}"
        if final.exists():
            return DownloadedFile(str(final), final.stat().st_size, await asyncio.to_thread(file_sha256, final))
        part = tmp / f"result-{request.attempt}.part"
        details = activity.info().heartbeat_details if activity.in_activity() else ()
        start = int(details[0]) if details and part.exists() and part.stat().st_size >= int(details[0]) else 0
        if start:
            activity.logger.info("resuming the result download at byte %d", start)
        else:
            activity.logger.info("downloading the result")
        size, digest = await self._stream_to(
            request.url, part, self.settings.max_result_bytes, "result", self.settings.result_fetch_policy, start
        )
        os.replace(part, final)
        activity.logger.info("result downloaded: %d bytes", size)
        telemetry.count("smi_result_download_bytes", size - start, "Bytes of results downloaded from Upsampler.")
        return DownloadedFile(str(final), size, digest)

    @activity.defn
    def validate_result(self, request: ValidateRequest) -> imaging.ImageInfo:
        """5. Dimensions equal input x scale, a format we know, every pixel decodes."""
        try:
            return imaging.validate(request.path, request.width, request.height)
        except imaging.ImageError as exc:
            raise _fail(exc.code, str(exc)) from None

    @activity.defn
    def store_result(self, request: StoreRequest) -> StoredImage:
        """Put the checked result in place as jobs/{job_id}/upscaled_<W>x<H>.<ext>, converting if asked."""
        src = Path(request.path)
        job_dir = self.storage.job_dir(request.job_id)
        info = imaging.probe(src) if src.exists() else None
        if info is None:  # a retry after the move: the result is already in place
            asked = request.format if request.format != "auto" else None
            placed = sorted(job_dir.glob(f"upscaled_*.{asked}" if asked else "upscaled_*"))
            if not placed:
                raise _fail(ErrorCode.INVALID_RESULT, "the downloaded result is gone")
            return _describe(placed[0], imaging.probe(placed[0]))
        fmt = request.format if request.format != "auto" else info.format
        final = job_dir / f"upscaled_{info.width}x{info.height}.{imaging.EXTENSIONS[fmt]}"
        if fmt == info.format:
            os.replace(src, final)
        else:
            part = final.with_suffix(".part")
            imaging.convert(src, part, fmt)
            os.replace(part, final)
            src.unlink()
        return _describe(final, imaging.probe(final))

    @activity.defn
    def cleanup(self, job_id: str) -> int:
        """Remove the job's temporary files; returns how many there were."""
        tmp = self.storage.tmp_dir(job_id)
        count = sum(1 for _ in tmp.iterdir()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        return count

    # Retention (workflows/retention.py): what is stored, and deleting what is due (smi/storage.py).

    @activity.defn
    def retention_inventory(self, request: InventoryRequest) -> StoredNames:
        """A page (by name, after `request.after`) of the job folders holding files, or of the uploads."""
        if request.kind not in ("jobs", "uploads"):
            raise _fail(ErrorCode.INVALID_REQUEST, f"unknown kind of stored files: {request.kind}")
        return self.storage.inventory(request)

    @activity.defn
    def delete_retained(self, plan: RetentionPlan) -> RetentionDeleted:
        """Delete what the plan makes due; returns how many files of each kind were there."""
        return self.storage.delete_retained(plan)


def _describe(path: Path, info: imaging.ImageInfo) -> StoredImage:
    return StoredImage(str(path), info.width, info.height, info.format, path.stat().st_size, file_sha256(path))


def _http_failure(status: int, what: str) -> ApplicationError:
    if status == 429 or status >= 500:
        return _fail(ErrorCode.TRANSIENT, f"fetching the {what} answered {status}", retryable=True)
    if status in (403, 410) and what == "result":
        return _fail(ErrorCode.RESULT_EXPIRED, f"the {what} link answered {status}: expired or refused")
    return _fail(ErrorCode.FETCH_FAILED, f"fetching the {what} answered {status}")
