"""RetentionWorkflow: one cleanup pass over stored files and download tokens, in UTC.

Due, as of the pass's time (`workflow.now()`), with `SMI_RETENTION_GRACE_HOURS` (72) read by
the activities:
- the original, its compressed copies and tmp/ leftovers of every finished job (completed or
  failed; a refunded job ends failed), and the upload it was ordered from;
- a job's result (`upscaled_*`) once its newest download link expired more than the grace ago
  (a finished job without a link: once it finished more than the grace ago);
- download-token rows that expired more than the grace ago;
- an upload no job names, once its signed URL's lifetime plus the grace has passed.
Nothing of a job still running or in manual review. Each step deletes what is there, so a
second pass deletes nothing more.

The Temporal Schedule `retention-daily` (03:00 UTC, overlaps skipped) starts it; the worker
creates the schedule when it is missing (`ensure_retention_schedule`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.types import MethodAsyncSingleParam, MethodSyncSingleParam

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.storage import StorageActivities
    from smi.vocabulary import InventoryRequest, RetentionPlanRequest, RetentionReport, RetentionRequest
    from workflows import schedules

if TYPE_CHECKING:
    from temporalio.client import Client

    from smi.settings import Settings

RETENTION_SCHEDULE_ID = "retention-daily"
RETENTION_WORKFLOW_ID = "retention"  # the schedule appends the time of each run
RETENTION_HOUR_UTC = 3
PAGE_SIZE = 500  # stored names per inventory page: keeps every payload small whatever the backlog
A = TypeVar("A")  # an activity's argument
R = TypeVar("R")  # what it returns
RETENTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=5), maximum_attempts=10
)


@workflow.defn
class RetentionWorkflow:
    @workflow.run
    async def run(self, request: RetentionRequest | None = None) -> RetentionReport:
        as_of = request.as_of if request is not None and request.as_of is not None else workflow.now()
        report = RetentionReport(as_of=as_of)
        for kind in ("jobs", "uploads"):
            after: str | None = ""
            while after is not None:
                page = await self._activity(
                    StorageActivities.retention_inventory, InventoryRequest(kind, after, PAGE_SIZE)
                )
                if kind == "jobs":
                    report.jobs_seen += len(page.names)
                plan = await self._activity(LedgerActivities.retention_plan, RetentionPlanRequest(page, as_of))
                if plan.inputs or plan.results or plan.uploads:
                    deleted = await self._activity(StorageActivities.delete_retained, plan)
                    report.originals += deleted.originals
                    report.compressed += deleted.compressed
                    report.temporary += deleted.temporary
                    report.results += deleted.results
                    report.uploads += deleted.uploads
                if plan.results:
                    await self._activity(LedgerActivities.forget_results, plan.results)
                after = page.next_after
        # Tokens last: a result is found due by its newest token, so the files go before the rows.
        report.tokens = await self._activity(LedgerActivities.delete_expired_tokens, RetentionRequest(as_of))
        workflow.logger.info("retention pass: %s", report)
        return report

    @overload
    async def _activity(self, activity: MethodAsyncSingleParam[Any, A, R], arg: A) -> R: ...
    @overload
    async def _activity(self, activity: MethodSyncSingleParam[Any, A, R], arg: A) -> R: ...
    async def _activity(self, activity: Callable[..., Any], arg: Any) -> Any:
        """Typed as the SDK's execute_activity_method is (an async activity method, then a sync one)."""
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RETENTION_RETRY,
        )


async def ensure_retention_schedule(client: Client, settings: Settings) -> bool:
    """Create the `retention-daily` schedule when it is missing; True when this call created it.

    An existing schedule is left as it is (an operator may have paused or edited it), so every
    worker can call this at start.
    """
    return await schedules.ensure_daily_schedule(
        client,
        RETENTION_SCHEDULE_ID,
        RetentionWorkflow.run,
        RetentionRequest(),
        workflow_id=RETENTION_WORKFLOW_ID,
        task_queue=settings.task_queue,
        hour_utc=RETENTION_HOUR_UTC,
        execution_timeout=timedelta(hours=6),
    )
