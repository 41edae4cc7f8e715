"""Admin endpoints: find jobs, and take over one: retry, refund, resend the email; usage, budgets, erasure; the
day's reconciliation with Upsampler."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from dataclasses import asdict
from datetime import date, timedelta
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from sqlalchemy import delete
from sqlmodel import Session, col, func, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api import deps, service
from api.errors import ApiError
from api.models import (
    AdminAction,
    AdminJob,
    AdminJobs,
    BudgetReleased,
    Erasure,
    LinkResent,
    Money,
    OrphanListed,
    ReconciliationDifference,
    ReconciliationReport,
    UsageReport,
)
from api.openapi import INVALID, KEYED_ERRORS, errors, merged
from api.service import EMAIL, ERASED_EMAIL, job_view, load_job
from smi import signing, usage
from smi.db import (
    BudgetRelease,
    DownloadToken,
    Job,
    LedgerEntry,
    OrphanJob,
    Reconciliation,
    Refund,
    SentMail,
    as_utc,
    rows_changed,
    utcnow,
)
from smi.vocabulary import FINISHED, JobStatus, ResendInput
from workflows.admin import ResendLinkWorkflow
from workflows.upscale import UpscaleWorkflow

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(deps.admin)])
log = logging.getLogger("smi.api.admin")


@router.get(
    "/jobs",
    response_model=AdminJobs,
    summary="Jobs by status, newest first",
    responses=errors(merged(KEYED_ERRORS, INVALID)),
)
def list_jobs(
    status: JobStatus | None = None,
    limit: int = Query(100, description="at most this many (1 to 1000)"),
    svc: deps.Services = Depends(deps.services),
) -> AdminJobs:
    query = select(Job).order_by(col(Job.created_at).desc()).limit(max(1, min(limit, 1000)))
    if status:
        query = query.where(Job.status == status)
    with Session(svc.engine) as session:  # closed before the response is sent (see api/deps.py)
        jobs = session.exec(query).all()
        ids = [j.job_id for j in jobs]
        refunds = {r.job_id: r for r in session.exec(select(Refund).where(col(Refund.job_id).in_(ids))).all()}
        ledger: dict[str, list[LedgerEntry]] = {}
        for entry in session.exec(select(LedgerEntry).where(col(LedgerEntry.job_id).in_(ids))).all():
            ledger.setdefault(entry.job_id, []).append(entry)
        return AdminJobs(
            jobs=[
                AdminJob(
                    **dict(job_view(job, svc.settings, session, refunds.get(job.job_id))),
                    money=money(ledger.get(job.job_id, [])),
                )
                for job in jobs
            ]
        )


def money(entries: list[LedgerEntry]) -> Money:
    """What one job earned: the price paid, Upsampler's charges, refunds, the margin; and the estimate."""
    booked = [e for e in entries if e.purpose != "estimate"]
    estimate = next((e for e in entries if e.purpose == "estimate"), None)
    revenue = round(sum(e.revenue_usd for e in booked if e.purpose == "revenue"), 2)
    refunded = round(-sum(e.revenue_usd for e in booked if e.purpose == "refund"), 2)
    cost = round(sum(e.cost_usd for e in booked), 6)
    return Money(
        revenue_usd=revenue,
        cost_usd=cost,
        credits=round(sum(e.credits for e in booked), 6),
        estimated_credits=estimate.credits if estimate else None,
        refunded_usd=refunded,
        margin_usd=round(revenue - refunded - cost, 6),
    )


# The async handlers below use the database in the threadpool, through these small functions, each
# with its own short session: none is held while Temporal is awaited (see api/deps.py).


# What taking over one job can answer besides its own codes.
JOB_ACTION_ERRORS = merged(
    KEYED_ERRORS, {404: ["job_not_found"], 503: ["temporal_unavailable", "workflow_unresponsive"]}
)


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    response_model=AdminAction,
    summary="Run the job again",
    responses=errors(merged(JOB_ACTION_ERRORS, {409: ["already_refunded", "customer_erased", "job_in_progress"]})),
)
async def retry(job_id: str, svc: deps.Services = Depends(deps.services)) -> AdminAction:
    return await service.retry(job_id, svc)


