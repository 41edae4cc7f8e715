"""smi/storage.py's interface, one suite run against both backends: a folder (LocalStorage) and a bucket of the
real S3-compatible server the tests start on loopback (S3Storage on SeaweedFS, each test under a prefix of its
own). What a store really holds is read beside the interface (the folder's files; the bucket's objects and
unfinished multipart uploads), so a deletion that reports a count but leaves bytes behind is seen.
Then what only S3 has (presigned URLs) and the settings that choose a backend."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError

from devstack import S3_ACCESS_KEY, S3_SECRET_KEY
from smi import signing
from smi.settings import Settings
from smi.storage import (
    PART_BYTES,
    LocalStorage,
    S3Storage,
    Storage,
    job_key,
    open_storage,
    parse_storage_url,
    upload_key,
)
from smi.vocabulary import InventoryRequest, RetentionDeleted, RetentionPlan

# Names under jobs/ and uploads/ that are no job or upload id (32 lowercase hex): never touched. The tests
# store files under them, then ask for them (and for "..", the folder above) to be deleted.
STRANGERS = ["not-an-id", "A" * 32, "b" * 31, "c" * 33, "d" * 32 + "\n"]
NOT_IDS = [*STRANGERS, ".."]


class LocalBackend:
    name = "local"

    def __init__(self, root: Path):
        self.root = root
        self.storage = LocalStorage(root)

    def held(self, prefix: str = "") -> list[str]:
        """Every file under the folder whose key starts with `prefix`."""
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix))

    def interrupt(self, key: str) -> None:
        """A write of `key` begun and never finished: its scratch file (`<key>.part`) left beside it."""
        self.storage.scratch(key).write_bytes(b"partial")

    def modified(self, key: str) -> datetime:
        return datetime.fromtimestamp(self.storage.path(key).stat().st_mtime, tz=timezone.utc)

    def listing_pages(self, prefix: str) -> int:
        return 1  # a folder is walked whole


class S3Backend:
    name = "s3"

    def __init__(self, server, scratch: Path):
        self.server, self.prefix = server, uuid.uuid4().hex[:12]
        self.storage = server.storage(scratch, prefix=self.prefix)

    def held(self, prefix: str = "") -> list[str]:
        """Every object and every unfinished multipart upload of the bucket under this test's `prefix`."""
        mine, under = f"{self.prefix}/", f"{self.prefix}/{prefix}"
        objects = [k.removeprefix(mine) for k in self.server.keys(under)]
        unfinished = [f"{k.removeprefix(mine)} (unfinished)" for k in self.server.unfinished_uploads(under)]
        return sorted(objects + unfinished)

    def interrupt(self, key: str) -> None:
        """A write of `key` begun and never finished: a multipart upload with one part stored."""
        upload = self.storage.create_multipart(key)
        self.storage.upload_part(key, upload, 1, b"partial")

    def modified(self, key: str) -> datetime:
        return self.server.client.head_object(Bucket=self.server.bucket, Key=f"{self.prefix}/{key}")["LastModified"]

    def listing_pages(self, prefix: str) -> int:
        pages = self.server.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.server.bucket, Prefix=f"{self.prefix}/{prefix}"
        )
        return sum(1 for _ in pages)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path / "storage")
    return S3Backend(request.getfixturevalue("s3_server"), tmp_path / "scratch")


def store(storage: Storage, key: str, data: bytes = b"bytes") -> None:
    """The way the service writes: build the content in the key's scratch file, then put it."""
    scratch = storage.scratch(key)
    scratch.write_bytes(data)
    storage.put(scratch, key)


def store_many(storage: Storage, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store(storage, key), keys))


def read(storage: Storage, key: str) -> bytes:
    with storage.local_copy(key) as copy:
        return copy.read_bytes()


def new_ids(count: int) -> list[str]:
    """Job or upload ids, in name order."""
    return sorted(uuid.uuid4().hex for _ in range(count))


def plant_strangers(storage: Storage) -> list[str]:
    """Files under names that are no id; returns their keys."""
    keys = [job_key(name, "original.png") for name in STRANGERS] + [upload_key(name) for name in STRANGERS]
    for key in keys:
        store(storage, key)
    return keys


