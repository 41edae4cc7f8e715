"""Upsampler's webhook: checked, then handed to the job's workflow as a signal.

The signal is only a hint; the workflow asks Upsampler's status endpoint before it acts,
so a replayed or late webhook changes nothing. Every signal is an event in the job's history,
which has a size limit: only webhooks naming one of the job's own submissions go through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, select
from temporalio.service import RPCError, RPCStatusCode

from api import deps
from api.errors import ApiError
from api.models import WebhookReceipt
from api.openapi import errors
from smi import signing
from smi.db import Job, Submission, as_utc
from smi.upsampler import UpsamplerJob
from smi.vocabulary import JobStatus, WebhookHint
from workflows.upscale import UpscaleWorkflow

router = APIRouter(tags=["upsampler"])
log = logging.getLogger("smi.api.webhook")

# Upsampler may call before our submit has recorded its reply: wait this long for the record.
EARLY_WEBHOOK_WAIT_SECONDS = 10.0
EARLY_WEBHOOK_CHECK_SECONDS = 0.25
# Webhooks this process delivered lately (svc.webhooks_delivered): Upsampler's duplicates add no
# second history event.
DELIVERED_REMEMBERED = 10_000


@dataclass(frozen=True)
class Known:
    created_at: datetime
    finished: bool
    submissions: frozenset[str]


def _known(svc: deps.Services, job_id: str) -> Known | None:
    with Session(svc.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        ids = session.exec(select(Submission.upsampler_id).where(Submission.job_id == job_id)).all()
        return Known(as_utc(job.created_at), job.status in (JobStatus.COMPLETED, JobStatus.FAILED), frozenset(ids))


def _authentic(svc: deps.Services, job: str, sig: str | None, known: Known | None) -> bool:
    secrets = svc.settings.webhook_secrets()
    if signing.verify_webhook(secrets, job, sig):
        return True
    return (
        known is not None
        and known.created_at < signing.LEGACY_WEBHOOK_SIGNATURES_BEFORE
        and signing.legacy_webhook_signature(secrets, job, sig)
    )


async def _submission_recorded(svc: deps.Services, job_id: str, upsampler_id: str) -> bool:
    """Whether `upsampler_id` is (or within EARLY_WEBHOOK_WAIT_SECONDS becomes) one of the job's submissions."""
    if svc.early_webhooks.locked():  # each waiter holds a connection and polls the database: bounded
        return False
    async with svc.early_webhooks:
        deadline = time.monotonic() + EARLY_WEBHOOK_WAIT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(EARLY_WEBHOOK_CHECK_SECONDS)
            known = await run_in_threadpool(_known, svc, job_id)
            if known is None or upsampler_id in known.submissions:
                return known is not None
    return False


@router.post(
    "/smi-webhook/upsampler/",
    response_model=WebhookReceipt,
    summary="Upsampler's completion webhook",
    dependencies=[Depends(deps.public_rate_limit)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": "Upsampler's job status"}}},
        }
    },
    responses=errors(
        {
            400: ["malformed_webhook"],
            401: ["bad_signature"],
            413: ["too_large"],
            429: ["rate_limited"],
            503: ["temporal_unavailable"],
        }
    ),
)
async def upsampler_webhook(
    request: Request, job: str = "", sig: str | None = None, svc: deps.Services = Depends(deps.services)
) -> WebhookReceipt:
    known = await run_in_threadpool(_known, svc, job) if signing.JOB_ID.fullmatch(job) else None
    if not signing.JOB_ID.fullmatch(job) or not _authentic(svc, job, sig, known):  # before the body is read
        raise ApiError(401, "bad_signature", "the webhook URL's signature does not match")
    try:
        update = UpsamplerJob.from_wire(json.loads(await request.body()))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise ApiError(400, "malformed_webhook", f"the body is not an Upsampler status: {exc}") from None
    if known is None or known.finished:
        log.info("webhook for job %s ignored: the job is unknown or finished", job)
        return WebhookReceipt(received=True, delivered=False)
    if update.id not in known.submissions and not await _submission_recorded(svc, job, update.id):
        log.info("webhook for job %s ignored: it names no submission of the job", job)
        return WebhookReceipt(received=True, delivered=False)
    seen = (job, update.id, update.status)
    delivered = svc.webhooks_delivered
    if seen in delivered:
        return WebhookReceipt(received=True, delivered=True)
    handle = (await svc.temporal_client()).get_workflow_handle(f"upscale-{job}")
    try:
        await handle.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint(update.id, update.status))
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise ApiError(503, "temporal_unavailable", "the workflow service is not reachable; try again") from None
        log.info("webhook for job %s ignored: its workflow is not running", job)
        return WebhookReceipt(received=True, delivered=False)
    delivered[seen] = None
    if len(delivered) > DELIVERED_REMEMBERED:
        delivered.popitem(last=False)
    return WebhookReceipt(received=True, delivered=True)
