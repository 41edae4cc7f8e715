"""Storage side effects: the original, the downloaded result, checks, conversion, clean-up.

Every file is built under a scratch name and put in place when whole (smi/storage.py: a rename,
or an upload to the bucket), so a retry finds either nothing or a complete file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi import imaging, signing, telemetry
from smi.fetch import FetchPolicy, FetchRefused, guarded_stream
from smi.settings import Settings
from smi.storage import PART_BYTES, PARTS_IN_FLIGHT, S3Storage, compressed_name, job_key, open_storage, upload_key
from smi.vocabulary import (
    CheckAndStoreRequest,
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
        self.storage = open_storage(settings)
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
            async with _fetching(self.http, url, policy, headers, what) as response:
                start = _resumed_from(response, start, limit, what)
                if start:
                    await on_disk(hash_file, part, hasher, start)
                out = await on_disk(_open_at, part, start)
                try:
                    written = await _copy_body(response, on_disk, hasher, out, start, limit, what)
                finally:
                    await asyncio.shield(on_disk(out.close))  # runs after a batch still in the thread, if any
        finally:
            disk.shutdown(wait=False)  # its queue, if any (an error), still runs: the close is last
        return written, hasher.hexdigest()

    @activity.defn
    async def fetch_original(self, request: FetchRequest) -> StoredImage:
        """1. Download the image the storefront named, check it is an image, keep it."""
        existing = await asyncio.to_thread(self.storage.original, request.job_id)
        if existing:  # a retry after it was stored: the file is whole
            return await asyncio.to_thread(self._describe_stored, existing)
        part = self.storage.scratch(job_key(request.job_id, "original"))
        cfg = self.settings
        try:
            upload_id = signing.own_upload_id(
                request.image_url, cfg.public_base_url, cfg.webhook_secrets(), time.time()
            )
            if upload_id:  # uploaded to us: read from storage, whichever host stored it
                await asyncio.to_thread(self._copy_upload, upload_id, part)
            else:
                await self._stream_to(
                    request.image_url, part, cfg.max_input_bytes, "original image", cfg.image_fetch_policy
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
                raise _fail(exc.code, str(exc)) from None
            key = job_key(request.job_id, f"original.{imaging.EXTENSIONS[info.format]}")
            stored = await asyncio.to_thread(_describe, self.storage.location(key), part, info)
            await asyncio.to_thread(self.storage.put, part, key)
        finally:
            part.unlink(missing_ok=True)  # after a failure; `put` took it otherwise
        activity.logger.info("original stored: %dx%d %s", info.width, info.height, info.format)
        return stored

    @activity.defn
    def compress_original(self, request: CompressRequest) -> StoredImage:
        """A JPEG copy of the original at a lower quality, same pixel size, for Upsampler's input limit."""
        key = job_key(request.job_id, compressed_name(request.quality))
        if not self.storage.exists(key):
            original = self.storage.original(request.job_id)
            if original is None:
                raise _fail(ErrorCode.FETCH_FAILED, "the original is gone")
            part = self.storage.scratch(key)
            try:
                with self.storage.local_copy(original) as source:
                    imaging.convert(source, part, "jpg", quality=request.quality)
                self.storage.put(part, key)
            finally:
                part.unlink(missing_ok=True)
        return self._describe_stored(key)

    @activity.defn
    async def download_result(self, request: DownloadRequest) -> DownloadedFile:
        """4. Stream Upsampler's result into storage; resume after a crash from the heartbeat."""
        key = job_key(request.job_id, f"tmp/result-{request.attempt}")
        if await asyncio.to_thread(self.storage.exists, key):  # a retry after it was whole
            size, digest = await asyncio.to_thread(self._hash_stored, key)
            return DownloadedFile(self.storage.location(key), size, digest)
        details = activity.info().heartbeat_details if activity.in_activity() else ()
        if isinstance(self.storage, S3Storage):
            start, size, digest = await self._download_to_object(request.url, key, details)
        else:
            start, size, digest = await self._download_to_file(request.url, key, details)
        activity.logger.info("result downloaded: %d bytes", size)
        telemetry.count("smi_result_download_bytes", size - start, "Bytes of results downloaded from Upsampler.")
        return DownloadedFile(self.storage.location(key), size, digest)

    async def _download_to_file(self, url: str, key: str, details) -> tuple[int, int, str]:
        """Local: into `<key>.part`, resumed from the bytes a heartbeat reported on disk; renamed when whole."""
        part = self.storage.scratch(key)
        start = int(details[0]) if details and part.exists() and part.stat().st_size >= int(details[0]) else 0
        _log_start(start)
        size, digest = await self._stream_to(
            url, part, self.settings.max_result_bytes, "result", self.settings.result_fetch_policy, start
        )
        self.storage.put(part, key)
        return start, size, digest

    async def _download_to_object(self, url: str, key: str, details) -> tuple[int, int, str]:
        """s3: straight into a multipart upload, parts in flight while the next arrives. Each heartbeat
        carries the bytes stored, the upload id and the parts' ETags: a worker that takes over asks
        the CDN only for what follows. The SHA-256 of a resumed download is read back from the store."""
        storage = self.storage
        assert isinstance(storage, S3Storage)
        resume = ResultUpload.from_details(details)
        if resume is not None and not await asyncio.to_thread(storage.multipart_alive, key, resume.upload_id):
            resume = None  # aborted meanwhile (a clean-up): start over
        if resume is None:
            resume = ResultUpload(0, await asyncio.to_thread(storage.create_multipart, key), [])
        start = resume.stored
        _log_start(start)
        sender: _PartSender | None = None
        try:
            async with _fetching(
                self.http, url, self.settings.result_fetch_policy, _range_from(start), "result"
            ) as response:
                if _resumed_from(response, start, self.settings.max_result_bytes, "result") != start:
                    # The CDN sent the whole file again: a fresh upload (the old one is aborted).
                    await asyncio.to_thread(storage.abort_multipart, key, resume.upload_id)
                    resume = ResultUpload(0, await asyncio.to_thread(storage.create_multipart, key), [])
                    start = 0
                hasher = hashlib.sha256() if start == 0 else None
                sender = _PartSender(storage, key, resume, hasher)
                size = await _upload_body(response, sender, self.settings.max_result_bytes)
        except ApplicationError as exc:
            if exc.non_retryable:  # no retry will use the parts
                await asyncio.to_thread(storage.abort_multipart, key, resume.upload_id)
            raise
        finally:
            if sender is not None:
                sender.close()
        await asyncio.to_thread(storage.complete_multipart, key, resume.upload_id, resume.etags)
        if hasher is not None:
            return start, size, hasher.hexdigest()
        stored_size, digest = await asyncio.to_thread(self._hash_stored, key)
        return start, stored_size, digest

    @activity.defn
    def validate_result(self, request: ValidateRequest) -> imaging.ImageInfo:
        """5. Dimensions equal input x scale, a format we know, every pixel decodes."""
        try:
            with self.storage.local_copy(self.storage.key_of(request.path)) as path:
                return imaging.validate(path, request.width, request.height)
        except imaging.ImageError as exc:
            raise _fail(exc.code, str(exc)) from None
        except FileNotFoundError:
            raise _fail(ErrorCode.INVALID_RESULT, "the downloaded result is gone") from None

    @activity.defn
    def store_result(self, request: StoreRequest) -> StoredImage:
        """Put the checked result in place (histories from before "fewer-rounds" validate it apart)."""
        return self._place(request, None)

    @activity.defn
    def check_and_store(self, request: CheckAndStoreRequest) -> StoredImage:
        """5. Validate the result (dimensions equal input x scale, a format we know, every pixel decodes),
        then put it in place as jobs/{job_id}/upscaled_<W>x<H>.<ext>, converting if asked: one activity,
        and in s3 mode one copy of the result read from the store instead of two."""
        return self._place(StoreRequest(request.job_id, request.path, request.format), (request.width, request.height))

    def _place(self, request: StoreRequest, check: tuple[int, int] | None) -> StoredImage:
        source = self.storage.key_of(request.path)
        asked = request.format if request.format != "auto" else None
        if not self.storage.exists(source):  # a retry after the move: the result is already in place, checked
            placed = [k for k in self.storage.names(job_key(request.job_id, "upscaled_")) if not k.endswith(".part")]
            placed = [k for k in placed if asked is None or k.endswith(f".{imaging.EXTENSIONS[asked]}")]
            if not placed:
                raise _fail(ErrorCode.INVALID_RESULT, "the downloaded result is gone")
            return self._describe_stored(placed[0])
        with self.storage.local_copy(source) as path:
            try:
                info = imaging.validate(path, *check) if check is not None else imaging.probe(path)
            except imaging.ImageError as exc:
                raise _fail(exc.code, str(exc)) from None
            fmt = asked or info.format
            final = job_key(request.job_id, f"upscaled_{info.width}x{info.height}.{imaging.EXTENSIONS[fmt]}")
            if fmt == info.format:
                stored = _describe(self.storage.location(final), path, info)
            else:
                part = self.storage.scratch(final)
                try:
                    imaging.convert(path, part, fmt)
                    stored = _describe(self.storage.location(final), part, imaging.probe(part))
                    self.storage.put(part, final)
                finally:
                    part.unlink(missing_ok=True)
        if fmt == info.format:
            self.storage.move(source, final)
        else:
            self.storage.delete(source)
        return stored

    @activity.defn
    def cleanup(self, job_id: str) -> int:
        """Remove the job's temporary files (and unfinished uploads); returns how many there were."""
        return self.storage.delete_prefix(job_key(job_id, "tmp/"))

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

    def _copy_upload(self, upload_id: str, part: Path) -> None:
        try:
            with self.storage.local_copy(upload_key(upload_id)) as upload:
                shutil.copyfile(upload, part)
        except FileNotFoundError:
            raise _fail(ErrorCode.FETCH_FAILED, "the uploaded image is gone (uploads are kept for a while)") from None

    def _describe_stored(self, key: str) -> StoredImage:
        with self.storage.local_copy(key) as path:
            return _describe(self.storage.location(key), path, imaging.probe(path))

    def _hash_stored(self, key: str) -> tuple[int, str]:
        with self.storage.local_copy(key) as path:
            return path.stat().st_size, file_sha256(path)