def after_a_second() -> None:
    """S3 keeps modification times to the second: what is written after this is seen as newer."""
    time.sleep(1.1)


# ---- the interface, on both backends ----


@pytest.mark.parametrize("size", [5, PART_BYTES + 1], ids=["small", "multipart"])
def test_put_moves_the_file_in_and_local_copy_gives_it_back(backend, size):
    storage, key = backend.storage, job_key(uuid.uuid4().hex, "original.png")
    data = os.urandom(size)
    scratch = storage.scratch(key)
    scratch.write_bytes(data)
    storage.put(scratch, key)
    assert not scratch.exists()
    assert backend.held() == [key]
    assert read(storage, key) == data
    if backend.name == "s3":  # an ETag "<md5>-<parts>" is the sign of a multipart upload
        etag = backend.server.client.head_object(Bucket=backend.server.bucket, Key=storage.object_key(key))["ETag"]
        assert etag.strip('"').endswith("-2" if size > PART_BYTES else "") and etag.count("-") == (size > PART_BYTES)
        assert list(storage.scratch_dir.iterdir()) == []  # the local copy is gone with its block


def test_local_copy_of_a_missing_key_is_file_not_found(backend):
    with pytest.raises(FileNotFoundError):
        with backend.storage.local_copy(job_key(uuid.uuid4().hex, "original.png")):
            pass
    with pytest.raises(FileNotFoundError):
        backend.storage.read_start(job_key(uuid.uuid4().hex, "original.png"), 10)


def test_read_start_gives_the_first_bytes_only(backend):
    key, data = job_key(uuid.uuid4().hex, "original.png"), os.urandom(100_000)
    store(backend.storage, key, data)
    assert backend.storage.read_start(key, 64) == data[:64]
    assert backend.storage.read_start(key, 200_000) == data  # a short file: all of it


def test_exists_names_move_and_original(backend):
    storage, job_id = backend.storage, uuid.uuid4().hex
    store(storage, job_key(job_id, "original.png.part"))
    assert storage.original(job_id) is None  # a partial original is no original
    store(storage, job_key(job_id, "original.png"), b"original")  # (in a folder, built in that .part file)
    store(storage, job_key(job_id, "original.png.part"))
    assert storage.original(job_id) == job_key(job_id, "original.png")
    assert storage.exists(job_key(job_id, "original.png"))
    assert not storage.exists(job_key(job_id, "original"))  # a prefix of a key is not the key
    assert not storage.exists(job_key(job_id, "upscaled_4x4.png"))

    store(storage, job_key(job_id, "tmp/result-1"), b"result")
    storage.move(job_key(job_id, "tmp/result-1"), job_key(job_id, "upscaled_4x4.png"))
    assert not storage.exists(job_key(job_id, "tmp/result-1"))
    assert read(storage, job_key(job_id, "upscaled_4x4.png")) == b"result"
    assert storage.names(job_key(job_id)) == [
        job_key(job_id, name) for name in ("original.png", "original.png.part", "upscaled_4x4.png")
    ]
    assert storage.names(job_key(job_id, "up")) == [job_key(job_id, "upscaled_4x4.png")]


def test_delete_prefix_counts_what_it_deleted_and_a_second_pass_deletes_nothing(backend):
    storage, (job_id, neighbour) = backend.storage, new_ids(2)
    for name in ("original.png", "compressed_q80.jpg", "tmp/result-1"):
        store(storage, job_key(job_id, name))
    backend.interrupt(job_key(job_id, "tmp/result-2"))
    store(storage, job_key(neighbour, "original.png"))

    assert storage.delete_prefix(job_key(job_id)) == 4
    assert backend.held() == [job_key(neighbour, "original.png")]
    assert storage.delete_prefix(job_key(job_id)) == 0


