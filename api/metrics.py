"""`GET /metrics`: Prometheus text, computed from the database at scrape time, so every API
process reports the same totals however many there are."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from sqlmodel import Session, func, select

from api import deps
from smi.db import Job, LedgerEntry, Refund, UpsamplerCall

router = APIRouter(tags=["operators"])


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
        lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
    return lines


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(session: Session = Depends(deps.db)):
    jobs = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    refunds = session.exec(select(Refund.status, func.count()).group_by(Refund.status)).all()
    calls = session.exec(select(UpsamplerCall.kind, UpsamplerCall.outcome, func.count())
                         .group_by(UpsamplerCall.kind, UpsamplerCall.outcome)).all()
    credits, cost, revenue = session.exec(select(
        func.coalesce(func.sum(LedgerEntry.credits), 0), func.coalesce(func.sum(LedgerEntry.cost_usd), 0),
        func.coalesce(func.sum(LedgerEntry.revenue_usd), 0)).where(LedgerEntry.purpose != "estimate")).one()
    lines = (
        _family("smi_jobs", "gauge", "Jobs by status.", [({"status": s}, n) for s, n in jobs])
        + _family("smi_refunds", "gauge", "Refunds by status.", [({"status": s}, n) for s, n in refunds])
        + _family("smi_upsampler_requests_total", "counter", "Requests to Upsampler by kind and outcome.",
                  [({"kind": k, "outcome": o}, n) for k, o, n in calls])
        + _family("smi_credits_spent_total", "counter", "Upsampler credits booked in the ledger.", [({}, credits)])
        + _family("smi_cost_usd_total", "counter", "Upsampler cost booked in the ledger, USD.", [({}, cost)])
        + _family("smi_revenue_usd_total", "counter", "Revenue less refunds booked in the ledger.", [({}, revenue)])
    )
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
