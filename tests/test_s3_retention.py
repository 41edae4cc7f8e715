"""Retention and GDPR erasure in s3 mode: the real API and an in-process worker on the Temporal dev
server, storing in a real S3 server (SeaweedFS on loopback, tests/conftest.py's s3_server).

The bucket is read directly: a cleanup pass deletes exactly the objects that are due (unfinished
multipart uploads included) and a second pass deletes nothing; an erased customer leaves no object
and no unfinished upload behind, while another customer's objects stay."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import httpx
from sqlmodel import select

from smi.db import DownloadToken, Job, utcnow
from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import eventually, order
from tests.test_retention import busy_job, complete, db_edit, db_rows, files_under, run_retention, upload
from worker import create_worker


class Bucket:
    """The test's part of the bucket (`<prefix>/<storage key>`), read and written with the S3 API itself."""

    def __init__(self, s3_server, storage_url: str):
        self.server, self.client, self.name = s3_server, s3_server.client, s3_server.bucket
        self.prefix = storage_url.removeprefix(f"s3://{self.name}/") + "/"

    def keys(self) -> set[str]:
        return {key.removeprefix(self.prefix) for key in self.server.keys(self.prefix)}

    def unfinished(self) -> set[str]:
        return {key.removeprefix(self.prefix) for key in self.server.unfinished_uploads(self.prefix)}

    def put(self, key: str, data: bytes = b"x") -> None:
        self.client.put_object(Bucket=self.name, Key=self.prefix + key, Body=data)

    def begin_upload(self, key: str) -> None:
        """A multipart upload with one part stored and never finished (a worker died mid-download)."""
        upload_id = self.client.create_multipart_upload(Bucket=self.name, Key=self.prefix + key)["UploadId"]
        self.client.upload_part(Bucket=self.name, Key=self.prefix + key, UploadId=upload_id, PartNumber=1, Body=b"y")

    def mirror(self, folder: Path) -> None:
        """Every file under `folder` (a local layout) as an object of the same key."""
        for name in files_under(folder):
            self.put(name, (folder / name).read_bytes())

    def modified(self, key: str):
        return self.client.head_object(Bucket=self.name, Key=self.prefix + key)["LastModified"]


def s3_busy_job(db: str, bucket: Bucket, seed: Path, email: str, status: str) -> str:
    """tests/test_retention.py's busy job, its files in the bucket, and a download in progress."""
    job_id = busy_job(db, seed, email, status)
    bucket.mirror(seed)
    bucket.begin_upload(f"jobs/{job_id}/tmp/result-2")
    return job_id


def of_jobs(keys: set[str], job_ids) -> set[str]:
    return {key for key in keys for job_id in job_ids if key.startswith(f"jobs/{job_id}/")}


def fetch(link: str) -> httpx.Response:
    """A download link followed to the store: 303 to a presigned URL, then the bytes."""
    answer = httpx.get(link)
    if answer.status_code != 303:
        return answer
    assert answer.headers["Location"].startswith("http://127.0.0.1:"), answer.headers
    return httpx.get(answer.headers["Location"])