def test_job_inventory_pages_by_name_past_a_thousand_files(backend):
    storage, (big, second, third) = backend.storage, new_ids(3)
    store_many(storage, [job_key(big, f"tmp/{n:04d}") for n in range(1001)])
    store_many(storage, [job_key(second, "original.png"), job_key(third, "original.png"), "jobs/not-an-id/x"])
    after_a_second()
    store(storage, job_key(big, "tmp/zz-newest"))  # listed last of its job, on the listing's second page
    if backend.name == "s3":
        assert backend.listing_pages("jobs/") == 2  # the inventory reads past ListObjectsV2's first 1000 keys

    page = storage.inventory(InventoryRequest("jobs", limit=2))
    assert (page.kind, page.names, page.next_after) == ("jobs", [big, second], second)
    assert page.modified[0] == backend.modified(job_key(big, "tmp/zz-newest"))
    assert page.modified[0] > backend.modified(job_key(big, "tmp/0000"))
    assert page.modified[1] == backend.modified(job_key(second, "original.png"))

    last = storage.inventory(InventoryRequest("jobs", after=second, limit=2))
    assert (last.names, last.next_after) == ([third], None)
    middle = storage.inventory(InventoryRequest("jobs", after=big, limit=1))
    assert (middle.names, middle.next_after) == ([second], second)

    # Deletion in batches of S3's 1000 keys at most: every file, then nothing.
    assert storage.erase_job_files(big) == 1002
    assert backend.held(job_key(big)) == []
    assert storage.erase_job_files(big) == 0


def test_a_job_holding_only_an_unfinished_write_is_inventoried_and_retained_away(backend):
    """A worker killed mid-download whose job was then ended by hand leaves no object, only the write."""
    storage, (job_id,) = backend.storage, new_ids(1)
    backend.interrupt(job_key(job_id, "tmp/result-1"))
    assert storage.inventory(InventoryRequest("jobs", limit=10)).names == [job_id]
    assert storage.delete_retained(RetentionPlan(inputs=[job_id])).temporary == 1
    assert backend.held() == [] and storage.inventory(InventoryRequest("jobs", limit=10)).names == []


def test_upload_inventory_counts_a_partial_upload_as_its_upload(backend):
    storage, (whole, partial, both) = backend.storage, new_ids(3)
    store_many(storage, [upload_key(whole), f"{upload_key(partial)}.part", upload_key(both), "uploads/readme"])
    after_a_second()
    store(storage, f"{upload_key(both)}.part")

    page = storage.inventory(InventoryRequest("uploads", limit=2))
    assert (page.kind, page.names, page.next_after) == ("uploads", [whole, partial], partial)
    assert page.modified == [backend.modified(upload_key(whole)), backend.modified(f"{upload_key(partial)}.part")]
    last = storage.inventory(InventoryRequest("uploads", after=partial, limit=2))
    assert (last.names, last.next_after) == ([both], None)
    assert last.modified == [backend.modified(f"{upload_key(both)}.part")]
    assert last.modified[0] > backend.modified(upload_key(both))


def test_delete_retained_deletes_exactly_what_is_due_and_counts_it(backend):
    storage, (inputs_due, results_due, kept, upload_due, upload_kept) = backend.storage, new_ids(5)
    layout = {
        inputs_due: ["original.png", "original.png.part", "compressed_q80.jpg", "compressed_q60.jpg"]
        + ["tmp/result-1", "upscaled_4x4.png"],
        results_due: ["original.png", "upscaled_4x4.png"],
        kept: ["original.png", "compressed_q80.jpg", "tmp/result-1", "upscaled_4x4.png"],
    }
    for job_id, names in layout.items():
        for name in names:
            store(storage, job_key(job_id, name))
    backend.interrupt(job_key(inputs_due, "tmp/result-2"))
    store(storage, upload_key(upload_due))
    backend.interrupt(upload_key(upload_due))
    store(storage, upload_key(upload_kept))
    strangers = plant_strangers(storage)
    remaining = sorted(
        [job_key(inputs_due, "upscaled_4x4.png"), job_key(results_due, "original.png"), upload_key(upload_kept)]
        + [job_key(kept, name) for name in layout[kept]]
        + strangers
    )

    plan = RetentionPlan(inputs=[inputs_due, *NOT_IDS], results=[results_due, *NOT_IDS], uploads=[upload_due, *NOT_IDS])
    assert storage.delete_retained(plan) == RetentionDeleted(
        originals=1, compressed=2, temporary=3, results=1, uploads=2
    )
    assert backend.held() == remaining
    assert storage.delete_retained(plan) == RetentionDeleted()
    assert backend.held() == remaining