@router.post(
    "/jobs/{job_id}/refund",
    status_code=202,
    response_model=AdminAction,
    summary="Refund now",
    responses=errors(JOB_ACTION_ERRORS),
)
async def refund(job_id: str, svc: deps.Services = Depends(deps.services)) -> AdminAction:
    return await service.refund(job_id, svc)


@router.post(
    "/jobs/{job_id}/resend-email",
    response_model=LinkResent,
    response_model_exclude_unset=True,  # download_expires_at: absent while the link is not sent yet
    summary="A fresh download link, new expiry, email again",
    responses=errors(merged(JOB_ACTION_ERRORS, {409: ["result_deleted", "not_completed"]})),
)
async def resend_email(job_id: str, svc: deps.Services = Depends(deps.services)) -> LinkResent:
    job = await run_in_threadpool(load_job, svc, job_id)
    if job.status == JobStatus.COMPLETED and not job.result_path:
        raise ApiError(
            409, "result_deleted", "the job's result was deleted (retention or erasure); there is no file to link"
        )
    if job.status != JobStatus.COMPLETED or not job.result_path:
        raise ApiError(409, "not_completed", f"the job is {job.status}; only completed jobs have a link to resend")
    request_id = uuid.uuid4().hex
    client = await svc.temporal_client()
    handle = await client.start_workflow(
        ResendLinkWorkflow.run,
        ResendInput(job_id, request_id, JobStatus(job.status), svc.settings.download_ttl_hours),
        id=f"resend-{job_id}-{request_id}",
        task_queue=svc.settings.task_queue,
    )
    try:
        link = await asyncio.wait_for(handle.result(), timeout=30)
    except asyncio.TimeoutError:
        return LinkResent(job_id=job_id, action="resend-email", how=f"workflow {handle.id} is still running")
    return LinkResent(
        job_id=job_id,
        action="resend-email",
        download_expires_at=link.expires_at.isoformat(),
        how=f"link generation {link.generation} sent",
    )


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="Jobs, credits, cost, revenue and margin per UTC day or month; Upsampler quota",
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "JSON, or CSV rows with `Accept: text/csv`",
        },
        **errors(merged(KEYED_ERRORS, INVALID)),
    },
)
def usage_report(
    request: Request,
    period: Literal["day", "month"] = "day",
    start: str | None = Query(None, alias="from"),
    end: str | None = Query(None, alias="to"),
    svc: deps.Services = Depends(deps.services),
) -> UsageReport | PlainTextResponse:
    today = utcnow().date()
    try:
        first = usage.parse_day(start, today - timedelta(days=30) if period == "day" else today.replace(day=1, month=1))
        last = usage.parse_day(end, today) + timedelta(days=1)  # `to` is inclusive
    except ValueError:
        raise ApiError(422, "invalid_request", "from and to must be dates like 2026-11-21") from None
    if last <= first:
        raise ApiError(422, "invalid_request", "to must not be before from")
    rows = usage.report(svc.engine, period, first, last)
    if "text/csv" in request.headers.get("accept", ""):
        return PlainTextResponse(usage.to_csv(rows), media_type="text/csv")
    cfg = svc.settings
    return UsageReport.model_validate(
        {
            "period": period,
            "from": first.date().isoformat(),
            "to": (last - timedelta(days=1)).date().isoformat(),
            "rows": [asdict(row) for row in rows],
            "upsampler_requests": usage.quota(
                svc.engine, utcnow(), cfg.upsampler_requests_per_minute, cfg.upsampler_requests_per_hour
            ),
        }
    )


