"""Refunds through each adapter, the admin API, and a customer mailbox that refuses mail.

Everything is real and on loopback: the API served by uvicorn, an in-process worker, the
Upsampler emulator, the SMTP server, and small local stand-ins for the storefront's refund
endpoint and for Stripe's `POST /v1/refunds`. Where a test waits through a retry policy
(refund webhook answering 500, SMTP refusing for ten attempts) it runs on the time-skipping
server; the rest runs on the dev server, where nothing waits long.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import uuid
from urllib.parse import parse_qs

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlmodel import Session
from temporalio.api.enums.v1 import EventType
from temporalio.api.testservice.v1 import UnlockTimeSkippingRequest

from smi.db import Refund
from smi.mailsink import MailSink, text_of
from smi.serve import ServerThread, free_port
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, WEBHOOK_SECRET, png_bytes
from tests.helpers import mail_rows, order, rows, wait_for_status
from worker import create_worker
from workflows.admin import RefundWorkflow
from workflows.upscale import UpscaleWorkflow

END = {"completed", "failed", "manual_review"}
CUSTOMER, ADMIN = "ana@example.com", "admin@localhost"
LINK = re.compile(r"http://\S+/downloads/[0-9a-f]{64}")
STRIPE_KEY = "sk_test_local_123"
# Upsampler's per-minute quota becomes a rate limit on the worker's Upsampler task queue (1 call/s at the
# real 60/min); nothing here is about that limit, so it is lifted to keep these tests quick.
QUICK = {"upsampler_requests_per_minute": 6000}


# --- local fixtures -------------------------------------------------------------------------


@pytest.fixture
def mailbox(request):
    """Overrides conftest's SMTP server for this module: `reject` comes from indirect parametrization."""
    sink = MailSink(port=free_port(), reject=getattr(request, "param", None)).start()
    yield sink
    sink.stop()


@pytest.fixture
def refund_endpoint():
    """The storefront's refund endpoint: `make(fail_first=n)` answers 500 to the first n requests, 200 after."""
    servers: list[ServerThread] = []

    def make(fail_first: int = 0) -> ServerThread:
        seen: list[dict] = []
        app = FastAPI()

        @app.post("/refund")
        async def refund(request: Request):
            answer = 500 if len(seen) < fail_first else 200
            seen.append({"headers": dict(request.headers), "body": await request.body(), "answer": answer})
            if answer != 200:
                return JSONResponse({"error": "try again later"}, status_code=answer)
            return {"id": f"sf-refund-{len(seen)}"}

        server = ServerThread(app).start()
        server.seen, server.refund_url = seen, f"{server.url}/refund"
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fake_stripe():
    """Stripe's `POST /v1/refunds` as the real API answers it: form-encoded in, a refund object out."""
    seen: list[dict] = []
    app = FastAPI()

    @app.post("/v1/refunds")
    async def create_refund(request: Request):
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()}
        seen.append({"headers": dict(request.headers), "form": form})
        refund = {
            "id": "re_3LocalTest0001",
            "object": "refund",
            "amount": int(form["amount"]),
            "currency": "usd",
            "payment_intent": form.get("payment_intent"),
            "status": "succeeded",
            "created": 1700000000,
            "metadata": {k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")},
        }
        return JSONResponse(refund, headers={"Request-Id": "req_local_1"})

    with ServerThread(app) as server:
        server.seen = seen
        yield server


# --- helpers --------------------------------------------------------------------------------


async def call(client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    """A request off the event loop: the in-process worker must keep running meanwhile."""
    return await asyncio.to_thread(client.request, method, path, **kwargs)


async def start(stack, order_id: str, **overrides) -> tuple[httpx.Client, str]:
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(40, 30)), order_id, **overrides)
    reply = await call(client, "POST", "/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return client, reply.json()["job_id"]


async def mails(mailbox: MailSink, count: int) -> list:
    found = await asyncio.to_thread(mailbox.wait_for, count)
    assert len(found) >= count, [m["Subject"] for m in found]
    return found


def only(messages: list, to: str) -> list:
    return [m for m in messages if m["To"] == to]


def emulator_jobs(stack) -> list[dict]:
    return httpx.get(f"{stack.emulator.url}/_emulator/jobs").json()


def refunds(stack, job_id: str) -> list[Refund]:
    return rows(stack.settings.database_url, Refund, job_id)


async def activity_attempts(handle) -> list[tuple[str, int]]:
    """(activity name, attempt of its last start) for each activity the workflow scheduled."""
    names: dict[int, str] = {}
    attempts: dict[int, int] = {}
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            attempts[started.scheduled_event_id] = started.attempt
    return [(names[i], attempts.get(i, 0)) for i in sorted(names)]


async def let_time_skip(env) -> None:
    await env.client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())


