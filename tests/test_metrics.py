"""Metrics for operators: the worker's Prometheus port (the SDK's metrics and ours) and the
API's /metrics (database totals, task queue backlog, behind SMI_METRICS_TOKEN), scraped from
real servers."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from temporalio.client import Client

from api import metrics
from api.app import create_app
from smi.serve import ServerThread, free_port
from smi.telemetry import worker_runtime
from tests.conftest import make_settings, png_bytes
from tests.helpers import eventually, order, wait_for_status
from worker import create_worker

METRICS_TOKEN = "metrics-token-for-tests"
BEARER = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}; the parser also proves the text is valid."""
    reply = httpx.get(url, headers=BEARER, timeout=10)  # the worker's port ignores the header
    assert reply.status_code == 200, reply.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, found), v in samples.items() if n == name and set(labels.items()) <= set(found))


async def scrape_until(url: str, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(samples := await asyncio.to_thread(scrape, url)):
        assert time.monotonic() < deadline, f"{url} never showed what the test waits for"
        await asyncio.sleep(0.5)
    return samples


async def client_exporting_metrics(dev_env) -> tuple[Client, str]:
    """A Temporal client whose runtime, and so its workers, export metrics on a free port: (client, host:port)."""
    address = f"127.0.0.1:{free_port()}"
    client = await Client.connect(dev_env.client.service_client.config.target_host, runtime=worker_runtime(address))
    return client, address


async def test_worker_port_has_sdk_and_job_metrics(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1)
    client, address = await client_exporting_metrics(dev_env)
    api = stack.client()

    async with create_worker(client, stack.settings):
        by_webhook = (
            await asyncio.to_thread(
                api.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(60, 40)), "metrics-1", scale_factor=2)
            )
        ).json()["job_id"]
        first = await wait_for_status(api, by_webhook, {"completed", "failed", "manual_review"}, timeout=60)
        faults(delay_seconds=0.2, webhook="drop")  # the next job is found by polling
        by_poll = (
            await asyncio.to_thread(
                api.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(50, 30)), "metrics-2", scale_factor=2)
            )
        ).json()["job_id"]
        second = await wait_for_status(api, by_poll, {"completed", "failed", "manual_review"}, timeout=60)
        assert first["status"] == second["status"] == "completed", (first, second)
        for job_id in (by_webhook, by_poll):  # "completed" comes before the email and the clean-up
            await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()

        samples = await asyncio.to_thread(scrape, f"http://{address}/metrics")

    # The SDK's own metrics, through the Runtime's exporter; durations in seconds, named so.
    assert value(samples, "temporal_workflow_completed_total", task_queue=stack.settings.task_queue) >= 2
    assert value(samples, "temporal_activity_execution_latency_seconds_count") > 0
    # Names Temporal's SDK dashboard (temporalio/dashboards, sdk/sdk-general.json) queries.
    assert value(samples, "temporal_request_latency_seconds_count") > 0
    assert value(samples, "temporal_workflow_endtoend_latency_seconds_count", task_queue=stack.settings.task_queue) >= 2
    assert not any(name.endswith("_latency_count") for name, _ in samples), "a duration without its unit"
    # Ours, recorded in the workflow and in activities.
    assert value(samples, "smi_jobs_started_total", run="first") == 2
    assert value(samples, "smi_job_outcomes_total", outcome="completed", reason="none") == 2
    assert value(samples, "smi_results_learned_total", via="webhook") == 1
    assert value(samples, "smi_results_learned_total", via="poll") == 1
    assert value(samples, "smi_upsampler_requests_total", kind="submit", outcome="ok") == 2
    assert value(samples, "smi_result_download_bytes_total") == first["output"]["bytes"] + second["output"]["bytes"]
    credits = first["cost"]["credits"] + second["cost"]["credits"]
    assert value(samples, "smi_credits_spent_hundredths_total") == round(credits * 100)
    # Each job left each of these stages once (Upsampler finished before a poll saw "processing").
    for stage in ("received", "queued", "downloading"):
        assert value(samples, "smi_stage_duration_seconds_count", stage=stage) == 2, stage
    assert value(samples, "smi_stage_duration_seconds_bucket", stage="queued", le="+Inf") == 2
    # Our buckets (up to a week), not the SDK's defaults: the override's key is the unsuffixed name.
    assert value(samples, "smi_stage_duration_seconds_bucket", stage="queued", le="604800") == 2
    # The polled job waited its initial delay (1 s) in queued; a webhook ends the wait sooner.
    assert value(samples, "smi_stage_duration_seconds_sum", stage="queued") >= 0.9


async def test_api_metrics_show_the_backlog(dev_env, stack_factory):
    stack = stack_factory(dev_env, metrics_token=METRICS_TOKEN, daily_budget_usd=0.01)
    api = stack.client()
    queue = stack.settings.task_queue
    job_id = (
        await asyncio.to_thread(
            api.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(40, 40)), "backlog-1", scale_factor=2)
        )
    ).json()["job_id"]

    # No worker yet: the job's first workflow task waits in the queue, and ages.
    samples = await scrape_until(
        f"{stack.api.url}/metrics",
        lambda found: value(found, "smi_task_queue_backlog", task_queue=queue, type="workflow") >= 1,
    )
    assert value(samples, "smi_task_queue_up") == 1
    assert value(samples, "smi_task_queue_backlog_age_seconds", task_queue=queue, type="workflow") > 0
    assert value(samples, "smi_db_jobs", status="received") == 1

    async with create_worker(dev_env.client, stack.settings):
        job = await wait_for_status(api, job_id, {"completed", "failed", "manual_review"}, timeout=60)
        assert job["status"] == "completed", job
        # Temporal's statistics are approximate and refreshed every few seconds.
        samples = await scrape_until(
            f"{stack.api.url}/metrics",
            lambda found: value(found, "smi_task_queue_backlog", task_queue=queue, type="workflow") == 0,
        )
    assert value(samples, "smi_task_queue_pollers", task_queue=queue, type="workflow") >= 1
    assert value(samples, "smi_task_queue_pollers", task_queue=queue + "-upsampler", type="activity") >= 1
    assert value(samples, "smi_db_jobs", status="completed") == 1
    # The day's spend against its budget (crossed: the job cost more than a cent); no monthly budget set.
    cost = job["cost"]["usd"]
    assert value(samples, "smi_db_budget_spent_usd", period="day") == cost > 0.01
    assert value(samples, "smi_budget_usd", period="day") == 0.01
    assert not any(name == "smi_budget_usd" and ("period", "month") in labels for name, labels in samples)