@router.get(
    "/reconciliation",
    response_model=ReconciliationReport,
    summary="One UTC day compared with Upsampler's own record, and the orphaned Upsampler jobs found that day",
    responses=errors(merged(KEYED_ERRORS, INVALID, {404: ["not_reconciled"]})),
)
def reconciliation(
    day: date | None = Query(None, description="the UTC day, 2026-11-21 (default: yesterday, the last one checked)"),
    svc: deps.Services = Depends(deps.services),
) -> ReconciliationReport:
    """The stored comparison of `day` (workflows/reconciliation.py: per job of the day, the credits booked
    against what Upsampler's status endpoint reports for every id we know of; what was missing, booked), and
    `orphans`: the Upsampler jobs recorded that day as no current submission of their job (smi/orphans.py),
    whoever found them. 404 `not_reconciled` until the day was checked."""
    day = day or utcnow().date() - timedelta(days=1)
    with Session(svc.engine) as session:
        row = session.get(Reconciliation, day)
        if row is None:
            raise ApiError(404, "not_reconciled", f"{day.isoformat()} has not been reconciled (yet)")
        start, end = usage.day_bounds(day)
        found = select(OrphanJob).where(col(OrphanJob.created_at) >= start, col(OrphanJob.created_at) < end)
        listed = session.exec(found.order_by(col(OrphanJob.created_at), col(OrphanJob.upsampler_id))).all()
        return ReconciliationReport(
            day=day.isoformat(),
            checked_at=as_utc(row.checked_at).isoformat(),
            jobs=row.jobs,
            upsampler_ids=row.upsampler_ids,
            booked_credits=row.booked_credits,
            reported_credits=row.reported_credits,
            booked_now=row.booked_now,
            differences=[ReconciliationDifference.model_validate(d) for d in json.loads(row.differences)],
            orphans=[
                OrphanListed(
                    upsampler_id=o.upsampler_id,
                    job_id=o.job_id,
                    credits=o.credits,
                    found_by=o.found_by,
                    created_at=as_utc(o.created_at).isoformat(),
                )
                for o in listed
            ],
        )


def _release_budget_periods(svc: deps.Services) -> list[str]:
    now = utcnow()
    periods = [f"{period}:{usage.period_key(now, period)}" for period in ("day", "month")]
    with Session(svc.engine) as session:
        for period in periods:
            if session.get(BudgetRelease, period) is None:
                session.add(BudgetRelease(period=period, created_at=now))
        session.commit()
    return periods


@router.post(
    "/budget/release",
    response_model=BudgetReleased,
    summary="Let jobs held by a crossed budget (hard stop) spend again this period",
    responses=errors(merged(KEYED_ERRORS, {503: ["temporal_unavailable"]})),
)
async def release_budget(svc: deps.Services = Depends(deps.services)) -> BudgetReleased:
    periods = await run_in_threadpool(_release_budget_periods, svc)
    client = await svc.temporal_client()
    woken = 0
    async for execution in client.list_workflows(f'UpscaleStatus="{JobStatus.QUEUED}" AND ExecutionStatus="Running"'):
        try:
            await client.get_workflow_handle(execution.id).signal(UpscaleWorkflow.budget_released)
            woken += 1
        except RPCError:
            pass  # finished in the meantime
    return BudgetReleased(released=periods, jobs_woken=woken)


ERASED_IMAGE_URL = "https://erased.invalid/"


