"""Storefront endpoints: start a job after payment, read how it stands, upload an image."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api import deps
from api.errors import ApiError
from api.models import JobCreated, JobView, Quote, Upload
from api.openapi import KEYED_ERRORS, errors, merged
from api.service import (
    EMAIL,
    HTTP_URL,
    IMAGE_PROBLEMS,
    get_job,
    job_url,
    job_view,
    probe_image,
    quote_for,
    start_workflow,
    status_page_url,
)
from smi import signing
from smi.db import Job, JobEvent, LedgerEntry, Refund, utcnow
from smi.storage import upload_key
from smi.vocabulary import ErrorCode, JobStatus

router = APIRouter(tags=["storefront"], dependencies=[Depends(deps.storefront)])


class JobRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "order_id": "wc-1042",
                    "image_url": "https://shop.example.com/media/poster.png",
                    "scale_factor": 4,
                    "format": "png",
                    "customer_email": "ana@example.com",
                    "customer_name": "Ana",
                    "amount_paid_cents": 1900,
                    "currency": "EUR",
                    "payment_reference": "pi_3Qx",
                }
            ]
        },
    )

    order_id: str = Field(
        pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="the storefront's order, 1-128 of [A-Za-z0-9._:-]"
    )
    image_url: str = Field(max_length=2048)
    scale_factor: StrictInt = Field(ge=2, le=16)
    format: Literal["auto", "png", "jpg", "webp"] = "auto"
    customer_email: str = Field(max_length=254)
    customer_name: str | None = Field(None, max_length=200)
    amount_paid_cents: StrictInt = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    payment_reference: str | None = Field(None, max_length=255)

    @field_validator("image_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(HTTP_URL, value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("customer_email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not EMAIL.match(value):
            raise ValueError("must be an e-mail address like name@example.com")
        return value

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


async def refuse_what_cannot_be_made(svc: deps.Services, image_url: str, scale_factor: int) -> None:
    """422 before anything is written when the image's header already shows the job cannot succeed."""
    found = await probe_image(svc, image_url)
    if found.problem:
        raise ApiError(422, found.problem, f"image_url: {found.detail}")
    if found.width and found.height:
        verdict = quote_for(svc.settings, found.width, found.height, scale_factor)
        if not verdict.accepted:
            raise ApiError(
                422,
                ErrorCode.OUTPUT_TOO_LARGE,
                verdict.reason or "the output is too large for Upsampler",  # a refusal always gives its reason
                {"max_scale_factor": verdict.max_scale_factor},
            )


def _job_of_order(svc: deps.Services, order_id: str) -> Job | None:
    with Session(svc.engine) as session:
        return session.exec(select(Job).where(Job.order_id == order_id)).first()


def _insert_job(svc: deps.Services, body: JobRequest, fingerprint: str) -> tuple[Job, bool]:
    """The new job with its first event and the price paid, in one transaction: (job, True). When the
    same order arrived twice at once and the other request won: (its job, False)."""
    now = utcnow()
    job = Job(
        job_id=uuid.uuid4().hex,
        request_sha256=fingerprint,
        status=JobStatus.RECEIVED,
        created_at=now,
        updated_at=now,
        **body.model_dump(),
    )
    with Session(svc.engine, expire_on_commit=False) as session:  # the job is read after the session closes
        session.add(job)
        session.add(JobEvent(job_id=job.job_id, status=JobStatus.RECEIVED, at=now))
        # The price paid, booked with the job in one transaction.
        session.add(
            LedgerEntry(job_id=job.job_id, purpose="revenue", revenue_usd=body.amount_paid_cents / 100, created_at=now)
        )
        try:
            session.commit()
            return job, True
        except IntegrityError:  # the order_id is unique
            session.rollback()
            return session.exec(select(Job).where(Job.order_id == body.order_id)).one(), False


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobCreated,
    summary="Start the job's workflow (after payment)",
    responses={
        200: {"model": JobCreated, "description": "The order was submitted before (same body): its job"},
        **errors(
            merged(
                KEYED_ERRORS,
                {409: ["order_conflict"], 422: ["invalid_request", *IMAGE_PROBLEMS], 503: ["temporal_unavailable"]},
            )
        ),
    },
)
async def create_job(body: JobRequest, response: Response, svc: deps.Services = Depends(deps.services)) -> JobCreated:
    # The database is used in the threadpool, a session only around each read or write: none is held
    # while the image probe or Temporal is awaited (many requests at once would empty the pool).
    cfg = svc.settings
    fingerprint = body.fingerprint()
    existing = await run_in_threadpool(_job_of_order, svc, body.order_id)
    if existing is None:
        await refuse_what_cannot_be_made(svc, body.image_url, body.scale_factor)
        job, created = await run_in_threadpool(_insert_job, svc, body, fingerprint)
        if not created:
            response.status_code = 200
    else:
        job = existing
        response.status_code = 200
    if job.request_sha256 != fingerprint:
        raise ApiError(
            409,
            "order_conflict",
            f"order {body.order_id} was already submitted with a different body; use a new order_id",
        )
    if job.status == JobStatus.RECEIVED:  # not yet picked up (or an earlier start failed): start, idempotently
        await start_workflow(await svc.temporal_client(), cfg, job)
    return JobCreated(
        job_id=job.job_id,
        status=JobStatus(job.status),
        status_url=job_url(cfg, job.job_id),
        status_page_url=status_page_url(cfg, job.job_id),
    )


