"""The job's vocabulary, one module that workflows, activities, API and CLI all import: its
statuses, its error codes and what the workflow answers to each, and the small typed payloads
the workflow and its activities exchange (files travel by path).

Wire values (statuses, error codes, payload field names) are what running workflows and saved
histories hold: change none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class JobStatus(StrEnum):
    """The job JSON's `status`; also the values of the UpscaleStatus search attribute."""

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    MANUAL_REVIEW = "manual_review"
    FAILED = "failed"


# No workflow runs for a job in these; a refunded job ends failed (or stays completed).
FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})


class ErrorCode(StrEnum):
    """Why a step failed: an activity's error type, the workflow's Problem code, a job's error.code."""

    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_LARGE = "too_large"  # the original, for Upsampler's input limit
    OUTPUT_TOO_LARGE = "output_too_large"  # input x scale over Upsampler's pixel limit
    FETCH_FAILED = "fetch_failed"
    IMAGE_URL_REFUSED = "image_url_refused"
    RESULT_URL_REFUSED = "result_url_refused"
    INVALID_RESULT = "invalid_result"
    RESULT_EXPIRED = "result_expired"
    UPSAMPLER_UNAUTHORIZED = "upsampler_unauthorized"
    UPSAMPLER_INVALID_INPUT = "upsampler_invalid_input"
    UPSAMPLER_NOT_FOUND = "upsampler_not_found"
    UPSAMPLER_FAILED = "upsampler_failed"
    UPSAMPLER_ERROR = "upsampler_error"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    REFUND_FAILED = "refund_failed"
    REFUND_PENDING = "refund_pending"
    ADMIN_REFUND = "admin_refund"
    MAIL_FAILED = "mail_failed"
    INVALID_REQUEST = "invalid_request"
    INTERNAL = "internal"
    SUBMISSION_UNKNOWN = "submission_unknown"  # a submit whose reply never came: Upsampler may hold a job


class Answer(StrEnum):
    """What the workflow does about a step that failed for good."""

    RESUBMIT = "resubmit"  # a new Upsampler job from the same input
    COMPRESS = "compress"  # a JPEG copy one quality step lower, then resubmit
    REFRESH = "refresh"  # ask the status endpoint for fresh result URLs, download again
    REFUND = "refund"  # refund, tell the customer and the admin; the job ends failed
    REVIEW = "review"  # manual review: tell the admin, wait (days if need be) for retry or refund


@dataclass(frozen=True)
class Rule:
    answers: tuple[Answer, ...]  # the n-th failure of the kind gets the n-th answer; the last one repeats
    final: bool = False  # an activity raising it is not retried: no retry can mend it


# The failure table. Network errors, timeouts, 5xx and 429 (after Retry-After) never reach it as
# long as the activities' RetryPolicies absorb them; only what outlasts those lands under
# "transient" or "rate_limited". A code missing here gets DEFAULT_RULE. Keyed by ErrorCode, a StrEnum:
# the failure's type name, a plain str, finds its row.
FAILURE_TABLE: dict[str, Rule] = {
    ErrorCode.UNSUPPORTED_FORMAT: Rule((Answer.REFUND,), final=True),
    ErrorCode.TOO_LARGE: Rule((Answer.COMPRESS, Answer.COMPRESS, Answer.COMPRESS, Answer.REFUND), final=True),
    ErrorCode.FETCH_FAILED: Rule((Answer.REFUND,), final=True),
    ErrorCode.IMAGE_URL_REFUSED: Rule((Answer.REFUND,), final=True),
    ErrorCode.RESULT_URL_REFUSED: Rule((Answer.REVIEW,), final=True),
    ErrorCode.INVALID_RESULT: Rule((Answer.RESUBMIT, Answer.REVIEW), final=True),
    ErrorCode.RESULT_EXPIRED: Rule((Answer.REFRESH, Answer.RESUBMIT, Answer.REVIEW), final=True),
    ErrorCode.UPSAMPLER_UNAUTHORIZED: Rule((Answer.REVIEW,), final=True),
    ErrorCode.UPSAMPLER_INVALID_INPUT: Rule((Answer.REFUND,), final=True),
    ErrorCode.UPSAMPLER_NOT_FOUND: Rule((Answer.REVIEW,), final=True),
    ErrorCode.REFUND_FAILED: Rule((Answer.REVIEW,), final=True),
    ErrorCode.OUTPUT_TOO_LARGE: Rule((Answer.REFUND,)),
    ErrorCode.UPSAMPLER_FAILED: Rule((Answer.RESUBMIT, Answer.REVIEW)),
    ErrorCode.TIMEOUT: Rule((Answer.REVIEW,)),
    ErrorCode.ADMIN_REFUND: Rule((Answer.REFUND,)),
    # The workflow answers it itself (adopt the job a webhook names, else submit again); listed for `final`.
    ErrorCode.SUBMISSION_UNKNOWN: Rule((Answer.RESUBMIT,), final=True),
}
DEFAULT_RULE = Rule((Answer.REVIEW,))
# Errors no retry can mend: the activities' RetryPolicies do not retry them.
FINAL_ERRORS = [str(code) for code, rule in FAILURE_TABLE.items() if rule.final]


