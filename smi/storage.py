"""Where the service's bytes live, and the one layout every part uses: the activities write
there, the API serves from it, retention and erasure delete from it.

    uploads/<upload_id>                     a storefront's upload
    jobs/<job_id>/original.<ext>            the image as fetched
    jobs/<job_id>/compressed_q<N>.jpg       copies for Upsampler's input limit
    jobs/<job_id>/tmp/result-<attempt>      downloaded results, before validation
    jobs/<job_id>/upscaled_<W>x<H>.<ext>    the result the customer downloads

Two backends behind one interface, chosen by SMI_STORAGE_URL (`open_storage`):

- `LocalStorage`: a folder (SMI_STORAGE_DIR), one host or a shared file system; the default.
- `S3Storage`: a bucket and key prefix of any S3-compatible store (`s3://bucket/prefix`). Each
  process keeps only scratch copies, in its own SMI_STORAGE_DIR: no step needs the host of the
  step before.

Payloads and the database record a stored file by its `location`: the file's path (local) or
`s3://bucket/key`. Every deletion is of what is there: running one again deletes nothing more.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from smi.settings import Settings, parse_storage_url
from smi.vocabulary import InventoryRequest, RetentionDeleted, RetentionPlan, StoredNames

# Job ids and upload ids: nothing else under jobs/ and uploads/ is touched (\Z: `$` would let a trailing newline in).
STORED_ID = re.compile(r"^[0-9a-f]{32}\Z")
PART_BYTES = 8 * 1024 * 1024  # multipart part size (S3's minimum is 5 MiB, all parts but the last)
PARTS_IN_FLIGHT = 2  # a part upload waits on the store; two overlap that wait (bench/s3_download.py)
COPY_CHUNK = 1024 * 1024


def compressed_name(quality: int) -> str:
    return f"compressed_q{quality}.jpg"


def job_key(job_id: str, name: str = "") -> str:
    return f"jobs/{job_id}/{name}"


def upload_key(upload_id: str) -> str:
    return f"uploads/{upload_id}"


@dataclass
class Stored:
    key: str
    size: int
    modified: datetime
    upload_id: str = ""  # of an unfinished multipart upload


class Storage:
    """What both backends offer; retention and erasure are written once, over `_list` and `_delete`."""

    # ---- the primitives each backend provides ----

    def location(self, key: str) -> str:  # what payloads and the database record
        raise NotImplementedError

    def key_of(self, location: str) -> str:
        raise NotImplementedError

    def scratch(self, key: str) -> Path:
        """A local file to build `key`'s content in, then `put` it there."""
        raise NotImplementedError

    def put(self, local: Path, key: str) -> None:
        """Move a whole local file into storage as `key` (the local file is gone afterwards)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local file with `key`'s bytes while the block runs (FileNotFoundError when there is none)."""
        raise NotImplementedError
        yield

    def move(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def read_start(self, key: str, size: int) -> bytes:
        """The first `size` bytes of `key` (FileNotFoundError when there is none)."""
        raise NotImplementedError

    def _list(self, prefix: str, start_after: str = "") -> Iterator[Stored]:
        """The files under `prefix`, in key order, after `start_after`."""
        raise NotImplementedError

    def _delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _unfinished(self, prefix: str, start_after: str = "") -> Iterator[Stored]:
        """Writes begun under `prefix` and never finished, in key order, that only a listing of their own shows."""
        return iter(())

    def _abort_unfinished(self, prefix: str) -> int:
        """Multipart uploads begun under `prefix` and never finished (their parts are stored too)."""
        return 0

    # ---- built on them ----

    def check(self) -> None:
        """Raises when the storage cannot be reached (the API's readiness)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        self._delete([key])

    def names(self, prefix: str) -> list[str]:
        return [item.key for item in self._list(prefix)]

    def exists(self, key: str) -> bool:
        return key in self.names(key)

    def original(self, job_id: str) -> str | None:
        """The key of the job's stored original, once it is whole (whatever its extension)."""
        return next((k for k in self.names(job_key(job_id, "original.")) if not k.endswith(".part")), None)

    def delete_prefix(self, prefix: str) -> int:
        """Every file under `prefix` (and unfinished uploads there); returns how many files there were."""
        count = self._abort_unfinished(prefix)
        batch: list[str] = []
        for item in self._list(prefix):
            batch.append(item.key)
            if len(batch) == 1000:  # S3's DeleteObjects takes at most 1000 keys
                self._delete(batch)
                count, batch = count + len(batch), []
        if batch:
            self._delete(batch)
        return count + len(batch)

    def inventory(self, request: InventoryRequest) -> StoredNames:
        """A page (by name, after `request.after`) of the job folders holding files, or of the uploads."""
        found: dict[str, datetime] = {}
        # "0" sorts after "/": the listing starts past every key of the job (or upload) named `after`.
        start = f"{request.kind}/{request.after}0" if request.after else ""
        stored = self._list(f"{request.kind}/", start)
        unfinished = self._unfinished(f"{request.kind}/", start)  # a job may hold nothing else
        for item in heapq.merge(stored, unfinished, key=lambda item: item.key):
            name = item.key.split("/")[1].removesuffix(".part")
            if not STORED_ID.match(name):
                continue
            if name not in found and len(found) == request.limit + 1:
                break
            found[name] = max(found.get(name, item.modified), item.modified)
        names = sorted(found)
        page = names[: request.limit]
        return StoredNames(
            request.kind, page, [found[name] for name in page], page[-1] if len(names) > request.limit else None
        )

    def delete_retained(self, plan: RetentionPlan) -> RetentionDeleted:
        """Delete what the plan makes due; returns how many files of each kind were there."""
        deleted = RetentionDeleted()
        for job_id in filter(STORED_ID.match, plan.inputs):
            deleted.temporary += self._abort_unfinished(job_key(job_id))
            due: dict[str, list[str]] = {"temporary": [], "originals": [], "compressed": []}
            for key in self.names(job_key(job_id)):
                name = key.removeprefix(job_key(job_id))
                if name.startswith("tmp/") or name.endswith(".part"):
                    due["temporary"].append(key)
                elif name.startswith("original."):
                    due["originals"].append(key)
                elif name.startswith("compressed_q"):
                    due["compressed"].append(key)
            for kind, keys in due.items():
                self._delete_all(keys)
                setattr(deleted, kind, getattr(deleted, kind) + len(keys))
        for job_id in filter(STORED_ID.match, plan.results):
            keys = self.names(job_key(job_id, "upscaled_"))
            self._delete_all(keys)
            deleted.results += len(keys)
        for upload_id in plan.uploads:
            deleted.uploads += self.erase_upload(upload_id)
        return deleted

    def erase_job_files(self, job_id: str) -> int:
        """Every file of the job (original, copies, result, leftovers); returns how many files."""
        return self.delete_prefix(job_key(job_id)) if STORED_ID.match(job_id) else 0

    def erase_upload(self, upload_id: str) -> int:
        """The upload (and a partial one, or an unfinished multipart upload); returns how many files there were."""
        if not STORED_ID.match(upload_id):
            return 0
        aborted = self._abort_unfinished(upload_key(upload_id))
        keys = [
            k
            for k in self.names(upload_key(upload_id))
            if k in (upload_key(upload_id), f"{upload_key(upload_id)}.part")
        ]
        self._delete_all(keys)
        return aborted + len(keys)

    def _delete_all(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            self._delete(keys[start : start + 1000])


class LocalStorage(Storage):
    """A folder: keys are paths under it; `scratch` is the key's `.part` beside it, so `put` is a rename."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def location(self, key: str) -> str:
        return str(self.path(key))

    def key_of(self, location: str) -> str:
        # A path outside the folder stays whole: `path` of an absolute key is that path.
        path = Path(location)
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else location

    def scratch(self, key: str) -> Path:
        part = self.path(key + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        return part

    def put(self, local: Path, key: str) -> None:
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, self.path(key))

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path

    def move(self, src: str, dst: str) -> None:
        self.put(self.path(src), dst)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_start(self, key: str, size: int) -> bytes:
        with open(self.path(key), "rb") as file:
            return file.read(size)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError("the storage folder is not writable")

    def _list(self, prefix: str, start_after: str = "") -> Iterator[Stored]:
        # The folder holding the prefix, walked in key order; only names that start with the prefix.
        folder = self.path(prefix) if prefix.endswith("/") else self.path(prefix).parent
        if not folder.is_dir():
            return
        keys = sorted(
            key
            for path in folder.rglob("*")
            if (path.is_file() or path.is_symlink())
            and (key := path.relative_to(self.root).as_posix()).startswith(prefix)
            and key > start_after
        )
        for key in keys:
            try:
                stat = self.path(key).lstat()
            except FileNotFoundError:
                continue
            yield Stored(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc))

    def _delete(self, keys: list[str]) -> None:
        folders: set[Path] = set()
        for key in keys:
            self.path(key).unlink(missing_ok=True)
            folders.update(self.path(key).parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
            if folder in (self.root / "jobs", self.root / "uploads") or self.root not in folder.parents:
                continue
            with contextlib.suppress(OSError):  # not empty (a result kept), or already gone
                folder.rmdir()

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        if prefix.endswith("/"):  # empty folders left by a crash
            shutil.rmtree(self.path(prefix), ignore_errors=True)
        return count


class S3Storage(Storage):
    """A bucket of an S3-compatible store, through botocore's client (thread-safe; calls in threads)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        scratch_dir: Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_base_url: str | None = None,
    ):
        import botocore.session
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.scratch_dir = scratch_dir
        config = Config(
            signature_version="s3v4",
            # Path style on any endpoint but AWS's own: MinIO, SeaweedFS, R2 and B2 all take it.
            # Bodies unsigned (UNSIGNED-PAYLOAD, as over https by default, here over http too): each carries a
            # CRC32 the store checks, and SHA-256 over every byte again would double the hashing of a download.
            s3={"addressing_style": "path" if endpoint_url else "auto", "payload_signing_enabled": False},
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        )

        def client(endpoint: str | None):
            return botocore.session.get_session().create_client(
                "s3",
                endpoint_url=endpoint or None,
                region_name=region or "us-east-1",
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None,
                config=config,
            )

        self.client = client(endpoint_url)
        # URLs handed to customers and Upsampler are signed for the address they will use.
        self.signer = client(public_base_url) if public_base_url else self.client
        self._scratch_lock = threading.Lock()
        _sweep(scratch_dir, older_than_seconds=24 * 3600)

    def object_key(self, key: str) -> str:
        return self.prefix + key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def key_of(self, location: str) -> str:
        head = f"s3://{self.bucket}/{self.prefix}"
        if not location.startswith(head):
            raise ValueError("not a location in this bucket")
        return location.removeprefix(head)

    def scratch(self, key: str) -> Path:
        with self._scratch_lock:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        return self.scratch_dir / f"{uuid.uuid4().hex}-{key.rsplit('/', 1)[-1]}.part"

    def put(self, local: Path, key: str) -> None:
        try:
            size = local.stat().st_size
            if size <= PART_BYTES:
                with open(local, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=body)
                return
            upload = self.create_multipart(key)
            try:
                parts: list[str] = []
                with open(local, "rb") as source:
                    while chunk := source.read(PART_BYTES):
                        parts.append(self.upload_part(key, upload, len(parts) + 1, chunk))
                self.complete_multipart(key, upload, parts)
            except BaseException:
                self.abort_multipart(key, upload)
                raise
        finally:
            local.unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        copy = self.scratch(key)
        try:
            self.download(key, copy)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def download(self, key: str, local: Path) -> None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        with body, open(local, "wb") as out:
            for chunk in body.iter_chunks(COPY_CHUNK):
                out.write(chunk)

    def move(self, src: str, dst: str) -> None:
        self.client.copy_object(
            Bucket=self.bucket,
            Key=self.object_key(dst),
            CopySource={"Bucket": self.bucket, "Key": self.object_key(src)},
        )
        self._delete([src])

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def read_start(self, key: str, size: int) -> bytes:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key), Range=f"bytes=0-{size - 1}")
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        with reply["Body"] as body:
            return body.read()

    def _list(self, prefix: str, start_after: str = "") -> Iterator[Stored]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.object_key(prefix),
            **({"StartAfter": self.object_key(start_after)} if start_after else {}),
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield Stored(item["Key"].removeprefix(self.prefix), item["Size"], item["LastModified"])

    def _delete(self, keys: list[str]) -> None:
        if keys:
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.object_key(k)} for k in keys], "Quiet": True},
            )

    def _unfinished(self, prefix: str, start_after: str = "") -> Iterator[Stored]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket,
            Prefix=self.object_key(prefix),
            **({"KeyMarker": self.object_key(start_after)} if start_after else {}),
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                yield Stored(upload["Key"].removeprefix(self.prefix), 0, upload["Initiated"], upload["UploadId"])

    def _abort_unfinished(self, prefix: str) -> int:
        uploads = list(self._unfinished(prefix))
        for upload in uploads:
            self.abort_multipart(upload.key, upload.upload_id)
        return len(uploads)

    # ---- multipart, for the result download (activities/storage.py): resumable by upload id and parts ----

    def create_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self.object_key(key))["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        reply = self.client.upload_part(
            Bucket=self.bucket, Key=self.object_key(key), UploadId=upload_id, PartNumber=number, Body=data
        )
        return reply["ETag"]

    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.object_key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]},
        )

    def multipart_alive(self, key: str, upload_id: str) -> bool:
        """Whether the upload can still take parts (not completed, aborted or expired)."""
        try:
            self.client.list_parts(Bucket=self.bucket, Key=self.object_key(key), UploadId=upload_id, MaxParts=1)
            return True
        except self.client.exceptions.NoSuchUpload:
            return False

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(self.client.exceptions.NoSuchUpload):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.object_key(key), UploadId=upload_id)

    # ---- handing bytes to others ----

    def presigned_get(self, key: str, ttl_seconds: int, filename: str | None = None) -> str:
        """A URL that GETs `key` for `ttl_seconds` (computed here, no request made; at most SigV4's 7 days),
        with the download's file name. Signed for SMI_DOWNLOAD_BASE_URL when set: the store's public
        address, or a proxy or CDN in front of it that passes the Host header on unchanged."""
        params = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if filename:
            params["ResponseContentDisposition"] = (
                f"attachment; filename=\"{filename}\"; filename*=UTF-8''{quote(filename)}"
            )
        lifetime = min(max(1, int(ttl_seconds)), 7 * 24 * 3600)
        return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=lifetime)


def _sweep(folder: Path, older_than_seconds: float) -> None:
    """Scratch copies a killed process left (no activity lives a day); another process's current ones stay."""
    cutoff = time.time() - older_than_seconds
    for path in folder.glob("*.part") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def open_storage(settings: Settings) -> Storage:
    """The backend SMI_STORAGE_URL names; SMI_STORAGE_DIR is its folder (local) or this process's scratch (s3)."""
    kind, bucket, prefix = parse_storage_url(settings.storage_url)
    if kind == "local":
        return LocalStorage(settings.storage_dir)

    def text(value) -> str | None:
        return value.get_secret_value() if value is not None else None

    return S3Storage(
        bucket,
        prefix,
        settings.storage_dir / "scratch",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=text(settings.s3_access_key_id),
        secret_access_key=text(settings.s3_secret_access_key),
        public_base_url=settings.download_base_url,
    )
