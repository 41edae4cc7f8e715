"""ReconciliationWorkflow: one UTC day's jobs compared with what Upsampler charged (issue 16).

For each job created that day (a page of `jobs_per_batch` at a time, by job id), every Upsampler id
it caused (submissions, orphans, ids webhooks named for lost replies, ledger rows) is checked with the
status endpoint: the existing `UpsamplerActivities.check_status` on the rate-limited Upsampler queue,
so the per-minute quota (the queue's rate limit) and the hourly one (counted by the activity) hold for
live jobs and this together. A batch's checks take at least `len(ids) * 60 / checks_per_minute`
seconds (a durable timer fills the rest): 10 a minute by default, a sixth of the minute's quota and a
third of the hour's: a day of 1,000 jobs of one id each takes 100 minutes. What Upsampler charged and the ledger
missed is booked (ReconciliationActivities.settle); the day's row is stored; the admin is emailed once
per day, and only when something differed (a `pending` id alone is no difference yet).

History stays bounded: a run handles at most `batches_per_run` pages (100: with 10 jobs a page, a few
thousand events; fewer when Temporal suggests it), then continues as new with the cursor and the counts;
at most MAX_DIFFERENCES_CARRIED differences travel with it (the rest are counted, and the summary says
how many).

The Temporal Schedule `reconciliation-daily` (04:00 UTC, after retention's 03:00; overlaps skipped)
starts it for the day before; the worker creates the schedule when it is missing
(`ensure_reconciliation_schedule`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import date, timedelta
from typing import TYPE_CHECKING, TypedDict, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.reconciliation import (
        UNCHECKED,
        UNKNOWN,
        Checked,
        KnownIds,
        PageRequest,
        ReconciliationActivities,
        ReconciliationProgress,
        ReconciliationReport,
        ReconciliationRequest,
        RecordRequest,
        Settled,
        SummaryRequest,
    )
    from activities.upsampler import UpsamplerActivities
    from smi.vocabulary import UPSAMPLER_QUEUE_SUFFIX, ErrorCode, UpsamplerResult
    from workflows import schedules
    from workflows.upscale import UPSAMPLER_RETRY

if TYPE_CHECKING:
    from temporalio.client import Client

    from smi.settings import Settings

A = TypeVar("A")  # a scheduled workflow's argument
RECONCILIATION_SCHEDULE_ID = "reconciliation-daily"
RECONCILIATION_WORKFLOW_ID = "reconciliation"  # the schedule appends the time of each run
RECONCILIATION_HOUR_UTC = 4
MAX_DIFFERENCES_CARRIED = 1000  # ~150 KB of payload; a day with more is counted past this


class _DatabaseCall(TypedDict):
    start_to_close_timeout: timedelta
    retry_policy: RetryPolicy


DATABASE_CALL = _DatabaseCall(
    start_to_close_timeout=timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=5), maximum_attempts=10
    ),
)


@workflow.defn
class ReconciliationWorkflow:
    @workflow.run
    async def run(self, request: ReconciliationRequest | None = None) -> ReconciliationReport:
        request = request or ReconciliationRequest()
        day = request.day or (workflow.now() - timedelta(days=1)).date().isoformat()
        try:
            date.fromisoformat(day)
        except ValueError:
            raise ApplicationError(f"not a day: {day!r} (YYYY-MM-DD)", non_retryable=True) from None
        if request.jobs_per_batch < 1 or request.batches_per_run < 1 or request.checks_per_minute <= 0:
            raise ApplicationError("batch sizes must be >= 1, checks_per_minute > 0", non_retryable=True)
        progress = request.progress or ReconciliationProgress()
        after: str | None = request.after_job_id
        batches = 0
        while after is not None:
            started = workflow.now()
            page = await workflow.execute_activity_method(
                ReconciliationActivities.reconciliation_page,
                PageRequest(day, after, request.jobs_per_batch),
                **DATABASE_CALL,
            )
            checks = [self._check(job.job_id, upsampler_id) for job in page.jobs for upsampler_id in job.upsampler_ids]
            checked = list(await asyncio.gather(*checks))
            settled = await workflow.execute_activity_method(ReconciliationActivities.settle, checked, **DATABASE_CALL)
            _add(progress, page.jobs, len(checked), settled)
            after, batches = page.next_after, batches + 1
            if after is None:
                break
            spent = (workflow.now() - started).total_seconds()
            pause = len(checked) * 60 / request.checks_per_minute - spent
            if pause > 0:
                await asyncio.sleep(pause)
            if batches >= request.batches_per_run or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(dataclasses.replace(request, day=day, after_job_id=after, progress=progress))
        mail_due = await workflow.execute_activity_method(
            ReconciliationActivities.record, RecordRequest(day, progress), **DATABASE_CALL
        )
        mailed = False
        if mail_due:
            mailed = await workflow.execute_activity_method(
                ReconciliationActivities.send_summary, SummaryRequest(day, progress.unlisted), **DATABASE_CALL
            )
        report = ReconciliationReport(
            day,
            progress.jobs,
            progress.upsampler_ids,
            round(progress.booked_credits, 6),
            round(progress.reported_credits, 6),
            progress.booked_now,
            len(progress.differences) + progress.unlisted,
            mailed,
        )
        workflow.logger.info("reconciliation of %s: %s", day, report)
        return report

    async def _check(self, job_id: str, upsampler_id: str) -> Checked:
        """The id's status from Upsampler, through the rate-limited queue; what could not be learnt is said so."""
        try:
            result: UpsamplerResult = await workflow.execute_activity_method(
                UpsamplerActivities.check_status,
                upsampler_id,
                task_queue=workflow.info().task_queue + UPSAMPLER_QUEUE_SUFFIX,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=65),  # outlasts a spent hourly quota
                retry_policy=UPSAMPLER_RETRY,
            )
        except ActivityError as err:
            cause = err.cause
            not_found = isinstance(cause, ApplicationError) and cause.type == ErrorCode.UPSAMPLER_NOT_FOUND
            workflow.logger.warning("reconciliation: status of %s: %s", upsampler_id, cause or err)
            return Checked(job_id, upsampler_id, UNKNOWN if not_found else UNCHECKED)
        return Checked(job_id, upsampler_id, str(result.status), result.credit_cost)


def _add(progress: ReconciliationProgress, jobs: list[KnownIds], ids: int, settled: Settled) -> None:
    progress.jobs += len(jobs)
    progress.upsampler_ids += ids
    progress.booked_credits += settled.booked_credits
    progress.reported_credits += settled.reported_credits
    progress.booked_now += settled.booked_now
    room = max(0, MAX_DIFFERENCES_CARRIED - len(progress.differences))
    progress.differences.extend(settled.differences[:room])
    progress.unlisted += len(settled.differences[room:])


async def ensure_reconciliation_schedule(client: Client, settings: Settings) -> bool:
    """Create the `reconciliation-daily` schedule when it is missing; True when this call created it."""
    return await schedules.ensure_daily_schedule(
        client,
        RECONCILIATION_SCHEDULE_ID,
        ReconciliationWorkflow.run,
        ReconciliationRequest(),  # day None: each run takes the day before its start
        workflow_id=RECONCILIATION_WORKFLOW_ID,
        task_queue=settings.task_queue,
        hour_utc=RECONCILIATION_HOUR_UTC,
        execution_timeout=timedelta(hours=20),  # ends before the next day's run is due
    )
