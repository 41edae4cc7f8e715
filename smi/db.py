"""The business record: jobs, Upsampler submissions, cost ledger, download tokens, sent mail.

Temporal holds the process; these tables hold what the business must keep. Every row that
records a side effect has a unique key of job and purpose, so repeating an activity finds
the row and does nothing twice.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, cast, overload

from sqlalchemy import Column, DateTime, UniqueConstraint, event
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.dml import UpdateBase
from sqlmodel import Field, Session, SQLModel, col, create_engine, select


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
@overload
def as_utc(value: datetime | None) -> datetime | None: ...


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _timestamp(**kwargs: Any) -> Any:  # Any, as sqlmodel.Field: the field keeps its annotated type
    return Field(sa_column=Column(DateTime(timezone=True), **kwargs))


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    job_id: str = Field(primary_key=True, max_length=32)
    order_id: str = Field(unique=True, index=True, max_length=128)
    request_sha256: str = Field(max_length=64)
    status: str = Field(index=True, max_length=32)
    created_at: datetime = _timestamp(nullable=False, index=True)
    updated_at: datetime = _timestamp(nullable=False)

    image_url: str
    scale_factor: int
    format: str = Field(max_length=8)
    customer_email: str
    customer_name: str | None = None
    amount_paid_cents: int
    currency: str = Field(max_length=3)
    payment_reference: str | None = None

    estimated_completion: datetime | None = _timestamp(nullable=True)
    input_width: int | None = None
    input_height: int | None = None
    upsampler_id: str | None = None
    output_width: int | None = None
    output_height: int | None = None
    output_bytes: int | None = None
    output_format: str | None = None
    output_sha256: str | None = None
    result_path: str | None = None
    cost_credits: float | None = None
    cost_usd: float | None = None
    runs: int = 1  # 1 + the admin retries that started a new workflow run
    download_generation: int = 0
    download_expires_at: datetime | None = _timestamp(nullable=True)
    error_code: str | None = None
    error_message: str | None = None


class JobEvent(SQLModel, table=True):
    """One row per status change: how long each stage took, for the dashboard and the status page."""

    __tablename__ = "job_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=32)
    status: str = Field(max_length=32)  # the status entered
    at: datetime = _timestamp(nullable=False, index=True)


def rows_changed(session: Session, statement: UpdateBase) -> int:
    """Run an UPDATE or DELETE in the session's transaction; how many rows it changed."""
    return cast(CursorResult, session.execute(statement)).rowcount


def set_status(session: Session, job: Job, status: str) -> None:
    """A job's new status, with its job_events row when it changes (the same status again, as from
    a retried activity, adds none)."""
    now = utcnow()
    if job.status != status:
        session.add(JobEvent(job_id=job.job_id, status=status, at=now))
    job.status, job.updated_at = status, now
    session.add(job)


class Submission(SQLModel, table=True):
    """One request to Upsampler: recorded before the activity reports it, found again on retry."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("job_id", "attempt"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=32)
    attempt: int
    upsampler_id: str
    credit_cost: float | None = None
    error: str | None = None  # set when Upsampler refused the job at once
    created_at: datetime = _timestamp(nullable=False)


class LedgerEntry(SQLModel, table=True):
    """Money per job, one row per purpose: "revenue" (the price paid), "estimate" (credits
    foreseen at start; informative, not summed), "upscale:<upsampler id>" (what each
    submission really cost), "refund" (the price paid back, as negative revenue)."""

    __tablename__ = "ledger"
    __table_args__ = (UniqueConstraint("job_id", "purpose"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=32)
    purpose: str = Field(max_length=128)
    credits: float = 0.0
    cost_usd: float = 0.0
    revenue_usd: float = 0.0
    created_at: datetime = _timestamp(nullable=False, index=True)


def insert_once(session: Session, row: SQLModel) -> bool:
    """Insert `row` and commit; when a unique key already holds it, change nothing. True if it was new."""
    session.add(row)
    try:
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
        return False


def set_job_cost(session: Session, job_id: str) -> float | None:
    """The job's cost (credits, USD) becomes the sum of its `upscale:<id>` ledger rows, one per Upsampler job
    it caused; the caller commits. Its cost in USD, None when the job has no record."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    entries = session.exec(
        select(LedgerEntry).where(LedgerEntry.job_id == job_id, col(LedgerEntry.purpose).startswith("upscale:"))
    ).all()
    job.cost_credits = round(sum(entry.credits for entry in entries), 6)
    job.cost_usd = round(sum(entry.cost_usd for entry in entries), 6)
    session.add(job)
    return job.cost_usd