class Decision(StrEnum):
    """An admin's word to a running UpscaleWorkflow (its `admin_decision` signal)."""

    RETRY = "retry"  # only while the job waits in manual review
    REFUND = "refund"  # any time; acted on at the next step


# Upsampler calls run on "<task queue>-upsampler", rate-limited to Upsampler's quota.
UPSAMPLER_QUEUE_SUFFIX = "-upsampler"


@dataclass
class JobPolicy:
    """Tunable numbers, read from settings when the job starts and kept for its whole life."""

    poll_initial_delay_seconds: float = 30.0
    poll_max_interval_seconds: float = 120.0
    processing_timeout_seconds: float = 900.0
    download_ttl_hours: float = 24.0
    credit_price_usd: float = 0.04
    credits_per_megapixel: float = 0.25
    upsampler_max_input_bytes: int = 20 * 1024 * 1024
    budget_hard_stop: bool = False
    shop_events: bool = False  # SMI_STOREFRONT_WEBHOOK_URL is set: the outcomes are POSTed to the shop
    shop_event_first_retry_seconds: float = 30.0


@dataclass
class UpscaleInput:
    """No customer data: the email address and name stay in the database."""

    job_id: str
    image_url: str
    scale_factor: int
    format: str  # auto | png | jpg | webp
    policy: JobPolicy = field(default_factory=JobPolicy)
    run: int = 1  # 1 + the admin retries that started this job again
    attempts_before: int = 0  # Upsampler submissions made by earlier runs: keeps submission keys unique


@dataclass
class FetchRequest:
    job_id: str
    image_url: str


@dataclass
class StoredImage:
    path: str
    width: int
    height: int
    format: str
    bytes: int
    sha256: str


@dataclass
class CompressRequest:
    job_id: str
    quality: int


@dataclass
class SubmitRequest:
    job_id: str
    attempt: int
    scale_factor: int
    variant: str = ""  # "" for the original, "q70" for the copy compressed at quality 70
    expected_seconds: float | None = None  # with it, the job's record gets the Upsampler id and an estimated time


@dataclass
class AdoptRequest:
    """A job a webhook named for a submission whose reply never came: confirm it, then it is the submission."""

    job_id: str
    attempt: int
    upsampler_id: str


@dataclass
class UpsamplerResult:
    """Upsampler's view of a job, in our status words (queued/processing/completed/failed)."""

    upsampler_id: str
    status: JobStatus  # queued, processing, completed or failed
    credit_cost: float | None = None
    image_url: str | None = None
    compressed_image_url: str | None = None
    error: str | None = None
    error_kind: str | None = None  # an ErrorCode, for FAILED: too_large, unsupported_format or upsampler_failed


@dataclass
class WebhookHint:
    """What a webhook says. Only a hint: the status endpoint is asked before anything moves."""

    upsampler_id: str
    status: JobStatus
    attempt: int = 0  # set when the webhook's nonce names a submission whose reply never came


@dataclass
class DownloadRequest:
    job_id: str
    url: str
    attempt: int


@dataclass
class DownloadedFile:
    path: str
    bytes: int
    sha256: str


@dataclass
class ValidateRequest:
    job_id: str
    path: str
    width: int
    height: int


@dataclass
class StoreRequest:
    job_id: str
    path: str
    format: str  # auto | png | jpg | webp


@dataclass
class CheckAndStoreRequest:
    """Validate the downloaded result (width x height, a known format, every pixel decodes), then store it."""

    job_id: str
    path: str
    width: int
    height: int
    format: str  # auto | png | jpg | webp


@dataclass
class CostRecord:
    job_id: str
    upsampler_id: str
    credits: float
    credit_price_usd: float


@dataclass
class EstimateRecord:
    job_id: str
    width: int
    height: int
    scale_factor: int
    credits_per_megapixel: float
    credit_price_usd: float


@dataclass
class TokenRequest:
    job_id: str
    purpose: str  # "run:1", "resend:<request id>": one link per purpose
    ttl_hours: float


@dataclass
class DownloadLink:
    generation: int
    expires_at: datetime


