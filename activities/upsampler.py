"""Upsampler side effects: submitting a job (which spends credits) and asking its status."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi import signing
from smi.db import Submission, utcnow
from smi.settings import Settings
from smi.upsampler import UpsamplerClient, UpsamplerError, UpsamplerJob, failure_kind
from workflows.types import QUEUED, SubmitRequest, UpsamplerResult


def as_application_error(exc: UpsamplerError) -> ApplicationError:
    """Typed client errors become error types the workflow's retry policies tell apart."""
    delay = timedelta(seconds=exc.retry_after) if exc.retry_after else None
    return ApplicationError(str(exc), type=exc.kind, non_retryable=not exc.retryable, next_retry_delay=delay)


def original_name(request: SubmitRequest) -> str:
    """The name the signed file URL carries: the job, plus the compressed variant if any."""
    return f"{request.job_id}-{request.variant}" if request.variant else request.job_id


def _result(job: UpsamplerJob) -> UpsamplerResult:
    kind = failure_kind(job.error) if job.status == "failed" else None
    return UpsamplerResult(job.id, job.status, job.credit_cost, job.image_url, job.compressed_image_url, job.error, kind)


class UpsamplerActivities:
    def __init__(self, settings: Settings, engine: Engine, client: UpsamplerClient):
        self.settings = settings
        self.engine = engine
        self.client = client

    @activity.defn
    async def submit_upscale(self, request: SubmitRequest) -> UpsamplerResult:
        """2. Hand Upsampler a temporary signed URL of the original and this job's signed webhook.

        Recorded by (job, attempt) before success is reported: a retried activity finds the
        submission and does not pay for a second one.
        """
        with Session(self.engine) as session:
            known = session.exec(
                select(Submission).where(Submission.job_id == request.job_id, Submission.attempt == request.attempt)
            ).first()
        if known is not None:
            return UpsamplerResult(known.upsampler_id, QUEUED, known.credit_cost)

        secret = self.settings.secret("webhook_secret")
        base = self.settings.public_base_url
        expires = int(time.time()) + self.settings.original_url_ttl_seconds
        try:
            job = await self.client.submit(
                signing.signed_file_url(base, secret, "originals", original_name(request), expires),
                request.scale_factor,
                signing.webhook_url(base, secret, request.job_id),
            )
        except UpsamplerError as exc:
            raise as_application_error(exc) from None
        if job.status != "failed":
            with Session(self.engine) as session:
                session.add(
                    Submission(
                        job_id=request.job_id,
                        attempt=request.attempt,
                        upsampler_id=job.id,
                        credit_cost=job.credit_cost,
                        created_at=utcnow(),
                    )
                )
                try:
                    session.commit()
                except IntegrityError:  # a concurrent duplicate attempt recorded it first
                    session.rollback()
        return _result(job)

    @activity.defn
    async def check_status(self, upsampler_id: str) -> UpsamplerResult:
        """3. Ask Upsampler how the job stands: the truth behind every webhook."""
        try:
            return _result(await self.client.status(upsampler_id))
        except UpsamplerError as exc:
            raise as_application_error(exc) from None