@dataclass
class ResultUpload:
    """A result's multipart upload as heartbeats carry it: bytes stored, upload id, the parts' ETags."""

    stored: int
    upload_id: str
    etags: list[str]

    @classmethod
    def from_details(cls, details) -> ResultUpload | None:
        if len(details) == 3 and isinstance(details[1], str) and details[1]:
            return cls(int(details[0]), details[1], list(details[2]))
        return None


class _PartSender:
    """Sends parts of a multipart upload, up to PARTS_IN_FLIGHT at once, hashing them in order in a thread
    of its own; a part counts as stored (and is heartbeated) once it and every part before it are."""

    def __init__(self, storage: S3Storage, key: str, upload: ResultUpload, hasher: hashlib._Hash | None):
        self.storage, self.key, self.upload, self.hasher = storage, key, upload, hasher
        self.senders = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="smi-upload")
        self.hashing = ThreadPoolExecutor(1, thread_name_prefix="smi-hash")  # one thread: the order is kept
        self.in_flight: collections.deque[tuple[asyncio.Future, int]] = collections.deque()
        self.hashed: asyncio.Future | None = None

    async def send(self, data: bytearray) -> None:
        while len(self.in_flight) >= PARTS_IN_FLIGHT:
            await self._retire_oldest()
        number = len(self.upload.etags) + len(self.in_flight) + 1
        if self.hasher is not None:
            if self.hashed is not None:
                await self.hashed  # the part before is hashed: memory stays at the parts in flight
            self.hashed = asyncio.wrap_future(self.hashing.submit(self.hasher.update, data))
        sent = self.senders.submit(self.storage.upload_part, self.key, self.upload.upload_id, number, data)
        self.in_flight.append((asyncio.wrap_future(sent), len(data)))

    async def finish(self) -> None:
        while self.in_flight:
            await self._retire_oldest()
        if self.hashed is not None:
            await self.hashed

    async def _retire_oldest(self) -> None:
        sent, size = self.in_flight[0]
        etag = await sent
        self.in_flight.popleft()
        self.upload.etags.append(etag)
        self.upload.stored += size
        if activity.in_activity():
            activity.heartbeat(self.upload.stored, self.upload.upload_id, self.upload.etags)

    def close(self) -> None:
        self.senders.shutdown(wait=False)
        self.hashing.shutdown(wait=False)


