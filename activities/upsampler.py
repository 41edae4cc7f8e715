"""Upsampler side effects: submitting a job (which spends credits) and asking its status."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, desc, func, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi import signing, telemetry
from smi.db import Job, Submission, SubmitIntent, UpsamplerCall, as_utc, utcnow
from smi.settings import Settings
from smi.storage import S3Storage, compressed_name, job_key, open_storage
from smi.upsampler import UpsamplerClient, UpsamplerError, UpsamplerJob, failure_kind
from smi.vocabulary import AdoptRequest, ErrorCode, JobStatus, SubmitRequest, UpsamplerResult

HEARTBEAT_SECONDS = 2.0  # well inside the submit's heartbeat timeout (workflows/upscale.py)


def as_application_error(exc: UpsamplerError) -> ApplicationError:
    """Typed client errors become error types the workflow's retry policies tell apart."""
    delay = timedelta(seconds=exc.retry_after) if exc.retry_after else None
    return ApplicationError(str(exc), type=exc.kind, non_retryable=not exc.retryable, next_retry_delay=delay)


def original_name(request: SubmitRequest) -> str:
    """The name the signed file URL carries: the job, plus the compressed variant if any."""
    return f"{request.job_id}-{request.variant}" if request.variant else request.job_id


def _result(job: UpsamplerJob) -> UpsamplerResult:
    kind = failure_kind(job.error) if job.status == JobStatus.FAILED else None
    return UpsamplerResult(
        job.id, job.status, job.credit_cost, job.image_url, job.compressed_image_url, job.error, kind
    )


