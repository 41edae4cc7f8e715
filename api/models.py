"""The JSON the API answers, as pydantic models: each route's `response_model`, so the OpenAPI document
describes the replies and a reply that strays from its model fails in the API, not in a client.

They describe the replies as they were before the models existed, field for field and in the same
order: a field that can be null is declared `X | None` and is always present (no route excludes
None). Where a sum over no rows gives a JSON integer (`0`) and otherwise a decimal number, the field
is `int | float`, so each is written as before.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from smi.vocabulary import JobStatus


class Size(BaseModel):
    width: int
    height: int


# --- the storefront's API (api/jobs.py) ----------------------------------------------------------


class JobCreated(BaseModel):
    job_id: str
    status: JobStatus
    status_url: str
    status_page_url: str


class Upload(BaseModel):
    upload_id: str
    image_url: str
    bytes: int


class QuoteOutput(BaseModel):
    width: int
    height: int
    megapixels: float


class Quote(BaseModel):
    input: Size
    scale_factor: int
    output: QuoteOutput
    credits: float
    cost_usd: float
    price_usd: float
    accepted: bool
    reason: str | None  # why Upsampler would refuse it; null when accepted
    max_scale_factor: int


class JobOutput(BaseModel):
    width: int
    height: int
    bytes: int
    format: str
    sha256: str


class JobCost(BaseModel):
    credits: float
    usd: float


class JobRefund(BaseModel):
    status: str  # refunded | owed | pending
    amount_cents: int
    reason: str


class JobError(BaseModel):
    code: str
    message: str | None


class JobView(BaseModel):
    """The job as GET /v1/jobs/{job_id} shows it (and, with its money, the admin's job list)."""

    job_id: str
    order_id: str
    status: JobStatus
    status_page_url: str
    scale_factor: int
    format: str
    created_at: str
    updated_at: str
    estimated_completion: str | None
    input: Size | None
    output: JobOutput | None
    download_url: str | None
    download_expires_at: str | None
    cost: JobCost | None
    refund: JobRefund | None
    error: JobError | None


# --- Upsampler's webhook (api/webhook.py) ---------------------------------------------------------


class WebhookReceipt(BaseModel):
    received: bool
    delivered: bool  # handed to the job's workflow (now or before); false when ignored


# --- the admin API (api/admin.py) ------------------------------------------------------------------


class Money(BaseModel):
    """What one job earned."""

    revenue_usd: int | float
    cost_usd: int | float
    credits: int | float
    estimated_credits: float | None
    refunded_usd: int | float
    margin_usd: int | float


class AdminJob(JobView):
    money: Money


class AdminJobs(BaseModel):
    jobs: list[AdminJob]


class AdminAction(BaseModel):
    """The reply to an admin's retry or refund: what was done."""

    job_id: str
    action: str  # retry | refund
    how: str


class LinkResent(BaseModel):
    """The reply to an admin's resend-email. `download_expires_at` once the link is sent; while its workflow
    still runs, the field is absent (not null): the route leaves out what was not set."""

    job_id: str
    action: str  # resend-email
    download_expires_at: str | None = None
    how: str


class UsageRow(BaseModel):
    period: str  # 2026-11-21, or 2026-11 by month
    jobs: int
    completed: int
    failed: int
    refunded: int
    credits: float
    cost_usd: float
    revenue_usd: float
    margin_usd: float


class UpsamplerRequests(BaseModel):
    last_minute: int
    per_minute_limit: int
    last_hour: int
    per_hour_limit: int


class UsageReport(BaseModel):
    period: str  # day | month
    from_: str = Field(alias="from")
    to: str
    rows: list[UsageRow]
    upsampler_requests: UpsamplerRequests


class BudgetReleased(BaseModel):
    released: list[str]  # the budget periods released: day:..., month:...
    jobs_woken: int


class Erasure(BaseModel):
    """How much of a customer was erased."""

    jobs: int
    files: int
    tokens: int
    emails: int


class ReconciliationDifference(BaseModel):
    """One Upsampler id whose booking and charge differed (workflows/reconciliation.py)."""

    job_id: str
    upsampler_id: str
    booked: float | None  # the ledger's credits for it before the reconciliation; null: no row
    reported: float | None  # what Upsampler charges for it; null: not known (yet)
    action: str  # booked | mismatch | pending | unchecked | unknown


class OrphanListed(BaseModel):
    """An Upsampler job we caused that was no current submission of its job, booked once (smi/orphans.py)."""

    upsampler_id: str
    job_id: str
    credits: float
    found_by: str  # webhook | reconciliation
    created_at: str


class ReconciliationReport(BaseModel):
    """One UTC day compared with Upsampler, and the orphans found that day."""

    day: str
    checked_at: str
    jobs: int  # jobs created that day
    upsampler_ids: int  # ids checked with the status endpoint
    booked_credits: float  # what the ledger had for them before
    reported_credits: float  # what Upsampler's status endpoint reports
    booked_now: int  # ledger rows the reconciliation added
    differences: list[ReconciliationDifference]
    orphans: list[OrphanListed]  # found that UTC day, by the webhook or a reconciliation


# --- the customer's status page (api/status.py) ------------------------------------------------------


class Stage(BaseModel):
    status: JobStatus
    label: str
    at: str | None  # when the job entered it
    state: str  # done | current | todo


class StatusOutput(BaseModel):
    width: int
    height: int
    format: str
    bytes: int


class StatusState(BaseModel):
    """What the status page shows; its event stream sends the same JSON."""

    job_id: str
    order_id: str
    status: JobStatus
    final: bool
    headline: str
    message: str
    progress: int | None
    stages: list[Stage]
    estimated_completion: str | None
    download_url: str | None
    download_expires_at: str | None
    output: StatusOutput | None


# --- operators (api/app.py) ---------------------------------------------------------------------------


class Liveness(BaseModel):
    status: str  # ok


class Readiness(BaseModel):
    status: str  # ready
    checks: dict[str, str]  # database, storage, temporal: ok


# --- the Temporal UI's remote codec (api/codec.py) -----------------------------------------------------


class CodecPayload(BaseModel):
    """A Temporal payload in protobuf JSON, which leaves out empty fields."""

    metadata: dict[str, str] = {}  # base64 values
    data: str | None = None  # base64


class CodecPayloads(BaseModel):
    payloads: list[CodecPayload]


class CodecRequest(BaseModel):
    """What the Temporal UI sends: the payloads, which protobuf JSON leaves out when there are none."""

    payloads: list[CodecPayload] = []


# --- every error (api/errors.py) -----------------------------------------------------------------------


class ErrorInfo(BaseModel):
    code: str  # what went wrong, for programs: each route's documented statuses list the codes they carry
    message: str  # what went wrong and what to do, for people
    details: Any  # more about it (a list of fields, the checks, the busy jobs), or null


class ErrorReply(BaseModel):
    """The shape of every error the API answers: {"error": {"code", "message", "details"}}."""

    error: ErrorInfo