async def _upload_body(response: httpx.Response, sender: _PartSender, limit: int) -> int:
    """The body, which follows byte `upload.stored`, sent as parts of PART_BYTES (the last may be
    shorter) while the next is read. Returns the result's size."""
    received = sender.upload.stored
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        received += len(chunk)
        if received > limit:  # capped while streaming, not after
            raise _fail(ErrorCode.TOO_LARGE, f"the result is larger than {limit} bytes")
        buffer += chunk
        if len(buffer) >= PART_BYTES:  # the buffer itself becomes the part (no copy); what is over starts the next
            part, buffer = buffer, buffer[PART_BYTES:]
            del part[PART_BYTES:]
            await sender.send(part)
    if buffer or not sender.upload.etags and not sender.in_flight:  # the last part (an empty file: one empty part)
        await sender.send(buffer)
    await sender.finish()
    return received


@contextlib.asynccontextmanager
async def _fetching(http: httpx.AsyncClient, url: str, policy: FetchPolicy, headers: dict, what: str):
    """`guarded_stream`, its failures made into the workflow's error codes."""
    try:
        async with guarded_stream(http, url, policy, headers) as response:
            yield response
    except FetchRefused as exc:
        code = ErrorCode.RESULT_URL_REFUSED if what == "result" else ErrorCode.IMAGE_URL_REFUSED
        raise _fail(code, f"the {what} URL was refused: {exc}") from None
    except httpx.DecodingError:  # the server's Content-Encoding does not match its body: no retry mends that
        code = ErrorCode.INVALID_RESULT if what == "result" else ErrorCode.FETCH_FAILED
        raise _fail(code, f"the {what} could not be decoded: its Content-Encoding does not match its body") from None
    except httpx.HTTPError as exc:  # network trouble; FetchRefused covers what httpx cannot request
        raise _fail(ErrorCode.TRANSIENT, f"fetching the {what} failed: {type(exc).__name__}", retryable=True) from None


def _range_from(start: int) -> dict:
    return {"Range": f"bytes={start}-"} if start else {}


def _log_start(start: int) -> None:
    if start:
        activity.logger.info("resuming the result download at byte %d", start)
    else:
        activity.logger.info("downloading the result")


def _describe(location: str, path: Path, info: imaging.ImageInfo) -> StoredImage:
    return StoredImage(location, info.width, info.height, info.format, path.stat().st_size, file_sha256(path))


def _http_failure(status: int, what: str) -> ApplicationError:
    if status == 429 or status >= 500:
        return _fail(ErrorCode.TRANSIENT, f"fetching the {what} answered {status}", retryable=True)
    if status in (403, 410) and what == "result":
        return _fail(ErrorCode.RESULT_EXPIRED, f"the {what} link answered {status}: expired or refused")
    return _fail(ErrorCode.FETCH_FAILED, f"fetching the {what} answered {status}")
