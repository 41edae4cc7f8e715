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
from smi.db import make_engine
from smi.settings import Settings, get_settings
from smi.upsampler import UpsamplerClient
from workflows.admin import RefundWorkflow, ResendLinkWorkflow
from workflows.upscale import UpscaleWorkflow

log = logging.getLogger("smi.worker")


def create_worker(client: Client, settings: Settings, task_queue: str | None = None) -> Worker:
    engine = make_engine(settings.database_url)
    upsampler = UpsamplerClient(settings.upsampler_base_url, settings.secret("upsampler_api_key"))
    storage = StorageActivities(settings)
    ledger = LedgerActivities(settings, engine)
    notify = NotifyActivities(settings, engine)
    calls = UpsamplerActivities(settings, engine, upsampler)
    payments = PaymentsActivities(settings, engine)
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=[UpscaleWorkflow, RefundWorkflow, ResendLinkWorkflow],
        activities=[
            storage.fetch_original,
            storage.compress_original,
            storage.download_result,
            storage.validate_result,
            storage.store_result,
            storage.cleanup,
            calls.submit_upscale,
            calls.check_status,
            ledger.update_job,
            ledger.record_cost,
            ledger.issue_download_token,
            notify.send_email,
            payments.refund,
        ],
        # Database and image work is blocking: it runs on these threads, not the event loop.
        activity_executor=ThreadPoolExecutor(max_workers=8),
    )


async def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    worker = create_worker(client, settings)
    log.info("worker polling task queue %s on %s", settings.task_queue, settings.temporal_address)
    await worker.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run())
