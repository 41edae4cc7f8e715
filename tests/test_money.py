"""Money: pricing, quotes, the per-job ledger, usage reports, budget alerts, Upsampler's quota."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, create_engine, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from smi import pricing
from smi.db import BudgetAlert, LedgerEntry, Refund
from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import event_count, eventually, job_row, order, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    "width, height, scale, credits, cost, price, accepted, max_scale",
    [
        (100, 100, 2, 1.0, 0.04, 0.50, True, 16),  # the 1-credit minimum and the $0.50 minimum price
        (1000, 1000, 4, 4.0, 0.16, 0.96, True, 7),  # 16 MP x 0.25 = 4 credits; x6 markup
        (1000, 500, 10, 12.5, 0.5, 3.00, True, 10),  # exactly 50,000,000 pixels: accepted
        (1767, 1767, 4, 12.49, 0.4996, 3.00, True, 4),  # 49,956,624 pixels; 12.489 credits round up
        (1768, 1768, 4, 12.51, 0.5004, 3.01, False, 3),  # 50,013,184 pixels: over the limit
        (3000, 2000, 2, 6.0, 0.24, 1.44, True, 2),
        (8000, 8000, 2, 64.0, 2.56, 15.36, False, 0),  # no factor fits at all
        (641, 480, 3, 1.0, 0.04, 0.50, True, 12),  # 2.77 MP x 0.25 = 0.69: the minimum again
        (1005, 1000, 2, 1.01, 0.0404, 0.50, True, 7),  # 4.02 MP x 0.25 = 1.005: rounds up to 1.01
    ],
)
def test_pricing_table(width, height, scale, credits, cost, price, accepted, max_scale):
    quote = pricing.quote(width, height, scale, credits_per_megapixel=0.25, credit_price_usd=0.04)
    assert (quote.credits, quote.cost_usd, quote.price_usd) == (credits, cost, price)
    assert quote.accepted is accepted and quote.max_scale_factor == max_scale
    assert (quote.output_width, quote.output_height) == (width * scale, height * scale)
    assert (quote.reason is None) is accepted


def test_pricing_follows_the_configured_rates():
    quote = pricing.quote(
        2000, 1000, 2, credits_per_megapixel=0.5, credit_price_usd=0.10, markup_percent=100, min_price_usd=0.0
    )
    assert (quote.credits, quote.cost_usd, quote.price_usd) == (4.0, 0.4, 0.8)


async def test_quotes_through_the_api_for_both_body_forms(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    client = stack.client()
    by_size = client.post("/v1/quotes", json={"width": 1000, "height": 1000, "scale_factor": 4})
    assert by_size.status_code == 200
    assert by_size.json() == {
        "input": {"width": 1000, "height": 1000},
        "scale_factor": 4,
        "output": {"width": 4000, "height": 4000, "megapixels": 16.0},
        "credits": 4.0,
        "cost_usd": 0.16,
        "price_usd": 0.96,
        "accepted": True,
        "reason": None,
        "max_scale_factor": 7,
    }
    by_url = client.post("/v1/quotes", json={"image_url": stack.shop.publish(png_bytes(1000, 1000)), "scale_factor": 4})
    assert by_url.json() == by_size.json()
    both = client.post(
        "/v1/quotes", json={"width": 10, "height": 10, "image_url": "http://x.test/a.png", "scale_factor": 2}
    )
    assert both.status_code == 422
    assert client.post("/v1/quotes", json={"width": 10, "scale_factor": 2}).status_code == 422
    assert client.post("/v1/quotes", json={"width": 10, "height": 10, "scale_factor": 1}).status_code == 422
    assert (
        httpx.post(f"{stack.api.url}/v1/quotes", json={"width": 1, "height": 1, "scale_factor": 2}).status_code == 401
    )


async def _finish(stack, env, order_id: str, **overrides) -> tuple[str, dict]:
    client = stack.client()
    body = order(stack.shop.publish(overrides.pop("image", None) or png_bytes(40, 30)), order_id, **overrides)
    job_id = (await asyncio.to_thread(client.post, "/v1/jobs", json=body)).json()["job_id"]
    job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"})
    if job["status"] != "manual_review":
        await env.client.get_workflow_handle(f"upscale-{job_id}").result()
    return job_id, job


async def _money(stack, job_id: str) -> dict:
    jobs = (await asyncio.to_thread(httpx.get, f"{stack.api.url}/v1/admin/jobs", headers=ADMIN)).json()["jobs"]
    return next(j["money"] for j in jobs if j["job_id"] == job_id)


async def test_ledger_of_a_clean_run_a_compression_and_a_refund(dev_env, stack_factory, faults):
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        faults(delay_seconds=0.1)
        clean, _ = await _finish(stack, dev_env, "m-clean")
        assert await _money(stack, clean) == {
            "revenue_usd": 12.99,
            "cost_usd": 0.04,
            "credits": 1.0,
            "estimated_credits": 1.0,
            "refunded_usd": 0.0,
            "margin_usd": 12.95,
        }

        image = png_bytes(240, 160)
        faults(max_input_bytes=len(image) // 2, delay_seconds=0.1)  # refused once as too large, then compressed
        compressed, _ = await _finish(stack, dev_env, "m-compressed", image=image)
        assert (await _money(stack, compressed))["cost_usd"] == 0.04

        faults(result="wrong_size", delay_seconds=0.1)  # two paid-for results, both wrong: manual review
        reviewed, job = await _finish(stack, dev_env, "m-refunded", amount_paid_cents=500)
        assert job["status"] == "manual_review"
        handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{reviewed}")
        refund = await asyncio.to_thread(httpx.post, f"{stack.api.url}/v1/admin/jobs/{reviewed}/refund", headers=ADMIN)
        assert refund.status_code == 202
        await handle.result()
        assert await _money(stack, reviewed) == {
            "revenue_usd": 5.0,
            "cost_usd": 0.08,
            "credits": 2.0,
            "estimated_credits": 1.0,
            "refunded_usd": 5.0,
            "margin_usd": -0.08,
        }

    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        entries = session.exec(select(LedgerEntry).where(LedgerEntry.job_id == reviewed)).all()
        purposes = sorted(e.purpose.split(":")[0] for e in entries)
    assert purposes == ["estimate", "refund", "revenue", "upscale", "upscale"]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _seed_usage(database_url: str) -> None:
    """Jobs and ledger rows on both sides of a UTC day and month boundary."""
    engine = create_engine(database_url)
    with Session(engine) as session:
        for n, (moment, status, cents, credits) in enumerate(
            [
                ("2026-10-31 23:59:59", "completed", 1000, 2.0),
                ("2026-10-31 12:00:00", "failed", 700, 1.0),
                ("2026-11-01 00:00:00", "completed", 500, 4.0),
            ]
        ):
            job_id = f"{n:032x}"
            at = _at(moment)
            session.add(
                job_row(
                    job_id,
                    status,
                    at,
                    order_id=f"seed-{n}",
                    image_url="http://x/i.png",
                    scale_factor=2,
                    customer_email="seed@example.com",
                    customer_name=None,
                    amount_paid_cents=cents,
                )
            )
            session.add(LedgerEntry(job_id=job_id, purpose="revenue", revenue_usd=cents / 100, created_at=at))
            session.add(LedgerEntry(job_id=job_id, purpose="estimate", credits=99, cost_usd=9.9, created_at=at))
            session.add(
                LedgerEntry(
                    job_id=job_id, purpose=f"upscale:u{n}", credits=credits, cost_usd=credits * 0.04, created_at=at
                )
            )
            if status == "failed":
                session.add(
                    Refund(
                        job_id=job_id,
                        status="refunded",
                        amount_cents=cents,
                        currency="USD",
                        reason="timeout",
                        adapter="none",
                        created_at=at,
                        completed_at=at,
                    )
                )
                session.add(LedgerEntry(job_id=job_id, purpose="refund", revenue_usd=-cents / 100, created_at=at))
        session.commit()
    engine.dispose()


async def test_usage_report_splits_days_and_months_in_utc(dev_env, stack_factory, tmp_path):
    stack = stack_factory(dev_env)
    _seed_usage(stack.settings.database_url)
    days = httpx.get(
        f"{stack.api.url}/v1/admin/usage",
        params={"period": "day", "from": "2026-10-30", "to": "2026-11-01"},
        headers=ADMIN,
    ).json()
    assert days["rows"] == [
        {
            "period": "2026-10-31",
            "jobs": 2,
            "completed": 1,
            "failed": 1,
            "refunded": 1,
            "credits": 3.0,
            "cost_usd": 0.12,
            "revenue_usd": 10.0,
            "margin_usd": 9.88,
        },
        {
            "period": "2026-11-01",
            "jobs": 1,
            "completed": 1,
            "failed": 0,
            "refunded": 0,
            "credits": 4.0,
            "cost_usd": 0.16,
            "revenue_usd": 5.0,
            "margin_usd": 4.84,
        },
    ]
    assert set(days["upsampler_requests"]) == {"last_minute", "per_minute_limit", "last_hour", "per_hour_limit"}
    months = httpx.get(
        f"{stack.api.url}/v1/admin/usage",
        params={"period": "month", "from": "2026-10-01", "to": "2026-11-30"},
        headers=ADMIN,
    ).json()
    assert [(r["period"], r["jobs"], r["cost_usd"], r["margin_usd"]) for r in months["rows"]] == [
        ("2026-10", 2, 0.12, 9.88),
        ("2026-11", 1, 0.16, 4.84),
    ]
    csv = httpx.get(
        f"{stack.api.url}/v1/admin/usage",
        params={"period": "month", "from": "2026-10-01", "to": "2026-11-30"},
        headers={**ADMIN, "Accept": "text/csv"},
    )
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines() == [
        "period,jobs,completed,failed,refunded,credits,cost_usd,revenue_usd,margin_usd",
        "2026-10,2,1,1,1,3.0,0.12,10.0,9.88",
        "2026-11,1,1,0,0,4.0,0.16,5.0,4.84",
    ]
    bad = httpx.get(f"{stack.api.url}/v1/admin/usage", params={"period": "week"}, headers=ADMIN)
    assert bad.status_code == 422
    assert httpx.get(f"{stack.api.url}/v1/admin/usage", params={"from": "yesterday"}, headers=ADMIN).status_code == 422

    table = subprocess.run(
        [
            str(Path(sys.executable).parent / "smi"),
            "usage",
            "--period",
            "month",
            "--from",
            "2026-10-01",
            "--to",
            "2026-11-30",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SMI_ENV": "dev", "SMI_DATABASE_URL": stack.settings.database_url},
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "period",
        "jobs",
        "done",
        "failed",
        "refund",
        "credits",
        "cost",
        "$",
        "revenue",
        "$",
        "margin",
        "$",
    ]
    assert lines[2].split() == ["2026-10", "2", "1", "1", "1", "3.00", "0.12", "10.00", "9.88"]
    assert lines[3].split() == ["2026-11", "1", "1", "0", "0", "4.00", "0.16", "5.00", "4.84"]


async def test_budget_alerts_once_per_threshold_with_two_workers(dev_env, stack_factory, faults):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env, daily_budget_usd=0.10)  # 80 % at $0.08, 100 % at $0.10; a job costs $0.04
    second = await Client.connect(dev_env.client.service_client.config.target_host)  # a worker needs its own client
    async with create_worker(dev_env.client, stack.settings), create_worker(second, stack.settings):
        results = await asyncio.gather(*(_finish(stack, dev_env, f"m-budget-{n}") for n in range(5)))
    assert {job["status"] for _, job in results} == {"completed"}
    alerts = sorted(m["Subject"] for m in stack.mailbox.messages if m["To"] == "admin@localhost")
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert alerts == [
        f"[upscale] 100% of the day budget spent ({day})",
        f"[upscale] 80% of the day budget spent ({day})",
    ]
    engine = create_engine(stack.settings.database_url)
    with Session(engine) as session:
        assert sorted(a.key for a in session.exec(select(BudgetAlert))) == [f"day:{day}:100", f"day:{day}:80"]


async def test_hard_stop_holds_new_jobs_until_an_admin_releases_the_budget(dev_env, stack_factory, faults):
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env, daily_budget_usd=0.04, budget_hard_stop=True)
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        first, job = await _finish(stack, dev_env, "m-stop-1")
        assert job["status"] == "completed"
        body = order(stack.shop.publish(png_bytes(40, 30)), "m-stop-2")
        held = (await asyncio.to_thread(client.post, "/v1/jobs", json=body)).json()["job_id"]
        await wait_for_status(client, held, {"queued"})
        # Held: the budget gate said no and the workflow waits on the gate's recheck timer.
        handle = dev_env.client.get_workflow_handle(f"upscale-{held}")
        await eventually(lambda: event_count(handle, EventType.EVENT_TYPE_TIMER_STARTED), what="the hold's timer")
        assert (await asyncio.to_thread(client.get, f"/v1/jobs/{held}")).json()["status"] == "queued"
        assert len(httpx.get(f"{stack.emulator.url}/_emulator/jobs").json()) == 1  # nothing spent on the held job

        released = await asyncio.to_thread(httpx.post, f"{stack.api.url}/v1/admin/budget/release", headers=ADMIN)
        assert released.status_code == 200 and released.json()["jobs_woken"] >= 1
        assert (await wait_for_status(client, held, {"completed", "failed"}))["status"] == "completed"


async def test_quota_two_hundred_jobs_without_a_rate_limit_failure(dev_env, stack_factory, faults):
    """200 jobs against an emulator that enforces a quota of 300 requests a minute (shortened
    from 60 so the test takes a minute and a half, not seven). Their 400 requests would
    exceed it within the first minute without our limit (the task queue's rate, set a little
    under the quota): every job completes and Upsampler never has to answer 429."""
    faults(delay_seconds=0.05, rate_limit_per_minute=300)
    stack = stack_factory(dev_env, upsampler_requests_per_minute=280)
    image_url = stack.shop.publish(png_bytes(16, 16))
    client = stack.client()

    async def one(n: int) -> str:
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(image_url, f"m-quota-{n}", scale_factor=2))
        return reply.json()["job_id"]

    async with create_worker(dev_env.client, stack.settings):
        ids = await asyncio.gather(*(one(n) for n in range(200)))
        states = await asyncio.gather(
            *(
                dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}").result()
                for job_id in ids
            )
        )
    assert [s.status for s in states] == ["completed"] * 200
    counts = httpx.get(f"{stack.emulator.url}/_emulator/requests").json()
    assert counts["submit"] == 200 and counts["rate_limited"] == 0
    report = httpx.get(f"{stack.api.url}/v1/admin/usage", headers=ADMIN).json()
    assert report["upsampler_requests"]["last_hour"] >= 400  # submits and status calls, all counted
    print(
        f"\nquota: {counts['submit']} submits, {counts['status']} status calls, {counts['rate_limited']} answered 429"
    )
