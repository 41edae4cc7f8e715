"""Small helpers shared by the workflow and end-to-end tests."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time

import httpx
from sqlmodel import Session, create_engine, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from devstack import CUSTOMER_EMAIL, CUSTOMER_NAME, WEBHOOK_SECRET, Site, job_row  # noqa: F401 (tests import them from here)
from smi.db import LedgerEntry, SentMail

RESULT_BYTES = 16 * 1024 * 1024  # far more than loopback socket buffers hold: a reader that stops stalls the sender


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


async def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = "the condition"):
    """Wait in real time until `check()` (a plain or an async function) gives something true, and return
    it; fail naming `what` if it is still false after `timeout` seconds. The check, not a fixed sleep,
    decides when a test goes on."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)


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


def raw_request(url: str, request: bytes) -> socket.socket:
    """A connection that sends `request` and then reads nothing (its receive buffer kept small)."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(request)
    return sock


def stalled_download(link: str) -> socket.socket:
    return raw_request(link, f"GET {httpx.URL(link).path} HTTP/1.1\r\nHost: shop\r\n\r\n".encode())


def reply_status(sock: socket.socket, timeout: float = 5.0) -> int:
    sock.settimeout(timeout)
    return int(sock.recv(64).split(b" ")[1])


def clear_of_minute_boundary(seconds: float = 15.0) -> None:
    """The limits count per UTC minute: a sequence of requests that must fall into one minute starts with at
    least `seconds` of it left (when less is left, this waits for the next minute to begin)."""
    deadline = time.monotonic() + seconds + 5
    while 60 - time.time() % 60 < seconds:
        assert time.monotonic() < deadline, "the minute did not turn"
        time.sleep(0.05)
