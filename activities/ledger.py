"""Database side effects: the job's business record, its cost, its download tokens.

Each write is keyed by job and purpose, so running an activity again changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio import activity

from smi import pricing, signing, telemetry, usage
from smi.db import (
    BudgetAlert,
    BudgetRelease,
    DownloadToken,
    Job,
    LedgerEntry,
    as_utc,
    insert_once,
    set_job_cost,
    set_status,
    utcnow,
)
from smi.settings import Settings
from smi.vocabulary import (
    FINISHED,
    BudgetAlertInfo,
    BudgetGate,
    Completion,
    CostRecord,
    DownloadLink,
    EstimateRecord,
    JobUpdate,
    ResultBooking,
    RetentionPlan,
    RetentionPlanRequest,
    RetentionRequest,
    StoredNames,
    TokenRequest,
)

BUDGET_THRESHOLDS = (80, 100)


class LedgerActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    @activity.defn
    def update_job(self, update: JobUpdate) -> None:
        """The job's record as `update` says, and its estimate when it carries one."""
        self._update(update)
        if update.estimate is not None:
            self.record_estimate(update.estimate)

    @activity.defn
    def book_result(self, booking: ResultBooking) -> list[BudgetAlertInfo]:
        """Upsampler's result is in: its cost, the record's `downloading`, and the budget alerts now due."""
        self.record_cost(booking.cost)
        self._update(booking.update)
        return self.check_budget(booking.cost.job_id)

    @activity.defn
    def complete(self, completion: Completion) -> DownloadLink:
        """The download link, and the record completed with it."""
        link = self.issue_download_token(completion.token)
        completion.update.download = link
        self._update(completion.update)
        return link

    def _update(self, update: JobUpdate) -> None:
        with Session(self.engine) as session:
            job = session.get(Job, update.job_id)
            if job is None:
                raise ValueError(f"job {update.job_id} has no record")
            set_status(session, job, update.status)
            if update.estimated_completion is not None:
                job.estimated_completion = update.estimated_completion
            if update.input is not None:
                job.input_width, job.input_height = update.input.width, update.input.height
            if update.output is not None:
                out = update.output
                job.output_width, job.output_height = out.width, out.height
                job.output_bytes, job.output_format, job.output_sha256 = out.bytes, out.format, out.sha256
                job.result_path = out.path
            if update.upsampler_id is not None:
                job.upsampler_id = update.upsampler_id
            if update.download is not None:
                job.download_generation = update.download.generation
                job.download_expires_at = update.download.expires_at
            if update.error_code is not None:  # "" clears the error
                job.error_code, job.error_message = update.error_code or None, update.error_message or None
            session.add(job)
            session.commit()

    @activity.defn
    def record_estimate(self, record: EstimateRecord) -> float:
        """Book the credits foreseen from the original's size, for comparison with what Upsampler charges."""
        credits = pricing.credits_for(
            record.width * record.scale_factor * record.height * record.scale_factor, record.credits_per_megapixel
        )
        with Session(self.engine) as session:
            insert_once(  # a row that an earlier run of the activity wrote stays as it is
                session,
                LedgerEntry(
                    job_id=record.job_id,
                    purpose="estimate",
                    credits=credits,
                    cost_usd=round(credits * record.credit_price_usd, 6),
                    created_at=utcnow(),
                ),
            )
        return credits

    @activity.defn
    def record_cost(self, record: CostRecord) -> float:
        """Book what Upsampler charged for one submission, once; the job's cost becomes the sum of its rows."""
        with Session(self.engine) as session:
            booked = insert_once(
                session,
                LedgerEntry(
                    job_id=record.job_id,
                    purpose=f"upscale:{record.upsampler_id}",
                    credits=record.credits,
                    cost_usd=round(record.credits * record.credit_price_usd, 6),
                    created_at=utcnow(),
                ),
            )
            if booked:  # counters take integers; credits come in hundredths
                telemetry.count(
                    "smi_credits_spent_hundredths",
                    round(record.credits * 100),
                    "Upsampler credits booked, in hundredths of a credit.",
                )
            cost_usd = set_job_cost(session, record.job_id)
            session.commit()
            return cost_usd or 0.0

    @activity.defn
    def issue_download_token(self, request: TokenRequest) -> DownloadLink:
        """The download link for this purpose, made once; every older link of the job stops working."""
        with Session(self.engine) as session:
            row = session.exec(
                select(DownloadToken).where(
                    DownloadToken.job_id == request.job_id, DownloadToken.purpose == request.purpose
                )
            ).first()
            if row is None:
                generations = session.exec(
                    select(DownloadToken.generation).where(DownloadToken.job_id == request.job_id)
                ).all()
                generation = max(generations, default=0) + 1
                token = signing.download_token(self.settings.secret("webhook_secret"), request.job_id, generation)
                now = utcnow()
                row = DownloadToken(
                    token_sha256=signing.token_sha256(token),
                    job_id=request.job_id,
                    purpose=request.purpose,
                    generation=generation,
                    expires_at=now + timedelta(hours=request.ttl_hours),
                    created_at=now,
                )
                session.add(row)
            for old in session.exec(
                select(DownloadToken).where(
                    DownloadToken.job_id == request.job_id, DownloadToken.generation < row.generation
                )
            ).all():
                old.revoked = True
                session.add(old)
            session.commit()
            session.refresh(row)
            return DownloadLink(row.generation, as_utc(row.expires_at))

    def _budgets(self, now: datetime) -> list[tuple[str, float, datetime, datetime]]:
        """(period key, budget, start, end) for each budget that is set."""
        found = []
        for period, budget in (("day", self.settings.daily_budget_usd), ("month", self.settings.monthly_budget_usd)):
            if budget:
                start, end = usage.period_bounds(now, period)
                found.append((f"{period}:{usage.period_key(now, period)}", budget, start, end))
        return found

    @activity.defn
    def check_budget(self, job_id: str) -> list[BudgetAlertInfo]:
        """Thresholds (80 %, 100 %) this period's spend has crossed whose alert falls to this workflow.

        The alert's row is inserted once per period and threshold; the workflow whose
        activity wins the insert owns the email, and finds it again if it is retried.
        """
        owner = (activity.info().workflow_id if activity.in_activity() else None) or job_id
        due = []
        with Session(self.engine) as session:
            for period, budget, start, end in self._budgets(utcnow()):
                spent = usage.spent_usd(self.engine, start, end)
                for threshold in BUDGET_THRESHOLDS:
                    if spent < budget * threshold / 100:
                        continue
                    key = f"{period}:{threshold}"
                    session.add(
                        BudgetAlert(key=key, owner=owner, spent_usd=spent, budget_usd=budget, created_at=utcnow())
                    )
                    try:
                        session.commit()
                    except IntegrityError:
                        session.rollback()
                    row = session.get_one(BudgetAlert, key)  # ours, or the one that won the insert
                    if row.owner == owner:
                        due.append(BudgetAlertInfo(key, period, threshold, row.spent_usd, budget))
        return due

    @activity.defn
    def budget_gate(self, job_id: str) -> BudgetGate:
        """With SMI_BUDGET_HARD_STOP: closed while a budget of this period is spent and not released."""
        now = utcnow()
        with Session(self.engine) as session:
            for period, budget, start, end in self._budgets(now):
                if usage.spent_usd(self.engine, start, end) >= budget and session.get(BudgetRelease, period) is None:
                    return BudgetGate(False, min(300.0, (end - now).total_seconds() + 1))
        return BudgetGate(True, 0.0)

    # Retention (workflows/retention.py): what is due, in UTC, and the rows that go with it.
    # Nothing of a job still running or in manual review is ever due.

    def _retention_cutoff(self, as_of: datetime) -> datetime:
        return as_utc(as_of) - timedelta(hours=self.settings.retention_grace_hours)

    @activity.defn
    def retention_plan(self, request: RetentionPlanRequest) -> RetentionPlan:
        """Of a page of stored names, what is due: inputs of finished jobs, results past their link's
        expiry plus the grace (or, without a link, past the job's end plus the grace), uploads of
        finished jobs or never ordered (older than their URL's lifetime plus the grace)."""
        page, cutoff = request.page, self._retention_cutoff(request.as_of)
        plan = RetentionPlan()
        if not page.names:
            return plan
        with Session(self.engine) as session:
            if page.kind == "jobs":
                plan.inputs, plan.results = _due_job_files(session, page.names, cutoff)
            elif page.kind == "uploads":
                unordered_cutoff = cutoff - timedelta(seconds=self.settings.original_url_ttl_seconds)
                plan.uploads = _due_uploads(session, page, unordered_cutoff)
        return plan

    @activity.defn
    def forget_results(self, job_ids: list[str]) -> int:
        """These jobs' results were deleted: their record no longer names a file (resend-email then says so)."""
        if not job_ids:
            return 0
        with Session(self.engine) as session:
            jobs = session.exec(
                select(Job).where(col(Job.job_id).in_(job_ids), col(Job.result_path).is_not(None))
            ).all()
            for job in jobs:
                job.result_path = None
                session.add(job)
            session.commit()
            return len(jobs)

    @activity.defn
    def delete_expired_tokens(self, request: RetentionRequest) -> int:
        """Download tokens that expired more than the grace ago, of finished (or unknown) jobs: the rows go."""
        cutoff = self._retention_cutoff(request.as_of or utcnow())
        with Session(self.engine) as session:
            tokens = session.exec(select(DownloadToken).where(DownloadToken.expires_at < cutoff)).all()
            ids = sorted({token.job_id for token in tokens})
            status = (
                dict(session.exec(select(Job.job_id, Job.status).where(col(Job.job_id).in_(ids))).all()) if ids else {}
            )
            due = [t for t in tokens if t.job_id not in status or status[t.job_id] in FINISHED]
            for token in due:
                session.delete(token)
            session.commit()
            return len(due)