class UpsamplerCall(SQLModel, table=True):
    """Every request to Upsampler, for the hourly quota (shared by all workers) and the usage report."""

    __tablename__ = "upsampler_calls"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _timestamp(nullable=False, index=True)
    kind: str = Field(max_length=16)  # submit | status
    outcome: str = Field(max_length=32)  # ok, rate_limited, transient, ...


class BudgetAlert(SQLModel, table=True):
    """One per budget period and threshold: the insert decides which worker sends the email."""

    __tablename__ = "budget_alerts"

    key: str = Field(primary_key=True, max_length=64)  # e.g. "day:2026-11-21:80"
    owner: str = Field(max_length=128)  # the workflow whose activity won the insert
    spent_usd: float
    budget_usd: float
    created_at: datetime = _timestamp(nullable=False)


class BudgetRelease(SQLModel, table=True):
    """An admin's release of a crossed budget (hard stop) for one period."""

    __tablename__ = "budget_releases"

    period: str = Field(primary_key=True, max_length=32)  # "day:2026-11-21" or "month:2026-11"
    created_at: datetime = _timestamp(nullable=False)


class DownloadToken(SQLModel, table=True):
    """Only the token's SHA-256 is kept; the token itself exists in the customer's email."""

    __tablename__ = "download_tokens"
    __table_args__ = (UniqueConstraint("job_id", "generation"), UniqueConstraint("job_id", "purpose"))

    token_sha256: str = Field(primary_key=True, max_length=64)
    job_id: str = Field(index=True, max_length=32)
    purpose: str = Field(max_length=64)  # "run:1", "resend:<request id>": one link per purpose
    generation: int
    expires_at: datetime = _timestamp(nullable=False)
    revoked: bool = False
    downloads: int = 0  # whole downloads started (requests from byte 0)
    created_at: datetime = _timestamp(nullable=False)


class Refund(SQLModel, table=True):
    """At most one per job (the primary key): retries, resets and admin clicks all find this row."""

    __tablename__ = "refunds"

    job_id: str = Field(primary_key=True, max_length=32)
    status: str = Field(max_length=16)  # pending -> refunded | owed (adapter "none": a human pays it back)
    amount_cents: int
    currency: str = Field(max_length=3)
    reason: str = Field(max_length=64)
    adapter: str = Field(max_length=16)
    external_id: str | None = None
    created_at: datetime = _timestamp(nullable=False, index=True)
    completed_at: datetime | None = _timestamp(nullable=True)


