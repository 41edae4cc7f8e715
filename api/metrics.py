"""`GET /metrics`: Prometheus text. Totals come from the database at scrape time, so every API
process reports the same ones however many there are; queue depth and backlog age come from
Temporal. Stage-time histograms and the SDK's own metrics are on each worker's port
(smi/telemetry.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from api import deps
from smi.db import Job, LedgerEntry, Refund, UpsamplerCall
from workflows.types import UPSAMPLER_QUEUE_SUFFIX

log = logging.getLogger("smi.api")
QUEUE_TYPES = {"workflow": TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, "activity": TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY}

router = APIRouter(tags=["operators"])


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
        lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
    return lines


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(svc: deps.Services = Depends(deps.services)):
    lines = await run_in_threadpool(_from_database, svc.engine) + await _from_task_queues(svc)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _from_database(engine: Engine) -> list[str]:
    with Session(engine) as session:
        jobs = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
        errors = session.exec(select(Job.status, Job.error_code, func.count()).where(Job.error_code.is_not(None))
                              .group_by(Job.status, Job.error_code)).all()
        refunds = session.exec(select(Refund.status, Refund.reason, func.count())
                               .group_by(Refund.status, Refund.reason)).all()
        calls = session.exec(select(UpsamplerCall.kind, UpsamplerCall.outcome, func.count())
                             .group_by(UpsamplerCall.kind, UpsamplerCall.outcome)).all()
        credits, cost, revenue = session.exec(select(
            func.coalesce(func.sum(LedgerEntry.credits), 0), func.coalesce(func.sum(LedgerEntry.cost_usd), 0),
            func.coalesce(func.sum(LedgerEntry.revenue_usd), 0)).where(LedgerEntry.purpose != "estimate")).one()
    return (
        _family("smi_jobs", "gauge", "Jobs by status.", [({"status": s}, n) for s, n in jobs])
        + _family("smi_job_errors", "gauge", "Jobs carrying an error, by status and error code.",
                  [({"status": s, "code": c}, n) for s, c, n in errors])
        + _family("smi_refunds", "gauge", "Refunds by status and reason.",
                  [({"status": s, "reason": r}, n) for s, r, n in refunds])
        + _family("smi_upsampler_requests_total", "counter", "Requests to Upsampler by kind and outcome.",
                  [({"kind": k, "outcome": o}, n) for k, o, n in calls])
        + _family("smi_credits_spent_total", "counter", "Upsampler credits booked in the ledger.", [({}, credits)])
        + _family("smi_cost_usd_total", "counter", "Upsampler cost booked in the ledger, USD.", [({}, cost)])
        + _family("smi_revenue_usd_total", "counter", "Revenue less refunds booked in the ledger.", [({}, revenue)])
    )


async def _from_task_queues(svc: deps.Services) -> list[str]:
    """Backlog of the jobs queue and of the Upsampler queue, as Temporal reports it."""
    depth, age, pollers = [], [], []
    try:
        client = await svc.temporal_client()
        for queue in (svc.settings.task_queue, svc.settings.task_queue + UPSAMPLER_QUEUE_SUFFIX):
            for kind, queue_type in QUEUE_TYPES.items():
                described = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
                    namespace=svc.settings.temporal_namespace, task_queue=TaskQueue(name=queue),
                    task_queue_type=queue_type, report_stats=True))
                labels = {"task_queue": queue, "type": kind}
                depth.append((labels, described.stats.approximate_backlog_count))
                age.append((labels, described.stats.approximate_backlog_age.ToTimedelta().total_seconds()))
                pollers.append((labels, len(described.pollers)))
    except Exception as exc:  # the database totals are still worth a scrape
        log.warning("task queue statistics unavailable: %s", type(exc).__name__)
        return _family("smi_task_queue_up", "gauge", "1 when Temporal answered for the task queues.", [({}, 0)])
    return (
        _family("smi_task_queue_up", "gauge", "1 when Temporal answered for the task queues.", [({}, 1)])
        + _family("smi_task_queue_backlog", "gauge", "Tasks waiting in the task queue (approximate).", depth)
        + _family("smi_task_queue_backlog_age_seconds", "gauge", "Age of the oldest waiting task.", age)
        + _family("smi_task_queue_pollers", "gauge", "Worker pollers seen recently on the task queue.", pollers)
    )
