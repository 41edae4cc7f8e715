"""`GET /metrics`: Prometheus text, behind `Authorization: Bearer $SMI_METRICS_TOKEN`.

Totals come from the database, so every API process reports the same ones however many there
are (hence `smi_db_`: a worker's `smi_...` counters count that process only); queue depth and
backlog age come from Temporal. Stage-time histograms and the SDK's own metrics are on each
worker's port (smi/telemetry.py). A collection costs a few aggregates and four Temporal calls,
so its figures answer every scrape for CACHE_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from fastapi import APIRouter, Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily as Counter
from prometheus_client.core import GaugeMetricFamily as Gauge
from prometheus_client.core import Metric
from sqlmodel import Session, col, func, select
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from api import deps
from api.errors import ApiError
from api.openapi import METRICS, errors
from smi import funnel, usage
from smi.db import Job, LedgerEntry, OrphanJob, Refund, UpsamplerCall, utcnow
from smi.settings import Settings
from smi.vocabulary import UPSAMPLER_QUEUE_SUFFIX

log = logging.getLogger("smi.api")
QUEUE_TYPES = {"workflow": TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, "activity": TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY}
CACHE_SECONDS = 5.0  # well under any scrape interval; a flood of scrapes costs one collection per this

router = APIRouter(tags=["operators"])


def scraper(request: Request, cfg: Settings = Depends(deps.settings)) -> None:
    """The figures include revenue and cost: a scraper shows SMI_METRICS_TOKEN. Without one
    configured, only a development process (SMI_ENV=dev) answers; any other refuses, saying why."""
    token = cfg.metrics_token.get_secret_value() if cfg.metrics_token else ""  # empty: as unset
    if token:
        deps._require(request, [token], "metrics")
    elif cfg.env != "dev":
        raise ApiError(
            401,
            "unauthorized",
            "/metrics is closed until SMI_METRICS_TOKEN is set; then scrape with 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Depends(scraper), Security(METRICS)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {"schema": {"type": "string"}}}, "description": "The figures"},
        **errors({401: ["unauthorized"]}),
    },
)
async def metrics(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "metrics", None) is None:  # no await since the check: one per app
        state.metrics = Figures(state.services)
    await state.metrics.refresh()
    # The classic text format: every Prometheus version reads it, and our names need no escaping.
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


class Figures:
    """The collector of one app, on a registry of its own: it yields the latest collection's families."""

    def __init__(self, svc: deps.Services):
        self.svc = svc
        self.families: list[Metric] = []
        self.collected_at = -math.inf
        self.lock = asyncio.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    async def refresh(self) -> None:
        async with self.lock:  # one collection at a time; the scrapes that waited find it fresh
            if time.monotonic() - self.collected_at < CACHE_SECONDS:
                return
            self.families = await run_in_threadpool(_from_database, self.svc) + await _from_task_queues(self.svc)
            self.collected_at = time.monotonic()

    def collect(self) -> list[Metric]:
        return self.families


def _family(kind: type[Counter] | type[Gauge], name: str, help_text: str, labels: list[str], rows) -> Metric:
    """A Gauge- or CounterMetricFamily of `rows`: (label values..., number)."""
    family = kind(name, help_text, labels=labels)
    for *values, number in rows:
        family.add_metric([str(v) for v in values], number)
    return family


