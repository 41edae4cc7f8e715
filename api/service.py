"""What several routers share: the job as the API shows it, starting its workflow, and an admin's
retry and refund (the admin API and the dashboard's buttons)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, func, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api import deps
from api.errors import ApiError
from api.models import AdminAction, JobView
from smi import pricing, probe, signing
from smi.db import Job, Refund, Submission, set_status
from smi.jobview import job_json, live_download_url, status_page_url  # noqa: F401 (the routers import them here)
from smi.settings import Settings
from smi.storage import upload_key
from smi.vocabulary import Decision, ErrorCode, JobPolicy, JobStatus, UpscaleInput
from workflows.admin import RefundWorkflow
from workflows.upscale import UPSCALE_STATUS, UpscaleWorkflow

EMAIL = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[^@\s<>\"',;]+$")


def job_url(cfg: Settings, job_id: str) -> str:
    return f"{cfg.public_base_url.rstrip('/')}/v1/jobs/{job_id}"


def policy_of(cfg: Settings) -> JobPolicy:
    return JobPolicy(
        poll_initial_delay_seconds=cfg.poll_initial_delay_seconds,
        poll_max_interval_seconds=cfg.poll_max_interval_seconds,
        processing_timeout_seconds=cfg.processing_timeout_seconds,
        download_ttl_hours=cfg.download_ttl_hours,
        credit_price_usd=cfg.credit_price_usd,
        credits_per_megapixel=cfg.credits_per_megapixel,
        upsampler_max_input_bytes=cfg.upsampler_max_input_bytes,
        budget_hard_stop=cfg.budget_hard_stop,
        shop_events=bool(cfg.storefront_webhook_url),
        shop_event_first_retry_seconds=cfg.storefront_webhook_first_retry_seconds,
    )


async def start_workflow(
    client: Client,
    cfg: Settings,
    job: Job,
    run: int = 1,
    attempts_before: int = 0,
    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
) -> None:
    """Idempotent: an open workflow of this job is reused; a finished one is left alone unless
    `id_reuse_policy` allows a new run (an admin's retry)."""
    try:
        await client.start_workflow(
            UpscaleWorkflow.run,
            UpscaleInput(job.job_id, job.image_url, job.scale_factor, job.format, policy_of(cfg), run, attempts_before),
            id=f"upscale-{job.job_id}",
            task_queue=cfg.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=id_reuse_policy,
            search_attributes=TypedSearchAttributes([SearchAttributePair(UPSCALE_STATUS, JobStatus.RECEIVED)]),
        )
    except WorkflowAlreadyStartedError:
        pass


def job_view(job: Job, cfg: Settings, session: Session, refund: Refund | None = None) -> JobView:
    return JobView.model_validate(job_json(job, cfg, session, refund))


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id) if signing.JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", "no job has this job_id")
    return job