def test_erase_job_files_leaves_nothing_of_the_job(backend):
    storage, (job_id, neighbour) = backend.storage, new_ids(2)
    for name in ("original.png", "compressed_q80.jpg", "tmp/result-1", "upscaled_4x4.png"):
        store(storage, job_key(job_id, name))
    backend.interrupt(job_key(job_id, "tmp/result-2"))
    store(storage, job_key(neighbour, "original.png"))
    strangers = plant_strangers(storage)

    assert storage.erase_job_files(job_id) == 5
    assert backend.held(job_key(job_id)) == []
    assert storage.erase_job_files(job_id) == 0
    assert [storage.erase_job_files(name) for name in NOT_IDS] == [0] * len(NOT_IDS)
    assert backend.held() == sorted([job_key(neighbour, "original.png"), *strangers])


def test_erase_upload_leaves_nothing_of_the_upload(backend):
    storage, (upload_id, neighbour) = backend.storage, new_ids(2)
    store(storage, upload_key(upload_id))
    backend.interrupt(upload_key(upload_id))
    store(storage, upload_key(neighbour))
    strangers = plant_strangers(storage)

    assert storage.erase_upload(upload_id) == 2
    assert backend.held(upload_key(upload_id)) == []
    assert storage.erase_upload(upload_id) == 0
    assert [storage.erase_upload(name) for name in NOT_IDS] == [0] * len(NOT_IDS)
    assert backend.held() == sorted([upload_key(neighbour), *strangers])


# ---- presigned URLs (s3) ----


@pytest.fixture
def s3_storage(s3_settings, tmp_path) -> S3Storage:
    storage = open_storage(Settings(env="dev", storage_dir=tmp_path, **s3_settings))
    assert isinstance(storage, S3Storage)
    return storage


def stored_result(storage: Storage) -> tuple[str, bytes]:
    key, data = job_key(uuid.uuid4().hex, "upscaled_4x4.png"), os.urandom(1000)
    store(storage, key, data)
    return key, data


def refusal(url: str) -> tuple[int, str]:
    """The status and S3 error message a GET of `url` gets."""
    reply = httpx.get(url)
    return reply.status_code, reply.text.split("<Message>")[-1].split("</Message>")[0]


SIGNATURE_MISMATCH = (
    403,
    "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
)


def test_a_presigned_url_serves_the_bytes_ranges_and_the_file_name(s3_storage):
    key, data = stored_result(s3_storage)
    url = s3_storage.presigned_get(key, 60, "cat upscaled.png")
    whole = httpx.get(url)
    assert (whole.status_code, whole.content) == (200, data)
    disposition = whole.headers["content-disposition"]
    assert disposition.startswith("attachment;") and 'filename="cat upscaled.png"' in disposition
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.content) == (206, data[10:20])


def test_a_presigned_url_is_refused_once_expired_or_tampered_with(s3_storage):
    key, data = stored_result(s3_storage)
    short, long = s3_storage.presigned_get(key, 1), s3_storage.presigned_get(key, 60)
    signature = parse_qs(urlsplit(long).query)["X-Amz-Signature"][0]
    forged = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert refusal(long.replace(signature, forged)) == SIGNATURE_MISMATCH
    time.sleep(2.5)
    assert refusal(short) == (403, "Request has expired")
    assert httpx.get(long).content == data  # the same key, still within its lifetime