def _job_view_of(svc: deps.Services, job_id: str) -> JobView:
    with Session(svc.engine) as session:  # closed before the response is sent (see api/deps.py)
        return job_view(get_job(session, job_id), svc.settings, session, session.get(Refund, job_id))


# Async, the database read in the threadpool: FastAPI checks an async handler's reply against its model
# on the event loop (a few microseconds), a sync handler's in a second trip to the threadpool, which
# costs the storefront's most frequent read its latency when the pool is busy.
@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    summary="The job as it stands",
    responses=errors({401: ["unauthorized"], 404: ["job_not_found"]}),
)
async def read_job(job_id: str, svc: deps.Services = Depends(deps.services)) -> JobView:
    return await run_in_threadpool(_job_view_of, svc, job_id)


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=Upload,
    summary="Upload an image; returns an image_url for POST /v1/jobs",
    description="The body is the image's bytes, a PNG, JPEG or WebP file as it is, at most SMI_MAX_INPUT_BYTES "
    "(whatever the Content-Type says: the bytes tell the format).",
    responses=errors({400: ["empty_upload"], 401: ["unauthorized"], 413: ["too_large"]}),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(request: Request, svc: deps.Services = Depends(deps.services)) -> Upload:
    cfg = svc.settings
    # The body is capped at SMI_MAX_INPUT_BYTES while it streams (api/guard.py).
    upload_id = uuid.uuid4().hex
    storage = svc.storage
    part = storage.scratch(upload_key(upload_id))
    size = 0
    try:
        with open(part, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                out.write(chunk)
        if size == 0:
            raise ApiError(400, "empty_upload", "the request body must be the image's bytes")
        await run_in_threadpool(storage.put, part, upload_key(upload_id))  # a rename, or an upload to the bucket
    finally:  # over the cap, empty, or the client went away: nothing half-written stays
        part.unlink(missing_ok=True)
    expires = int(time.time()) + cfg.original_url_ttl_seconds
    url = signing.signed_file_url(cfg.public_base_url, cfg.secret("webhook_secret"), "uploads", upload_id, expires)
    return Upload(upload_id=upload_id, image_url=url, bytes=size)


class QuoteRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"width": 1200, "height": 800, "scale_factor": 4},
                {"image_url": "https://shop.example.com/media/poster.png", "scale_factor": 2},
            ]
        },
    )

    width: StrictInt | None = Field(None, ge=1, le=100_000)
    height: StrictInt | None = Field(None, ge=1, le=100_000)
    image_url: str | None = Field(None, max_length=2048, pattern=HTTP_URL)
    scale_factor: StrictInt = Field(ge=2, le=16)


@router.post(
    "/v1/quotes",
    response_model=Quote,
    summary="Output size, credits, cost, price, and whether Upsampler accepts it",
    responses=errors(merged(KEYED_ERRORS, {422: ["invalid_request", *IMAGE_PROBLEMS], 502: ["image_unreadable"]})),
)
async def create_quote(body: QuoteRequest, svc: deps.Services = Depends(deps.services)) -> Quote:
    width, height = body.width, body.height
    if body.image_url is not None and width is None and height is None:
        found = await probe_image(svc, body.image_url)
        if found.problem:
            raise ApiError(422, found.problem, f"image_url: {found.detail}")
        if not found.width or not found.height:
            raise ApiError(
                502,
                "image_unreadable",
                "could not read the image's size from image_url; try again or send width and height",
            )
        width, height = found.width, found.height
    elif body.image_url is not None or width is None or height is None:
        raise ApiError(422, "invalid_request", "send either width and height, or image_url (not both)")
    q = quote_for(svc.settings, width, height, body.scale_factor)
    return Quote.model_validate(
        {
            "input": {"width": q.width, "height": q.height},
            "scale_factor": q.scale_factor,
            "output": {"width": q.output_width, "height": q.output_height, "megapixels": q.output_megapixels},
            "credits": q.credits,
            "cost_usd": q.cost_usd,
            "price_usd": q.price_usd,
            "accepted": q.accepted,
            "reason": q.reason,
            "max_scale_factor": q.max_scale_factor,
        }
    )