def signature_ok(headers: dict, body: bytes) -> bool:
    expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-smi-signature", ""), expected)


# --- 1. refund adapters ---------------------------------------------------------------------


async def test_webhook_refund_is_retried_until_2xx(time_skipping_env, stack_factory, faults, refund_endpoint):
    faults(refuse_with="unsupported image format")
    storefront = refund_endpoint(fail_first=2)
    stack = stack_factory(
        time_skipping_env, **QUICK, refund_adapter="webhook", refund_webhook_url=storefront.refund_url
    )
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "rf-webhook")
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        await let_time_skip(time_skipping_env)  # the refund's retry backoff (5 s, 10 s) is skipped
        state = await handle.result()
        attempts = await activity_attempts(handle)
        job = (await call(client, "GET", f"/v1/jobs/{job_id}")).json()
        messages = await mails(stack.mailbox, 2)

    assert state.status == "failed" and state.refund.status == "refunded"
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_format"
    assert job["refund"] == {"status": "refunded", "amount_cents": 1299, "reason": "unsupported_format"}
    assert ("refund", 3) in attempts  # one activity, three attempts: 500, 500, 200

    seen = storefront.seen
    assert [r["answer"] for r in seen] == [500, 500, 200]
    assert all(signature_ok(r["headers"], r["body"]) for r in seen)
    assert {r["headers"]["idempotency-key"] for r in seen} == {f"smi-refund-{job_id}"}
    assert len({r["body"] for r in seen}) == 1  # every retry asks for exactly the same refund
    body = json.loads(seen[0]["body"])
    assert body == {
        "job_id": job_id,
        "order_id": "rf-webhook",
        "payment_reference": "pi_test_123",
        "amount_cents": 1299,
        "currency": "USD",
        "reason": "unsupported_format",
        "idempotency_key": f"smi-refund-{job_id}",
    }
    assert seen[0]["headers"]["content-type"] == "application/json"

    # The workflow has ended (its result is in hand above): no mail can follow the two counted here.
    assert len(stack.mailbox.messages) == 2
    [customer], [notice] = only(messages, CUSTOMER), only(messages, ADMIN)
    assert customer["Subject"] == "We could not upscale your image (order rf-webhook)"
    assert "Your payment of 12.99 USD has been refunded" in text_of(customer)
    assert notice["Subject"].startswith("[upscale] Refunded (unsupported_format)")
    assert "Refund:  refunded, 12.99 USD" in text_of(notice)

    [row] = refunds(stack, job_id)
    assert (row.status, row.adapter, row.amount_cents, row.external_id) == ("refunded", "webhook", 1299, "sf-refund-3")


async def test_stripe_refund_request(dev_env, stack_factory, faults, fake_stripe):
    faults(refuse_with="unsupported image format")
    stack = stack_factory(
        dev_env, **QUICK, refund_adapter="stripe", stripe_api_key=STRIPE_KEY, stripe_api_base=fake_stripe.url
    )
    async with create_worker(dev_env.client, stack.settings):
        client, job_id = await start(stack, "rf-stripe", amount_paid_cents=2499, payment_reference="pi_3NxStripeLocal")
        job = await wait_for_status(client, job_id, END)
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
        messages = await mails(stack.mailbox, 2)

    assert job["status"] == "failed"
    assert job["refund"] == {"status": "refunded", "amount_cents": 2499, "reason": "unsupported_format"}
    [request] = fake_stripe.seen
    form, headers = request["form"], request["headers"]
    assert form["payment_intent"] == "pi_3NxStripeLocal"  # the order's payment_reference
    assert form["amount"] == "2499"  # its amount_paid_cents
    assert form["metadata[job_id]"] == job_id
    assert headers["idempotency-key"] == f"smi-refund-{job_id}"
    assert headers["authorization"] == f"Bearer {STRIPE_KEY}"
    assert headers["content-type"].startswith("application/x-www-form-urlencoded")

    [row] = refunds(stack, job_id)
    assert (row.status, row.adapter, row.external_id) == ("refunded", "stripe", "re_3LocalTest0001")
    [customer] = only(messages, CUSTOMER)
    assert "24.99 USD has been refunded" in text_of(customer)


