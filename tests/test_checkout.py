"""Selling from a page: the quote, Stripe Checkout and Stripe's webhook, with the official `stripe` library pointed
at a loopback server speaking Stripe's REST API (tests/stripe_server.py) and events signed as Stripe signs them.

Everything is real and on loopback: the API served by uvicorn, the Temporal dev server, a worker, the Upsampler
emulator, the shop serving the images, the SMTP sink.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlmodel import Session, create_engine, select

from devstack import KEYS
from smi.db import CheckoutSession, Job, Refund
from smi.mailsink import text_of
from smi.settings import Settings
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import clear_of_minute_boundary, eventually, wait_for_status
from tests.stripe_server import StripeServer, sign
from worker import create_worker

STRIPE_KEY = "sk_test_checkout_local_1"
WHSEC = "whsec_test_current_secret"
WHSEC_OLD = "whsec_test_previous_secret"
PK = "pk_test_blog_0123456789"
PK_OTHER = "pk_test_other_0123456789"
ORIGIN = "https://blog.example"
PAGE = f"{ORIGIN}/posts/harbour"
CUSTOMER = "ana@example.com"
LINK = re.compile(r"http://\S+/downloads/[0-9a-f]{64}")


@pytest.fixture
def stripe_server():
    server = StripeServer(STRIPE_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def checkout_stack(dev_env, stack_factory, shop, stripe_server):
    """`make(**overrides)`: the API with a publishable key bound to ORIGIN and the shop's image host."""
    shop_host = shop.url.split("//")[1]

    def make(**overrides):
        values = dict(
            publishable_keys=f"{PK}={ORIGIN}|http://127.0.0.1:1;{shop_host},{PK_OTHER}=https://other.example;nowhere.example",
            stripe_mode="test",
            stripe_secret_key_test=STRIPE_KEY,
            stripe_api_base=stripe_server.url,
            stripe_webhook_secret=WHSEC,
            stripe_webhook_secret_previous=WHSEC_OLD,
            refund_adapter="stripe",
        )
        values.update(overrides)
        return stack_factory(dev_env, **values)

    return make


