"""Activities with logic of their own, one call at a time: temporalio's ActivityEnvironment, a real
database (SQLite in the test's folder, or PostgreSQL under `make test-postgres`) and real files.
Nothing is fetched: every URL points at a closed loopback port, and the Upsampler client is a
stand-in that records its calls, so a test fails if an activity reaches out when it must not."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

import pytest
from sqlmodel import Session, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentsActivities
from activities.storage import StorageActivities
from activities.upsampler import UpsamplerActivities
from devstack import WEBHOOK_SECRET, make_settings, png_bytes
from smi import imaging, signing, usage
from smi.db import (
    BudgetRelease,
    DownloadToken,
    Job,
    JobEvent,
    LedgerEntry,
    Refund,
    SentMail,
    Submission,
    UpsamplerCall,
    make_engine,
    utcnow,
)
from smi.migrations import migrate
from smi.upsampler import UpsamplerInvalidInput, UpsamplerJob, UpsamplerRateLimited
from smi.vocabulary import (
    BudgetAlertInfo,
    CheckAndStoreRequest,
    CompressRequest,
    CostRecord,
    DownloadRequest,
    EmailRequest,
    EstimateRecord,
    FetchRequest,
    JobUpdate,
    RefundOutcome,
    RefundRequest,
    RetentionRequest,
    StoredImage,
    StoreRequest,
    SubmitRequest,
    TokenRequest,
    UpsamplerResult,
    ValidateRequest,
)
from tests.helpers import Site

pytestmark = pytest.mark.fast

CLOSED = "http://127.0.0.1:9"  # nothing listens: a request there fails


@pytest.fixture
def make_site(tmp_path):
    """Settings and a migrated database for one test; `make_site(**settings)`."""
    engines = []

    def build(**overrides) -> Site:
        settings = make_settings(
            tmp_path, temporal_address="127.0.0.1:9", api_port=9, smtp_port=9, emulator_url=CLOSED, **overrides
        )
        engine = make_engine(settings.database_url)
        migrate(engine)
        engines.append(engine)
        return Site(settings.public_base_url, engine, settings, app=None)

    yield build
    for engine in engines:
        engine.dispose()


@pytest.fixture
def site(make_site) -> Site:
    return make_site()


def rows(site: Site, model, *where) -> list:
    with Session(site.engine) as session:
        return list(session.exec(select(model).where(*where)).all())


def job(site: Site, job_id: str) -> Job:
    with Session(site.engine) as session:
        return session.get(Job, job_id)


def book_spend(site: Site, cost_usd: float) -> None:
    with Session(site.engine) as session:
        session.add(
            LedgerEntry(job_id="other", purpose=f"upscale:{uuid.uuid4().hex}", cost_usd=cost_usd, created_at=utcnow())
        )
        session.commit()


def failure(call) -> ApplicationError:
    with pytest.raises(ApplicationError) as raised:
        call()
    return raised.value


# --- LedgerActivities -----------------------------------------------------------------------------


def test_record_cost_books_each_submission_once_and_the_job_costs_their_sum(site):
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("processing")

    assert env.run(ledger.record_cost, CostRecord(job_id, "up-1", 2.0, 0.04)) == 0.08
    assert env.run(ledger.record_cost, CostRecord(job_id, "up-1", 2.0, 0.04)) == 0.08  # a retry: booked already
    assert env.run(ledger.record_cost, CostRecord(job_id, "up-2", 1.5, 0.04)) == 0.14

    booked = rows(site, LedgerEntry, LedgerEntry.job_id == job_id)
    assert sorted((row.purpose, row.credits, row.cost_usd) for row in booked) == [
        ("upscale:up-1", 2.0, 0.08),
        ("upscale:up-2", 1.5, 0.06),
    ]
    assert (job(site, job_id).cost_credits, job(site, job_id).cost_usd) == (3.5, 0.14)


def test_record_estimate_books_once(site):
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("queued")

    # 2000x1500 x4 = 48 MP at 0.25 credits each; the second call (a retry) changes nothing.
    assert env.run(ledger.record_estimate, EstimateRecord(job_id, 2000, 1500, 4, 0.25, 0.04)) == 12.0
    env.run(ledger.record_estimate, EstimateRecord(job_id, 4000, 3000, 4, 0.25, 0.04))
    assert [(r.purpose, r.credits, r.cost_usd) for r in rows(site, LedgerEntry, LedgerEntry.job_id == job_id)] == [
        ("estimate", 12.0, 0.48)
    ]


def test_issue_download_token_one_link_per_purpose_and_the_newest_replaces_the_older(site):
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("completed")
    before = utcnow()

    first = env.run(ledger.issue_download_token, TokenRequest(job_id, "run:1", 24.0))
    again = env.run(ledger.issue_download_token, TokenRequest(job_id, "run:1", 48.0))  # a retry of the same purpose
    assert first.generation == 1 and again == first
    assert timedelta(hours=24) <= first.expires_at - before < timedelta(hours=24, minutes=1)

    resent = env.run(ledger.issue_download_token, TokenRequest(job_id, "resend:r1", 2.0))
    assert resent.generation == 2
    tokens = {t.generation: t for t in rows(site, DownloadToken, DownloadToken.job_id == job_id)}
    assert sorted(tokens) == [1, 2]
    assert tokens[1].revoked and not tokens[2].revoked
    # Only the hash is kept: of the token the email activity derives again from the secret.
    assert tokens[2].token_sha256 == signing.token_sha256(signing.download_token(WEBHOOK_SECRET, job_id, 2))


def test_update_job_writes_what_is_given_and_an_event_per_change(site):
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("queued")

    env.run(ledger.update_job, JobUpdate(job_id, "manual_review", error_code="timeout", error_message="no result"))
    env.run(ledger.update_job, JobUpdate(job_id, "manual_review"))  # a retry: no second event, the error stays
    assert (job(site, job_id).error_code, job(site, job_id).error_message) == ("timeout", "no result")
    output = StoredImage("/data/upscaled_256x192.png", 256, 192, "png", 4096, "ab" * 32)
    env.run(
        ledger.update_job,
        JobUpdate(job_id, "completed", output=output, upsampler_id="up-9", error_code="", error_message=""),
    )

    done = job(site, job_id)
    assert done.status == "completed" and done.error_code is None and done.error_message is None
    assert (done.output_width, done.output_height, done.result_path, done.upsampler_id) == (
        256,
        192,
        "/data/upscaled_256x192.png",
        "up-9",
    )
    events = rows(site, JobEvent, JobEvent.job_id == job_id)
    assert [e.status for e in sorted(events, key=lambda e: e.id)] == [
        "received",
        "queued",
        "manual_review",
        "completed",
    ]
    with pytest.raises(ValueError, match="has no record"):
        env.run(ledger.update_job, JobUpdate("no-such-job", "queued"))


def test_check_budget_gives_each_crossed_threshold_to_one_workflow_once_per_period(make_site):
    site = make_site(daily_budget_usd=10.0)
    ledger = LedgerActivities(site.settings, site.engine)
    first, second = ActivityEnvironment(), ActivityEnvironment()
    first.info = dataclasses.replace(first.info, workflow_id="upscale-a")
    second.info = dataclasses.replace(second.info, workflow_id="upscale-b")
    day = f"day:{usage.period_key(utcnow(), 'day')}"

    book_spend(site, 7.0)
    assert first.run(ledger.check_budget, "a") == []  # 70 %
    book_spend(site, 1.5)
    assert first.run(ledger.check_budget, "a") == [BudgetAlertInfo(f"{day}:80", day, 80, 8.5, 10.0)]
    assert first.run(ledger.check_budget, "a") == [BudgetAlertInfo(f"{day}:80", day, 80, 8.5, 10.0)]  # a retry
    assert second.run(ledger.check_budget, "b") == []  # the 80 % alert is a's
    book_spend(site, 2.0)
    assert [alert.threshold for alert in second.run(ledger.check_budget, "b")] == [100]


def test_budget_gate_closes_on_a_spent_budget_until_it_is_released(make_site):
    site = make_site(daily_budget_usd=10.0)
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    unlimited = LedgerActivities(site.settings.model_copy(update={"daily_budget_usd": None}), site.engine)

    book_spend(site, 9.99)
    assert env.run(ledger.budget_gate, "j").open
    book_spend(site, 0.01)
    gate = env.run(ledger.budget_gate, "j")
    assert not gate.open and 0 < gate.recheck_seconds <= 300
    assert env.run(unlimited.budget_gate, "j").open  # no budget, no gate
    with Session(site.engine) as session:
        session.add(BudgetRelease(period=f"day:{usage.period_key(utcnow(), 'day')}", created_at=utcnow()))
        session.commit()
    assert env.run(ledger.budget_gate, "j").open


def test_delete_expired_tokens_only_of_finished_or_unknown_jobs(make_site):
    site = make_site(retention_grace_hours=1.0)
    ledger, env = LedgerActivities(site.settings, site.engine), ActivityEnvironment()
    done, running = site.add_job("completed"), site.add_job("manual_review")
    now = utcnow()
    with Session(site.engine) as session:
        for job_id, generation, expired_hours_ago in [(done, 1, 5), (done, 2, 0.5), (running, 1, 5), ("gone", 1, 5)]:
            session.add(
                DownloadToken(
                    token_sha256=f"{job_id}-{generation}",
                    job_id=job_id,
                    purpose=f"p{generation}",
                    generation=generation,
                    expires_at=now - timedelta(hours=expired_hours_ago),
                    created_at=now - timedelta(days=2),
                )
            )
        session.commit()

    assert env.run(ledger.delete_expired_tokens, RetentionRequest(as_of=now)) == 2
    assert {t.token_sha256 for t in rows(site, DownloadToken)} == {f"{done}-2", f"{running}-1"}


# --- UpsamplerActivities ----------------------------------------------------------------------------


class FakeUpsampler:
    """The client's two calls, answered from a list (a job or an exception to raise); each call recorded."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple] = []

    async def _answer(self, *call):
        self.calls.append(call)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def submit(self, image_url: str, upscale_factor: int, webhook_url: str | None) -> UpsamplerJob:
        return await self._answer("submit", image_url, upscale_factor, webhook_url)

    async def status(self, upsampler_id: str) -> UpsamplerJob:
        return await self._answer("status", upsampler_id)


