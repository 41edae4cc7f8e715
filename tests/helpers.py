"""Small helpers shared by the workflow and end-to-end tests."""

from __future__ import annotations

import asyncio
import time

from sqlmodel import Session, create_engine, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from smi.db import LedgerEntry, SentMail


def order(image_url: str, order_id: str, **overrides) -> dict:
    body = {
        "order_id": order_id,
        "image_url": image_url,
        "scale_factor": 4,
        "format": "auto",
        "customer_email": "ana@example.com",
        "customer_name": "Ana",
        "amount_paid_cents": 1299,
        "currency": "USD",
        "payment_reference": "pi_test_123",
    }
    body.update(overrides)
    return body


async def wait_for_status(client, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict:
    """Poll GET /v1/jobs/{id} in real time (no time skipping) until the job reaches a status."""
    deadline = time.monotonic() + timeout
    while True:
        job = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job stayed {job['status']}, wanted one of {statuses}")
        await asyncio.sleep(0.1)


async def timer_seconds(handle: WorkflowHandle) -> list[float]:
    """Durations of the timers the workflow started, in order."""
    durations = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            durations.append(event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds())
    return durations


async def event_count(handle: WorkflowHandle, event_type) -> int:
    return sum([1 async for event in handle.fetch_history_events() if event.event_type == event_type])


def rows(database_url: str, model, job_id: str) -> list:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(model).where(model.job_id == job_id)).all())
    finally:
        engine.dispose()


def ledger_rows(database_url: str, job_id: str, purpose: str = "upscale:") -> list[LedgerEntry]:
    """The job's ledger rows whose purpose starts with `purpose`: by default its charges."""
    return [row for row in rows(database_url, LedgerEntry, job_id) if row.purpose.startswith(purpose)]


def mail_rows(database_url: str, job_id: str) -> list[SentMail]:
    return rows(database_url, SentMail, job_id)