@contextmanager
def api_alone(tmp_path, emulator, mailbox, **overrides):
    """A real API whose Temporal is down (nothing listens at its address); yields its URL."""
    port = free_port()
    settings = make_settings(
        tmp_path,
        temporal_address=f"127.0.0.1:{free_port()}",
        api_port=port,
        smtp_port=mailbox.port,
        emulator_url=emulator.url,
        **overrides,
    )
    server = ServerThread(create_app(settings), port=port).start()
    try:
        yield server.url
    finally:
        server.stop()


async def test_api_metrics_without_temporal_still_answer(tmp_path, emulator, mailbox):
    """Temporal down: the database totals are still scraped, and the queue gauge says so."""
    with api_alone(tmp_path, emulator, mailbox, metrics_token=METRICS_TOKEN) as url:
        samples = await asyncio.to_thread(scrape, f"{url}/metrics")
    assert value(samples, "smi_task_queue_up") == 0
    assert ("smi_db_credits_spent_total", ()) in samples


def aggregates_run_by(app) -> list[str]:
    """The aggregate queries (count, sum) the API process sends to its database from now on."""
    seen: list[str] = []

    def note(conn, cursor, statement, *args):
        if "count(" in statement.lower() or "sum(" in statement.lower():
            seen.append(statement)

    event.listen(app.state.services.engine, "before_cursor_execute", note)
    return seen


async def test_api_metrics_need_the_token_and_a_flood_costs_one_collection(dev_env, stack_factory):
    stack = stack_factory(dev_env, metrics_token=METRICS_TOKEN)
    url = f"{stack.api.url}/metrics"
    aggregates = aggregates_run_by(stack.api.server.config.app)

    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": "Bearer \xe9t\xe9".encode("latin-1")},
        {"Authorization": METRICS_TOKEN},
    ):
        refused = await asyncio.to_thread(httpx.get, url, headers=headers)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "smi_" not in refused.text
    assert aggregates == [], "an unauthenticated scrape reached the database"

    # Twenty scrapes at once: one collection answers them all, and the text is valid Prometheus.
    flood = await asyncio.gather(*(asyncio.to_thread(scrape, url) for _ in range(20)))
    one_collection = len(aggregates)
    assert one_collection > 0 and all(samples == flood[0] for samples in flood)
    assert value(flood[0], "smi_task_queue_up") == 1
    # A scrape soon after is answered from the same figures.
    await asyncio.to_thread(scrape, url)
    assert len(aggregates) == one_collection
    # Figures older than the cache's few seconds are collected again, once.
    figures = stack.api.server.config.app.state.metrics
    await eventually(
        lambda: time.monotonic() - figures.collected_at >= metrics.CACHE_SECONDS,
        timeout=2 * metrics.CACHE_SECONDS,
        what="the cached figures out of date",
    )
    await asyncio.gather(*(asyncio.to_thread(scrape, url) for _ in range(5)))
    assert len(aggregates) == 2 * one_collection


async def test_metrics_are_refused_without_a_configured_token_outside_dev(tmp_path, emulator, mailbox):
    with api_alone(tmp_path, emulator, mailbox, env="test") as url:  # no SMI_METRICS_TOKEN
        reply = await asyncio.to_thread(httpx.get, f"{url}/metrics", headers=BEARER)
    assert reply.status_code == 401 and "SMI_METRICS_TOKEN" in reply.json()["error"]["message"]
    with api_alone(tmp_path, emulator, mailbox, env="dev") as url:  # `smi dev`: open, on loopback
        reply = await asyncio.to_thread(httpx.get, f"{url}/metrics")
    assert reply.status_code == 200 and "smi_db_jobs" in reply.text


async def test_revenue_and_refunds_are_two_counters(dev_env, stack_factory, faults):
    """A refund adds to the refunds counter; the revenue counter keeps what was paid (it never goes down)."""
    faults(refuse_with="unsupported image format")  # Upsampler refuses the job: it fails and is refunded
    stack = stack_factory(dev_env, metrics_token=METRICS_TOKEN)
    api = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        job_id = (
            await asyncio.to_thread(
                api.post,
                "/v1/jobs",
                json=order(stack.shop.publish(png_bytes(40, 30)), "refunded-1", amount_paid_cents=1299),
            )
        ).json()["job_id"]
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
    job = (await asyncio.to_thread(api.get, f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["refund"]["amount_cents"] == 1299, job

    samples = await asyncio.to_thread(scrape, f"{stack.api.url}/metrics")
    assert value(samples, "smi_db_revenue_usd_total") == 12.99
    assert value(samples, "smi_db_refunded_usd_total") == 12.99
    assert value(samples, "smi_db_refunds", reason=job["refund"]["reason"]) == 1
