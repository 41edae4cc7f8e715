"""Signed job events to the shop (issue 13, item 1): smi/shop_webhooks.py's check, and deliveries to a real
HTTP receiver on loopback from the real worker, on the dev server (a reset with the CLI) and on the
time-skipping server (three days of retries)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from temporalio.api.enums.v1 import EventType
from temporalio.api.testservice.v1 import UnlockTimeSkippingRequest

from smi import shop_webhooks
from smi.db import as_utc
from smi.mailsink import text_of
from smi.serve import ServerThread
from smi.settings import Settings
from smi.shop_webhooks import SignatureError, sign, verify
from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import event_count, eventually, mail_rows, order, wait_for_status
from tests.test_crash_and_reset import finished_run, reset_to_first_task
from worker import create_worker
from workflows.shop_events import GIVE_UP_AFTER, ShopEventWorkflow, event_id
from workflows.upscale import UpscaleWorkflow

SECRET = "whsec_current_0123456789"
PREVIOUS = "whsec_previous_9876543210"
BODY = b'{"id":"evt-1","type":"job.completed"}'

# --- the copyable check (unit) -------------------------------------------------------------------


def test_a_fresh_signature_verifies_and_returns_the_event():
    header = sign(BODY, SECRET)
    assert header.startswith("t=") and ",v1=" in header
    assert verify(BODY, header, SECRET) == {"id": "evt-1", "type": "job.completed"}
    assert verify(BODY.decode(), header, [SECRET, PREVIOUS])["id"] == "evt-1"


def test_a_replay_older_than_the_tolerance_is_refused():
    header = sign(BODY, SECRET, timestamp=int(time.time()) - 301)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(BODY, header, SECRET, tolerance=300)
    assert verify(BODY, header, SECRET, tolerance=600)["id"] == "evt-1"  # the same header, a wider tolerance
    ahead = sign(BODY, SECRET, timestamp=int(time.time()) + 3600)  # a clock far ahead is no better
    with pytest.raises(SignatureError, match="tolerance"):
        verify(BODY, ahead, SECRET)


def test_a_tampered_body_or_timestamp_is_refused():
    now = int(time.time())
    header = sign(BODY, SECRET, timestamp=now)
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY.replace(b"completed", b"refunded"), header, SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY, header.replace(f"t={now}", f"t={now + 1}"), SECRET)  # a replay given a fresh time
    with pytest.raises(SignatureError, match="does not match"):
        verify(BODY, header, "another-secret")


def test_the_previous_secret_is_accepted_during_a_rotation():
    # The sender signs with both while rotating: a shop still on the previous secret verifies ...
    both = sign(BODY, [SECRET, PREVIOUS])
    assert both.count("v1=") == 2
    assert verify(BODY, both, PREVIOUS)["id"] == "evt-1"
    assert verify(BODY, both, SECRET)["id"] == "evt-1"
    # ... and a shop that has the new secret keeps accepting deliveries signed with the old one.
    old = sign(BODY, PREVIOUS)
    assert verify(BODY, old, [SECRET, PREVIOUS])["id"] == "evt-1"
    with pytest.raises(SignatureError):
        verify(BODY, old, SECRET)


@pytest.mark.parametrize(
    "header",
    [None, "", "v1=abc", "t=123", "t=abc,v1=00", "t=1,v1=é", "garbage", "t=1,v2=" + "0" * 64],
)
def test_a_malformed_header_is_a_signature_error(header):
    with pytest.raises(SignatureError):
        verify(BODY, header, SECRET)


def test_a_shop_url_needs_its_secret_and_an_http_url():
    with pytest.raises(ValueError, match="SMI_STOREFRONT_WEBHOOK_SECRET"):
        Settings(env="dev", storefront_webhook_url="https://shop.example/hooks")
    with pytest.raises(ValueError, match="SMI_STOREFRONT_WEBHOOK_URL"):
        Settings(env="dev", storefront_webhook_url="ftp://shop.example/hooks", storefront_webhook_secret="s")
    assert Settings(env="dev", storefront_webhook_url="").storefront_webhook_url is None


# --- a real receiver -------------------------------------------------------------------------------


@dataclass
class Receiver:
    """The shop's endpoint. Answers 500 `fail_first` times, then 200; while `hold` says so, a request
    waits (up to 30 s) before it is answered. Every request is kept with the time it was answered."""

    fail_first: int = 0
    hold: object = None  # a callable: True while requests must wait
    seen: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks/smi")
        async def receive(request: Request):
            body = await request.body()
            deadline = time.monotonic() + 30
            while self.hold is not None and self.hold() and time.monotonic() < deadline:  # type: ignore[operator]
                await asyncio.sleep(0.05)
            with self.lock:
                answer = 500 if len(self.seen) < self.fail_first else 200
                self.seen.append(
                    {
                        "body": body,
                        "signature": request.headers.get("smi-signature"),
                        "answer": answer,
                        "at": time.time(),
                    }
                )
            return Response(status_code=answer)

        return app

    def accepted(self) -> list[dict]:
        return [r for r in self.seen if r["answer"] == 200]


@pytest.fixture
def receiver():
    made: list[ServerThread] = []

    def build(**options) -> Receiver:
        shop = Receiver(**options)
        server = ServerThread(shop.app()).start()
        made.append(server)
        shop.url = f"{server.url}/hooks/smi"
        return shop

    yield build
    for server in made:
        server.stop()


def events_settings(stack_factory, env, shop: Receiver, **overrides):
    """A stack whose worker posts events to `shop`: loopback allow-listed, as other tests allow theirs."""
    return stack_factory(
        env,
        storefront_webhook_url=shop.url,
        storefront_webhook_secret=SECRET,
        storefront_webhook_secret_previous=PREVIOUS,
        storefront_webhook_first_retry_seconds=0.5,
        fetch_allow_hosts="127.0.0.1",  # any port of it: the shop's files, the API, the receiver
        **overrides,
    )


async def post_order(stack, order_id: str, **overrides) -> str:
    client = stack.client()
    body = order(stack.shop.publish(png_bytes(64, 48)), order_id, scale_factor=2, **overrides)
    reply = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()["job_id"]


def customer_mail_seen(mailbox) -> bool:
    return any("admin" not in str(m["To"]) for m in mailbox.messages)


# --- on the dev server -----------------------------------------------------------------------------


async def test_completed_event_retried_until_accepted_after_the_email_and_not_sent_again_after_a_reset(
    dev_env, stack_factory, faults, receiver, mailbox, caplog
):
    caplog.set_level(logging.INFO)
    faults(delay_seconds=0.2)
    # The receiver holds its first answer until the customer's email is in the mailbox and the job's workflow
    # has ended (30 s at most), then fails three times.
    job_done = threading.Event()
    shop = receiver(fail_first=3, hold=lambda: not (customer_mail_seen(mailbox) and job_done.is_set()))
    stack = events_settings(stack_factory, dev_env, shop, poll_initial_delay_seconds=1)
    address = dev_env.client.service_client.config.target_host
    async with create_worker(dev_env.client, stack.settings):
        job_id = await post_order(stack, "ev-complete")
        workflow_id = f"upscale-{job_id}"
        first = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id)
        assert (await finished_run(first)).status == "completed"
        job_ended = time.time()
        answered_when_job_ended = len(shop.seen)
        job_done.set()
        job = (await asyncio.to_thread(stack.client().get, f"/v1/jobs/{job_id}")).json()
        delivery = dev_env.client.get_workflow_handle_for(ShopEventWorkflow.run, event_id(job_id, 1, "job.completed"))
        assert await asyncio.wait_for(delivery.result(), 30) is True
        mail_sent_at = next(
            m.sent_at for m in mail_rows(stack.settings.database_url, job_id) if m.purpose == "completed:1"
        )

        # A reset of the finished job: the new run reaches `completed` again and tries to start the same event.
        new_run = await reset_to_first_task(address, workflow_id)
        second = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, workflow_id, run_id=new_run)
        assert (await finished_run(second)).status == "completed"
        refused = await event_count(second, EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED)
        await asyncio.sleep(2)  # what a second delivery would take: start, build, POST (retries 0.5 s apart)

    # The job ended, and the customer was mailed, before the shop answered at all.
    assert answered_when_job_ended == 0
    assert all(r["at"] > job_ended for r in shop.seen)
    assert mail_sent_at is not None and all(r["at"] > as_utc(mail_sent_at).timestamp() for r in shop.seen)
    # Three failures, then one acceptance; after the reset no more requests: once per acceptance.
    assert [r["answer"] for r in shop.seen] == [500, 500, 500, 200]
    assert refused == 1  # the reset's run asked, and the duplicate event ID was refused
    # The same event each time, each signed afresh with both secrets; each verifies with either.
    assert len({r["body"] for r in shop.seen}) == 1
    for r in shop.seen:
        assert verify(r["body"], r["signature"], SECRET)["id"] == verify(r["body"], r["signature"], PREVIOUS)["id"]
        assert SECRET not in r["signature"] and PREVIOUS not in r["signature"]
    event = json.loads(shop.seen[0]["body"])
    assert event["id"] == f"evt-{job_id}-r1-completed" and event["type"] == "job.completed"
    assert abs(event["created"] - job_ended) < 30 and event["created_at"].startswith(
        time.strftime("%Y-", time.gmtime())
    )
    assert event["data"]["job"] == job  # the job as GET /v1/jobs/{id} shows it
    assert event["data"]["download_url"] == job["download_url"] is not None
    assert event["data"]["download_expires_at"] == job["download_expires_at"] is not None
    assert "ana@example.com" not in shop.seen[0]["body"].decode()
    assert [text_of(m).count(job["download_url"]) for m in stack.mailbox.messages] == [1]  # one email, no notice
    # The worker's log tells each attempt by event id, and never the secrets or the customer's address.
    assert caplog.text.count(f"event {event['id']} attempt") == 3 and f"event {event['id']} delivered" in caplog.text
    ours = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name != "mail.log")  # not the SMTP sink
    assert SECRET not in ours and PREVIOUS not in ours and "ana@example.com" not in ours, [
        line for line in ours.splitlines() if SECRET in line or PREVIOUS in line or "ana@" in line
    ]


async def test_without_a_shop_url_nothing_is_started(dev_env, stack_factory, faults, receiver):
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        job_id = await post_order(stack, "ev-none")
        handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        assert (await finished_run(handle)).status == "completed"
        started = await event_count(handle, EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
        history = (await handle.fetch_history()).to_json()
    assert started == 0 and "shop-events" not in history  # not even the patch marker: the history is as before
    assert stack.settings.storefront_webhook_url is None


# --- on the time-skipping server ---------------------------------------------------------------------


async def test_a_shop_that_never_accepts_is_given_up_after_three_days_and_the_admin_told(
    time_skipping_env, stack_factory, faults, receiver, mailbox
):
    faults(refuse_with="unsupported image format")  # the job fails and is refunded: job.failed
    shop = receiver(fail_first=10**6)
    stack = events_settings(stack_factory, time_skipping_env, shop)
    env = time_skipping_env
    async with create_worker(env.client, stack.settings):
        job_id = await post_order(stack, "ev-give-up")
        await env.client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
        state = await env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}").result()
        delivery = env.client.get_workflow_handle_for(ShopEventWorkflow.run, event_id(job_id, 1, "job.failed"))
        began = time.monotonic()
        assert await delivery.result() is False
        took = time.monotonic() - began
        notices = await eventually(lambda: [m for m in mailbox.messages if "did not accept" in str(m["Subject"])])
        described = await delivery.describe()

    assert state.status == "failed"
    # 0.5 s doubling to an hour apart, for three days: about 80 tries, then the admin's notice.
    tries = len(shop.seen)
    assert 70 <= tries <= 90, tries
    span = described.close_time - described.start_time
    assert GIVE_UP_AFTER * 0.98 <= span <= GIVE_UP_AFTER * 1.02, span
    event = json.loads(shop.seen[0]["body"])
    assert event["type"] == "job.failed" and event["data"]["reason"]["code"] == "unsupported_format"
    assert event["data"]["refund"]["amount_cents"] == 1299 and event["data"]["job"]["status"] == "failed"
    notice = notices
    assert len(notice) == 1 and str(notice[0]["To"]) == stack.settings.admin_email
    assert "no 2xx answer within 3 days" in text_of(notice[0]) and shop.url not in text_of(notice[0])
    print(f"\nshop events: {tries} tries over {span}, {took:.1f} s of real time")


async def test_a_shop_url_on_a_private_address_is_refused_and_the_admin_told(
    time_skipping_env, stack_factory, faults, receiver, mailbox
):
    faults(delay_seconds=0.2)
    shop = receiver()
    port = shop.url.split(":")[2].split("/")[0]
    stack = stack_factory(  # the receiver is on loopback, its port allowed, its host not on SMI_FETCH_ALLOW_HOSTS
        time_skipping_env,
        storefront_webhook_url=shop.url,
        storefront_webhook_secret=SECRET,
        fetch_allowed_ports=f"80,443,{port}",
    )
    env = time_skipping_env
    async with create_worker(env.client, stack.settings):
        job_id = await post_order(stack, "ev-private")
        assert (await env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}").result()).status == (
            "completed"
        )
        delivery = env.client.get_workflow_handle_for(ShopEventWorkflow.run, event_id(job_id, 1, "job.completed"))
        assert await delivery.result() is False
        notice = await eventually(lambda: [m for m in mailbox.messages if "did not accept" in str(m["Subject"])])

    assert shop.seen == []  # not one packet to it
    assert len(notice) == 1 and "resolves to a loopback address" in text_of(notice[0])


async def test_review_refund_and_a_finished_jobs_refund_each_send_their_event(
    time_skipping_env, stack_factory, faults, receiver, mailbox
):
    """job.manual_review (no result within the processing timeout), then job.failed (the admin refunds it
    there); and for a completed job refunded later by an admin, job.completed then job.refunded. In real time:
    time skipping would race past a job waiting for its admin."""
    env = time_skipping_env
    shop = receiver()
    stack = events_settings(stack_factory, env, shop, processing_timeout_seconds=2, poll_initial_delay_seconds=0.5)
    admin = stack.client(ADMIN_KEY)
    async with create_worker(env.client, stack.settings):
        faults(delay_seconds=0.2)
        done_id = await post_order(stack, "ev-done")
        await wait_for_status(stack.client(), done_id, {"completed"})
        faults(never_finish=True)
        review_id = await post_order(stack, "ev-review")
        await wait_for_status(stack.client(), review_id, {"manual_review"})
        for job_id in (review_id, done_id):
            reply = await asyncio.to_thread(admin.post, f"/v1/admin/jobs/{job_id}/refund")
            assert reply.status_code in (200, 202), reply.text
        await env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{review_id}").result()
        await env.client.get_workflow_handle(f"refund-{done_id}").result()
        expected = {
            event_id(done_id, 1, "job.completed"),
            event_id(review_id, 1, "job.manual_review", 1),
            event_id(review_id, 1, "job.failed"),
            event_id(done_id, None, "job.refunded"),
        }
        for name in expected:
            assert await env.client.get_workflow_handle(name).result() is True
        jobs = {job_id: stack.client().get(f"/v1/jobs/{job_id}").json() for job_id in (done_id, review_id)}

    events = {e["id"]: e for e in (verify(r["body"], r["signature"], SECRET) for r in shop.seen)}
    assert set(events) == expected and len(shop.seen) == 4  # each once, each verified
    review = events[event_id(review_id, 1, "job.manual_review", 1)]
    assert review["type"] == "job.manual_review" and review["data"]["reason"]["code"] == "timeout"
    assert review["data"]["job"]["status"] == "manual_review"
    failed = events[event_id(review_id, 1, "job.failed")]
    assert (
        failed["type"] == "job.failed" and failed["data"]["reason"]["code"] == "timeout"
    )  # why the job failed; the refund says who
    assert failed["data"]["refund"] == jobs[review_id]["refund"] is not None
    assert failed["data"]["job"] == jobs[review_id]
    refunded = events[event_id(done_id, None, "job.refunded")]
    assert refunded["type"] == "job.refunded" and refunded["data"]["refund"]["reason"] == "admin"
    assert refunded["data"]["refund"] == jobs[done_id]["refund"] is not None
    assert events[event_id(done_id, 1, "job.completed")]["data"]["job"]["refund"] is None  # the job as it was then


def test_the_module_is_standard_library_only():
    """A shop copies smi/shop_webhooks.py alone: it imports nothing of ours, nothing from PyPI."""
    source = open(shop_webhooks.__file__).read()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "hashlib", "hmac", "json", "time", "collections", "typing"}, imports