def _from_database(svc: deps.Services) -> list[Metric]:
    """Money only ever adds rows to the ledger (a refund is a row of its own), so its sums are counters."""
    booked = LedgerEntry.purpose != "estimate"
    with Session(svc.engine) as session:
        jobs = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
        errors = session.exec(
            select(Job.status, Job.error_code, func.count())
            .where(col(Job.error_code).is_not(None))
            .group_by(col(Job.status), col(Job.error_code))
        ).all()
        refunds = session.exec(
            select(Refund.status, Refund.reason, func.count()).group_by(Refund.status, Refund.reason)
        ).all()
        calls = session.exec(
            select(UpsamplerCall.kind, UpsamplerCall.outcome, func.count()).group_by(
                UpsamplerCall.kind, UpsamplerCall.outcome
            )
        ).all()
        orphans = session.exec(select(OrphanJob.found_by, func.count()).group_by(OrphanJob.found_by)).all()
        credits, cost = session.exec(
            select(
                func.coalesce(func.sum(LedgerEntry.credits), 0), func.coalesce(func.sum(LedgerEntry.cost_usd), 0)
            ).where(booked)
        ).one()
        money = dict(
            session.exec(
                select(LedgerEntry.purpose, func.sum(LedgerEntry.revenue_usd))
                .where(col(LedgerEntry.purpose).in_(("revenue", "refund")))
                .group_by(LedgerEntry.purpose)
            ).all()
        )  # a refund row is negative revenue
    now, cfg = utcnow(), svc.settings
    budgets = {"day": cfg.daily_budget_usd, "month": cfg.monthly_budget_usd}
    spent = [(period, usage.spent_usd(svc.engine, *usage.period_bounds(now, period))) for period in budgets]
    revenue, refunded = round(money.get("revenue") or 0, 2), round(-(money.get("refund") or 0), 2)
    stages = funnel.totals_by_stage(svc.engine)
    return [
        _family(Gauge, "smi_db_jobs", "Jobs by status.", ["status"], jobs),
        _family(
            Gauge, "smi_db_job_errors", "Jobs carrying an error, by status and error code.", ["status", "code"], errors
        ),
        _family(Gauge, "smi_db_refunds", "Refunds by status and reason.", ["status", "reason"], refunds),
        _family(
            Counter,
            "smi_db_upsampler_requests",
            "Requests to Upsampler by kind and outcome, all workers.",
            ["kind", "outcome"],
            calls,
        ),
        _family(
            Counter,
            "smi_db_orphan_jobs",
            "Upsampler jobs we caused that were no current submission of their job, booked (issue 16), by finder.",
            ["found_by"],
            orphans,
        ),
        _family(Counter, "smi_db_credits_spent", "Upsampler credits booked in the ledger.", [], [(credits,)]),
        _family(Counter, "smi_db_cost_usd", "Upsampler cost booked in the ledger, USD.", [], [(cost,)]),
        _family(
            Counter, "smi_db_revenue_usd", "Prices paid, booked in the ledger (refunds not deducted).", [], [(revenue,)]
        ),
        _family(Counter, "smi_db_refunded_usd", "Refunds booked in the ledger.", [], [(refunded,)]),
        _family(
            Counter,
            # By stage only: a label per page or image would be a new series per URL any page can invent.
            "smi_db_funnel_events",
            "The sales funnel by stage, all pages and images (shown, opened, checkout_started, paid, delivered, "
            "refunded).",
            ["stage"],
            stages.items(),
        ),
        _family(
            Gauge,
            "smi_db_budget_spent_usd",
            "Upsampler cost booked in this UTC day or month, USD: what the budgets are checked against.",
            ["period"],
            spent,
        ),
        _family(
            Gauge,
            "smi_budget_usd",
            "The budget of each period, USD (SMI_DAILY_BUDGET_USD, SMI_MONTHLY_BUDGET_USD); absent when unset.",
            ["period"],
            [(period, budget) for period, budget in budgets.items() if budget],
        ),
    ]


async def _from_task_queues(svc: deps.Services) -> list[Metric]:
    """Backlog of the jobs queue and of the Upsampler queue, as Temporal reports it."""
    labels = ["task_queue", "type"]
    depth = Gauge("smi_task_queue_backlog", "Tasks waiting in the task queue (approximate).", labels=labels)
    age = Gauge("smi_task_queue_backlog_age_seconds", "Age of the oldest waiting task.", labels=labels)
    pollers = Gauge("smi_task_queue_pollers", "Worker pollers seen recently on the task queue.", labels=labels)
    up = Gauge("smi_task_queue_up", "1 when Temporal answered for the task queues.")
    try:
        client = await svc.temporal_client()
        for queue in (svc.settings.task_queue, svc.settings.task_queue + UPSAMPLER_QUEUE_SUFFIX):
            for kind, queue_type in QUEUE_TYPES.items():
                described = await client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=svc.settings.temporal_namespace,
                        task_queue=TaskQueue(name=queue),
                        task_queue_type=queue_type,
                        report_stats=True,
                    )
                )
                depth.add_metric([queue, kind], described.stats.approximate_backlog_count)
                age.add_metric([queue, kind], described.stats.approximate_backlog_age.ToTimedelta().total_seconds())
                pollers.add_metric([queue, kind], len(described.pollers))
    except Exception as exc:  # the database totals are still worth a scrape
        log.warning("task queue statistics unavailable: %s", type(exc).__name__)
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    return [up, depth, age, pollers]
