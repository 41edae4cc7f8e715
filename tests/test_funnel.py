"""The sales funnel (issue 14, item 3) against the real API on a loopback port: a page's batches sent as a browser
sends them (CORS preflight, then POST with the publishable key and the page's Origin), the sale's stages read from
the checkout sessions, jobs and refunds, and what comes out: GET /v1/admin/analytics (JSON and CSV), the
dashboard's panel and /metrics. Refusals (a foreign origin, a page or image host the key does not hold, too many
batches) count nothing."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import uuid
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from selenium.webdriver.common.by import By
from sqlmodel import Session, select

from smi.db import CheckoutSession, Refund, make_engine, utcnow
from smi.funnel import FunnelRefused, stripped
from smi.serve import ServerThread
from tests import test_browser
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import clear_of_minute_boundary, eventually, wait_for_status
from tests.stripe_server import StripeServer, sign
from worker import create_worker

browser = test_browser.browser  # headless Chromium (Debian's, installed by .ci/install-chromium when missing)
in_browser, wait_until = test_browser.in_browser, test_browser.wait_until

KEY = "pk_blog_test_0001"
OTHER_KEY = "pk_other_site_0002"
ORIGIN = "https://blog.example"
PUBLISHABLE_KEYS = (
    f"{KEY}={ORIGIN}|https://www.blog.example;img.blog.example|.cdn.example,"
    f"{OTHER_KEY}=https://other.example;img.other.example"
)
PAGE = f"{ORIGIN}/posts/sunset"
IMAGE = "https://img.blog.example/sunset.jpg"
IMAGE_2 = "https://eu.cdn.example/lake.jpg"
METRICS_TOKEN = "funnel-metrics-token"
# Pages sell through Stripe Checkout: outside dev, publishable keys need its key and webhook secret set.
STRIPE_SET = {"stripe_api_key": "sk_test_funnel_unused", "stripe_webhook_secret": "whsec_funnel_unused"}


def page_client(site, key: str = KEY, origin: str | None = ORIGIN) -> httpx.Client:
    """What the embed script's fetch sends: Authorization with the publishable key, the page's Origin, no cookie."""
    headers = {"Authorization": f"Bearer {key}"}
    if origin:
        headers["Origin"] = origin
    return httpx.Client(base_url=site.url, headers=headers, timeout=30)


def admin(site) -> httpx.Client:
    return httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def analytics(site, **params) -> dict:
    reply = admin(site).get("/v1/admin/analytics", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def by_url(rows: list[dict]) -> dict[str, dict]:
    return {row["url"]: row for row in rows}


def event(stage: str, page: str = PAGE, image: str = IMAGE, count: int | None = None) -> dict:
    body = {"stage": stage, "page_url": page, "image_url": image}
    if count is not None:
        body["count"] = count
    return body


def sale(site, *, page: str, image: str, price_cents: int, paid: bool, job_status: str | None, refunded: bool = False):
    """A checkout session as api/checkout.py writes it (created on "Pay", paid and its job by Stripe's webhook)."""
    now = utcnow()
    job_id = site.add_job(job_status) if job_status else None
    with Session(site.engine) as session:
        session.add(
            CheckoutSession(
                session_id=f"cs_test_{uuid.uuid4().hex}",
                order_id=f"co-{uuid.uuid4().hex[:12]}",
                job_id=job_id,
                publishable_key=KEY,
                image_url=image,
                page_url=page,
                scale_factor=4,
                price_cents=price_cents,
                currency="usd",
                status="paid" if paid else "created",
                created_at=now,
                updated_at=now,
                paid_at=now if paid else None,
            )
        )
        if refunded:
            session.add(
                Refund(
                    job_id=job_id,
                    status="refunded",
                    amount_cents=price_cents,
                    currency="USD",
                    reason="invalid_result",
                    adapter="stripe",
                    created_at=now,
                    completed_at=now,
                )
            )
        session.commit()


@pytest.fixture
def blog(site_factory):
    return site_factory(**STRIPE_SET, publishable_keys=PUBLISHABLE_KEYS, metrics_token=METRICS_TOKEN)


def test_a_scripted_session_appears_in_the_analytics_as_json_and_csv_and_as_metrics(blog):
    client = page_client(blog)
    # The preflight the browser sends before a cross-origin POST carrying Authorization.
    preflight = httpx.options(
        f"{blog.url}/v1/funnel",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    foreign = httpx.options(f"{blog.url}/v1/funnel", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers  # the browser would not send the POST

    # Buttons shown (sampled: one event stands for 10), two modals opened, on a page whose URL carries a query
    # and fragment (a visitor's search, a token): kept without them.
    first = client.post(
        "/v1/funnel",
        json={
            "events": [
                event("shown", page=f"{PAGE}?utm_source=mail&email=ana%40example.com#comments", count=10),
                event("shown", image=IMAGE_2, count=10),
                event("opened"),
            ]
        },
    )
    assert first.status_code == 200, first.text
    assert first.json() == {"counted": 3}
    assert first.headers["access-control-allow-origin"] == ORIGIN
    assert "set-cookie" not in first.headers
    second = client.post("/v1/funnel", json={"events": [event("opened"), event("shown", count=5)]})
    assert second.status_code == 200, second.text

    # The sale, as the checkout and Stripe's webhook record it: three checkouts from the page, two paid (one
    # delivered, one refunded), and a checkout of the second image that was never paid.
    sale(blog, page=f"{PAGE}?ref=x", image=IMAGE, price_cents=1299, paid=True, job_status="completed")
    sale(blog, page=PAGE, image=IMAGE, price_cents=1299, paid=True, job_status="failed", refunded=True)
    sale(blog, page=PAGE, image=IMAGE, price_cents=1299, paid=False, job_status=None)
    sale(blog, page=PAGE, image=IMAGE_2, price_cents=899, paid=False, job_status=None)

    report = analytics(blog)
    today = utcnow().date()
    assert report["from"] == (today - timedelta(days=30)).isoformat() and report["to"] == today.isoformat()
    assert [row["url"] for row in report["pages"]] == [PAGE]  # query and fragment gone: one page
    page = report["pages"][0]
    assert page == {
        "url": PAGE,
        "shown": 25,
        "opened": 2,
        "checkout_started": 4,
        "paid": 2,
        "delivered": 1,
        "refunded": 1,
        "revenue_cents": 2598,
        "conversion": 1.0,
    }
    images = by_url(report["images"])
    assert [row["url"] for row in report["images"]] == [IMAGE, IMAGE_2]  # by revenue
    assert images[IMAGE]["shown"] == 15 and images[IMAGE]["opened"] == 2 and images[IMAGE]["paid"] == 2
    assert images[IMAGE_2] == {
        "url": IMAGE_2,
        "shown": 10,
        "opened": 0,
        "checkout_started": 1,
        "paid": 0,
        "delivered": 0,
        "refunded": 0,
        "revenue_cents": 0,
        "conversion": None,
    }
    assert "utm_source" not in str(report) and "ana" not in str(report)

    # CSV: the same rows.
    reply = admin(blog).get("/v1/admin/analytics", params={"format": "csv"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.text)))
    assert [(r["kind"], r["url"]) for r in rows] == [("page", PAGE), ("image", IMAGE), ("image", IMAGE_2)]
    assert rows[0] | {} == {
        "kind": "page",
        "url": PAGE,
        "shown": "25",
        "opened": "2",
        "checkout_started": "4",
        "paid": "2",
        "delivered": "1",
        "refunded": "1",
        "revenue_cents": "2598",
        "conversion": "1.0",
    }
    assert rows[2]["conversion"] == ""

    # A period with none of it: nothing; a period the wrong way round: 422 saying so.
    assert analytics(blog, **{"from": "2020-01-01", "to": "2020-01-31"})["pages"] == []
    wrong = admin(blog).get("/v1/admin/analytics", params={"from": "2026-12-01", "to": "2026-11-01"})
    assert wrong.status_code == 422 and "before" in wrong.json()["error"]["message"]
    assert admin(blog).get("/v1/admin/analytics", params={"from": "yesterday"}).status_code == 422
    # The analytics are the admin's: the storefront's key and the publishable key are refused.
    for key in (STOREFRONT_KEY, KEY):
        refused = httpx.get(f"{blog.url}/v1/admin/analytics", headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 401

    # Metrics: by stage only, no page or image label.
    metrics = httpx.get(f"{blog.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    funnel_lines = [line for line in metrics.splitlines() if line.startswith("smi_db_funnel_events_total")]
    assert sorted(funnel_lines) == sorted(
        f'smi_db_funnel_events_total{{stage="{stage}"}} {value:.1f}'
        for stage, value in {
            "shown": 25,
            "opened": 2,
            "checkout_started": 4,
            "paid": 2,
            "delivered": 1,
            "refunded": 1,
        }.items()
    )


def test_a_foreign_origin_page_or_image_host_is_refused_and_counts_nothing(blog):
    def refused(client: httpx.Client, events: list[dict], status: int, code: str) -> dict:
        reply = client.post("/v1/funnel", json={"events": events})
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["code"] == code
        return reply.json()["error"]

    # Another site's page cannot use this key (its browser sends its own Origin), nor a request without Origin.
    error = refused(page_client(blog, origin="https://evil.example"), [event("shown")], 403, "origin_not_allowed")
    assert "SMI_PUBLISHABLE_KEYS" in error["message"]
    refused(page_client(blog, origin=None), [event("shown")], 403, "origin_not_allowed")
    # Another site's key, from its own origin, cannot count this blog's pages or images.
    other = page_client(blog, key=OTHER_KEY, origin="https://other.example")
    refused(other, [event("shown")], 403, "page_not_allowed")
    refused(other, [event("shown", page="https://other.example/a", image=IMAGE)], 403, "image_host_not_allowed")
    # The right key and origin, one event of the batch on a host the key does not sell: the whole batch refused.
    client = page_client(blog)
    error = refused(
        client,
        [event("shown", count=50), event("opened", image="https://images.evil.example/x.jpg")],
        403,
        "image_host_not_allowed",
    )
    assert "events[1].image_url" in error["message"]
    refused(client, [event("shown", page="https://www.evil.example/p")], 403, "page_not_allowed")
    # Malformed batches: 422 naming what to fix.
    refused(client, [event("shown")] * 51, 422, "invalid_request")
    refused(client, [event("shown", count=101)], 422, "invalid_request")
    refused(client, [event("paid")], 422, "invalid_request")  # the sale's stages are not a page's to post
    refused(client, [], 422, "invalid_request")
    refused(client, [event("shown", page="javascript:alert(1)")], 422, "invalid_request")
    # Keys that are not this key: the storefront's, none, a made-up one.
    for key in (STOREFRONT_KEY, None, "pk_made_up_00000"):
        headers = {"Origin": ORIGIN} | ({"Authorization": f"Bearer {key}"} if key else {})
        reply = httpx.post(f"{blog.url}/v1/funnel", json={"events": [event("shown")]}, headers=headers)
        assert reply.status_code == 401, reply.text

    report = analytics(blog)
    assert report["pages"] == [] and report["images"] == []


def test_a_clients_batches_past_its_budget_are_refused_and_count_nothing(site_factory):
    # Per client: the 4th batch of a minute is a 429 with Retry-After, and counts nothing.
    site = site_factory(**STRIPE_SET, publishable_keys=PUBLISHABLE_KEYS, funnel_batches_per_minute=3)
    client = page_client(site)
    clear_of_minute_boundary()
    for _ in range(3):
        assert client.post("/v1/funnel", json={"events": [event("shown", count=100)]}).status_code == 200
    over = client.post("/v1/funnel", json={"events": [event("shown", count=100)]})
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limited" and 1 <= int(over.headers["retry-after"]) <= 60
    assert analytics(site)["pages"][0]["shown"] == 300


def test_a_keys_budget_over_all_clients_is_spent_only_from_its_origins(site_factory):
    # Per key, over every client: a browser elsewhere cannot spend the key's budget (refused by Origin first),
    # and past the key's budget no client adds anything.
    site = site_factory(**STRIPE_SET, publishable_keys=PUBLISHABLE_KEYS, funnel_key_batches_per_minute=2)
    clear_of_minute_boundary()
    for _ in range(5):
        foreign = page_client(site, origin="https://evil.example").post("/v1/funnel", json={"events": [event("shown")]})
        assert foreign.status_code == 403
    client = page_client(site)
    assert [client.post("/v1/funnel", json={"events": [event("opened")]}).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    over = page_client(site, origin="https://www.blog.example").post("/v1/funnel", json={"events": [event("opened")]})
    assert over.status_code == 429 and "publishable key" in over.json()["error"]["message"]
    assert analytics(site)["pages"][0]["opened"] == 2


def test_the_dashboard_shows_the_top_pages_and_images_by_revenue(blog):
    client = page_client(blog)
    second_page = f"{ORIGIN}/posts/lake"
    assert client.post("/v1/funnel", json={"events": [event("opened", count=4)]}).status_code == 200
    assert (
        client.post("/v1/funnel", json={"events": [event("opened", page=second_page, image=IMAGE_2)]}).status_code
        == 200
    )
    sale(blog, page=PAGE, image=IMAGE, price_cents=1299, paid=True, job_status="completed")
    sale(blog, page=second_page, image=IMAGE_2, price_cents=2500, paid=True, job_status="completed")

    browser_session = httpx.Client(base_url=blog.url)
    assert browser_session.post("/admin/login", data={"key": ADMIN_KEY}).status_code == 303
    html = browser_session.get("/admin").text
    pages = html.split('id="funnel-pages"')[1].split("</table>")[0]
    assert pages.index(f'data-url="{second_page}"') < pages.index(f'data-url="{PAGE}"')  # by revenue
    assert 'data-revenue-cents="2500"' in pages and "25.00" in pages
    first_row = pages.split(f'data-url="{PAGE}"')[1].split("</tr>")[0]
    assert "25.0 %" in first_row  # 1 paid of 4 opened
    images = html.split('id="funnel-images"')[1].split("</table>")[0]
    assert IMAGE in images and IMAGE_2 in images


def test_urls_are_kept_without_query_fragment_or_user_info():
    assert stripped("https://Blog.Example:443/a/b?q=1#top", "page_url") == "https://blog.example/a/b"
    assert stripped("http://user:pw@blog.example:8080", "page_url") == "http://blog.example:8080/"
    for bad in ("ftp://blog.example/x", "/relative", "https://", "https://blog.example:99999/"):
        with pytest.raises(FunnelRefused):
            stripped(bad, "page_url")


# --- a whole sale in a real browser --------------------------------------------------------------------

STRIPE_KEY = "sk_test_funnel_local_1"
WHSEC = "whsec_test_funnel_secret"
SHADOW = "return document.querySelector('smi-dialog').shadowRoot"


@pytest.fixture
def stripe_server():
    server = StripeServer(STRIPE_KEY).start()
    yield server
    server.stop()


def blog_page(api: str, image_url: str) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>A blog post</title>
<script src="{html.escape(api)}/embed.js" data-key="{KEY}" data-sample="1" defer></script></head>
<body><main><h1>Sunset</h1><img id="sunset" src="{html.escape(image_url)}" width="640" height="400" alt="Sunset">
</main></body></html>"""


async def test_a_browser_session_from_button_to_refund_shows_every_stage_in_the_analytics(
    dev_env, stack_factory, shop, stripe_server, browser
):
    """The embed script in Chromium on a page of its own origin: its button shown and its modal opened are
    counted by the script; "Pay" creates the Checkout Session; Stripe's signed webhook starts the job, which the
    worker completes; the admin refunds it. Every stage of the analytics comes from that session."""
    image_url = shop.publish(png_bytes(640, 400))
    site = FastAPI()
    page_server = ServerThread(site).start()
    try:
        stack = stack_factory(
            dev_env,
            publishable_keys=f"{KEY}={page_server.url};{shop.url.split('//')[1]}",
            stripe_mode="test",
            stripe_secret_key_test=STRIPE_KEY,
            stripe_api_base=stripe_server.url,
            stripe_webhook_secret=WHSEC,
            refund_adapter="stripe",
        )

        @site.get("/posts/sunset")
        def post() -> HTMLResponse:
            return HTMLResponse(blog_page(stack.api.url, image_url))

        page_url = f"{page_server.url}/posts/sunset"
        # A visitor arriving from a newsletter: the query and fragment are theirs, and are not kept.
        await in_browser(browser.get, f"{page_url}?utm_source=newsletter&email=ana%40example.com#top")
        await in_browser(wait_until, browser, lambda d: d.execute_script("return !!document.querySelector('smi-buy')"))
        await in_browser(
            browser.execute_script, "document.querySelector('smi-buy').shadowRoot.querySelector('button').click()"
        )

        def options_shown(driver) -> bool:
            return bool(driver.execute_script(SHADOW + ".querySelectorAll('input[name=scale]').length"))

        await in_browser(wait_until, browser, options_shown)
        price_cents = round(
            float(
                browser.execute_script(
                    SHADOW + ".querySelector('input[name=scale]:checked').closest('label').dataset.price"
                )
            )
            * 100
        )

        def pay(driver) -> None:
            email = driver.execute_script(SHADOW + ".querySelector('input[type=email]')")
            email.send_keys("ana@example.com")
            driver.execute_script(SHADOW + ".querySelector('button.pay').click()")

        await in_browser(pay, browser)
        await in_browser(wait_until, browser, lambda d: d.current_url.startswith(f"{stripe_server.url}/pay/cs_test_"))
        # The script sent its batch (button shown, modal opened) before the page was left.
        await eventually(lambda: funnel_page(stack.api.url).get("opened") == 1, timeout=30, what="the page's counts")

        engine = make_engine(stack.settings.database_url)
        with Session(engine) as session:
            [checkout] = session.exec(select(CheckoutSession)).all()
        assert checkout.page_url.startswith(page_url)  # as the page sent it; the funnel keys it without its query
        stripe_server.complete(checkout.session_id, "ana@example.com", paid=True)
        event = stripe_server.event("checkout.session.completed", checkout.session_id)
        async with create_worker(dev_env.client, stack.settings):
            delivered = await asyncio.to_thread(
                httpx.post,
                f"{stack.api.url}/stripe/webhook",
                content=event,
                headers={"Stripe-Signature": sign_event(event), "Content-Type": "application/json"},
                timeout=30,
            )
            assert delivered.status_code == 200, delivered.text
            job_id = delivered.json()["job_id"]
            job = await wait_for_status(stack.client(), job_id, {"completed", "failed", "manual_review"}, timeout=90)
            assert job["status"] == "completed", job
            refund = await asyncio.to_thread(admin_of(stack.api.url).post, f"/v1/admin/jobs/{job_id}/refund")
            assert refund.status_code in (200, 202), refund.text

            def refunded() -> bool:
                with Session(engine) as session:
                    return [r.status for r in session.exec(select(Refund)).all()] == ["refunded"]

            await eventually(refunded, timeout=60, what="the refund")
        engine.dispose()

        row = funnel_page(stack.api.url)
        assert row == {
            "url": page_url,
            "shown": 1,
            "opened": 1,
            "checkout_started": 1,
            "paid": 1,
            "delivered": 1,
            "refunded": 1,
            "revenue_cents": price_cents,
            "conversion": 1.0,
        }
        csv_rows = list(csv.DictReader(io.StringIO(admin_of(stack.api.url).get("/v1/admin/analytics?format=csv").text)))
        assert [(r["kind"], r["url"], r["paid"]) for r in csv_rows] == [
            ("page", page_url, "1"),
            ("image", image_url, "1"),
        ]
        # The dashboard shows the page at the top.
        await in_browser(browser.get, f"{stack.api.url}/admin/login")
        await in_browser(lambda: browser.find_element(By.NAME, "key").send_keys(ADMIN_KEY + "\n"))
        await in_browser(wait_until, browser, lambda d: d.find_elements(By.ID, "funnel-pages"))
        top = browser.find_element(By.CSS_SELECTOR, "#funnel-pages tr[data-url]")
        assert top.get_attribute("data-url") == page_url and "100.0 %" in top.text
    finally:
        page_server.stop()


def admin_of(api_url: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def funnel_page(api_url: str) -> dict:
    pages = admin_of(api_url).get("/v1/admin/analytics").json()["pages"]
    return pages[0] if pages else {}


def sign_event(payload: bytes) -> str:
    return sign(payload, WHSEC)
