"""Orphaned Upsampler jobs: ones we caused that are no current submission of their job (issue 16).

A submit whose reply was lost and that the workflow gave up waiting for, a job from before a reset, a
second job a fault forced: Upsampler bills each, so the ledger books each, as `upscale:<upsampler id>`,
once. They are found by the webhook (api/webhook.py) and by the daily reconciliation
(workflows/reconciliation.py); both book through `book_orphan`.
"""

from __future__ import annotations

import math

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, or_, select

from smi import telemetry
from smi.db import LedgerEntry, OrphanJob, Submission, SubmitIntent, insert_once, set_job_cost, utcnow

FOUND_BY = ("webhook", "reconciliation")


def job_credit_price(session: Session, job_id: str, default: float) -> float:
    """The price of a credit in USD that the job started with (its policy's, as its estimate or an earlier
    charge booked it); `default` (SMI_CREDIT_PRICE_USD) when the job's ledger has no credits yet."""
    entry = session.exec(
        select(LedgerEntry)
        .where(LedgerEntry.job_id == job_id, LedgerEntry.credits > 0)
        .where(or_(col(LedgerEntry.purpose) == "estimate", col(LedgerEntry.purpose).startswith("upscale:")))
        .order_by(col(LedgerEntry.purpose) != "estimate", col(LedgerEntry.id))
    ).first()
    return entry.cost_usd / entry.credits if entry is not None else default


def known_upsampler_ids(session: Session, job_id: str) -> set[str]:
    """Every Upsampler id the service knows its job caused: its submissions, its orphans, and the ids webhooks
    named for submits whose reply never came (SubmitIntent.reported_id)."""
    submitted = session.exec(select(Submission.upsampler_id).where(Submission.job_id == job_id)).all()
    orphans = session.exec(select(OrphanJob.upsampler_id).where(OrphanJob.job_id == job_id)).all()
    reported = session.exec(
        select(SubmitIntent.reported_id).where(
            SubmitIntent.job_id == job_id, col(SubmitIntent.reported_id).is_not(None)
        )
    ).all()
    return {*submitted, *orphans, *(upsampler_id for upsampler_id in reported if upsampler_id)}


def book_charge(engine: Engine, job_id: str, upsampler_id: str, credits: float, credit_price_usd: float) -> bool:
    """Book what one Upsampler job of `job_id` cost as ledger row `upscale:<upsampler_id>`, once (the row is
    unique per job and purpose: whoever books it first, record_cost or this, it stays as booked), priced
    like the job's other charges (`job_credit_price`, else `credit_price_usd`); then the job's cost becomes
    the sum of its `upscale:` rows, whether or not this call added one. True when it added the row."""
    with Session(engine) as session:
        charge = LedgerEntry(
            job_id=job_id,
            purpose=f"upscale:{upsampler_id}",
            credits=credits,
            cost_usd=round(credits * job_credit_price(session, job_id, credit_price_usd), 6),
            created_at=utcnow(),
        )
        booked = insert_once(session, charge)
        if booked:  # counters take integers; credits come in hundredths
            telemetry.count(
                "smi_credits_spent_hundredths",
                round(credits * 100),
                "Upsampler credits booked, in hundredths of a credit.",
            )
        set_job_cost(session, job_id)
        session.commit()
    return booked


def book_orphan(
    engine: Engine, job_id: str, upsampler_id: str, credits: float, credit_price_usd: float, found_by: str
) -> bool:
    """Record `upsampler_id` as an orphan of `job_id` and book what it cost, each once; True when this call
    recorded it (False: known already, by a duplicate webhook or the other finder; or no orphan at all).

    `credits`: what Upsampler charges for it (its `creditCost` once it ended SUCCESS, 0 when it FAILED); a
    value that is not a finite non-negative number books 0. `credit_price_usd`: the price of a credit when the
    job's ledger has none of its own yet. `found_by`: "webhook" or "reconciliation". One of the job's
    submissions is no orphan: nothing is recorded or booked for it here (its cost is record_cost's, or
    `book_charge`'s). Every call completes the booking (`book_charge`) of a recorded orphan, so a process
    that died between the two rows leaves nothing owed for the next call. Counted once in
    `smi_orphan_jobs_total` (when called from an activity: in the worker's metrics; the API's `/metrics`
    has `smi_db_orphan_jobs_total` from the table).
    """
    if found_by not in FOUND_BY:
        raise ValueError(f"found_by is one of {FOUND_BY}")
    credits = float(credits) if isinstance(credits, (int, float)) and math.isfinite(credits) and credits > 0 else 0.0
    with Session(engine) as session:
        submitted = session.exec(
            select(Submission.id).where(Submission.job_id == job_id, Submission.upsampler_id == upsampler_id)
        ).first()
        if submitted is not None:
            return False
        found = OrphanJob(
            upsampler_id=upsampler_id, job_id=job_id, credits=credits, found_by=found_by, created_at=utcnow()
        )
        recorded = insert_once(session, found)
        orphan = session.get(OrphanJob, upsampler_id)
        if orphan is None or orphan.job_id != job_id:  # another job's id: nothing of this job to book
            return False
        credits = orphan.credits  # as first recorded
    book_charge(engine, job_id, upsampler_id, credits, credit_price_usd)
    if recorded:
        telemetry.count("smi_orphan_jobs", 1, "Upsampler jobs we caused that were no current submission.")
    return recorded