async def test_submit_upscale_answers_a_recorded_submission_without_calling_upsampler(site):
    client = FakeUpsampler()  # no answers: any call fails the test
    calls, env = UpsamplerActivities(site.settings, site.engine, client), ActivityEnvironment()
    with Session(site.engine) as session:
        session.add(Submission(job_id="j", attempt=1, upsampler_id="up-1", credit_cost=1.5, created_at=utcnow()))
        session.add(
            Submission(
                job_id="j", attempt=2, upsampler_id="up-2", error="Image too large for processing", created_at=utcnow()
            )
        )
        session.commit()

    assert await env.run(calls.submit_upscale, SubmitRequest("j", 1, 4)) == UpsamplerResult("up-1", "queued", 1.5)
    refused = await env.run(calls.submit_upscale, SubmitRequest("j", 2, 4))
    assert (refused.upsampler_id, refused.status, refused.error_kind) == ("up-2", "failed", "too_large")
    assert client.calls == [] and rows(site, UpsamplerCall) == []


async def test_submit_upscale_records_the_submission_so_a_retry_does_not_pay_twice(site):
    client = FakeUpsampler(UpsamplerJob("up-7", "queued", 3.0))
    calls, env = UpsamplerActivities(site.settings, site.engine, client), ActivityEnvironment()

    first = await env.run(calls.submit_upscale, SubmitRequest("j", 3, 4, "q70"))
    retried = await env.run(calls.submit_upscale, SubmitRequest("j", 3, 4, "q70"))

    assert first == retried == UpsamplerResult("up-7", "queued", 3.0)
    assert len(client.calls) == 1
    _, image_url, factor, webhook_url = client.calls[0]
    assert image_url.startswith(f"{site.settings.public_base_url}/files/originals/j-q70?") and factor == 4
    assert webhook_url.startswith(f"{site.settings.public_base_url}/smi-webhook/upsampler/?job=j&")
    assert [(s.attempt, s.upsampler_id, s.credit_cost) for s in rows(site, Submission)] == [(3, "up-7", 3.0)]
    assert [(c.kind, c.outcome) for c in rows(site, UpsamplerCall)] == [("submit", "ok")]


