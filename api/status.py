"""The customer's status page: where the order stands, live, and the download button when done.

No API key: the link carries a view token (an HMAC of the job id under SMI_WEBHOOK_SECRET),
so the storefront can hand it to the customer or embed the page. Nothing personal is shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from sqlmodel import Session, col, select

from api import deps
from api.errors import ApiError
from api.models import StatusState
from api.openapi import PUBLIC_ERRORS, errors, merged
from api.service import live_download_url
from smi import signing
from smi.db import Job, JobEvent, Refund, as_utc, utcnow
from smi.vocabulary import FINISHED, JobStatus

router = APIRouter(tags=["customer"], dependencies=[Depends(deps.public_rate_limit)])
log = logging.getLogger("smi.api.status")

EVENTS_POLL_SECONDS = 0.5  # how often the streams' one poller (StatusHub) looks at the database
EVENTS_MAX_SECONDS = 300  # then the stream ends and the browser's EventSource reconnects
KEEPALIVE_SECONDS = 15  # a comment line, so proxies keep the connection and a gone client is noticed

STAGES = [JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.DOWNLOADING, JobStatus.COMPLETED]
STAGE_LABELS = {
    "received": "Order received",
    "queued": "In line",
    "processing": "Upscaling",
    "downloading": "Checking the result",
    "completed": "Ready",
}
# Progress on entering each stage, and how far it may grow while estimated_completion lies ahead.
PROGRESS = {
    "received": (5, 5),
    "queued": (10, 25),
    "processing": (25, 85),
    "downloading": (90, 95),
    "completed": (100, 100),
}
HEADLINES = {
    "received": ("Order received", "We have your order and are getting your image ready."),
    "queued": ("In line", "Your image is waiting for its turn to be upscaled."),
    "processing": ("Upscaling your image", "Your image is being upscaled right now."),
    "downloading": ("Almost done", "We are checking the finished image."),
    "completed": ("Your image is ready", "Download your upscaled image below."),
    "manual_review": (
        "We're looking into it",
        "Something needs a closer look. Our team has been told and will finish your order or refund it.",
    ),
}


def _iso(value) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def _headline(job: Job, refund: Refund | None) -> tuple[str, str]:
    if job.status != JobStatus.FAILED:
        return HEADLINES.get(job.status, HEADLINES[JobStatus.RECEIVED])
    if refund is not None and refund.status == "refunded":
        return "Refunded", "We could not upscale this image, so we refunded your payment."
    if refund is not None:
        return "Refund on its way", "We could not upscale this image; your payment will be refunded."
    return "We could not finish this order", "Please contact the shop's support; they will sort it out."


def _progress(status: str, entered, estimated_completion) -> int | None:
    """From the stage, moving on towards estimated_completion when it is known; None outside the happy path."""
    if status not in PROGRESS:
        return None
    low, high = PROGRESS[status]
    entered, eta = as_utc(entered), as_utc(estimated_completion)
    if entered is None or eta is None or eta <= entered:
        return low
    share = (utcnow() - entered) / (eta - entered)
    return round(low + (high - low) * min(1.0, max(0.0, share)))


def job_state(session: Session, svc: deps.Services, job_id: str) -> dict | None:
    """What the page shows, as JSON: the same for the first render, the event stream and polling."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    entered = {}  # the latest entry into each status: after an admin's retry, the current run's times
    for event in session.exec(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.at), col(JobEvent.id))
    ):
        entered[event.status] = event.at
    refund = session.get(Refund, job_id)
    headline, message = _headline(job, refund)
    current = STAGES.index(JobStatus(job.status)) if job.status in STAGES else -1
    download_url = None
    expires = as_utc(job.download_expires_at)
    if job.status == JobStatus.COMPLETED and job.download_generation > 0 and expires and expires > utcnow():
        download_url = live_download_url(session, svc.settings, job)
    if job.status == JobStatus.COMPLETED and download_url is None:
        message = f"The download link has expired. Write to {svc.settings.support_email} for a new one."
    return {
        "job_id": job.job_id,
        "order_id": job.order_id,
        "status": job.status,
        "final": job.status in FINISHED,
        "headline": headline,
        "message": message,
        "progress": _progress(job.status, entered.get(job.status, job.created_at), job.estimated_completion),
        "stages": [
            {
                "status": stage,
                "label": STAGE_LABELS[stage],
                "at": _iso(entered.get(stage)),
                "state": "done"
                if i < current or job.status == JobStatus.COMPLETED
                else "current"
                if i == current
                else "todo",
            }
            for i, stage in enumerate(STAGES)
        ],
        "estimated_completion": _iso(job.estimated_completion) if job.status not in FINISHED else None,
        "download_url": download_url,
        "download_expires_at": _iso(expires) if download_url else None,
        "output": (
            {
                "width": job.output_width,
                "height": job.output_height,
                "format": job.output_format,
                "bytes": job.output_bytes,
            }
            if download_url
            else None
        ),
    }


def _read_state(svc: deps.Services, job_id: str) -> dict | None:
    return _read_states(svc, [job_id])[job_id]


