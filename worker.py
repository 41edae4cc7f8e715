"""One worker: runs UpscaleWorkflow and its activities on the task queue. `python worker.py`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentsActivities
from activities.storage import StorageActivities
from activities.upsampler import UpsamplerActivities
from smi.codec import data_converter
from smi.db import make_engine
from smi.settings import Settings, get_settings
from smi.upsampler import UpsamplerClient
from workflows.admin import RefundWorkflow, ResendLinkWorkflow
from workflows.retention import RetentionWorkflow, ensure_retention_schedule
from workflows.types import UPSAMPLER_QUEUE_SUFFIX
from workflows.upscale import UpscaleWorkflow

log = logging.getLogger("smi.worker")


class WorkerGroup:
    """The job worker and the Upsampler worker of one process, started and stopped together."""

    def __init__(self, *workers: Worker):
        self.workers = workers

    async def __aenter__(self) -> "WorkerGroup":
        for worker in self.workers:
            await worker.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        for worker in reversed(self.workers):
            await worker.__aexit__(*exc)

    async def run(self) -> None:
        await asyncio.gather(*(worker.run() for worker in self.workers))


def create_worker(client: Client, settings: Settings, task_queue: str | None = None) -> WorkerGroup:
    task_queue = task_queue or settings.task_queue
    if settings.payload_key is not None and client.data_converter.payload_codec is None:
        raise ValueError("SMI_PAYLOAD_KEY is set but the Temporal client does not encrypt: "
                         "connect it with data_converter=smi.codec.data_converter(settings)")
    engine = make_engine(settings.database_url)
    upsampler = UpsamplerClient(settings.upsampler_base_url, settings.secret("upsampler_api_key"))
    storage = StorageActivities(settings)
    ledger = LedgerActivities(settings, engine)
    notify = NotifyActivities(settings, engine)
    calls = UpsamplerActivities(settings, engine, upsampler)
    payments = PaymentsActivities(settings, engine)
    # Database and image work is blocking: it runs on these threads, not the event loop.
    threads = ThreadPoolExecutor(max_workers=8)
    jobs = Worker(
        client,
        task_queue=task_queue,
        workflows=[UpscaleWorkflow, RefundWorkflow, ResendLinkWorkflow, RetentionWorkflow],
        activities=[
            storage.fetch_original,
            storage.compress_original,
            storage.download_result,
            storage.validate_result,
            storage.store_result,
            storage.cleanup,
            ledger.update_job,
            ledger.record_estimate,
            ledger.record_cost,
            ledger.check_budget,
            ledger.budget_gate,
            ledger.issue_download_token,
            notify.send_email,
            notify.send_budget_alert,
            payments.refund,
            storage.retention_inventory,
            storage.delete_retained,
            ledger.retention_plan,
            ledger.forget_results,
            ledger.delete_expired_tokens,
        ],
        activity_executor=threads,
    )
    # Upsampler calls have a queue of their own whose rate limit the server enforces for all
    # workers together: Upsampler's per-minute quota. The hourly one is kept in UpsamplerActivities.
    upsampler_calls = Worker(
        client,
        task_queue=task_queue + UPSAMPLER_QUEUE_SUFFIX,
        activities=[calls.submit_upscale, calls.check_status],
        max_task_queue_activities_per_second=settings.upsampler_requests_per_minute / 60,
        activity_executor=threads,
    )
    return WorkerGroup(jobs, upsampler_calls)


async def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace,
                                  data_converter=data_converter(settings))  # encrypts payloads when a key is set
    workers = create_worker(client, settings)
    log.info("worker polling task queues %s and %s%s on %s", settings.task_queue, settings.task_queue,
             UPSAMPLER_QUEUE_SUFFIX, settings.temporal_address)
    try:
        if await ensure_retention_schedule(client, settings):
            log.info("created the retention schedule (daily, 03:00 UTC)")
    except Exception:  # the worker is still needed; the next worker start tries again
        log.exception("could not create the retention schedule")
    await workers.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run())