async def test_upsampler_errors_become_typed_application_errors_and_are_counted(site):
    client = FakeUpsampler(UpsamplerInvalidInput("bad image URL"), UpsamplerRateLimited("slow down", retry_after=7))
    calls, env = UpsamplerActivities(site.settings, site.engine, client), ActivityEnvironment()

    with pytest.raises(ApplicationError) as invalid:
        await env.run(calls.submit_upscale, SubmitRequest("j", 1, 4))
    with pytest.raises(ApplicationError) as limited:
        await env.run(calls.check_status, "up-1")

    assert (invalid.value.type, invalid.value.non_retryable) == ("upsampler_invalid_input", True)
    assert (limited.value.type, limited.value.non_retryable) == ("rate_limited", False)
    assert limited.value.next_retry_delay == timedelta(seconds=7)
    assert rows(site, Submission) == []  # nothing was accepted, nothing recorded
    assert sorted((c.kind, c.outcome) for c in rows(site, UpsamplerCall)) == [
        ("status", "rate_limited"),
        ("submit", "upsampler_invalid_input"),
    ]


async def test_the_hourly_quota_stops_a_call_before_it_is_made(make_site):
    site = make_site(upsampler_requests_per_hour=2)
    client = FakeUpsampler()
    calls, env = UpsamplerActivities(site.settings, site.engine, client), ActivityEnvironment()
    with Session(site.engine) as session:
        for minutes_ago in (50, 10):
            session.add(UpsamplerCall(at=utcnow() - timedelta(minutes=minutes_ago), kind="status", outcome="ok"))
        session.commit()

    with pytest.raises(ApplicationError) as limited:
        await env.run(calls.check_status, "up-1")

    assert limited.value.type == "rate_limited" and not limited.value.non_retryable
    # Retried once the older call is an hour old: in about 10 minutes.
    assert timedelta(minutes=9) < limited.value.next_retry_delay <= timedelta(minutes=10, seconds=1)
    assert client.calls == []