def _read_states(svc: deps.Services, job_ids: list[str]) -> dict[str, dict | None]:
    with Session(svc.engine) as session:
        return {job_id: job_state(session, svc, job_id) for job_id in job_ids}


class StatusHub:
    """One poller for every open event stream of this API process: each EVENTS_POLL_SECONDS it reads
    each watched job's state once (one session, in the threadpool), and hands changes to that job's
    streams. 500 streams on one job cost one read a tick, not 500."""

    def __init__(self, svc: deps.Services):
        self.svc = svc
        self.watchers: dict[str, set[asyncio.Queue]] = {}
        self.task: asyncio.Task | None = None

    def watch(self, job_id: str) -> asyncio.Queue:
        """A queue that gets the job's state whenever it changes (None: erased). Only the newest counts."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.watchers.setdefault(job_id, set()).add(queue)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._poll())
        return queue

    def unwatch(self, job_id: str, queue: asyncio.Queue) -> None:
        queues = self.watchers.get(job_id, set())
        queues.discard(queue)
        if not queues:
            self.watchers.pop(job_id, None)

    async def _poll(self) -> None:
        unseen = object()
        last: dict[str, object] = {}
        while self.watchers:
            await asyncio.sleep(EVENTS_POLL_SECONDS)
            try:
                states = await run_in_threadpool(_read_states, self.svc, list(self.watchers))
            except Exception:  # the database is away: streams keep their last state and keep-alives
                log.warning("status streams: reading job states failed", exc_info=True)
                continue
            last = {job_id: last.get(job_id, unseen) for job_id in self.watchers}  # forget jobs no one watches
            for job_id, state in states.items():
                if state == last[job_id]:
                    continue
                last[job_id] = state
                for queue in self.watchers.get(job_id, ()):
                    if queue.full():
                        queue.get_nowait()
                    queue.put_nowait(state)


async def _checked_state(svc: deps.Services, job_id: str, token: str | None) -> dict:
    """The state, or the same 404 for a bad token and an unknown job: the page reveals nothing without its link."""
    state = None
    if signing.verify_view_token(svc.settings.webhook_secrets(), job_id, token):
        state = await run_in_threadpool(_read_state, svc, job_id)
    if state is None:
        raise ApiError(404, "not_found", "there is no status page at this address; check the link you were given")
    return state


# A status page and its feeds answer the same 404 to an unknown job and a wrong view token.
STATUS_ERRORS = merged(PUBLIC_ERRORS, {404: ["not_found"]})


@router.get(
    "/status/{job_id}",
    summary="The customer's status page (HTML)",
    response_class=HTMLResponse,
    responses=errors(STATUS_ERRORS),
)
async def status_page(
    request: Request,
    job_id: str,
    v: str | None = Query(None, description="the view token"),
    svc: deps.Services = Depends(deps.services),
) -> Response:
    state = await _checked_state(svc, job_id, v)
    nonce = secrets.token_urlsafe(16)
    headers = {
        # Embeddable in the storefront (no frame-ancestors); scripts and styles only our own inline ones.
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
        "Referrer-Policy": "no-referrer",  # the URL carries the view token
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return deps.pages.TemplateResponse(request, "pages/status.html", {"state": state, "nonce": nonce}, headers=headers)


@router.get(
    "/status/{job_id}/state",
    response_model=StatusState,
    summary="The status page's state as JSON (the page's polling fallback)",
    responses=errors(STATUS_ERRORS),
)
async def status_state(job_id: str, v: str | None = None, svc: deps.Services = Depends(deps.services)) -> StatusState:
    return StatusState.model_validate(await _checked_state(svc, job_id, v))


def _sse(state: dict) -> str:
    return f"data: {json.dumps(state, separators=(',', ':'))}\n\n"


class HeldStreamingResponse(deps.ReleasedWhenSent, StreamingResponse):
    """Gives its stream slot back when the stream ends."""


@router.get(
    "/status/{job_id}/events",
    summary="The status page's state as Server-Sent Events, on every change",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`data:` lines, each the JSON of the state (StatusState)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **errors(merged(STATUS_ERRORS, {429: ["too_many_connections"]})),
    },
)
async def status_events(
    request: Request, job_id: str, v: str | None = None, svc: deps.Services = Depends(deps.services)
) -> StreamingResponse:
    first = await _checked_state(svc, job_id, v)
    release = svc.event_streams.acquire(deps.client_host(request))  # over the cap: 429, the page polls instead
    hub: StatusHub = svc.status_hub

    async def stream():
        yield "retry: 2000\n" + _sse(first)  # the state at once; `retry`: how soon the browser reconnects
        if first["final"]:
            return
        queue = hub.watch(job_id)
        try:
            last, deadline = first, time.monotonic() + EVENTS_MAX_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                try:
                    state = await asyncio.wait_for(queue.get(), min(KEEPALIVE_SECONDS, left))
                except asyncio.TimeoutError:
                    if left > KEEPALIVE_SECONDS:
                        yield ": keep-alive\n\n"
                    continue
                if state is None:  # erased meanwhile
                    return
                if state != last:
                    last = state
                    yield _sse(state)
                if state["final"]:
                    return
        finally:
            hub.unwatch(job_id, queue)

    response = HeldStreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    response.release = release
    return response