async def test_s3_retention_pass_deletes_exactly_the_objects_due(
    dev_env, stack_factory, faults, s3_server, s3_settings, tmp_path
):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env, **s3_settings)
    settings, client, db = stack.settings, stack.client(), stack.settings.database_url
    bucket = Bucket(s3_server, settings.storage_url)
    grace, url_ttl = timedelta(hours=settings.retention_grace_hours), settings.original_url_ttl_seconds

    async with create_worker(dev_env.client, settings):
        # An upload nobody orders; the pass runs as of just after its URL's lifetime plus the grace has passed
        # (an object's LastModified cannot be set back: the pass's time is moved forward instead).
        old_upload = (await upload(client, png_bytes(8, 8)))["upload_id"]
        as_of = bucket.modified(f"uploads/{old_upload}") + grace + timedelta(seconds=url_ttl + 1)
        stale = await complete(stack, client, order(stack.shop.publish(png_bytes(40, 30)), "s3ret-stale"), dev_env)
        uploaded = await upload(client, png_bytes(30, 20))
        fresh = await complete(stack, client, order(uploaded["image_url"], "s3ret-fresh", scale_factor=2), dev_env)
        # A recent unordered upload, stored at least 2 s after the old one (LastModified counts whole seconds).
        await eventually(lambda: utcnow() > as_of - grace - timedelta(seconds=url_ttl - 2), what="2 s to pass")
        recent_upload = (await upload(client, png_bytes(8, 8)))["upload_id"]
        assert bucket.modified(f"uploads/{recent_upload}") > as_of - grace - timedelta(seconds=url_ttl)

        # Leftovers of the finished jobs: compressed copies, a tmp/ object, downloads never finished.
        for job in (stale, fresh):
            bucket.put(f"jobs/{job['job_id']}/compressed_q85.jpg")
            bucket.begin_upload(f"jobs/{job['job_id']}/tmp/result-7")
        bucket.put(f"jobs/{stale['job_id']}/tmp/result-1")
        # A job still running and one in manual review: nothing of them goes, not their downloads in progress.
        busy = [
            s3_busy_job(db, bucket, tmp_path / "seed", "busy@example.com", s) for s in ("processing", "manual_review")
        ]

        def expire(session):  # the stale job's link expired more than the grace ago; the fresh one's is valid
            token = session.exec(select(DownloadToken).where(DownloadToken.job_id == stale["job_id"])).one()
            token.expires_at = utcnow() - grace - timedelta(hours=1)
            session.add(token)

        db_edit(db, expire)
        before, unfinished_before = bucket.keys(), bucket.unfinished()
        s, f = stale["job_id"], fresh["job_id"]
        assert {
            f"jobs/{s}/original.png",
            f"jobs/{s}/upscaled_160x120.png",
            f"jobs/{f}/original.png",
            f"jobs/{f}/upscaled_60x40.png",
            f"uploads/{uploaded['upload_id']}",
            f"uploads/{old_upload}",
            f"uploads/{recent_upload}",
        } <= before
        assert unfinished_before == {f"jobs/{s}/tmp/result-7", f"jobs/{f}/tmp/result-7"} | {
            f"jobs/{b}/tmp/result-2" for b in busy
        }

        report = await run_retention(dev_env, settings, as_of)
        assert (report.originals, report.compressed, report.temporary, report.results, report.uploads) == (
            2,
            2,
            3,  # stale's tmp/result-1 and the two unfinished uploads
            1,
            2,
        )
        assert report.tokens == 1
        gone = before - bucket.keys()
        assert gone == {
            f"jobs/{s}/original.png",
            f"jobs/{s}/compressed_q85.jpg",
            f"jobs/{s}/tmp/result-1",
            f"jobs/{s}/upscaled_160x120.png",
            f"jobs/{f}/original.png",
            f"jobs/{f}/compressed_q85.jpg",
            f"uploads/{uploaded['upload_id']}",
            f"uploads/{old_upload}",
        }
        assert bucket.unfinished() == {f"jobs/{b}/tmp/result-2" for b in busy}
        assert of_jobs(bucket.keys(), [s]) == set() and f"uploads/{recent_upload}" in bucket.keys()
        assert of_jobs(bucket.keys(), busy) == of_jobs(before, busy) and len(of_jobs(before, busy)) == 8
        for job_id in busy:
            assert len(db_rows(db, DownloadToken, DownloadToken.job_id == job_id)) == 1
        assert db_rows(db, DownloadToken, DownloadToken.job_id == s) == []
        assert db_rows(db, Job, Job.job_id == s)[0].result_path is None

        # The fresh result still downloads (from the store), whole; the stale link is dead.
        download = fetch(fresh["download_url"])
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == fresh["output"]["sha256"]
        assert httpx.get(stale["download_url"]).status_code in (404, 410)

        # A second pass finds nothing more to delete.
        again = await run_retention(dev_env, settings, as_of)
        counts = (again.originals, again.compressed, again.temporary, again.results, again.uploads, again.tokens)
        assert counts == (0, 0, 0, 0, 0, 0)
        assert before - bucket.keys() == gone and bucket.unfinished() == {f"jobs/{b}/tmp/result-2" for b in busy}
    # No process kept a local copy: in s3 mode SMI_STORAGE_DIR holds scratch files only while they are used.
    assert files_under(settings.storage_dir) == set()


