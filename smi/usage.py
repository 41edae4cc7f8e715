"""Usage per UTC day or month: jobs and outcomes, credits, cost, revenue, margin; Upsampler quota."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from smi.db import Job, LedgerEntry, Refund, UpsamplerCall, as_utc
from smi.vocabulary import JobStatus

COLUMNS = ["period", "jobs", "completed", "failed", "refunded", "credits", "cost_usd", "revenue_usd", "margin_usd"]


@dataclass
class PeriodUsage:
    period: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    refunded: int = 0
    credits: float = 0.0
    cost_usd: float = 0.0
    revenue_usd: float = 0.0
    margin_usd: float = 0.0


def period_key(moment: datetime, period: str) -> str:
    moment = as_utc(moment)
    return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day; the last day a date can name ends at the last datetime."""
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    return start, start + timedelta(days=1) if day < date.max else datetime.max.replace(tzinfo=timezone.utc)


def period_bounds(moment: datetime, period: str) -> tuple[datetime, datetime]:
    """[start, end) of the UTC day or month holding `moment`."""
    moment = as_utc(moment)
    if period == "day":
        return day_bounds(moment.date())
    start = datetime(moment.year, moment.month, 1, tzinfo=timezone.utc)
    return start, datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=timezone.utc)


def report(engine: Engine, period: str, start: datetime, end: datetime) -> list[PeriodUsage]:
    """Jobs count in the period they were ordered; money in the period it was booked."""
    rows: dict[str, PeriodUsage] = {}

    def bucket(moment: datetime) -> PeriodUsage:
        key = period_key(moment, period)
        return rows.setdefault(key, PeriodUsage(key))

    with Session(engine) as session:
        for created, status in session.exec(
            select(Job.created_at, Job.status).where(Job.created_at >= start, Job.created_at < end)
        ):
            usage = bucket(created)
            usage.jobs += 1
            usage.completed += status == JobStatus.COMPLETED
            usage.failed += status == JobStatus.FAILED
        refunded_at = col(Refund.completed_at)
        for completed_at in session.exec(select(refunded_at).where(refunded_at >= start, refunded_at < end)):
            if completed_at is not None:  # always: NULL compares false in the query
                bucket(completed_at).refunded += 1
        for entry in session.exec(
            select(LedgerEntry).where(
                LedgerEntry.created_at >= start, LedgerEntry.created_at < end, LedgerEntry.purpose != "estimate"
            )
        ):
            usage = bucket(entry.created_at)
            usage.credits += entry.credits
            usage.cost_usd += entry.cost_usd
            usage.revenue_usd += entry.revenue_usd
    for usage in rows.values():
        usage.credits = round(usage.credits, 6)
        usage.cost_usd = round(usage.cost_usd, 6)
        usage.revenue_usd = round(usage.revenue_usd, 2)
        usage.margin_usd = round(usage.revenue_usd - usage.cost_usd, 6)
    return [rows[key] for key in sorted(rows)]


def spent_usd(engine: Engine, start: datetime, end: datetime) -> float:
    with Session(engine) as session:
        total = session.exec(
            select(func.sum(LedgerEntry.cost_usd)).where(
                LedgerEntry.created_at >= start,
                LedgerEntry.created_at < end,
                LedgerEntry.purpose.startswith("upscale:"),
            )
        ).one()
    return round(total or 0.0, 6)


def quota(engine: Engine, now: datetime, per_minute: int, per_hour: int) -> dict:
    with Session(engine) as session:

        def since(delta: timedelta) -> int:
            return session.exec(
                select(func.count()).select_from(UpsamplerCall).where(UpsamplerCall.at >= now - delta)
            ).one()

        return {
            "last_minute": since(timedelta(minutes=1)),
            "per_minute_limit": per_minute,
            "last_hour": since(timedelta(hours=1)),
            "per_hour_limit": per_hour,
        }


def to_csv(rows: list[PeriodUsage]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return out.getvalue()


def to_table(rows: list[PeriodUsage]) -> str:
    header = (
        f"{'period':<10} {'jobs':>5} {'done':>5} {'failed':>6} {'refund':>6} {'credits':>9} {'cost $':>9} "
        f"{'revenue $':>10} {'margin $':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.period:<10} {r.jobs:>5} {r.completed:>5} {r.failed:>6} {r.refunded:>6} {r.credits:>9.2f} "
            f"{r.cost_usd:>9.2f} {r.revenue_usd:>10.2f} {r.margin_usd:>9.2f}"
        )
    return "\n".join(lines)


def parse_day(value: str | None, default: date) -> datetime:
    day = date.fromisoformat(value) if value else default
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