@dataclass
class EmailRequest:
    job_id: str
    kind: str  # template name: completed, failed, admin_notice
    generation: int = 0  # the download link's generation, for "completed"
    purpose: str | None = None  # the once-only key; default "<kind>:<generation>"
    note: str | None = None  # the admin notice's headline


@dataclass
class JobUpdate:
    """A change to the job's business record; None fields are left as they are."""

    job_id: str
    status: JobStatus
    estimated_completion: datetime | None = None
    input: StoredImage | None = None
    output: StoredImage | None = None
    upsampler_id: str | None = None
    download: DownloadLink | None = None
    error_code: str | None = None  # an ErrorCode; "" clears it
    error_message: str | None = None
    estimate: EstimateRecord | None = None  # booked in the same transaction


@dataclass
class ResultBooking:
    """Upsampler's result is in: book its cost, enter `downloading`; the budget alerts it set off come back."""

    cost: CostRecord
    update: JobUpdate


@dataclass
class Completion:
    """The result is in place: the link for `token`, and `update` (status completed) naming it, in one go."""

    token: TokenRequest
    update: JobUpdate


@dataclass
class RefundRequest:
    job_id: str
    reason: str  # the error kind, or "admin"


@dataclass
class ResendInput:
    job_id: str
    request_id: str
    status: JobStatus  # the job's status, kept as it is
    ttl_hours: float


@dataclass
class RefundOutcome:
    status: str  # refunded | owed
    amount_cents: int
    currency: str
    adapter: str


@dataclass
class JobState:
    """What the workflow's `state` query answers."""

    status: JobStatus = JobStatus.RECEIVED
    upsampler_id: str | None = None
    attempt: int = 0
    polls: int = 0
    webhooks: int = 0
    error_code: str | None = None
    error_message: str | None = None
    refund: RefundOutcome | None = None
    awaiting_decision: bool = False


@dataclass
class BudgetAlertInfo:
    key: str  # "day:2026-11-21:80"
    period: str  # "day:2026-11-21"
    threshold: int  # percent
    spent_usd: float
    budget_usd: float


@dataclass
class BudgetGate:
    open: bool
    recheck_seconds: float  # when a closed gate is worth asking again


# Retention (workflows/retention.py): one cleanup pass, a page of stored names at a time.
@dataclass
class RetentionRequest:
    as_of: datetime | None = None  # the pass's "now" (UTC); the workflow sets it from workflow.now()


@dataclass
class StoredNames:
    """A page of what storage holds: job ids (jobs/<id>/ with files) or upload ids (uploads/<id>)."""

    kind: str  # "jobs" | "uploads"
    names: list[str] = field(default_factory=list)
    modified: list[datetime] = field(default_factory=list)  # per name: the newest file's modification time
    next_after: str | None = None  # the cursor of the next page; None on the last one


@dataclass
class InventoryRequest:
    kind: str  # "jobs" | "uploads"
    after: str = ""
    limit: int = 500


@dataclass
class RetentionPlan:
    """What one page makes due. Inputs: original, compressed copies, leftovers of tmp/; results: upscaled_*."""

    inputs: list[str] = field(default_factory=list)  # job ids
    results: list[str] = field(default_factory=list)  # job ids
    uploads: list[str] = field(default_factory=list)  # upload ids


@dataclass
class RetentionDeleted:
    originals: int = 0
    compressed: int = 0
    temporary: int = 0  # tmp/ and *.part leftovers
    results: int = 0
    uploads: int = 0


@dataclass
class RetentionReport:
    as_of: datetime | None = None
    originals: int = 0
    compressed: int = 0
    temporary: int = 0
    results: int = 0
    uploads: int = 0
    tokens: int = 0
    jobs_seen: int = 0


@dataclass
class RetentionPlanRequest:
    page: StoredNames
    as_of: datetime


# --- job events to the shop (workflows/shop_events.py, activities/shop_events.py) ---------------


class ShopEventType(StrEnum):
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    REFUNDED = "job.refunded"
    MANUAL_REVIEW = "job.manual_review"


@dataclass
class ShopEvent:
    """One event, delivered by its own ShopEventWorkflow whose ID is `event_id`: the same event of the same
    run always has the same id, so a reset of the job's workflow cannot send an accepted event again."""

    event_id: str
    job_id: str
    type: str  # a ShopEventType
    created: str  # ISO 8601, when the job's workflow reached the outcome
    first_retry_seconds: float = 30.0


@dataclass
class ShopDelivery:
    """The event's body as built once (the job as it was), POSTed again until the shop answers 2xx."""

    event_id: str
    job_id: str
    body: str