def test_a_presigned_url_is_signed_for_the_download_base_url(s3_settings, tmp_path):
    endpoint = s3_settings["s3_endpoint_url"]
    public = endpoint.replace("127.0.0.1", "localhost")  # the same server under another name
    settings = Settings(env="dev", storage_dir=tmp_path, download_base_url=public, **s3_settings)
    storage = open_storage(settings)
    key, data = stored_result(storage)
    url = storage.presigned_get(key, 60)
    assert url.startswith(f"{public}/")
    assert httpx.get(url).content == data
    # Not just the origin swapped: a URL signed for the endpoint is refused under the other name.
    direct = open_storage(Settings(env="dev", storage_dir=tmp_path, **s3_settings)).presigned_get(key, 60)
    assert direct.startswith(f"{endpoint}/")
    assert refusal(direct.replace(endpoint, public)) == SIGNATURE_MISMATCH


# ---- the settings that choose a backend ----


@pytest.mark.parametrize(
    "url, parsed",
    [("local", ("local", "", "")), ("s3://bucket", ("s3", "bucket", "")), ("s3://bucket/a/b", ("s3", "bucket", "a/b"))],
)
def test_storage_urls_that_parse(url, parsed):
    assert Settings(env="dev", storage_url=url).storage_url == url
    assert parse_storage_url(url) == parsed


@pytest.mark.parametrize("url", ["ftp://x", "s3://", "s3://b?x=1"])
def test_storage_urls_that_are_refused(url):
    with pytest.raises(ValidationError, match="SMI_STORAGE_URL must be `local` or s3://bucket/prefix"):
        Settings(env="dev", storage_url=url)


def test_the_store_settings_come_from_files(tmp_path, monkeypatch):
    values = {
        "storage_url": "s3://from-file/prefix",
        "s3_endpoint_url": "http://127.0.0.1:9",
        "s3_region": "eu-file-1",
        "s3_access_key_id": "key-id-from-a-file",
        "s3_secret_access_key": "secret-from-a-file",
    }
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
        monkeypatch.setenv(f"SMI_{name.upper()}_FILE", str(tmp_path / name))
    settings = Settings(env="dev")
    read_back = {name: getattr(settings, name) for name in values}
    for name in ("s3_access_key_id", "s3_secret_access_key"):
        read_back[name] = settings.secret(name)
    assert read_back == values
    assert "secret-from-a-file" not in repr(settings) and "secret-from-a-file" not in str(settings.model_dump())


def test_open_storage_is_local_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("SMI_STORAGE_URL", raising=False)
    storage = open_storage(Settings(env="dev", storage_dir=tmp_path))
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path


def test_open_storage_of_an_s3_url_keeps_its_scratch_under_the_storage_dir(tmp_path):
    settings = Settings(
        env="dev",
        storage_dir=tmp_path,
        storage_url="s3://bucket/a/b",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_access_key_id="id",
        s3_secret_access_key="the-secret",
    )
    assert "the-secret" not in repr(settings)
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    assert storage.location("jobs/x/original.png") == "s3://bucket/a/b/jobs/x/original.png"
    assert storage.key_of("s3://bucket/a/b/jobs/x/original.png") == "jobs/x/original.png"
    assert storage.scratch("jobs/x/original.png").is_relative_to(tmp_path)


def test_open_storage_of_s3_settings_writes_into_their_bucket_and_prefix(s3_server, s3_storage):
    key, _ = stored_result(s3_storage)
    assert s3_server.keys(s3_storage.prefix) == [s3_storage.object_key(key)]


def test_check_reaches_the_store_or_says_why(s3_server, tmp_path):
    """The API's /readyz asks each backend whether it can be reached."""
    LocalStorage(tmp_path / "files").check()
    assert (tmp_path / "files").is_dir()
    s3_server.storage(tmp_path / "scratch").check()
    missing = S3Storage(
        "no-such-bucket",
        "",
        tmp_path / "scratch",
        endpoint_url=s3_server.endpoint,
        access_key_id=S3_ACCESS_KEY,
        secret_access_key=S3_SECRET_KEY,
    )
    with pytest.raises(ClientError, match="404"):
        missing.check()


def test_an_unparsable_image_url_is_no_upload_of_ours():
    """urlsplit refuses a broken IPv6 literal: not ours, and no 500 (Schemathesis found it via /v1/checkout/quote)."""
    assert signing.own_upload_id("http://\u00d6[\u00930", "http://127.0.0.1:8000", ["secret"], time.time()) is None