async def _running_state(svc: deps.Services, job_id: str):
    """The workflow's state if its latest run is still open, else None."""
    handle = (await svc.temporal_client()).get_workflow_handle(f"upscale-{job_id}")
    try:
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            return handle, None
        # A query is answered by a worker: with none polling it would wait for Temporal's own minute.
        return handle, await handle.query(UpscaleWorkflow.state, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return handle, None
        raise ApiError(
            503, "workflow_unresponsive", "the job's workflow did not answer (is a worker running?); try again"
        ) from None


QUERY_TIMEOUT = timedelta(seconds=5)


async def _decide(handle, decision: Decision) -> bool:
    """Signal an admin's decision; False when the run ended since it was seen running (then it is a finished job)."""
    try:
        await handle.signal(UpscaleWorkflow.admin_decision, decision)
        return True
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise


def load_job(svc: deps.Services, job_id: str) -> Job:
    """The job, or 404; in its own short session (none is held while Temporal is awaited)."""
    with Session(svc.engine) as session:
        return get_job(session, job_id)


def _mark_for_retry(svc: deps.Services, job_id: str) -> tuple[Job, int]:
    """The job back to received for a new run, with its event; and how many submissions came before."""
    with Session(svc.engine, expire_on_commit=False) as session:  # the job is read after the session closes
        job = get_job(session, job_id)
        if session.get(Refund, job_id) is not None:
            raise ApiError(409, "already_refunded", "the job was refunded; place a new order instead of retrying")
        attempts = session.exec(select(func.max(Submission.attempt)).where(Submission.job_id == job_id)).one() or 0
        job.runs += 1
        job.error_code = job.error_message = None
        set_status(session, job, JobStatus.RECEIVED)
        session.commit()
        return job, attempts


async def retry(job_id: str, svc: deps.Services) -> AdminAction:
    """An admin's retry: a job waiting in manual review is signalled to go on; a finished one runs again."""
    job = await run_in_threadpool(load_job, svc, job_id)
    if job.customer_email == ERASED_EMAIL:
        raise ApiError(409, "customer_erased", "the customer's data was erased; this job cannot run again")
    handle, state = await _running_state(svc, job_id)
    if state is not None:
        if not state.awaiting_decision:
            raise ApiError(
                409,
                "job_in_progress",
                f"the job is {state.status} and not waiting for a decision; "
                "retry applies to jobs in manual review or finished",
            )
        if await _decide(handle, Decision.RETRY):
            return AdminAction(job_id=job_id, action="retry", how="signalled the waiting workflow")
    job, attempts = await run_in_threadpool(_mark_for_retry, svc, job_id)
    await start_workflow(
        await svc.temporal_client(),
        svc.settings,
        job,
        run=job.runs,
        attempts_before=attempts,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return AdminAction(job_id=job_id, action="retry", how=f"started run {job.runs} of the workflow")


def _refund_of(svc: deps.Services, job_id: str) -> Refund | None:
    with Session(svc.engine) as session:
        get_job(session, job_id)
        return session.get(Refund, job_id)


async def refund(job_id: str, svc: deps.Services) -> AdminAction:
    """An admin's refund: a running job is signalled to stop and refund; a finished one gets refund-<job_id>."""
    done = await run_in_threadpool(_refund_of, svc, job_id)
    if done is not None:
        return AdminAction(job_id=job_id, action="refund", how=f"already {done.status}; nothing more was paid back")
    handle, state = await _running_state(svc, job_id)
    if state is not None and await _decide(handle, Decision.REFUND):
        return AdminAction(job_id=job_id, action="refund", how="signalled the running workflow")
    client = await svc.temporal_client()
    try:
        await client.start_workflow(
            RefundWorkflow.run,
            args=[job_id, policy_of(svc.settings)],
            id=f"refund-{job_id}",
            task_queue=svc.settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except WorkflowAlreadyStartedError:
        pass
    return AdminAction(job_id=job_id, action="refund", how=f"started workflow refund-{job_id}")


# GDPR erasure. The address comes in the path, so it is masked in the access log (api/redact.py) and
# never written to a log, a workflow payload or an error message.
ERASED_EMAIL = "erased@erased.invalid"  # the placeholder: reserved TLD, undeliverable, matches no customer


# Images and prices, for orders (api/jobs.py) and checkouts (api/checkout.py).

HTTP_URL = r"^https?://[^\s/?#]+"  # a scheme we fetch and a host; the fetch guard checks the rest
# What probing an image_url can refuse (probe_image, then the order's or the quote's checks).
IMAGE_PROBLEMS = [ErrorCode.UNSUPPORTED_FORMAT, "image_unreachable", "url_refused", ErrorCode.OUTPUT_TOO_LARGE]


async def probe_image(svc: deps.Services, image_url: str) -> probe.Probe:
    """The image's header: an upload of ours is read from storage (in s3 mode its URL answers 303 to the
    store, an address the fetch guard rightly refuses), any other URL is fetched."""
    cfg = svc.settings
    upload_id = signing.own_upload_id(image_url, cfg.public_base_url, cfg.webhook_secrets(), time.time())
    if upload_id is None:
        return await probe.probe_url(svc.http, image_url, cfg.image_fetch_policy)

    def read() -> probe.Probe:
        try:
            data = svc.storage.read_start(upload_key(upload_id), probe.STEPS[-1])
        except FileNotFoundError:
            return probe.Probe(problem="image_unreachable", detail="the upload is gone (uploads are kept for a while)")
        return probe.read_header(data) or probe.Probe(
            problem=ErrorCode.UNSUPPORTED_FORMAT, detail="the file is not a PNG, JPEG or WebP image"
        )

    return await asyncio.to_thread(read)


def quote_for(cfg: Settings, width: int, height: int, scale_factor: int) -> pricing.Quote:
    return pricing.quote(
        width,
        height,
        scale_factor,
        credits_per_megapixel=cfg.credits_per_megapixel,
        credit_price_usd=cfg.credit_price_usd,
        markup_percent=cfg.markup_percent,
        min_price_usd=cfg.min_price_usd,
    )
