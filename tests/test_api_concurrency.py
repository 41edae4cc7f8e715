"""Many storefront requests at once: no request holds a pooled database connection while it waits
on the network (the image probe, Temporal), so more requests than the pool has connections
(SQLAlchemy's default: 5 + 10 overflow) are all answered, promptly."""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlmodel import Session, create_engine, select

from smi.db import Job, JobEvent, LedgerEntry
from tests.conftest import STOREFRONT_KEY, png_bytes
from tests.helpers import order

BURST = 40  # well over the pool's 15 connections


def table(database_url: str, model) -> list:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(model)).all())
    finally:
        engine.dispose()


async def post_all(stack, bodies: list[dict]) -> tuple[list[httpx.Response], float]:
    """All at once; a request that got no answer in 30 s (a stalled API) fails the test with its timeout."""
    async with httpx.AsyncClient(
        base_url=stack.api.url,
        headers={"Authorization": f"Bearer {STOREFRONT_KEY}"},
        timeout=30,
        limits=httpx.Limits(max_connections=len(bodies)),
    ) as client:
        started = time.monotonic()
        replies = await asyncio.gather(*(client.post("/v1/jobs", json=body) for body in bodies), return_exceptions=True)
        elapsed = time.monotonic() - started
    failed = [type(reply).__name__ for reply in replies if isinstance(reply, Exception)]
    assert not failed, f"{len(failed)} of {len(bodies)} requests got no answer ({failed[0]}) in {elapsed:.1f} s"
    return replies, elapsed


async def terminate(env, job_ids) -> None:
    """No worker runs here: end the workflows, the dev server is shared by the session's tests."""
    for job_id in job_ids:
        await env.client.get_workflow_handle(f"upscale-{job_id}").terminate("test over")


async def test_a_burst_of_orders_is_answered_without_exhausting_the_pool(dev_env, stack_factory):
    stack = stack_factory(dev_env)  # no worker: every workflow stays open, each request awaits probe and Temporal
    image_url = stack.shop.publish(png_bytes(64, 48))

    replies, elapsed = await post_all(stack, [order(image_url, f"burst-{i}") for i in range(BURST)])

    codes = [reply.status_code for reply in replies]
    assert codes == [202] * BURST and elapsed < 20, f"{codes} in {elapsed:.1f} s"
    job_ids = {reply.json()["job_id"] for reply in replies}
    assert len(job_ids) == BURST and {reply.json()["status"] for reply in replies} == {"received"}
    jobs = table(stack.settings.database_url, Job)
    assert {job.job_id for job in jobs} == job_ids
    assert len(table(stack.settings.database_url, JobEvent)) == BURST  # each job with its first event
    assert len([e for e in table(stack.settings.database_url, LedgerEntry) if e.purpose == "revenue"]) == BURST
    for job_id in job_ids:  # each job's workflow was started
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").describe()
    await terminate(dev_env, job_ids)


async def test_the_same_order_at_once_makes_one_job(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    image_url = stack.shop.publish(png_bytes(64, 48))

    replies, elapsed = await post_all(stack, [order(image_url, "same-order")] * 10)

    codes = sorted(reply.status_code for reply in replies)
    assert codes == [200] * 9 + [202], f"{codes} in {elapsed:.1f} s"
    job_ids = {reply.json()["job_id"] for reply in replies}
    assert len(job_ids) == 1
    jobs = table(stack.settings.database_url, Job)
    assert [job.job_id for job in jobs] == list(job_ids)
    assert len(table(stack.settings.database_url, JobEvent)) == 1
    assert len(table(stack.settings.database_url, LedgerEntry)) == 1

    # A different body under the same order_id is still a conflict, and writes nothing.
    conflict, _ = await post_all(stack, [order(image_url, "same-order", scale_factor=2)])
    assert conflict[0].status_code == 409 and conflict[0].json()["error"]["code"] == "order_conflict"
    assert len(table(stack.settings.database_url, Job)) == 1
    await terminate(dev_env, job_ids)