async def test_no_adapter_records_the_refund_as_owed(dev_env, stack_factory, faults):
    faults(refuse_with="unsupported image format")
    stack = stack_factory(dev_env, **QUICK)  # refund_adapter "none"
    async with create_worker(dev_env.client, stack.settings):
        client, job_id = await start(stack, "rf-none")
        job = await wait_for_status(client, job_id, END)
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
        messages = await mails(stack.mailbox, 2)

    assert job["status"] == "failed"
    assert job["refund"] == {"status": "owed", "amount_cents": 1299, "reason": "unsupported_format"}
    [row] = refunds(stack, job_id)
    assert (row.status, row.adapter, row.external_id) == ("owed", "none", None)
    [notice], [customer] = only(messages, ADMIN), only(messages, CUSTOMER)
    assert "Refund owed: pay it back by hand (unsupported_format)" in notice["Subject"]
    assert "Refund:  owed, 12.99 USD" in text_of(notice)
    assert "12.99 USD is being returned to you" in text_of(customer)
    assert "has been refunded" not in text_of(customer)


# --- 2. admin API ---------------------------------------------------------------------------


async def test_admin_auth_listing_and_unknown_jobs(dev_env, stack_factory, faults):
    faults(refuse_with="unsupported image format", faulty_jobs=2)  # two refused jobs, then a normal one
    stack = stack_factory(dev_env, **QUICK)
    admin = stack.client(ADMIN_KEY)
    ids = []
    async with create_worker(dev_env.client, stack.settings):
        for n, expected in enumerate(["failed", "failed", "completed"]):
            client, job_id = await start(stack, f"adm-list-{n}")
            assert (await wait_for_status(client, job_id, END))["status"] == expected
            ids.append(job_id)
        failed_id = ids[0]

        # 401: no key, a wrong key, the storefront's key; on every admin endpoint, before anything else.
        anonymous = httpx.Client(base_url=stack.api.url, timeout=30)
        for who in (anonymous, stack.client("wrong-key"), stack.client(STOREFRONT_KEY)):
            for method, path in (
                ("GET", "/v1/admin/jobs"),
                ("POST", f"/v1/admin/jobs/{failed_id}/retry"),
                ("POST", f"/v1/admin/jobs/{failed_id}/refund"),
                ("POST", f"/v1/admin/jobs/{failed_id}/resend-email"),
            ):
                reply = await call(who, method, path)
                assert reply.status_code == 401, (method, path, reply.text)
                assert reply.json()["error"]["code"] == "unauthorized"
                assert reply.headers["www-authenticate"] == "Bearer"

        # Listing: newest first, filtered by status; an unknown status is 422.
        failed = (await call(admin, "GET", "/v1/admin/jobs", params={"status": "failed"})).json()["jobs"]
        assert [j["job_id"] for j in failed] == [ids[1], ids[0]]
        assert all(j["status"] == "failed" and j["refund"]["status"] == "owed" for j in failed)
        everything = (await call(admin, "GET", "/v1/admin/jobs")).json()["jobs"]
        assert [j["job_id"] for j in everything] == ids[::-1]
        completed = (await call(admin, "GET", "/v1/admin/jobs", params={"status": "completed"})).json()["jobs"]
        assert [j["job_id"] for j in completed] == [ids[2]]
        bad = await call(admin, "GET", "/v1/admin/jobs", params={"status": "done"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"

        # resend-email needs a completed job.
        reply = await call(admin, "POST", f"/v1/admin/jobs/{failed_id}/resend-email")
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "not_completed"

        # Unknown or malformed job ids: 404 on every action.
        for job_id in ("0" * 32, "not-a-job"):
            for action in ("retry", "refund", "resend-email"):
                reply = await call(admin, "POST", f"/v1/admin/jobs/{job_id}/{action}")
                assert reply.status_code == 404, (job_id, action, reply.text)
                assert reply.json()["error"]["code"] == "job_not_found"
        for job_id in ids:
            await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()

    # Nothing the refused callers asked for happened: still one refund per failed job, none for the other.
    assert [len(refunds(stack, job_id)) for job_id in ids] == [1, 1, 0]


async def test_admin_resend_email_then_refund_a_completed_job(dev_env, stack_factory, faults, refund_endpoint):
    faults()
    storefront = refund_endpoint(fail_first=0)
    stack = stack_factory(dev_env, **QUICK, refund_adapter="webhook", refund_webhook_url=storefront.refund_url)
    admin = stack.client(ADMIN_KEY)
    async with create_worker(dev_env.client, stack.settings):
        client, job_id = await start(stack, "adm-done")
        first = await wait_for_status(client, job_id, END)
        assert first["status"] == "completed", first
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()  # finished, cleaned up
        [completion] = await mails(stack.mailbox, 1)
        old_link = LINK.search(text_of(completion)).group(0)
        assert old_link == first["download_url"]

        # resend-email: a new link with a new expiry, emailed again; the old link is gone.
        reply = await call(admin, "POST", f"/v1/admin/jobs/{job_id}/resend-email")
        assert reply.status_code == 200 and "sent" in reply.json()["how"], reply.text  # its workflow has ended
        resent = (await mails(stack.mailbox, 2))[1]
        assert resent["To"] == CUSTOMER and resent["Subject"] == completion["Subject"]
        new_link = LINK.search(text_of(resent)).group(0)
        assert new_link != old_link
        after = (await call(client, "GET", f"/v1/jobs/{job_id}")).json()
        assert after["download_url"] == new_link and after["status"] == "completed"
        assert after["download_expires_at"] != first["download_expires_at"]
        assert after["download_expires_at"] > first["download_expires_at"]
        assert after["download_expires_at"] == reply.json()["download_expires_at"]
        gone = await asyncio.to_thread(httpx.get, old_link)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "link_replaced"
        fresh = await asyncio.to_thread(httpx.get, new_link)
        assert fresh.status_code == 200 and hashlib.sha256(fresh.content).hexdigest() == first["output"]["sha256"]

        # refund of the finished job, asked for twice at once: RefundWorkflow pays back once.
        replies = await asyncio.gather(*(call(admin, "POST", f"/v1/admin/jobs/{job_id}/refund") for _ in range(2)))
        assert [r.status_code for r in replies] == [202, 202], [r.text for r in replies]
        outcome = await dev_env.client.get_workflow_handle_for(RefundWorkflow.run, f"refund-{job_id}").result()
        assert (outcome.status, outcome.amount_cents, outcome.adapter) == ("refunded", 1299, "webhook")
        again = await call(admin, "POST", f"/v1/admin/jobs/{job_id}/refund")
        assert again.status_code == 202 and "already refunded" in again.json()["how"]
        messages = await mails(stack.mailbox, 4)

        # A refunded job cannot be retried.
        retry = await call(admin, "POST", f"/v1/admin/jobs/{job_id}/retry")
        assert retry.status_code == 409 and retry.json()["error"]["code"] == "already_refunded"
        job = (await call(client, "GET", f"/v1/jobs/{job_id}")).json()

    # Every workflow of the job has ended (the job's and the refund's awaited, the resend's answered): no
    # mail can follow the four counted here.
    assert len(stack.mailbox.messages) == 4
    [refunded] = [m for m in only(messages, CUSTOMER) if "refunded" in m["Subject"]]
    assert refunded["Subject"] == "Your payment for order adm-done has been refunded"
    assert "your payment of 12.99 USD for order adm-done has been refunded" in text_of(refunded)
    [notice] = only(messages, ADMIN)
    assert "Refund refunded by an admin" in notice["Subject"]
    assert len(storefront.seen) == 1 and signature_ok(storefront.seen[0]["headers"], storefront.seen[0]["body"])
    [row] = refunds(stack, job_id)
    assert (row.status, row.reason, row.external_id) == ("refunded", "admin", "sf-refund-1")
    assert job["status"] == "completed" and job["refund"] == {
        "status": "refunded",
        "amount_cents": 1299,
        "reason": "admin",
    }
    runs = [w.id async for w in dev_env.client.list_workflows(f'WorkflowId="refund-{job_id}"')]
    assert runs == [f"refund-{job_id}"]


async def test_admin_retry_from_manual_review_and_of_running_jobs(dev_env, stack_factory, faults):
    faults(fail_with="model crashed")
    stack = stack_factory(dev_env, **QUICK)
    admin = stack.client(ADMIN_KEY)
    async with create_worker(dev_env.client, stack.settings):
        client, job_id = await start(stack, "adm-review")
        review = await wait_for_status(client, job_id, END)
        assert review["status"] == "manual_review" and review["error"]["code"] == "upsampler_failed", review
        assert len(emulator_jobs(stack)) == 2  # one automatic resubmission, then manual review
        [notice] = await mails(stack.mailbox, 1)
        assert notice["To"] == ADMIN and "Manual review needed (upsampler_failed)" in notice["Subject"]
        handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        # The job row says manual_review a moment before the workflow takes decisions (after the notice).
        for _ in range(100):
            if (await handle.query(UpscaleWorkflow.state)).awaiting_decision:
                break
            await asyncio.sleep(0.05)

        faults()  # Upsampler works again
        reply = await call(admin, "POST", f"/v1/admin/jobs/{job_id}/retry")
        assert reply.status_code == 202 and "signalled" in reply.json()["how"], reply.text
        done = await wait_for_status(client, job_id, {"completed", "failed"})
        state = await handle.result()
        assert done["status"] == "completed" and done["error"] is None and done["download_url"], done
        assert state.attempt == 3 and len(emulator_jobs(stack)) == 3
        completion = (await mails(stack.mailbox, 2))[1]
        assert completion["To"] == CUSTOMER and LINK.search(text_of(completion)).group(0) == done["download_url"]

        # A job that is running and not in review: retry is 409; refund is signalled and ends it.
        faults(never_finish=True, webhook="drop")
        client, running_id = await start(stack, "adm-running")
        await wait_for_status(client, running_id, {"queued", "processing"})
        reply = await call(admin, "POST", f"/v1/admin/jobs/{running_id}/retry")
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "job_in_progress", reply.text
        reply = await call(admin, "POST", f"/v1/admin/jobs/{running_id}/refund")
        assert reply.status_code == 202 and "signalled" in reply.json()["how"], reply.text
        ended = await wait_for_status(client, running_id, {"failed", "completed"}, timeout=20)
        await dev_env.client.get_workflow_handle(f"upscale-{running_id}").result()
        reply = await call(admin, "POST", f"/v1/admin/jobs/{running_id}/retry")
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "already_refunded"
        await mails(stack.mailbox, 4)

    assert ended["status"] == "failed" and ended["error"]["code"] == "admin_refund"
    assert ended["refund"] == {"status": "owed", "amount_cents": 1299, "reason": "admin_refund"}
    assert len(refunds(stack, running_id)) == 1 and refunds(stack, job_id) == []


# --- 3. a customer mailbox that refuses mail ------------------------------------------------


@pytest.mark.parametrize("mailbox", [{CUSTOMER}], indirect=True, ids=["customer-refused"])
async def test_refused_completion_email_keeps_the_job_completed(time_skipping_env, stack_factory, faults, mailbox):
    faults()
    stack = stack_factory(time_skipping_env, **QUICK)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "mail-refused")
        # Real time until the job is made (so the webhook wins over the 30 s poll), then skip the mail retries.
        await wait_for_status(client, job_id, {"completed", "failed", "manual_review"})
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        await let_time_skip(time_skipping_env)
        state = await handle.result()
        attempts = await activity_attempts(handle)
        described = await handle.describe()
        job = (await call(client, "GET", f"/v1/jobs/{job_id}")).json()
        [notice] = await mails(mailbox, 1)

    assert state.status == "completed" and state.error_code == "mail_failed"
    assert job["status"] == "completed" and job["error"]["code"] == "mail_failed"
    assert job["download_url"] and job["refund"] is None
    # The completion email was tried MAIL_RETRY's ten times (about 30 minutes of workflow time), then the admin told.
    assert [a for a in attempts if a[0] == "send_email"] == [("send_email", 10), ("send_email", 1)]
    assert (described.close_time - described.start_time).total_seconds() > 1800
    assert notice["To"] == ADMIN and "The completion email could not be sent" in notice["Subject"]
    assert "mail_failed" in text_of(notice)
    assert len(mailbox.messages) == 1  # nothing reached the customer
    assert sorted((m.purpose, m.status) for m in mail_rows(stack.settings.database_url, job_id)) == [
        ("admin:mail:1", "sent"),
        ("completed:1", "sending"),
    ]


async def test_a_decision_racing_the_workflows_end_treats_the_job_as_finished(dev_env, stack_factory, monkeypatch):
    """The run was seen open, then ended before the signal (a 500 in CI's tests/test_funnel.py run): the refund
    starts refund-<job_id>, as for any finished job (a retry goes through the same `_decide`). `_running_state`
    is made to report an open run whose signal then finds none: the race, at will."""
    from api import deps, service
    from devstack import job_row
    from smi.db import make_engine, utcnow

    stack = stack_factory(dev_env)  # the API's start migrated the database
    engine = make_engine(stack.settings.database_url)
    svc = deps.Services(stack.settings, engine, dev_env.client)
    job_id = uuid.uuid4().hex
    with Session(engine) as session:
        session.add(job_row(job_id, "completed", utcnow()))
        session.commit()

    async def seen_running(_svc, seen_job_id):
        gone = dev_env.client.get_workflow_handle(f"upscale-{seen_job_id}")  # no such run any more
        return gone, "an open run's state"

    monkeypatch.setattr(service, "_running_state", seen_running)
    refunded = await service.refund(job_id, svc)
    assert refunded.how == f"started workflow refund-{job_id}"
    assert (await dev_env.client.get_workflow_handle(f"refund-{job_id}").describe()).workflow_type == "RefundWorkflow"
    engine.dispose()