class SentMail(SQLModel, table=True):
    __tablename__ = "sent_mail"
    __table_args__ = (UniqueConstraint("job_id", "purpose"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=32)
    purpose: str = Field(max_length=64)  # e.g. "completed:1" (kind and link generation), "failed:run:1"
    message_id: str
    status: str = "sending"  # sending -> sent
    created_at: datetime = _timestamp(nullable=False)
    sent_at: datetime | None = _timestamp(nullable=True)


class RateLimitCount(SQLModel, table=True):
    """Requests of one client (an address, an IPv6 /64) to one group of public routes in one UTC minute,
    counted by every API process alike (api/deps.py RateLimiter). Minutes before the current one are
    deleted in batches; the key leads with the minute, so that deletion walks the primary key."""

    __tablename__ = "rate_limit_counts"

    minute: int = Field(primary_key=True)  # minutes since the Unix epoch
    client: str = Field(primary_key=True, max_length=64)
    route_group: str = Field(primary_key=True, max_length=32)  # the path's first segment: downloads, files, ...
    requests: int


class FunnelCount(SQLModel, table=True):
    """What the pages count of the sales funnel (smi/funnel.py): buttons shown and modals opened, per UTC day,
    stage and (page URL, image URL). One row per key, added to by an upsert; the key holds the pair's SHA-256,
    not the URLs, so it stays short however long they are. Checkout, payment, delivery and refunds are not
    here: they are read from the checkout sessions, jobs and refunds when the funnel is asked for."""

    __tablename__ = "funnel_counts"

    day: date = Field(primary_key=True)
    stage: str = Field(primary_key=True, max_length=16)  # shown | opened
    pair_sha256: str = Field(primary_key=True, max_length=64)  # sha256(page_url + "\n" + image_url)
    site: str = Field(index=True, max_length=255)  # the page's origin: scheme://host[:port]
    page_url: str = Field(max_length=2048)  # without query and fragment
    image_url: str = Field(max_length=2048)  # without query and fragment
    count: int


class CheckoutSession(SQLModel, table=True):
    """One Stripe Checkout Session started by POST /v1/checkout, and how far it went: `created` (the
    customer was sent to Stripe), `paid` (the webhook started job_id). The funnel reads its stages here.
    The customer's address is stored only once paid, taken from the session."""

    __tablename__ = "checkout_sessions"

    session_id: str = Field(primary_key=True, max_length=255)  # Stripe's cs_...
    order_id: str = Field(unique=True, index=True, max_length=128)  # the job's order_id once paid
    job_id: str | None = Field(default=None, max_length=32, index=True)
    publishable_key: str | None = Field(default=None, max_length=255)  # None: created with the storefront key
    image_url: str
    page_url: str | None = None
    scale_factor: int
    price_cents: int
    currency: str = Field(max_length=3)
    status: str = Field(index=True, max_length=16)  # created -> paid
    customer_email: str | None = None
    payment_intent: str | None = Field(default=None, max_length=255)
    created_at: datetime = _timestamp(nullable=False, index=True)
    updated_at: datetime = _timestamp(nullable=False)
    paid_at: datetime | None = _timestamp(nullable=True, index=True)


class SubmitIntent(SQLModel, table=True):
    """A POST to Upsampler about to be made. Written before the POST; `outcome` after.
    outcome None: the reply never reached us (a job may exist at Upsampler, fate unknown);
    "accepted": the reply came (a Submission row has its id); "refused": Upsampler answered an
    HTTP error (no job); "adopted": a webhook carrying this nonce named the job and the status endpoint
    confirmed it (a Submission row has its id); "abandoned": the workflow stopped waiting and submitted again
    (a webhook for it later is an orphan)."""

    __tablename__ = "submit_intents"

    nonce: str = Field(primary_key=True, max_length=32)  # 32 lowercase hex, secrets.token_hex(16)
    job_id: str = Field(index=True, max_length=32)
    attempt: int
    outcome: str | None = Field(default=None, max_length=16)
    reported_id: str | None = Field(default=None, max_length=128)  # an Upsampler id a webhook with this nonce named
    created_at: datetime = _timestamp(nullable=False)


class OrphanJob(SQLModel, table=True):
    """An Upsampler job we caused that is no current submission of its job (a lost reply given up on, a job
    from before a reset): its cost is booked as ledger purpose upscale:<id>, once."""

    __tablename__ = "orphan_jobs"

    upsampler_id: str = Field(primary_key=True, max_length=128)
    job_id: str = Field(index=True, max_length=32)
    credits: float
    found_by: str = Field(max_length=16)  # "webhook" | "reconciliation"
    created_at: datetime = _timestamp(nullable=False)


class Reconciliation(SQLModel, table=True):
    """One UTC day compared with Upsampler (workflows/reconciliation.py)."""

    __tablename__ = "reconciliations"

    day: date = Field(primary_key=True)
    checked_at: datetime = _timestamp(nullable=False)
    jobs: int  # jobs created that day
    upsampler_ids: int  # ids checked with the status endpoint
    booked_credits: float  # what the ledger had for them before
    reported_credits: float  # what Upsampler's status endpoint reports
    booked_now: int  # ledger rows this reconciliation added
    differences: str  # JSON list of {"job_id","upsampler_id","booked","reported","action"}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # WAL: readers never block the writer
            cursor = dbapi_connection.cursor()
            for attempt in range(100):
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    # Processes opening a new file at once: one converts it to WAL, and SQLite answers
                    # the others "locked" at once, without its busy timeout. Soon it is WAL for all.
                    if attempt == 99:
                        raise
                    time.sleep(0.05)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine  # no schema change here: each process migrates explicitly at start (smi.migrations.migrate)


__all__ = [
    "BudgetAlert",
    "BudgetRelease",
    "CheckoutSession",
    "DownloadToken",
    "FunnelCount",
    "Job",
    "JobEvent",
    "LedgerEntry",
    "OrphanJob",
    "RateLimitCount",
    "Reconciliation",
    "Refund",
    "SentMail",
    "Session",
    "Submission",
    "SubmitIntent",
    "UpsamplerCall",
    "as_utc",
    "insert_once",
    "make_engine",
    "set_job_cost",
    "set_status",
    "utcnow",
]