def page_client(stack, key: str = PK, origin: str | None = ORIGIN) -> httpx.Client:
    """What the embed script sends from a page: the publishable key and the browser's Origin."""
    headers = {"Authorization": f"Bearer {key}"}
    if origin:
        headers["Origin"] = origin
    return httpx.Client(base_url=stack.api.url, headers=headers, timeout=30)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (the probe reads only the header)."""
    data = png_bytes(2, 2)
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def deliver(stack, payload: bytes, secret: str = WHSEC, timestamp: int | None = None) -> httpx.Response:
    return httpx.post(
        f"{stack.api.url}/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": sign(payload, secret, timestamp), "Content-Type": "application/json"},
        timeout=30,
    )


def db_rows(stack, model) -> list:
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        found = list(session.exec(select(model)).all())
    engine.dispose()
    return found


def start_checkout(stack, image_url: str, scale_factor: int = 2, **extra) -> dict:
    with page_client(stack) as client:
        reply = client.post(
            "/v1/checkout", json={"image_url": image_url, "scale_factor": scale_factor, "page_url": PAGE, **extra}
        )
    assert reply.status_code == 201, reply.text
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    return reply.json()


async def test_paid_checkout_starts_one_job_that_emails_a_working_link(dev_env, checkout_stack, stripe_server):
    stack = checkout_stack()
    image_url = stack.shop.publish(png_bytes(120, 80))

    # The page asks what the image can be sold as; the server's own quote prices it.
    with page_client(stack) as client:
        quoted = client.post("/v1/checkout/quote", json={"image_url": image_url})
    assert quoted.status_code == 200, quoted.text
    assert quoted.headers["access-control-allow-origin"] == ORIGIN
    body = quoted.json()
    assert (body["width"], body["height"]) == (120, 80)
    options = {o["scale_factor"]: o for o in body["options"]}
    assert sorted(options) == [2, 4, 8, 16]
    assert options[4]["output_width"] == 480 and options[4]["currency"] == "usd"
    assert options[4]["price_cents"] == round(options[4]["price"] * 100) >= 50

    # "Pay": a Checkout Session at the quoted price, the order in its metadata, back to our page.
    created = await asyncio.to_thread(start_checkout, stack, image_url, 4, email=CUSTOMER)
    [create] = [r for r in stripe_server.requests if r["path"] == "/v1/checkout/sessions"]
    form = create["form"]
    assert form["mode"] == "payment"
    assert form["line_items"][0]["price_data"]["unit_amount"] == str(options[4]["price_cents"])
    assert form["line_items"][0]["price_data"]["currency"] == "usd"
    assert form["metadata"]["order_id"] == created["order_id"] == form["client_reference_id"]
    assert form["cancel_url"] == PAGE and form["customer_email"] == CUSTOMER
    assert form["success_url"] == f"{stack.api.url}/checkout/return/{created['order_id']}"
    assert created["checkout_url"] == stripe_server.sessions[created["session_id"]]["url"]
    [row] = db_rows(stack, CheckoutSession)
    assert (row.status, row.session_id, row.customer_email, row.job_id) == (
        "created",
        created["session_id"],
        None,
        None,
    )

    # Back from Stripe before the webhook: the page waits (and refreshes itself).
    back = httpx.get(form["success_url"], follow_redirects=False)
    assert back.status_code == 200 and 'http-equiv="refresh"' in back.text

    stripe_server.complete(created["session_id"], CUSTOMER, paid=True)
    completed = stripe_server.event("checkout.session.completed", created["session_id"])
    async with create_worker(dev_env.client, stack.settings):
        first = await asyncio.to_thread(deliver, stack, completed)
        assert first.status_code == 200 and first.json()["action"] == "started", first.text
        job_id = first.json()["job_id"]
        again = await asyncio.to_thread(deliver, stack, completed)  # Stripe redelivers
        assert again.json() == {"received": True, "action": "already_started", "job_id": job_id}
        late = stripe_server.event("checkout.session.async_payment_succeeded", created["session_id"])
        assert (await asyncio.to_thread(deliver, stack, late)).json()["job_id"] == job_id

        job = await wait_for_status(stack.client(), job_id, {"completed", "failed", "manual_review"}, timeout=90)
        assert job["status"] == "completed", job
        messages = await asyncio.to_thread(stack.mailbox.wait_for, 1)
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()  # through its clean-up

    # The customer's address came from the session; the link downloads the image, 4x.
    [mail] = messages
    assert mail["To"] == CUSTOMER
    link = LINK.search(text_of(mail)).group(0)
    download = httpx.get(link)
    assert download.status_code == 200 and len(download.content) == job["output"]["bytes"]
    assert job["output"]["width"] == 480

    # One job, the paid amount and the payment intent on it; the session marked paid with the address.
    [stored] = db_rows(stack, Job)
    session = stripe_server.sessions[created["session_id"]]
    assert stored.job_id == job_id and stored.order_id == created["order_id"]
    assert stored.amount_paid_cents == options[4]["price_cents"] and stored.currency == "USD"
    assert stored.payment_reference == session["payment_intent"]
    [row] = db_rows(stack, CheckoutSession)
    assert (row.status, row.job_id, row.customer_email) == ("paid", job_id, CUSTOMER)

    # The page Stripe returns to now leads to the order's status page.
    back = httpx.get(form["success_url"], follow_redirects=False)
    assert back.status_code == 303 and back.headers["location"] == job["status_page_url"]
    assert httpx.get(back.headers["location"]).status_code == 200

    # A refund goes to that payment intent through the Stripe refund adapter.
    async with create_worker(dev_env.client, stack.settings):
        refunded = await asyncio.to_thread(
            httpx.post,
            f"{stack.api.url}/v1/admin/jobs/{job_id}/refund",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert refunded.status_code in (200, 202), refunded.text
        await eventually(lambda: len(stripe_server.refunds) == 1, timeout=30, what="the Stripe refund")
        await eventually(
            lambda: [r.status for r in db_rows(stack, Refund)] == ["refunded"], timeout=30, what="refund recorded"
        )
    [refund] = stripe_server.refunds
    assert refund["payment_intent"] == session["payment_intent"]
    assert refund["amount"] == options[4]["price_cents"]


async def test_unpaid_session_waits_for_its_payment_and_events_in_any_order_start_one_job(
    dev_env, checkout_stack, stripe_server
):
    stack = checkout_stack()
    created = await asyncio.to_thread(start_checkout, stack, stack.shop.publish(png_bytes(40, 30)))
    sid = created["session_id"]

    # A bank debit: Checkout completes unpaid. No job until the payment succeeds.
    stripe_server.complete(sid, CUSTOMER, paid=False)
    unpaid = stripe_server.event("checkout.session.completed", sid)
    reply = await asyncio.to_thread(deliver, stack, unpaid)
    assert reply.status_code == 200 and reply.json()["action"] == "awaiting_payment"
    assert db_rows(stack, Job) == [] and db_rows(stack, CheckoutSession)[0].status == "created"

    # The money arrives; the success event and a late redelivery of the unpaid one, all at once, several times.
    stripe_server.settle(sid)
    succeeded = stripe_server.event("checkout.session.async_payment_succeeded", sid)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: deliver(stack, p), [succeeded, unpaid] * 4))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert len({r.json()["job_id"] for r in replies}) == 1
    assert sorted(r.json()["action"] for r in replies).count("started") == 1
    [job] = db_rows(stack, Job)
    assert job.customer_email == CUSTOMER
    workflows = [w.id async for w in dev_env.client.list_workflows(f'WorkflowId="upscale-{job.job_id}"')]
    assert workflows == [f"upscale-{job.job_id}"]


async def test_forged_and_replayed_events_are_refused_and_write_nothing(checkout_stack, stripe_server):
    stack = checkout_stack()
    created = await asyncio.to_thread(start_checkout, stack, stack.shop.publish(png_bytes(40, 30)))
    sid = created["session_id"]
    stripe_server.complete(sid, CUSTOMER, paid=True)
    event = stripe_server.event("checkout.session.completed", sid)
    before = len(stripe_server.requests)

    forged = await asyncio.to_thread(deliver, stack, event, "whsec_guessed")
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "bad_signature"
    tampered_payload = event.replace(b'"paid"', b'"paid" ', 1)
    tampered = httpx.post(
        f"{stack.api.url}/stripe/webhook",
        content=tampered_payload,
        headers={"Stripe-Signature": sign(event, WHSEC)},  # the signature of another body
    )
    assert tampered.status_code == 400
    replayed = await asyncio.to_thread(deliver, stack, event, WHSEC, int(time.time()) - 301)
    assert replayed.status_code == 400 and replayed.json()["error"]["code"] == "bad_signature"
    unsigned = httpx.post(f"{stack.api.url}/stripe/webhook", content=event)
    assert unsigned.status_code == 400

    # Nothing written, nothing asked of Stripe.
    assert db_rows(stack, Job) == []
    assert [r.status for r in db_rows(stack, CheckoutSession)] == ["created"]
    assert len(stripe_server.requests) == before

    # Unknown events are acknowledged and ignored; the previous secret still verifies during a rotation.
    other = b'{"id": "evt_1", "object": "event", "type": "customer.created", "data": {"object": {"id": "cus_1"}}}'
    ignored = await asyncio.to_thread(deliver, stack, other, WHSEC_OLD)
    assert ignored.status_code == 200 and ignored.json()["action"] == "ignored"
    within = await asyncio.to_thread(deliver, stack, event, WHSEC_OLD, int(time.time()) - 250)
    assert within.status_code == 200 and within.json()["action"] == "started"
    assert len(db_rows(stack, Job)) == 1


async def test_refused_quotes_and_checkouts_never_reach_stripe(checkout_stack, stripe_server, shop):
    stack = checkout_stack()
    image_url = stack.shop.publish(png_bytes(40, 30))
    shop_host = shop.url.split("//")[1]
    big = stack.shop.publish(png_header(3000, 3000))  # 2x fits (36 MP), 4x does not
    huge = stack.shop.publish(png_header(8000, 8000))  # not even 2x
    good = {"image_url": image_url, "scale_factor": 2, "page_url": PAGE}

    def post(path: str, body: dict, **client) -> httpx.Response:
        with page_client(stack, **client) as c:
            return c.post(path, json=body)

    cases = [
        (post("/v1/checkout", good, origin=None), 403, "origin_not_allowed"),
        (post("/v1/checkout", good, origin="https://evil.example"), 403, "origin_not_allowed"),
        (
            post("/v1/checkout/quote", {"image_url": image_url}, origin="https://evil.example"),
            403,
            "origin_not_allowed",
        ),
        (post("/v1/checkout", good, key="pk_test_unknown_123456"), 401, "unauthorized"),
        (post("/v1/checkout", good, key=PK_OTHER, origin="https://other.example"), 403, "image_host_not_allowed"),
        (post("/v1/checkout/quote", {"image_url": "https://elsewhere.example/a.png"}), 403, "image_host_not_allowed"),
        (post("/v1/checkout/quote", {"image_url": f"http://x@{shop_host}/a.png"}), 403, "image_host_not_allowed"),
        (
            post("/v1/checkout/quote", {"image_url": f"http://{shop_host}\\@evil.example/"}),
            403,
            "image_host_not_allowed",
        ),
        (post("/v1/checkout", {**good, "scale_factor": 17}), 422, "invalid_request"),
        (post("/v1/checkout", {**good, "page_url": "https://evil.example/x"}), 422, "invalid_request"),
        (post("/v1/checkout", {**good, "image_url": big, "scale_factor": 4}), 422, "output_too_large"),
        (post("/v1/checkout/quote", {"image_url": huge}), 422, "output_too_large"),
        (post("/v1/checkout", {**good, "price": 1}), 422, "invalid_request"),  # a price from the page: refused
    ]
    for reply, status, code in cases:
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
        assert reply.json()["error"]["message"]
    assert stripe_server.requests == []
    assert db_rows(stack, CheckoutSession) == []

    # The largest scale that fits is offered, nothing above it; the storefront key (a server) needs no Origin.
    quoted = post("/v1/checkout/quote", {"image_url": big})
    assert [o["scale_factor"] for o in quoted.json()["options"]] == [2]
    with stack.client(STOREFRONT_KEY) as server_side:
        made = server_side.post("/v1/checkout", json={**good, "page_url": "https://shop.example/cart"})
    assert made.status_code == 201, made.text
    assert "access-control-allow-origin" not in made.headers
    assert len(stripe_server.requests) == 1


async def test_checkouts_are_rate_limited_per_client(checkout_stack, stripe_server):
    stack = checkout_stack(checkout_rate_limit_per_minute=3)
    image_url = stack.shop.publish(png_bytes(40, 30))
    body = {"image_url": image_url, "scale_factor": 2, "page_url": PAGE}
    await asyncio.to_thread(clear_of_minute_boundary)
    with page_client(stack) as client:
        replies = [client.post("/v1/checkout", json=body) for _ in range(4)]
    assert [r.status_code for r in replies] == [201, 201, 201, 429]
    assert replies[-1].json()["error"]["code"] == "rate_limited" and int(replies[-1].headers["retry-after"]) >= 1
    assert len([r for r in stripe_server.requests if r["path"] == "/v1/checkout/sessions"]) == 3


async def test_quotes_and_checkouts_are_rate_limited_per_key(checkout_stack, stripe_server):
    stack = checkout_stack(checkout_key_rate_limit_per_minute=3)
    image_url = stack.shop.publish(png_bytes(40, 30))
    await asyncio.to_thread(clear_of_minute_boundary)
    with page_client(stack) as client:
        replies = [client.post("/v1/checkout/quote", json={"image_url": image_url}) for _ in range(2)]
        replies += [client.post("/v1/checkout", json={"image_url": image_url, "scale_factor": 2, "page_url": PAGE})]
        replies += [client.post("/v1/checkout", json={"image_url": image_url, "scale_factor": 2, "page_url": PAGE})]
    assert [r.status_code for r in replies] == [200, 200, 201, 429]
    assert "this key" in replies[-1].json()["error"]["message"]
    # The storefront key is no publishable key: its server is limited per client address only.
    with stack.client(STOREFRONT_KEY) as server_side:
        assert server_side.post("/v1/checkout/quote", json={"image_url": image_url}).status_code == 200


def test_cors_preflight_answers_the_keys_origins_only(checkout_stack):
    stack = checkout_stack()
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    for path in ("/v1/checkout", "/v1/checkout/quote"):
        allowed = httpx.options(f"{stack.api.url}{path}", headers={"Origin": ORIGIN, **asked})
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        refused = httpx.options(f"{stack.api.url}{path}", headers={"Origin": "https://evil.example", **asked})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    # A reply to a key of another origin carries no CORS header for this one.
    with page_client(stack, key=PK_OTHER, origin=ORIGIN) as client:
        reply = client.post("/v1/checkout/quote", json={"image_url": "https://nowhere.example/a.png"})
    assert reply.status_code == 403 and "access-control-allow-origin" not in reply.headers


def test_settings_bind_keys_and_pick_the_stripe_key_of_the_mode():
    keys = Settings(
        env="dev",
        publishable_keys=f" {PK}=https://Blog.example/|http://127.0.0.1:8080;img.example|.cdn.example , "
        f"{PK_OTHER}=https://other.example;other.example",
        stripe_mode="live",
        stripe_secret_key_test="sk_test_1",
        stripe_secret_key_live="sk_live_1",
    )
    bound = keys.publishable_key_map()[PK]
    assert bound.origins == {"https://blog.example", "http://127.0.0.1:8080"}
    assert bound.sells_from("img.example") and bound.sells_from("a.cdn.example")
    assert not bound.sells_from("img.example.evil.test") and not bound.sells_from("cdn.example.evil")
    assert keys.stripe_api_key is not None and keys.stripe_api_key.get_secret_value() == "sk_live_1"
    explicit = Settings(env="dev", stripe_api_key="sk_explicit", stripe_mode="test", stripe_secret_key_test="sk_test_1")
    assert explicit.stripe_api_key is not None and explicit.stripe_api_key.get_secret_value() == "sk_explicit"
    for wrong in ("pk_short=https://a.example;a.example", f"{PK}=blog.example;a.example", f"{PK}=https://a.example"):
        with pytest.raises(ValueError, match="SMI_PUBLISHABLE_KEYS"):
            Settings(env="dev", publishable_keys=wrong)
    with pytest.raises(ValueError, match="SMI_STRIPE_WEBHOOK_SECRET"):
        Settings(env="production", publishable_keys=f"{PK}=https://a.example;a.example", stripe_api_key="sk", **KEYS)


def test_a_server_without_stripe_has_no_checkout(checkout_stack, stripe_server):
    """No publishable keys and no Stripe (what settings allow outside dev): no checkout, a 404, not a 5xx."""
    stack = checkout_stack(
        publishable_keys="",
        stripe_mode=None,
        stripe_webhook_secret=None,
        stripe_webhook_secret_previous=None,
        refund_adapter="none",
    )
    image_url = stack.shop.publish(png_bytes(40, 30))
    with stack.client(STOREFRONT_KEY) as client:
        assert client.post("/v1/checkout/quote", json={"image_url": image_url}).status_code == 200
        made = client.post("/v1/checkout", json={"image_url": image_url, "scale_factor": 2, "page_url": PAGE})
    assert made.status_code == 404 and made.json()["error"]["code"] == "checkout_not_configured"
    hook = httpx.post(f"{stack.api.url}/stripe/webhook", content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert hook.status_code == 404 and hook.json()["error"]["code"] == "checkout_not_configured"
    assert stripe_server.requests == [] and db_rows(stack, CheckoutSession) == []


async def test_stripe_unreachable_means_deliver_again_and_ended_sessions_are_recorded(
    dev_env, checkout_stack, stripe_server
):
    stack = checkout_stack()
    paid, lapsed, failed = [
        (await asyncio.to_thread(start_checkout, stack, stack.shop.publish(png_bytes(40, 30))))["session_id"]
        for _ in range(3)
    ]
    stripe_server.complete(paid, CUSTOMER, paid=True)
    completed = stripe_server.event("checkout.session.completed", paid)

    # Stripe cannot be asked how the session stands: 503, nothing written; Stripe's next delivery starts the job.
    stripe_server.down = True
    refused = await asyncio.to_thread(deliver, stack, completed)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "stripe_unavailable"
    assert db_rows(stack, Job) == []
    stripe_server.down = False
    assert (await asyncio.to_thread(deliver, stack, completed)).json()["action"] == "started"

    # A session that expired, or whose delayed payment failed: recorded for the funnel, no job.
    stripe_server.complete(failed, CUSTOMER, paid=False)
    for kind, sid in (("checkout.session.expired", lapsed), ("checkout.session.async_payment_failed", failed)):
        reply = await asyncio.to_thread(deliver, stack, stripe_server.event(kind, sid))
        assert reply.status_code == 200 and reply.json()["action"] == "recorded"
    states = {row.session_id: row.status for row in db_rows(stack, CheckoutSession)}
    assert states == {paid: "paid", lapsed: "expired", failed: "failed"}
    assert len(db_rows(stack, Job)) == 1
