"""Downloads that leave the API process, with the API alone in front of storage (no Temporal: jobs
are written straight into its database, tests.helpers.Site).

- s3 (a real SeaweedFS on loopback): GET /downloads/{token} counts and answers 303 to a presigned
  GET of the bucket (lifetime SMI_PRESIGNED_TTL_SECONDS, never past the link's expiry, the order's
  file name as response-content-disposition); HEAD answers the size and counts nothing; refusals are
  local mode's; the download slot is free at once. Signed /files/ URLs answer 303 too.
- local behind nginx (SMI_ACCEL_REDIRECT_PREFIX): an empty 200 naming the file in X-Accel-Redirect."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlmodel import Session, select

from smi import signing
from smi.db import DownloadToken, Job, utcnow
from smi.storage import Storage, compressed_name, job_key, upload_key
from tests.conftest import WEBHOOK_SECRET, png_bytes
from tests.helpers import Site

RESULT = "upscaled_480x320.png"


def storage_of(site: Site) -> Storage:
    return site.app.state.services.storage


def store(site: Site, key: str, data: bytes) -> None:
    """Put `data` into the site's storage as `key`, as the activities do (a scratch file, then `put`)."""
    storage = storage_of(site)
    part = storage.scratch(key)
    part.write_bytes(data)
    storage.put(part, key)


def edit(site: Site, model, where, **values) -> None:
    with Session(site.engine) as session:
        for row in session.exec(select(model).where(where)).all():
            for name, value in values.items():
                setattr(row, name, value)
            session.add(row)
        session.commit()


def finished_job(site: Site, data: bytes) -> tuple[str, str, str]:
    """A completed job whose stored result is `data`: (job id, its download link, the file's name)."""
    order_id = f"wc-{uuid.uuid4().hex[:6]}"
    job_id = site.add_job("processing", order_id=order_id)
    store(site, job_key(job_id, RESULT), data)
    link = site.complete(job_id, result_path=storage_of(site).location(job_key(job_id, RESULT)))
    edit(site, Job, Job.job_id == job_id, output_bytes=len(data))
    return job_id, link, f"{order_id}-{RESULT}"


def downloads_counted(site: Site, job_id: str) -> int:
    with Session(site.engine) as session:
        return session.exec(select(DownloadToken).where(DownloadToken.job_id == job_id)).one().downloads


def presigned(answer: httpx.Response, s3_server) -> dict[str, str]:
    """The 303's presigned URL, checked to point at the bucket; its query's parameters."""
    assert answer.status_code == 303, answer.text
    location = answer.headers["Location"]
    assert location.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/"), location
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


@pytest.fixture
def data() -> bytes:
    return png_bytes(480, 320)


def test_s3_download_answers_303_to_a_presigned_url_and_counts_it(site_factory, s3_server, s3_settings, data):
    site = site_factory(**s3_settings, presigned_ttl_seconds=123, download_max_count=2)
    job_id, link, filename = finished_job(site, data)

    for _ in range(3):  # HEAD: the size, here; no redirect, no download counted
        head = httpx.head(link)
        assert head.status_code == 200 and "Location" not in head.headers
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["Content-Disposition"].startswith(f'attachment; filename="{filename}"')
    assert downloads_counted(site, job_id) == 0

    first = httpx.get(link)
    query = presigned(first, s3_server)
    assert query["X-Amz-Expires"] == "123"
    assert query["response-content-disposition"].startswith(f'attachment; filename="{filename}"')
    assert first.content == b"" and downloads_counted(site, job_id) == 1
    fetched = httpx.get(first.headers["Location"])  # the store, not the API, sends the bytes
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["Content-Disposition"].startswith(f'attachment; filename="{filename}"')

    assert presigned(httpx.get(link), s3_server)["X-Amz-Expires"] == "123"
    assert downloads_counted(site, job_id) == 2
    third = httpx.get(link)
    assert third.status_code == 410 and third.json()["error"]["code"] == "download_limit"
    assert "Location" not in third.headers and downloads_counted(site, job_id) == 2
    assert httpx.head(link).headers["Content-Length"] == str(len(data))  # HEAD still answers


