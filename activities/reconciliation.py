"""The daily reconciliation's database side (workflows/reconciliation.py decides; the status checks are
UpsamplerActivities.check_status on the rate-limited queue): which Upsampler ids the day's jobs caused,
what the ledger has for each, booking what Upsampler charged and the ledger missed, the day's row, the
admin's summary.

What Upsampler charges for an id is read from its status: `creditCost` once it ended SUCCESS, nothing
for one that FAILED (the emulator bills the same way, /_emulator/charges); one still queued or in
progress is not settled yet. Every write is keyed (ledger `upscale:<id>` per job, the orphan row per id,
the day's row, the mail per day), so a second run books and sends nothing new.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import activity

from activities.notify import NotifyActivities
from smi import orphans, usage
from smi.db import Job, LedgerEntry, Reconciliation, Submission, utcnow
from smi.settings import Settings
from smi.vocabulary import FINISHED, JobStatus

UNCHECKED = "unchecked"  # the status endpoint did not answer (within the activity's retries)
UNKNOWN = "unknown"  # the status endpoint does not know the id (404)


class Action:
    """What a reconciliation did about one Upsampler id whose booking and charge differ."""

    BOOKED = "booked"  # charged, not in the ledger: booked now (a submission's cost, or an orphan)
    MISMATCH = "mismatch"  # the ledger's credits differ from the charge: listed, not changed (rows are written once)
    PENDING = "pending"  # not settled yet: Upsampler still works on it, or its job still runs (and may book it)
    UNCHECKED = UNCHECKED
    UNKNOWN = UNKNOWN


# A day with only these differences sends no mail: nothing is wrong yet.
QUIET_ACTIONS = frozenset({Action.PENDING})


@dataclass
class Difference:
    job_id: str
    upsampler_id: str
    booked: float | None  # the ledger's credits for it before this run; None: no row
    reported: float | None  # what Upsampler charges for it; None: not known (yet)
    action: str


@dataclass
class ReconciliationProgress:
    """The day's counts so far (carried across continue-as-new)."""

    jobs: int = 0
    upsampler_ids: int = 0
    booked_credits: float = 0.0
    reported_credits: float = 0.0
    booked_now: int = 0
    differences: list[Difference] = field(default_factory=list)
    unlisted: int = 0  # differences past the workflow's cap: counted, not carried


@dataclass
class ReconciliationRequest:
    """The workflow's input. `day`: a UTC day, "YYYY-MM-DD"; None: yesterday by the workflow's clock."""

    day: str | None = None
    jobs_per_batch: int = 10
    checks_per_minute: float = 10.0  # the share of Upsampler's quota (60/min, 1,800/h) it may use
    batches_per_run: int = 100  # pages per run, then continue-as-new: a few thousand history events at most
    after_job_id: str = ""  # where the next page starts: continue-as-new carries it, and the progress
    progress: ReconciliationProgress | None = None


@dataclass
class PageRequest:
    day: str
    after_job_id: str
    limit: int


@dataclass
class KnownIds:
    job_id: str
    upsampler_ids: list[str]


@dataclass
class ReconciliationPage:
    jobs: list[KnownIds]
    next_after: str | None  # None: this was the last page


@dataclass
class Checked:
    """One id's status as the status endpoint gave it (a JobStatus value, or UNCHECKED / UNKNOWN)."""

    job_id: str
    upsampler_id: str
    status: str
    credit_cost: float | None = None


@dataclass
class Settled:
    booked_credits: float = 0.0
    reported_credits: float = 0.0
    booked_now: int = 0
    differences: list[Difference] = field(default_factory=list)


@dataclass
class RecordRequest:
    day: str
    progress: ReconciliationProgress


@dataclass
class ReconciliationReport:
    """What the workflow returns (the day's row has the details)."""

    day: str
    jobs: int
    upsampler_ids: int
    booked_credits: float
    reported_credits: float
    booked_now: int
    differences: int
    mailed: bool


@dataclass
class SummaryRequest:
    day: str
    unlisted: int = 0  # differences the workflow counted but did not carry (past its cap)


def charged(check: Checked) -> float | None:
    """What Upsampler bills for it: its creditCost once SUCCESS, 0 once FAILED, None while unsettled."""
    if check.status == JobStatus.COMPLETED:
        return check.credit_cost or 0.0
    if check.status == JobStatus.FAILED:
        return 0.0
    return None


def same_money(a: float, b: float) -> bool:
    return abs(a - b) < 0.005  # credits come in hundredths


class ReconciliationActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.notify = NotifyActivities(settings, engine)

    @activity.defn
    def reconciliation_page(self, request: PageRequest) -> ReconciliationPage:
        """Up to `limit` jobs created that UTC day after `after_job_id`, each with every Upsampler id it caused:
        its submissions, its orphans, the ids webhooks named for lost replies, and its ledger's `upscale:` rows."""
        start, end = usage.day_bounds(date.fromisoformat(request.day))
        with Session(self.engine) as session:
            job_ids = session.exec(
                select(Job.job_id)
                .where(Job.created_at >= start, Job.created_at < end, col(Job.job_id) > request.after_job_id)
                .order_by(col(Job.job_id))
                .limit(request.limit)
            ).all()
            jobs = []
            for job_id in job_ids:
                booked = session.exec(
                    select(LedgerEntry.purpose).where(
                        LedgerEntry.job_id == job_id, col(LedgerEntry.purpose).startswith("upscale:")
                    )
                ).all()
                known = orphans.known_upsampler_ids(session, job_id) | {p.removeprefix("upscale:") for p in booked}
                jobs.append(KnownIds(job_id, sorted(known)))
        return ReconciliationPage(jobs, job_ids[-1] if len(job_ids) == request.limit else None)

    @activity.defn
    def settle(self, checked: list[Checked]) -> Settled:
        """Compare each id's charge with the ledger; book a charge the ledger misses (a submission's as its cost,
        any other id as an orphan), unless its job still runs and will book it itself."""
        settled = Settled()
        for check in checked:
            difference = self._settle_one(check, settled)
            if difference is not None:
                settled.differences.append(difference)
        return settled

    def _settle_one(self, check: Checked, settled: Settled) -> Difference | None:
        job_id, upsampler_id = check.job_id, check.upsampler_id
        with Session(self.engine) as session:
            row = session.exec(
                select(LedgerEntry).where(
                    LedgerEntry.job_id == job_id, LedgerEntry.purpose == f"upscale:{upsampler_id}"
                )
            ).first()
            booked = row.credits if row is not None else None
            job = session.get(Job, job_id)
            running = job is not None and job.status not in FINISHED
            submitted = session.exec(
                select(Submission.id).where(Submission.job_id == job_id, Submission.upsampler_id == upsampler_id)
            ).first()
        reported = charged(check)
        settled.booked_credits += booked or 0.0
        settled.reported_credits += reported or 0.0

        def differs(action: str) -> Difference:
            return Difference(job_id, upsampler_id, booked, reported, action)

        if check.status in (UNCHECKED, UNKNOWN):
            return differs(check.status)
        if reported is None:
            return differs(Action.PENDING)
        if booked is not None:
            return None if same_money(booked, reported) else differs(Action.MISMATCH)
        if reported == 0:  # failed, never charged, never booked: they agree
            return None
        if running:  # it books its submission's cost when it sees the result, and may still adopt a lost one
            return differs(Action.PENDING)
        price = self.settings.credit_price_usd  # unless the job's ledger has a price of its own
        if submitted is not None:
            new = orphans.book_charge(self.engine, job_id, upsampler_id, reported, price)
        else:
            new = orphans.book_orphan(self.engine, job_id, upsampler_id, reported, price, "reconciliation")
        settled.booked_now += int(new)
        activity.logger.info("reconciliation booked %s credits for %s of job %s", reported, upsampler_id, job_id)
        return differs(Action.BOOKED)

    @activity.defn
    def record(self, request: RecordRequest) -> bool:
        """Store the day's row, merged with an earlier run's (what that run booked stays listed and counted);
        True when something differed, so the admin's summary is due."""
        day, progress = date.fromisoformat(request.day), request.progress
        with Session(self.engine) as session:
            row = session.get(Reconciliation, day)
            earlier = [Difference(**d) for d in json.loads(row.differences)] if row is not None else []
            kept = [d for d in earlier if d.action == Action.BOOKED]
            kept_ids = {d.upsampler_id for d in kept}
            differences = kept + [d for d in progress.differences if d.upsampler_id not in kept_ids]
            earlier_booked = sum(d.reported or 0.0 for d in kept)
            session.merge(  # insert, or replace an earlier run's row
                Reconciliation(
                    day=day,
                    checked_at=utcnow(),
                    jobs=progress.jobs,
                    upsampler_ids=progress.upsampler_ids,
                    booked_credits=round(max(0.0, progress.booked_credits - earlier_booked), 6),
                    reported_credits=round(progress.reported_credits, 6),
                    booked_now=progress.booked_now + (row.booked_now if row is not None else 0),
                    differences=json.dumps([asdict(d) for d in differences]),
                )
            )
            session.commit()
        return progress.unlisted > 0 or any(d.action not in QUIET_ACTIONS for d in differences)

    @activity.defn
    async def send_summary(self, request: SummaryRequest) -> bool:
        """The admin's summary of the day's row, once per day; False when an earlier run sent it."""
        day = request.day
        with Session(self.engine) as session:
            row = session.get_one(Reconciliation, date.fromisoformat(day))
            differences = json.loads(row.differences)
            context = dict(
                day=day,
                jobs=row.jobs,
                upsampler_ids=row.upsampler_ids,
                booked_credits=f"{row.booked_credits:.2f}",
                reported_credits=f"{row.reported_credits:.2f}",
                booked_now=row.booked_now,
                booked_now_credits=f"{sum(d['reported'] or 0 for d in differences if d['action'] == 'booked'):.2f}",
                differences=differences,
                unlisted=request.unlisted,
                admin_url=f"{self.settings.public_base_url.rstrip('/')}/v1/admin/reconciliation?day={day}",
            )
        # Keyed by day under the pseudo-job "reconciliation", as budget alerts are under "budget".
        sent = await self.notify.send_once(
            "reconciliation", day, self.settings.admin_email, "reconciliation", **context
        )
        activity.logger.info("reconciliation summary for %s %s", day, "sent" if sent else "was sent before")
        return sent