async def _open_workflows(svc: deps.Services, job_ids: list[str]) -> list[str]:
    """Jobs whose upscale or refund workflow is still open (e.g. still sending the customer's email)."""
    client = await svc.temporal_client()
    gate = asyncio.Semaphore(16)

    async def is_open(workflow_id: str) -> bool:
        async with gate:
            try:
                description = await client.get_workflow_handle(workflow_id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return False
                raise
            return description.status == WorkflowExecutionStatus.RUNNING

    pairs = [(job_id, f"{kind}-{job_id}") for job_id in job_ids for kind in ("upscale", "refund")]
    checks = await asyncio.gather(*(is_open(workflow_id) for _, workflow_id in pairs))
    return sorted({job_id for (job_id, _), busy in zip(pairs, checks, strict=True) if busy})


def _jobs_of_customer(svc: deps.Services, address: str) -> list[Job]:
    if address == ERASED_EMAIL:
        return []
    with Session(svc.engine) as session:
        return list(
            session.exec(select(Job).where(func.lower(Job.customer_email) == address).order_by(Job.job_id)).all()
        )


def _erase_rows(svc: deps.Services, ids: list[str]) -> tuple[int, int]:
    """The jobs' download tokens and sent-mail rows deleted, their personal data replaced, in one
    transaction; returns how many tokens and sent-mail rows."""
    now = utcnow()
    with Session(svc.engine) as session:
        tokens = rows_changed(session, delete(DownloadToken).where(col(DownloadToken.job_id).in_(ids)))
        emails = rows_changed(session, delete(SentMail).where(col(SentMail.job_id).in_(ids)))
        for job in session.exec(select(Job).where(col(Job.job_id).in_(ids))).all():
            job.customer_email, job.customer_name = ERASED_EMAIL, None
            job.payment_reference, job.image_url, job.result_path = None, ERASED_IMAGE_URL, None
            # The idempotency fingerprint hashed the order with the address: replaced too (the same order again
            # is a conflict).
            job.request_sha256 = hashlib.sha256(f"erased:{job.job_id}".encode()).hexdigest()
            job.updated_at = now
            session.add(job)
        session.commit()
    return tokens, emails


@router.delete(
    "/customers/{email}",
    response_model=Erasure,
    summary="Erase a customer's personal data and files (GDPR)",
    responses=errors(merged(KEYED_ERRORS, INVALID, {409: ["customer_jobs_busy"], 503: ["temporal_unavailable"]})),
)
async def erase_customer(email: str, svc: deps.Services = Depends(deps.services)) -> Erasure:
    """Every job of the address (compared case-insensitively): its files (original, copies, result,
    upload) are deleted, its download tokens and sent-mail rows too, and the address, name,
    payment reference and image URL on the job are replaced by placeholders. Ledger and refund
    rows stay, anonymous (they name the job only). All or nothing: while any job of the address
    is running or in manual review the answer is `409` and nothing is erased. An unknown address
    (or one already erased) is `200` with zero counts."""
    address = email.strip().lower()
    if len(address) > 254 or not EMAIL.match(address):
        raise ApiError(
            422,
            "invalid_request",
            "email: must be an e-mail address like name@example.com",
            [{"field": "email", "problem": "not an e-mail address"}],
        )
    jobs = await run_in_threadpool(_jobs_of_customer, svc, address)
    if not jobs:
        return Erasure(jobs=0, files=0, tokens=0, emails=0)
    ids = [job.job_id for job in jobs]
    busy = [job.job_id for job in jobs if job.status not in FINISHED] or await _open_workflows(svc, ids)
    if busy:
        raise ApiError(
            409,
            "customer_jobs_busy",
            f"{len(busy)} of the customer's {len(jobs)} jobs are still running "
            "or waiting in manual review; nothing was erased. Let them finish (or refund them), then "
            "call this again",
            {"busy_job_ids": busy},
        )

    # Files first: should anything fail after them, calling again finds the jobs and finishes the work.
    storage = svc.storage
    uploads = {upload_id for job in jobs if (upload_id := signing.upload_id_of(job.image_url))}

    def delete_files() -> int:
        return sum(storage.erase_job_files(job_id) for job_id in ids) + sum(storage.erase_upload(u) for u in uploads)

    files = await asyncio.to_thread(delete_files)
    tokens, emails = await run_in_threadpool(_erase_rows, svc, ids)
    log.info(
        "erased a customer's personal data: %d jobs (%s), %d files, %d tokens, %d sent-mail rows",
        len(ids),
        ", ".join(ids),
        files,
        tokens,
        emails,
    )
    return Erasure(jobs=len(jobs), files=files, tokens=tokens, emails=emails)
