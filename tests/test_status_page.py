"""The customer's status page and the admin dashboard over HTTP, without a browser: the real API
on a loopback port, jobs written straight into its database (no Temporal needed here)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlmodel import Session

from api import admin_pages, dashboard, status
from smi import signing
from smi.db import Job, Refund, utcnow
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, WEBHOOK_SECRET
from tests.helpers import CUSTOMER_EMAIL, CUSTOMER_NAME, Site


def events_of(lines: list[str]) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


# --- the view token --------------------------------------------------------------------------


def test_view_token_is_per_job_and_purpose():
    job_id = "a" * 32
    url = signing.status_page_url("https://api.shop.test/", "s3cret", job_id)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"https://api.shop.test/status/{job_id}"
    token = parse_qs(parts.query)["v"][0]
    assert token == signing.view_token("s3cret", job_id)
    assert signing.verify_view_token(["new", "s3cret"], job_id, token)  # the previous secret, during a rotation
    assert not signing.verify_view_token("s3cret", "b" * 32, token)  # another job's page
    assert not signing.verify_view_token("s3cret", job_id, signing.sign("s3cret", job_id))  # the webhook's signature
    assert not signing.verify_view_token("s3cret", job_id, None)


def test_bad_or_missing_view_token_is_the_same_404(site):
    job_id = site.add_job("processing")
    good = parse_qs(urlsplit(site.page_url(job_id)).query)["v"][0]
    unknown = uuid.uuid4().hex  # a job that does not exist, with a valid token for it
    tries = [
        (job_id, None),
        (job_id, "0" * 64),
        (job_id, good[:-1]),
        (job_id, site.page_url(unknown)[-64:]),
        (unknown, signing.view_token(WEBHOOK_SECRET, unknown)),
        ("not-a-job", "x"),
    ]
    bodies = set()
    for target, token in tries:
        for suffix in ("", "/state", "/events"):
            reply = httpx.get(f"{site.url}/status/{target}{suffix}", params={"v": token} if token else {})
            assert reply.status_code == 404, (target, token, suffix, reply.text)
            assert reply.headers["content-type"] == "application/json"
            bodies.add(reply.text)
    assert len(bodies) == 1 and json.loads(bodies.pop())["error"]["code"] == "not_found"
    assert httpx.get(site.page_url(job_id)).status_code == 200
    assert httpx.get(site.page_url(job_id, secret="old-secret")).status_code == 200  # links signed before a rotation


def test_status_page_shows_the_stage_and_nothing_personal(site):
    start = utcnow() - timedelta(seconds=20)
    job_id = site.add_job(
        "processing",
        created_at=start,
        estimated_completion=start + timedelta(seconds=40),
        events=[("received", start), ("queued", start), ("processing", start)],
    )
    page = httpx.get(site.page_url(job_id))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "Upscaling your image" in html and 'data-status="processing"' in html
    assert CUSTOMER_EMAIL not in html and CUSTOMER_NAME not in html and "Secretname" not in html
    # Embeddable (no X-Frame-Options), but only its own nonce'd inline script runs.
    assert "x-frame-options" not in page.headers
    csp = page.headers["content-security-policy"]
    nonce = csp.split("script-src 'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in html and "frame-ancestors" not in csp and "default-src 'none'" in csp
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"

    state = httpx.get(
        f"{site.url}/status/{job_id}/state", params={"v": signing.view_token(WEBHOOK_SECRET, job_id)}
    ).json()
    assert CUSTOMER_EMAIL not in json.dumps(state) and CUSTOMER_NAME not in json.dumps(state)
    assert state["status"] == "processing" and state["final"] is False and state["download_url"] is None
    assert 45 <= state["progress"] <= 65  # half way from entering processing (25) to the estimate (85)
    assert [s["state"] for s in state["stages"]] == ["done", "done", "current", "todo", "todo"]


def test_progress_follows_the_stage_and_the_estimate():
    now = utcnow()
    assert status._progress("received", now, None) == 5
    assert status._progress("processing", now - timedelta(seconds=5), None) == 25
    assert (
        status._progress("processing", now - timedelta(seconds=100), now - timedelta(seconds=1)) == 85
    )  # late: capped
    assert status._progress("downloading", now, now + timedelta(seconds=60)) == 90
    assert status._progress("completed", now, None) == 100
    assert status._progress("manual_review", now, None) is None


def test_completed_page_has_the_download_button(site):
    job_id = site.add_job("downloading")
    link = site.complete(job_id)
    page = httpx.get(site.page_url(job_id)).text
    assert f'id="download" class="download" href="{link}"' in page and "480×320 PNG" in page
    state = httpx.get(
        f"{site.url}/status/{job_id}/state", params={"v": signing.view_token(WEBHOOK_SECRET, job_id)}
    ).json()
    assert state["final"] and state["download_url"] == link and state["progress"] == 100
    assert all(s["state"] == "done" for s in state["stages"])


def test_manual_review_and_refunds_are_worded_for_the_customer(site):
    review = site.add_job("manual_review", error_code="upsampler_failed", error_message="model crashed")
    state = httpx.get(
        f"{site.url}/status/{review}/state", params={"v": signing.view_token(WEBHOOK_SECRET, review)}
    ).json()
    assert state["headline"] == "We're looking into it" and state["progress"] is None and not state["final"]
    assert "model crashed" not in json.dumps(state)  # internal errors stay internal

    failed = site.add_job("failed", error_code="unsupported_format")
    with Session(site.engine) as session:
        session.add(
            Refund(
                job_id=failed,
                status="refunded",
                amount_cents=1299,
                currency="USD",
                reason="x",
                adapter="stripe",
                created_at=utcnow(),
            )
        )
        session.commit()
    state = httpx.get(
        f"{site.url}/status/{failed}/state", params={"v": signing.view_token(WEBHOOK_SECRET, failed)}
    ).json()
    assert state["headline"] == "Refunded" and state["final"] and state["download_url"] is None


def test_event_stream_sends_the_state_then_each_change_and_ends_when_final(site):
    """Each change is made once the stream has shown the one before: no timing to get wrong."""
    job_id = site.add_job("queued")
    link = None
    params = {"v": signing.view_token(WEBHOOK_SECRET, job_id)}
    lines = []
    with httpx.stream("GET", f"{site.url}/status/{job_id}/events", params=params, timeout=20) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["cache-control"] == "no-store"
        for line in reply.iter_lines():
            lines.append(line)
            shown = json.loads(line[5:])["status"] if line.startswith("data:") else None
            if shown == "queued":
                site.set_status(job_id, "processing")
            elif shown == "processing":
                link = site.complete(job_id)
    assert lines[0] == "retry: 2000"
    events = events_of(lines)
    assert [e["status"] for e in events] == ["queued", "processing", "completed"]
    assert events[-1]["final"] and events[-1]["download_url"] == link
    assert CUSTOMER_EMAIL not in "\n".join(lines)


def test_event_stream_is_bounded_in_time(site, monkeypatch):
    monkeypatch.setattr(status, "EVENTS_MAX_SECONDS", 1.0)
    job_id = site.add_job("manual_review")
    params = {"v": signing.view_token(WEBHOOK_SECRET, job_id)}
    started = time.monotonic()
    with httpx.stream("GET", f"{site.url}/status/{job_id}/events", params=params, timeout=20) as reply:
        lines = list(reply.iter_lines())
    assert time.monotonic() - started < 5  # ended although the job is not final: the browser reconnects
    assert [e["status"] for e in events_of(lines)] == ["manual_review"]


def test_a_quiet_event_stream_sends_keep_alives(site, monkeypatch):
    monkeypatch.setattr(status, "KEEPALIVE_SECONDS", 0.2)
    monkeypatch.setattr(status, "EVENTS_MAX_SECONDS", 2.0)
    job_id = site.add_job("processing")  # nothing changes while the stream is open
    params = {"v": signing.view_token(WEBHOOK_SECRET, job_id)}
    with httpx.stream("GET", f"{site.url}/status/{job_id}/events", params=params, timeout=20) as reply:
        lines = list(reply.iter_lines())
    assert [e["status"] for e in events_of(lines)] == ["processing"]
    assert ": keep-alive" in lines


def test_job_json_carries_the_status_page_url(site):
    job_id = site.add_job("queued")
    job = httpx.get(f"{site.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {STOREFRONT_KEY}"}).json()
    assert job["status_page_url"] == site.page_url(job_id)


# --- the admin dashboard ---------------------------------------------------------------------


def login(site: Site) -> httpx.Client:
    client = httpx.Client(base_url=site.url)
    reply = client.post("/admin/login", data={"key": ADMIN_KEY})
    assert reply.status_code == 303 and reply.headers["location"] == "/admin"
    return client


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="')[1].split('"')[0]


def test_dashboard_needs_a_login_with_the_admin_key(site):
    anonymous = httpx.Client(base_url=site.url)
    reply = anonymous.get("/admin")
    assert reply.status_code == 303 and reply.headers["location"] == "/admin/login"
    assert anonymous.get("/admin/login").status_code == 200

    wrong = anonymous.post("/admin/login", data={"key": STOREFRONT_KEY})
    assert wrong.status_code == 401 and "not the admin API key" in wrong.text and "set-cookie" not in wrong.headers

    reply = anonymous.post("/admin/login", data={"key": ADMIN_KEY})
    cookie = reply.headers["set-cookie"]
    assert reply.status_code == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    page = anonymous.get("/admin")
    assert page.status_code == 200 and "Jobs by status" in page.text
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )

    # A session cookie with its expiry pushed out, or one already expired, is no session.
    value = anonymous.cookies.get(admin_pages.SESSION_COOKIE)
    expiry, salt, signature = value.split(".")
    past = int(time.time()) - 1
    for forged in (
        f"{int(expiry) + 3600}.{salt}.{signature}",
        admin_pages.new_session("another-key"),
        f"{past}.{salt}.{signing.sign(ADMIN_KEY, f'dashboard:{past}:{salt}')}",
        "",
        "1.2",
    ):
        other = httpx.Client(base_url=site.url, cookies={admin_pages.SESSION_COOKIE: forged})
        assert other.get("/admin").status_code == 303, forged

    # Logging out needs the form's CSRF token, then ends the session.
    assert anonymous.post("/admin/logout", data={}).status_code == 403
    out = anonymous.post("/admin/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/admin/login"
    assert anonymous.get("/admin").status_code == 303


def test_dashboard_actions_need_the_session_and_its_csrf_token(site):
    job_id = site.add_job("manual_review", error_code="timeout")
    anonymous = httpx.post(f"{site.url}/admin/jobs/{job_id}/retry", data={"csrf": "x"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "login_required"

    client = login(site)
    for form in (
        {},
        {"csrf": "0" * 64},
        {"csrf": admin_pages.csrf_token(ADMIN_KEY, admin_pages.new_session(ADMIN_KEY))},
    ):
        for action in ("retry", "refund"):
            refused = client.post(f"/admin/jobs/{job_id}/{action}", data=form)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed", form
    with Session(site.engine) as session:
        assert session.get(Job, job_id).status == "manual_review" and session.get(Refund, job_id) is None
    assert client.post(f"/admin/jobs/{job_id}/delete", data={}).status_code == 422  # only retry and refund


def test_dashboard_figures(site):
    now = utcnow()
    t0 = now - timedelta(hours=1)
    done = site.add_job(
        "completed",
        created_at=t0,
        events=[
            ("received", t0),
            ("queued", t0 + timedelta(seconds=10)),
            ("processing", t0 + timedelta(seconds=20)),
            ("downloading", t0 + timedelta(seconds=50)),
            ("completed", t0 + timedelta(seconds=52)),
        ],
    )
    site.add_job(
        "completed",
        created_at=t0,
        events=[("received", t0), ("queued", t0 + timedelta(seconds=30)), ("completed", t0 + timedelta(seconds=90))],
    )
    review = site.add_job(
        "manual_review",
        created_at=t0,
        error_code="upsampler_failed",
        error_message="model crashed",
        events=[("received", t0), ("manual_review", now - timedelta(minutes=5))],
    )
    site.add_job("failed", created_at=t0, events=[("received", t0), ("failed", t0 + timedelta(seconds=4))])
    site.add_job("completed", created_at=now - timedelta(days=3))  # older than a day: counted, no rate or medians

    assert dashboard.status_counts(site.engine) == {"completed": 3, "manual_review": 1, "failed": 1}
    assert dashboard.error_rate(site.engine, now - timedelta(hours=24)) == (2, 4)
    medians = dashboard.median_stage_seconds(site.engine, now - timedelta(hours=24))
    # received: 10, 30, 4 and ~3300 s (until manual review); queued: 10 and 60 s.
    assert medians == {"received": 20.0, "queued": 35.0, "processing": 30.0, "downloading": 2.0}
    [item] = dashboard.manual_review_queue(site.engine)
    assert item.job_id == review and 299 < (now - item.since).total_seconds() < 310

    html = login(site).get("/admin").text
    assert 'data-status-count="completed">3<' in html and 'data-status-count="manual_review">1<' in html
    assert "50.0 %" in html and "(2 of 4 jobs" in html
    assert 'data-median="queued">35.0 s<' in html
    assert f'<tr data-job="{review}">' in html and "upsampler_failed" in html and "5.0 min" in html
    assert f'action="/admin/jobs/{review}/retry"' in html and f'action="/admin/jobs/{review}/refund"' in html
    assert f'href="http://ui.test:8233/namespaces/shop-ns/workflows/upscale-{done}"' in html
    assert CUSTOMER_EMAIL not in html and CUSTOMER_NAME not in html