async def _heartbeat_while_waiting() -> None:
    """Heartbeats while a request is out: a worker that dies mid-submit is noticed by the submit's heartbeat
    timeout (10 s) instead of its start-to-close timeout (a minute). Ignored where no heartbeat timeout is set."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_SECONDS)


def _submission(job_id: str, attempt: int, job: UpsamplerJob) -> Submission:
    error = (job.error or "refused") if job.status == JobStatus.FAILED else None
    return Submission(
        job_id=job_id,
        attempt=attempt,
        upsampler_id=job.id,
        credit_cost=job.credit_cost,
        created_at=utcnow(),
        error=error,
    )


class UpsamplerActivities:
    def __init__(self, settings: Settings, engine: Engine, client: UpsamplerClient):
        self.settings = settings
        self.engine = engine
        self.client = client
        self.storage = open_storage(settings)

    def _original_url(self, request: SubmitRequest) -> str:
        """A temporary URL of the image Upsampler is to fetch: presigned by the bucket (s3), else ours, signed."""
        ttl = self.settings.original_url_ttl_seconds
        if isinstance(self.storage, S3Storage):
            key = (
                job_key(request.job_id, compressed_name(int(request.variant.removeprefix("q"))))
                if request.variant
                else self.storage.original(request.job_id)
            )
            if key is None:
                raise ApplicationError("the original is gone", type=ErrorCode.FETCH_FAILED, non_retryable=True)
            return self.storage.presigned_get(key, ttl)
        secret = self.settings.secret("webhook_secret")
        expires = int(time.time()) + ttl
        return signing.signed_file_url(
            self.settings.public_base_url, secret, "originals", original_name(request), expires
        )

    @activity.defn
    async def submit_upscale(self, request: SubmitRequest) -> UpsamplerResult:
        """2. Hand Upsampler a temporary signed URL of the original and this job's signed webhook.

        Recorded by (job, attempt) before success is reported: a retried activity finds the
        submission and does not pay for a second one. Before the POST an intent is written, whose
        nonce goes into the webhook URL: a retry that finds an intent without a reply knows that
        Upsampler may hold a job, and raises submission_unknown instead of paying for another.
        """
        known = await asyncio.to_thread(self._known_or_intent, request)
        if isinstance(known, Submission):  # a retry or a reset: the answer Upsampler gave the first time
            if known.error is not None:
                return UpsamplerResult(
                    known.upsampler_id, JobStatus.FAILED, error=known.error, error_kind=failure_kind(known.error)
                )
            return UpsamplerResult(known.upsampler_id, JobStatus.QUEUED, known.credit_cost)
        nonce, call = known
        secret = self.settings.secret("webhook_secret")
        webhook = signing.webhook_url(self.settings.public_base_url, secret, request.job_id, nonce)
        image_url = await asyncio.to_thread(self._original_url, request)
        reply_lost = False

        async def post() -> UpsamplerJob:
            nonlocal reply_lost
            try:
                return await self.client.submit(image_url, request.scale_factor, webhook)
            except UpsamplerError as exc:
                reply_lost = exc.reply_lost
                raise

        try:
            job = await self._call("submit", post, call)
        except ApplicationError:
            if not reply_lost:  # Upsampler answered with an error, or nothing was sent: no job
                await asyncio.to_thread(self._intent_outcome, nonce, "refused")
            raise
        await asyncio.to_thread(self._record_submission, request, nonce, job)
        activity.logger.info("submitted to Upsampler: %s %s", job.id, job.status)
        return _result(job)

    def _known_or_intent(self, request: SubmitRequest) -> Submission | tuple[str, int]:
        """The submission recorded for this attempt; else a new intent to submit it and its request counted
        against the hourly quota, in one transaction: the intent's nonce and the request's row."""
        with Session(self.engine) as session:
            known = session.exec(
                select(Submission).where(Submission.job_id == request.job_id, Submission.attempt == request.attempt)
            ).first()
            if known is not None:
                return known
            intents = session.exec(
                select(SubmitIntent)
                .where(SubmitIntent.job_id == request.job_id, SubmitIntent.attempt <= request.attempt)
                .order_by(desc(SubmitIntent.created_at))
            ).all()
            for intent in intents:
                if intent.outcome is not None:
                    continue
                if intent.attempt == request.attempt:
                    raise ApplicationError(
                        f"the reply to submit attempt {request.attempt} was lost: Upsampler may hold a job",
                        type=ErrorCode.SUBMISSION_UNKNOWN,
                        non_retryable=True,
                    )
                intent.outcome = "abandoned"  # the workflow stopped waiting for its webhook
                session.add(intent)
            call = self._count_call(session, "submit")
            nonce = secrets.token_hex(16)
            session.add(SubmitIntent(nonce=nonce, job_id=request.job_id, attempt=request.attempt, created_at=utcnow()))
            session.flush()  # the row's id, without reading it back after the commit
            call_id = call.id
            session.commit()
            assert call_id is not None
            return nonce, call_id

    def _intent_outcome(self, nonce: str, outcome: str) -> None:
        with Session(self.engine) as session:
            intent = session.get_one(SubmitIntent, nonce)
            intent.outcome = outcome
            session.add(intent)
            session.commit()

    def _record_submission(self, request: SubmitRequest, nonce: str, job: UpsamplerJob) -> None:
        """Upsampler's reply, with the intent's outcome and, when asked, the job's record: one transaction."""
        with Session(self.engine) as session:
            intent = session.get_one(SubmitIntent, nonce)
            intent.outcome = "accepted"
            session.add(intent)
            session.add(_submission(request.job_id, request.attempt, job))
            if request.expected_seconds is not None and job.status != JobStatus.FAILED:
                record = session.get_one(Job, request.job_id)
                record.upsampler_id = job.id
                record.estimated_completion = utcnow() + timedelta(seconds=request.expected_seconds)
                session.add(record)
            try:
                session.commit()
            except IntegrityError:  # a concurrent duplicate attempt recorded another reply first: ours is an orphan
                session.rollback()
                self._intent_outcome(nonce, "abandoned")

    @activity.defn
    async def adopt_submission(self, request: AdoptRequest) -> UpsamplerResult:
        """The job a webhook named (by its URL's nonce) for a submit whose reply was lost: once the status
        endpoint confirms it, it is that attempt's submission. No second job is paid for."""
        job = await self._call("status", lambda: self.client.status(request.upsampler_id))
        with Session(self.engine) as session:
            for intent in session.exec(
                select(SubmitIntent).where(
                    SubmitIntent.job_id == request.job_id,
                    SubmitIntent.attempt == request.attempt,
                    col(SubmitIntent.outcome).is_(None),
                )
            ).all():
                intent.outcome = "adopted"
                session.add(intent)
            session.add(_submission(request.job_id, request.attempt, job))
            record = session.get_one(Job, request.job_id)
            record.upsampler_id = job.id
            session.add(record)
            try:
                session.commit()
            except IntegrityError:  # a retry of this activity: adopted already
                session.rollback()
        activity.logger.info("adopted Upsampler job %s after a lost submit reply", job.id)
        return _result(job)

    @activity.defn
    async def check_status(self, upsampler_id: str) -> UpsamplerResult:
        """3. Ask Upsampler how the job stands: the truth behind every webhook."""
        return _result(await self._call("status", lambda: self.client.status(upsampler_id)))

    async def _call(self, kind: str, request, call: int | None = None):
        """One request within the hourly quota, counted for all workers in the database (`call`: its row,
        when the caller counted it in a transaction of its own).

        The per-minute quota is the task queue's rate limit (see worker.py); the hour is
        kept here because a task queue knows only a per-second rate.
        """
        if call is None:
            call = await asyncio.to_thread(self._count_call_alone, kind)
        outcome = "ok"
        beating = asyncio.create_task(_heartbeat_while_waiting())
        try:
            return await request()
        except UpsamplerError as exc:
            outcome = exc.kind
            await asyncio.to_thread(self._call_outcome, call, outcome)
            raise as_application_error(exc) from None
        finally:
            beating.cancel()
            telemetry.count(
                "smi_upsampler_requests", 1, "Requests to Upsampler by kind and outcome.", kind=kind, outcome=outcome
            )

    def _count_call(self, session: Session, kind: str) -> UpsamplerCall:
        """The request's row (outcome "ok" until it fails), added when the last hour leaves room for it."""
        hour_ago = utcnow() - timedelta(hours=1)
        in_window = col(UpsamplerCall.at) >= hour_ago
        used = session.exec(select(func.count()).select_from(UpsamplerCall).where(in_window)).one()
        if used >= self.settings.upsampler_requests_per_hour:  # a count: the hour's rows are not fetched
            oldest = session.exec(select(func.min(UpsamplerCall.at)).where(in_window)).one()
            wait = (as_utc(oldest) - hour_ago if oldest is not None else timedelta(0)) + timedelta(seconds=1)
            raise ApplicationError(
                "Upsampler's hourly quota is used up", type=ErrorCode.RATE_LIMITED, next_retry_delay=wait
            )
        call = UpsamplerCall(at=utcnow(), kind=kind, outcome="ok")
        session.add(call)
        return call

    def _count_call_alone(self, kind: str) -> int:
        with Session(self.engine) as session:
            call = self._count_call(session, kind)
            session.flush()  # the row's id, without reading it back after the commit
            call_id = call.id
            session.commit()
            assert call_id is not None
            return call_id

    def _call_outcome(self, call: int, outcome: str) -> None:
        with Session(self.engine) as session:
            row = session.get_one(UpsamplerCall, call)
            row.outcome = outcome
            session.add(row)
            session.commit()
