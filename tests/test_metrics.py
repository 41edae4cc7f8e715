"""Metrics for operators: the worker's Prometheus port (the SDK's metrics and ours) and the
API's /metrics (database totals, task queue backlog), scraped from real servers."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from smi.serve import free_port
from smi.telemetry import worker_runtime
from tests.conftest import png_bytes
from tests.helpers import order, wait_for_status
from worker import create_worker


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}; the parser also proves the text is valid."""
    text = httpx.get(url, timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, found), v in samples.items()
               if n == name and set(labels.items()) <= set(found))


async def scrape_until(url: str, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(samples := await asyncio.to_thread(scrape, url)):
        assert time.monotonic() < deadline, f"{url} never showed what the test waits for"
        await asyncio.sleep(0.5)
    return samples


async def test_worker_port_has_sdk_and_job_metrics(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, poll_initial_delay_seconds=1)
    address = f"127.0.0.1:{free_port()}"
    client = await Client.connect(dev_env.client.service_client.config.target_host, runtime=worker_runtime(address))
    api = stack.client()

    async with create_worker(client, stack.settings):
        by_webhook = (await asyncio.to_thread(api.post, "/v1/jobs", json=order(
            stack.shop.publish(png_bytes(60, 40)), "metrics-1", scale_factor=2))).json()["job_id"]
        first = await wait_for_status(api, by_webhook, {"completed", "failed", "manual_review"}, timeout=60)
        faults(delay_seconds=0.2, webhook="drop")  # the next job is found by polling
        by_poll = (await asyncio.to_thread(api.post, "/v1/jobs", json=order(
            stack.shop.publish(png_bytes(50, 30)), "metrics-2", scale_factor=2))).json()["job_id"]
        second = await wait_for_status(api, by_poll, {"completed", "failed", "manual_review"}, timeout=60)
        assert first["status"] == second["status"] == "completed", (first, second)
        for job_id in (by_webhook, by_poll):  # "completed" comes before the email and the clean-up
            await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()

        samples = await asyncio.to_thread(scrape, f"http://{address}/metrics")

    # The SDK's own metrics, through the Runtime's exporter.
    assert value(samples, "temporal_workflow_completed_total", task_queue=stack.settings.task_queue) >= 2
    assert value(samples, "temporal_activity_execution_latency_count") > 0
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
        assert value(samples, "smi_stage_duration_count", stage=stage) == 2, stage
    assert value(samples, "smi_stage_duration_bucket", stage="queued", le="+Inf") == 2
    # The polled job waited its initial delay (1 s) in queued; a webhook ends the wait sooner.
    assert value(samples, "smi_stage_duration_sum", stage="queued") >= 0.9


async def test_api_metrics_show_the_backlog(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    api = stack.client()
    queue = stack.settings.task_queue
    job_id = (await asyncio.to_thread(api.post, "/v1/jobs", json=order(
        stack.shop.publish(png_bytes(40, 40)), "backlog-1", scale_factor=2))).json()["job_id"]

    # No worker yet: the job's first workflow task waits in the queue, and ages.
    samples = await scrape_until(f"{stack.api.url}/metrics", lambda found: value(
        found, "smi_task_queue_backlog", task_queue=queue, type="workflow") >= 1)
    assert value(samples, "smi_task_queue_up") == 1
    assert value(samples, "smi_task_queue_backlog_age_seconds", task_queue=queue, type="workflow") > 0
    assert value(samples, "smi_jobs", status="received") == 1

    async with create_worker(dev_env.client, stack.settings):
        job = await wait_for_status(api, job_id, {"completed", "failed", "manual_review"}, timeout=60)
        assert job["status"] == "completed", job
        # Temporal's statistics are approximate and refreshed every few seconds.
        samples = await scrape_until(f"{stack.api.url}/metrics", lambda found: value(
            found, "smi_task_queue_backlog", task_queue=queue, type="workflow") == 0)
    assert value(samples, "smi_task_queue_pollers", task_queue=queue, type="workflow") >= 1
    assert value(samples, "smi_task_queue_pollers", task_queue=queue + "-upsampler", type="activity") >= 1
    assert value(samples, "smi_jobs", status="completed") == 1


async def test_api_metrics_without_temporal_still_answer(tmp_path, emulator, shop, mailbox):
    """Temporal down: the database totals are still scraped, and the queue gauge says so."""
    from api.app import create_app
    from smi.serve import ServerThread
    from tests.conftest import make_settings

    port = free_port()
    settings = make_settings(tmp_path, temporal_address=f"127.0.0.1:{free_port()}", api_port=port,
                             smtp_port=mailbox.port, emulator_url=emulator.url)
    server = ServerThread(create_app(settings), port=port).start()
    try:
        samples = await asyncio.to_thread(scrape, f"{server.url}/metrics")
    finally:
        server.stop()
    assert value(samples, "smi_task_queue_up") == 0
    assert ("smi_credits_spent_total", ()) in samples