# --- PaymentsActivities, NotifyActivities -----------------------------------------------------------


def test_refund_without_an_adapter_is_owed_and_booked_once(site):
    payments, env = PaymentsActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("failed", amount_paid_cents=1299, currency="USD")
    payouts, pay_back = [], payments._pay_back
    payments._pay_back = lambda row, job: payouts.append(job.job_id) or pay_back(row, job)

    assert env.run(payments.refund, RefundRequest(job_id, "unsupported_format")) == RefundOutcome(
        "owed", 1299, "USD", "none"
    )
    assert env.run(payments.refund, RefundRequest(job_id, "admin_refund")) == RefundOutcome("owed", 1299, "USD", "none")

    assert payouts == [job_id]  # the second run finds the refund done: no second payout
    assert [(r.status, r.reason) for r in rows(site, Refund)] == [("owed", "unsupported_format")]
    refunds = rows(site, LedgerEntry, LedgerEntry.job_id == job_id, LedgerEntry.purpose == "refund")
    assert [r.revenue_usd for r in refunds] == [-12.99]


def test_refund_of_nothing_paid_is_done_and_of_an_unknown_job_fails_for_good(site):
    payments, env = PaymentsActivities(site.settings, site.engine), ActivityEnvironment()
    free = site.add_job("failed", amount_paid_cents=0)

    assert env.run(payments.refund, RefundRequest(free, "fetch_failed")).status == "refunded"
    unknown = failure(lambda: env.run(payments.refund, RefundRequest("no-such-job", "fetch_failed")))
    assert (unknown.type, unknown.non_retryable) == ("refund_failed", True)


async def test_an_email_sent_before_is_not_sent_again(site):
    notify, env = NotifyActivities(site.settings, site.engine), ActivityEnvironment()
    job_id = site.add_job("completed")
    with Session(site.engine) as session:
        session.add(
            SentMail(job_id=job_id, purpose="completed:1", message_id="<m>", status="sent", created_at=utcnow())
        )
        session.commit()

    # The SMTP port is closed: sending would fail the test.
    assert await env.run(notify.send_email, EmailRequest(job_id, "completed", 1)) is False
    with pytest.raises(ValueError, match="has no record"):
        await env.run(notify.send_email, EmailRequest("no-such-job", "completed", 1))


# --- StorageActivities ------------------------------------------------------------------------------


def put_original(site: Site, job_id: str, width: int = 64, height: int = 48) -> None:
    folder = site.settings.storage_dir / "jobs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "original.png").write_bytes(png_bytes(width, height))