def test_s3_presigned_url_never_outlives_the_link(site_factory, s3_server, s3_settings, data):
    site = site_factory(**s3_settings)  # SMI_PRESIGNED_TTL_SECONDS left at its default
    job_id, link, _ = finished_job(site, data)
    assert presigned(httpx.get(link), s3_server)["X-Amz-Expires"] == "300"  # the link lives 24 h: the default

    edit(site, DownloadToken, DownloadToken.job_id == job_id, expires_at=utcnow() + timedelta(seconds=60))
    assert 55 <= int(presigned(httpx.get(link), s3_server)["X-Amz-Expires"]) <= 60

    # A link with 5 s left: the presigned URL is refused by the store once the link has expired.
    link_expires = utcnow() + timedelta(seconds=5)
    edit(site, DownloadToken, DownloadToken.job_id == job_id, expires_at=link_expires)
    answer = httpx.get(link)
    query = presigned(answer, s3_server)
    assert 1 <= int(query["X-Amz-Expires"]) <= 5
    assert httpx.get(answer.headers["Location"]).content == data
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    url_expires = signed_at + timedelta(seconds=int(query["X-Amz-Expires"]))
    assert url_expires <= link_expires
    time.sleep(max(0.0, (max(url_expires, link_expires) - utcnow()).total_seconds() + 1.5))
    assert httpx.get(answer.headers["Location"]).status_code == 403
    assert httpx.get(link).status_code == 410


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_refused_links_get_the_same_answer_in_both_modes(mode, site_factory, s3_settings, data):
    site = site_factory(**(s3_settings if mode == "s3" else {}))
    links = {}
    for case in ("revoked", "expired", "gone"):
        job_id, links[case], _ = finished_job(site, data)
        where = DownloadToken.job_id == job_id
        if case == "revoked":
            edit(site, DownloadToken, where, revoked=True)
        elif case == "expired":
            edit(site, DownloadToken, where, expires_at=utcnow() - timedelta(minutes=1))
        else:  # retention deleted the result and cleared the record
            edit(site, Job, Job.job_id == job_id, result_path=None)
    links["unknown"] = f"{site.url}/downloads/{'ab' * 32}"
    links["malformed"] = f"{site.url}/downloads/not-a-token"
    answers = {case: httpx.get(link) for case, link in links.items()}
    assert {case: (a.status_code, a.json()["error"]["code"]) for case, a in answers.items()} == {
        "revoked": (410, "link_replaced"),
        "expired": (410, "link_expired"),
        "gone": (410, "file_gone"),
        "unknown": (404, "link_not_found"),
        "malformed": (404, "link_not_found"),
    }
    assert not any("Location" in a.headers or "X-Accel-Redirect" in a.headers for a in answers.values())
    assert {case: httpx.head(link).status_code for case, link in links.items()} == {
        case: a.status_code for case, a in answers.items()
    }


def test_s3_download_slot_is_released_at_once(site_factory, s3_server, s3_settings, data):
    site = site_factory(**s3_settings, downloads_per_client=1)
    _, link, _ = finished_job(site, data)
    slots = site.app.state.services.downloads
    with httpx.Client() as client:  # one kept-alive connection, as a browser's
        for _ in range(20):
            presigned(client.get(link), s3_server)  # a 303 each: a held slot would make the second a 429
            assert slots.open.total() == 0


def test_s3_signed_files_answer_303_to_the_stored_bytes(site_factory, s3_server, s3_settings):
    site = site_factory(**s3_settings, presigned_ttl_seconds=600)
    upload_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    files = {
        ("uploads", upload_id): (upload_key(upload_id), png_bytes(10, 10)),
        ("originals", job_id): (job_key(job_id, "original.png"), png_bytes(12, 12)),
        ("originals", f"{job_id}-q85"): (job_key(job_id, compressed_name(85)), b"\xff\xd8jpeg"),
    }
    for key, content in files.values():
        store(site, key, content)
    exp = int(time.time()) + 120
    for (kind, name), (_, content) in files.items():
        good = signing.signed_file_url(site.url, WEBHOOK_SECRET, kind, name, exp)
        answer = httpx.get(good)
        # The presigned URL lives no longer than the signed one (120 s here, under the 600 s setting).
        assert int(presigned(answer, s3_server)["X-Amz-Expires"]) <= 121
        assert httpx.get(answer.headers["Location"]).content == content

        forged = signing.signed_file_url(site.url, "not-the-secret", kind, name, exp)
        late = signing.signed_file_url(site.url, WEBHOOK_SECRET, kind, name, int(time.time()) - 1)
        for refused in (httpx.get(forged), httpx.get(late)):
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "bad_signature"
            assert "Location" not in refused.headers
    missing = httpx.get(signing.signed_file_url(site.url, WEBHOOK_SECRET, "uploads", uuid.uuid4().hex, exp))
    assert missing.status_code == 404 and "Location" not in missing.headers


def test_local_accel_redirect_hands_the_file_to_nginx(site_factory, data):
    site = site_factory(accel_redirect_prefix="/protected", download_max_count=2)
    job_id, link, filename = finished_job(site, data)

    head = httpx.head(link)  # HEAD: the API answers the size itself, counting nothing
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
    assert "X-Accel-Redirect" not in head.headers and downloads_counted(site, job_id) == 0

    answer = httpx.get(link)
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["X-Accel-Redirect"] == f"/protected/jobs/{job_id}/{RESULT}"
    assert answer.headers["Content-Disposition"].startswith(f'attachment; filename="{filename}"')
    assert downloads_counted(site, job_id) == 1
    resumed = httpx.get(link, headers={"Range": "bytes=100-"})  # nginx serves the range; not a new download
    assert resumed.headers["X-Accel-Redirect"] == f"/protected/jobs/{job_id}/{RESULT}"
    assert downloads_counted(site, job_id) == 1
    assert httpx.get(link).status_code == 200 and downloads_counted(site, job_id) == 2
    used_up = httpx.get(link)
    assert used_up.status_code == 410 and used_up.json()["error"]["code"] == "download_limit"
    assert "X-Accel-Redirect" not in used_up.headers


def test_local_without_accel_redirect_streams_the_bytes(site_factory, data):
    site = site_factory(download_max_count=2)
    job_id, link, filename = finished_job(site, data)
    answer = httpx.get(link)
    assert answer.status_code == 200 and answer.content == data
    assert "X-Accel-Redirect" not in answer.headers
    assert answer.headers["Content-Disposition"].startswith(f'attachment; filename="{filename}"')
    assert downloads_counted(site, job_id) == 1
