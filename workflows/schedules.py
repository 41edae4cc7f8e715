"""Daily Temporal schedules (retention, reconciliation), created by every worker at start if missing.

Outside the workflow sandbox: only workers call this, never a workflow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

A = TypeVar("A")


async def ensure_daily_schedule(
    client: Client,
    schedule_id: str,
    run: Callable[[Any, A], Awaitable[Any]],
    arg: A,
    *,
    workflow_id: str,
    task_queue: str,
    hour_utc: int,
    execution_timeout: timedelta,
) -> bool:
    """Create a schedule starting `run(arg)` every day at `hour_utc`:00 UTC (a run still going at the next
    start is skipped) when it is missing; True when this call created it. An existing schedule is left as
    it is (an operator may have paused or edited it), so every worker can call this at start.
    """
    try:
        await client.get_schedule_handle(schedule_id).describe()
        return False
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
    calendar = ScheduleCalendarSpec(
        hour=[ScheduleRange(hour_utc)],
        minute=[ScheduleRange(0)],
        second=[ScheduleRange(0)],
        comment=f"daily at {hour_utc:02d}:00 UTC",
    )
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            run, arg, id=workflow_id, task_queue=task_queue, execution_timeout=execution_timeout
        ),
        spec=ScheduleSpec(calendars=[calendar], time_zone_name="UTC"),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:  # another worker created it a moment ago
        return False
    return True
