"""Upsampler's webhook: checked, then handed to the job's workflow as a signal, or booked as an orphan.

The URL Upsampler calls is signed for the job, and for the submit intent (`n`, its nonce) whose POST
caused the Upsampler job (smi/signing.py; URLs without a nonce, handed out before, still verify). An
unsigned or forged webhook is a 401 before its body is read; one for an unknown job changes nothing.
For a signed webhook of a known job, by the Upsampler id its body names:

1. One of the job's submissions, or one within EARLY_WEBHOOK_WAIT_SECONDS (Upsampler may call before
   our submit has recorded its reply; the wait is skipped when the nonce's intent already has its
   outcome, recorded in one transaction with its submission): a signal to the job's workflow, as
   before. The signal is only a hint: the workflow asks Upsampler's status endpoint before it acts, so a
   replayed or late webhook changes nothing. A finished job is not signalled.
2. Else, while the job is unfinished, when the nonce names an intent of this job whose reply never came
   (outcome None: the worker died, or the connection dropped, after Upsampler accepted): the intent's
   `reported_id` becomes the id, and the workflow is signalled the hint with the intent's attempt. It
   adopts the Upsampler job once the status endpoint confirms it, instead of paying for a second one.
   Should its workflow not be running, `reported_id` keeps the id for the daily reconciliation.
3. Else the Upsampler job is an orphan: a job we caused that is no current submission (no nonce; its
   intent was accepted or adopted with another id, refused, or abandoned; or the job finished, late
   orphans included). Once it has ended it is recorded in `orphan_jobs` and booked as ledger row
   `upscale:<id>` (its `creditCost` for SUCCESS, 0 for FAILED, as Upsampler bills), once however often
   the webhook comes; the job's cost becomes the sum of its charges, `smi_db_orphan_jobs_total` counts
   it (smi/orphans.py). Nothing else about the job changes: no signal, status, result or email. A webhook
   saying the orphan is still queued or processing books nothing: the one at its end will.

Every signal is an event in the job's history, which has a size limit: only rules 1 and 2 signal, and
Upsampler's duplicates of one (job, id, status) once per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import update
from sqlmodel import Session, col, or_, select
from temporalio.service import RPCError, RPCStatusCode

from api import deps
from api.errors import ApiError
from api.models import WebhookReceipt
from api.openapi import errors
from smi import orphans, signing
from smi.db import Job, Submission, SubmitIntent, as_utc, rows_changed
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
    attempt: int | None = None  # of the URL's intent, when it names one of this job's
    settled: bool = False  # that intent has its outcome: its submission, if any, is recorded


def _known(svc: deps.Services, job_id: str, nonce: str = "") -> Known | None:
    with Session(svc.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        # The intent before the submissions: its outcome and its submission are committed together, so
        # an intent read as settled has its submission in the next read (each read sees the latest commit).
        intent = session.get(SubmitIntent, nonce) if nonce else None
        if intent is not None and intent.job_id != job_id:
            intent = None
        ids = session.exec(select(Submission.upsampler_id).where(Submission.job_id == job_id)).all()
        return Known(
            as_utc(job.created_at),
            job.status in (JobStatus.COMPLETED, JobStatus.FAILED),
            frozenset(ids),
            intent.attempt if intent else None,
            intent is not None and intent.outcome is not None,
        )


def _authentic(svc: deps.Services, job: str, sig: str | None, nonce: str, known: Known | None) -> bool:
    secrets = svc.settings.webhook_secrets()
    if nonce:  # only URLs with a nonce carry one; a nonce not of our shape is refused
        return signing.verify_webhook(secrets, job, sig, nonce)
    if signing.verify_webhook(secrets, job, sig):
        return True
    return (
        known is not None
        and known.created_at < signing.LEGACY_WEBHOOK_SIGNATURES_BEFORE
        and signing.legacy_webhook_signature(secrets, job, sig)
    )


async def _after_early_wait(svc: deps.Services, job_id: str, nonce: str, upsampler_id: str, known: Known) -> Known:
    """The job as last read once `upsampler_id` is (or within EARLY_WEBHOOK_WAIT_SECONDS becomes) one of its
    submissions; without a wait (all taken, or the job gone), read once more or as it was."""
    if svc.early_webhooks.locked():  # each waiter holds a connection and polls the database: bounded
        return await run_in_threadpool(_known, svc, job_id, nonce) or known
    async with svc.early_webhooks:
        deadline = time.monotonic() + EARLY_WEBHOOK_WAIT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(EARLY_WEBHOOK_CHECK_SECONDS)
            fresh = await run_in_threadpool(_known, svc, job_id, nonce)
            if fresh is None:
                break
            known = fresh
            if upsampler_id in known.submissions:
                break
    return known


def _report(svc: deps.Services, nonce: str, upsampler_id: str) -> bool:
    """Rule 2: the intent, still without its reply, now knows the id a webhook named. False when it has its
    outcome by now, or another id was reported for it (one POST makes one Upsampler job)."""
    with Session(svc.engine) as session:
        changed = rows_changed(
            session,
            update(SubmitIntent)
            .where(
                col(SubmitIntent.nonce) == nonce,
                col(SubmitIntent.outcome).is_(None),
                or_(col(SubmitIntent.reported_id).is_(None), col(SubmitIntent.reported_id) == upsampler_id),
            )
            .values(reported_id=upsampler_id),
        )
        session.commit()
    return changed == 1


def _book_orphan(svc: deps.Services, job_id: str, job: UpsamplerJob) -> bool:
    """Rule 3, for an Upsampler job that has ended: Upsampler bills its creditCost for SUCCESS, nothing for FAILED."""
    credits = (job.credit_cost or 0.0) if job.status == JobStatus.COMPLETED else 0.0
    return orphans.book_orphan(svc.engine, job_id, job.id, credits, svc.settings.credit_price_usd, "webhook")


async def _signal(svc: deps.Services, job: str, hint: WebhookHint) -> WebhookReceipt:
    """The hint to the job's workflow, once per (job, id, status) in this process."""
    seen = (job, hint.upsampler_id, hint.status)
    delivered = svc.webhooks_delivered
    if seen in delivered:
        return WebhookReceipt(received=True, delivered=True)
    handle = (await svc.temporal_client()).get_workflow_handle(f"upscale-{job}")
    try:
        await handle.signal(UpscaleWorkflow.upsampler_webhook, hint)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise ApiError(503, "temporal_unavailable", "the workflow service is not reachable; try again") from None
        log.info("webhook for job %s ignored: its workflow is not running", job)
        return WebhookReceipt(received=True, delivered=False)
    delivered[seen] = None
    if len(delivered) > DELIVERED_REMEMBERED:
        delivered.popitem(last=False)
    return WebhookReceipt(received=True, delivered=True)


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
    request: Request,
    job: str = "",
    sig: str | None = None,
    n: str = Query("", description="the submit intent's nonce, in URLs that carry one"),
    svc: deps.Services = Depends(deps.services),
) -> WebhookReceipt:
    """The rules are the module's (api/webhook.py): a submission's webhook signals the workflow; one naming the
    job of a submit whose reply was lost signals it for adoption; any other is an orphan, booked once."""
    known = await run_in_threadpool(_known, svc, job, n) if signing.JOB_ID.fullmatch(job) else None
    if not signing.JOB_ID.fullmatch(job) or not _authentic(svc, job, sig, n, known):  # before the body is read
        raise ApiError(401, "bad_signature", "the webhook URL's signature does not match")
    try:
        upsampler = UpsamplerJob.from_wire(json.loads(await request.body()))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise ApiError(400, "malformed_webhook", f"the body is not an Upsampler status: {exc}") from None
    if known is None:
        log.info("webhook for job %s ignored: the job is unknown", job)
        return WebhookReceipt(received=True, delivered=False)
    if upsampler.id not in known.submissions and not known.finished and not known.settled:
        known = await _after_early_wait(svc, job, n, upsampler.id, known)  # the intent's outcome may come meanwhile
    if upsampler.id in known.submissions:  # rule 1
        if known.finished:
            log.info("webhook for job %s ignored: the job is finished", job)
            return WebhookReceipt(received=True, delivered=False)
        return await _signal(svc, job, WebhookHint(upsampler.id, upsampler.status))
    if (
        not known.finished
        and known.attempt is not None
        and not known.settled
        and await run_in_threadpool(_report, svc, n, upsampler.id)
    ):  # rule 2
        log.info("webhook for job %s names the Upsampler job of attempt %s, whose reply was lost", job, known.attempt)
        return await _signal(svc, job, WebhookHint(upsampler.id, upsampler.status, attempt=known.attempt))
    if upsampler.status not in (JobStatus.COMPLETED, JobStatus.FAILED):  # rule 3, at the orphan's end only
        log.info("webhook for job %s: Upsampler job %s is no submission of it and has not ended", job, upsampler.id)
        return WebhookReceipt(received=True, delivered=False)
    if await run_in_threadpool(_book_orphan, svc, job, upsampler):
        log.warning("webhook for job %s: Upsampler job %s, no submission of it, booked as an orphan", job, upsampler.id)
    return WebhookReceipt(received=True, delivered=False)