def _due_job_files(session: Session, job_ids: list[str], cutoff: datetime) -> tuple[list[str], list[str]]:
    """Of these jobs, those whose inputs are due (finished), and those whose results are due too (their
    newest link expired, or without a link the job ended, before the cutoff)."""
    newest: dict[str, DownloadToken] = {}
    for token in session.exec(select(DownloadToken).where(col(DownloadToken.job_id).in_(job_ids))).all():
        if token.job_id not in newest or token.generation > newest[token.job_id].generation:
            newest[token.job_id] = token
    inputs, results = [], []
    for job in session.exec(select(Job).where(col(Job.job_id).in_(job_ids)).order_by(col(Job.job_id))).all():
        if job.status not in FINISHED:
            continue
        inputs.append(job.job_id)
        link = newest.get(job.job_id)
        ended = as_utc(link.expires_at) if link is not None else as_utc(job.updated_at)
        if ended < cutoff:
            results.append(job.job_id)
    return inputs, results


def _due_uploads(session: Session, page: StoredNames, unordered_cutoff: datetime) -> list[str]:
    """Of this page of uploads, those due: every job ordered from it finished, or never ordered and last
    written before the cutoff."""
    statuses: dict[str, list[str]] = {}
    for image_url, status in session.exec(
        select(Job.image_url, Job.status).where(col(Job.image_url).contains("/files/uploads/"))
    ).all():
        upload_id = signing.upload_id_of(image_url)
        if upload_id:
            statuses.setdefault(upload_id, []).append(status)
    due = []
    for upload_id, modified in zip(page.names, page.modified, strict=True):
        ordered = statuses.get(upload_id)
        if ordered and all(status in FINISHED for status in ordered):
            due.append(upload_id)
        elif not ordered and as_utc(modified) < unordered_cutoff:
            due.append(upload_id)
    return due