async def test_s3_erase_customer_leaves_nothing_in_the_bucket(
    dev_env, stack_factory, faults, s3_server, s3_settings, tmp_path
):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env, **s3_settings)
    settings, client, admin, db = stack.settings, stack.client(), stack.client(ADMIN_KEY), stack.settings.database_url
    bucket = Bucket(s3_server, settings.storage_url)
    email = "erase.s3+shop@example.com"

    async with create_worker(dev_env.client, settings):
        other_upload = await upload(client, png_bytes(20, 20))
        other = await complete(stack, client, order(other_upload["image_url"], "s3erase-other"), dev_env)
        uploaded = await upload(client, png_bytes(40, 30))
        done = await complete(
            stack, client, order(uploaded["image_url"], "s3erase-1", customer_email=email, scale_factor=2), dev_env
        )
        faults(refuse_with="unsupported image format", faulty_jobs=1)
        failed = await complete(
            stack,
            client,
            order(stack.shop.publish(png_bytes(30, 20)), "s3erase-2", customer_email=email),
            dev_env,
            status="failed",
        )
    waiting = s3_busy_job(db, bucket, tmp_path / "seed", email, "manual_review")
    bucket.begin_upload(f"jobs/{done['job_id']}/tmp/result-4")  # a download left unfinished
    bucket.begin_upload(f"jobs/{other['job_id']}/tmp/result-4")  # the other customer's: kept
    ids = [done["job_id"], failed["job_id"], waiting]
    mine = of_jobs(bucket.keys(), ids) | {f"uploads/{uploaded['upload_id']}"}
    theirs = of_jobs(bucket.keys(), [other["job_id"]]) | {f"uploads/{other_upload['upload_id']}"}
    assert f"jobs/{done['job_id']}/upscaled_80x60.png" in mine and f"uploads/{uploaded['upload_id']}" in mine
    assert f"jobs/{other['job_id']}/upscaled_80x80.png" in theirs and theirs <= bucket.keys()
    unfinished = {f"jobs/{done['job_id']}/tmp/result-4", f"jobs/{waiting}/tmp/result-2"}
    assert bucket.unfinished() == unfinished | {f"jobs/{other['job_id']}/tmp/result-4"}

    # All or nothing: while a job waits in manual review, no object goes.
    refused = admin.delete(f"/v1/admin/customers/{email}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "customer_jobs_busy"
    assert mine | theirs <= bucket.keys() and unfinished <= bucket.unfinished()

    def finish(session):
        job = session.get(Job, waiting)
        job.status = "failed"
        session.add(job)

    db_edit(db, finish)
    erased = admin.delete(f"/v1/admin/customers/{email}")
    assert erased.status_code == 200, erased.text
    assert erased.json()["jobs"] == 3 and erased.json()["files"] == len(mine) + len(unfinished)

    keys = bucket.keys()
    assert keys & mine == set() and of_jobs(keys, ids) == set()
    assert not any(key.startswith(f"uploads/{uploaded['upload_id']}") for key in keys)
    assert bucket.unfinished() == {f"jobs/{other['job_id']}/tmp/result-4"}  # none of the customer's
    assert theirs <= keys  # the other customer's objects all stay
    assert httpx.get(done["download_url"]).status_code == 404
    assert hashlib.sha256(fetch(other["download_url"]).content).hexdigest() == other["output"]["sha256"]
    again = admin.delete(f"/v1/admin/customers/{email}").json()
    assert again == {"jobs": 0, "files": 0, "tokens": 0, "emails": 0}
    assert bucket.keys() == keys