async def test_fetch_original_again_answers_from_the_stored_original(site):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    put_original(site, "j")

    stored = await env.run(storage.fetch_original, FetchRequest("j", f"{CLOSED}/photo.png"))

    assert (stored.width, stored.height, stored.format) == (64, 48, "png")
    assert stored.path.endswith("jobs/j/original.png") and len(stored.sha256) == 64


def test_compress_original_makes_each_quality_once_and_fails_without_an_original(site):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    gone = failure(lambda: env.run(storage.compress_original, CompressRequest("j", 70)))
    assert (gone.type, gone.non_retryable) == ("fetch_failed", True)

    put_original(site, "j", 320, 240)
    copy = env.run(storage.compress_original, CompressRequest("j", 70))
    made = (site.settings.storage_dir / "jobs" / "j" / copy.path.rsplit("/", 1)[1]).stat().st_mtime_ns
    again = env.run(storage.compress_original, CompressRequest("j", 70))

    assert (copy.width, copy.height, copy.format) == (320, 240, "jpg") and again == copy
    assert (site.settings.storage_dir / "jobs" / "j" / copy.path.rsplit("/", 1)[1]).stat().st_mtime_ns == made


def test_validate_result_wants_input_times_scale(site, tmp_path):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    result = tmp_path / "result-1"
    result.write_bytes(png_bytes(256, 192))

    assert env.run(storage.validate_result, ValidateRequest("j", str(result), 256, 192)) == imaging.ImageInfo(
        256, 192, "png"
    )
    wrong = failure(lambda: env.run(storage.validate_result, ValidateRequest("j", str(result), 512, 384)))
    assert (wrong.type, wrong.non_retryable) == ("invalid_result", True) and "expected 512x384" in wrong.message


def test_store_result_converts_and_a_retry_finds_it_in_place(site):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    tmp = site.settings.storage_dir / "jobs" / "j" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "result-1").write_bytes(png_bytes(256, 192))

    stored = env.run(storage.store_result, StoreRequest("j", str(tmp / "result-1"), "jpg"))
    retried = env.run(storage.store_result, StoreRequest("j", str(tmp / "result-1"), "jpg"))  # after the move

    assert stored.path.endswith("jobs/j/upscaled_256x192.jpg") and stored.format == "jpg"
    assert retried == stored and not (tmp / "result-1").exists()
    lost = failure(lambda: env.run(storage.store_result, StoreRequest("k", str(tmp / "result-9"), "png")))
    assert lost.type == "invalid_result"


def test_check_and_store_validates_then_places_and_a_wrong_result_stays_unplaced(site):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    tmp = site.settings.storage_dir / "jobs" / "j" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "result-1").write_bytes(png_bytes(256, 192))

    wrong = failure(
        lambda: env.run(storage.check_and_store, CheckAndStoreRequest("j", str(tmp / "result-1"), 512, 384, "auto"))
    )
    assert (wrong.type, wrong.non_retryable) == ("invalid_result", True) and "expected 512x384" in wrong.message
    assert (tmp / "result-1").exists() and not list(tmp.parent.glob("upscaled_*"))  # nothing placed

    request = CheckAndStoreRequest("j", str(tmp / "result-1"), 256, 192, "png")
    stored = env.run(storage.check_and_store, request)
    retried = env.run(storage.check_and_store, request)  # after the move
    assert stored.path.endswith("jobs/j/upscaled_256x192.png") and (stored.width, stored.height) == (256, 192)
    assert retried == stored and not (tmp / "result-1").exists()


async def test_download_result_again_answers_from_the_finished_file_and_cleanup_removes_tmp(site):
    storage, env = StorageActivities(site.settings), ActivityEnvironment()
    tmp = site.settings.storage_dir / "jobs" / "j" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "result-2").write_bytes(b"x" * 1000)
    (tmp / "result-3.part").write_bytes(b"y")

    done = await env.run(storage.download_result, DownloadRequest("j", f"{CLOSED}/result.png", 2))

    assert (done.path, done.bytes) == (str(tmp / "result-2"), 1000)
    assert env.run(storage.cleanup, "j") == 2 and not tmp.exists()
    assert env.run(storage.cleanup, "j") == 0
