"""The admin dashboard's figures, read from the database: every query of the dashboard is here."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import DateTime, case, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from smi import funnel
from smi.db import Job, JobEvent, as_utc
from smi.vocabulary import JobStatus

TROUBLE = (JobStatus.FAILED, JobStatus.MANUAL_REVIEW)


@dataclass
class ReviewItem:
    job_id: str
    order_id: str
    error_code: str | None
    error_message: str | None
    since: datetime  # when the job entered manual review


def status_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.execute(select(col(Job.status), func.count()).group_by(col(Job.status))).all()
    return {status: count for status, count in rows}


def manual_review_queue(engine: Engine) -> list[ReviewItem]:
    """Jobs waiting for an admin, longest waiting first."""
    entered = (
        select(col(JobEvent.job_id), func.max(col(JobEvent.at)).label("at"))
        .where(col(JobEvent.status) == JobStatus.MANUAL_REVIEW)
        .group_by(col(JobEvent.job_id))
        .subquery()
    )
    query = (
        select(
            col(Job.job_id),
            col(Job.order_id),
            col(Job.error_code),
            col(Job.error_message),
            func.coalesce(entered.c.at, col(Job.updated_at)).label("since"),
        )
        .outerjoin(entered, entered.c.job_id == col(Job.job_id))
        .where(col(Job.status) == JobStatus.MANUAL_REVIEW)
        .order_by("since")
    )
    with Session(engine) as session:
        rows = session.execute(query).all()
    return [ReviewItem(r.job_id, r.order_id, r.error_code, r.error_message, as_utc(r.since)) for r in rows]


def error_rate(engine: Engine, since: datetime) -> tuple[int, int]:
    """(jobs created since then that failed or wait in manual review, jobs created since then)."""
    troubled = func.sum(case((col(Job.status).in_(TROUBLE), 1), else_=0))
    with Session(engine) as session:
        total, bad = session.execute(select(func.count(), troubled).where(col(Job.created_at) >= since)).one()
    return bad or 0, total


def median_stage_seconds(engine: Engine, since: datetime) -> dict[str, float]:
    """Per status: the median time from entering it to the job's next event, over stages entered since then.

    The next event comes from a window function (SQLite and PostgreSQL alike); the median is
    taken here because SQLite has no percentile function.
    """
    next_at = func.lead(col(JobEvent.at), type_=DateTime(timezone=True)).over(
        partition_by=col(JobEvent.job_id), order_by=(col(JobEvent.at), col(JobEvent.id))
    )
    query = select(col(JobEvent.status), col(JobEvent.at), next_at.label("next_at")).where(col(JobEvent.at) >= since)
    durations: dict[str, list[float]] = {}
    with Session(engine) as session:
        for status, at, following in session.execute(query):
            if following is not None:
                durations.setdefault(status, []).append((as_utc(following) - as_utc(at)).total_seconds())
    return {status: statistics.median(values) for status, values in durations.items()}


def recent_jobs(engine: Engine, limit: int = 20) -> list:
    """The newest jobs, without the customer's address or name."""
    query = (
        select(
            col(Job.job_id),
            col(Job.order_id),
            col(Job.status),
            col(Job.created_at),
            col(Job.updated_at),
            col(Job.error_code),
        )
        .order_by(col(Job.created_at).desc())
        .limit(limit)
    )
    with Session(engine) as session:
        return list(session.execute(query).all())


def funnel_top(engine: Engine, today: date, days: int = 30, limit: int = 10) -> funnel.Report:
    """The funnel of the last `days` UTC days: the top pages and images by revenue (then by modals opened)."""
    report = funnel.report(engine, today - timedelta(days=days - 1), today)
    report.pages, report.images = report.pages[:limit], report.images[:limit]
    return report
