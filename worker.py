"""One worker: runs UpscaleWorkflow and its activities on the task queue. `python worker.py`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentsActivities
from activities.reconciliation import ReconciliationActivities
from activities.shop_events import ShopEventActivities
from activities.storage import StorageActivities
from activities.upsampler import UpsamplerActivities
from smi.codec import data_converter
from smi.db import make_engine
from smi.migrations import migrate
from smi.settings import Settings, get_settings
from smi.telemetry import worker_runtime
from smi.upsampler import UpsamplerClient
from smi.vocabulary import UPSAMPLER_QUEUE_SUFFIX
from workflows.admin import RefundWorkflow, ResendLinkWorkflow
from workflows.reconciliation import ReconciliationWorkflow, ensure_reconciliation_schedule
from workflows.retention import RetentionWorkflow, ensure_retention_schedule
from workflows.shop_events import ShopEventWorkflow
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
        try:
            await asyncio.gather(*(worker.run() for worker in self.workers))
        finally:  # one failed: stop the other too, rather than leave half a worker polling
            await self.shutdown()

    async def shutdown(self) -> None:
        """Poll no more; wait for running activities, cancelling those still running after the grace period."""
        await asyncio.gather(*(worker.shutdown() for worker in self.workers))


def create_worker(
    client: Client, settings: Settings, task_queue: str | None = None, shutdown_grace: float = 0.0
) -> WorkerGroup:
    """The process's workers. `shutdown_grace`: seconds running activities get to finish at shutdown
    before they are cancelled; `run()` passes SMI_WORKER_SHUTDOWN_SECONDS, in-process users stop at once."""
    task_queue = task_queue or settings.task_queue
    if settings.payload_key is not None and client.data_converter.payload_codec is None:
        raise ValueError(
            "SMI_PAYLOAD_KEY is set but the Temporal client does not encrypt: "
            "connect it with data_converter=smi.codec.data_converter(settings.payload_codec())"
        )
    engine = make_engine(settings.database_url)
    upsampler = UpsamplerClient(settings.upsampler_base_url, settings.secret("upsampler_api_key"))
    storage = StorageActivities(settings)
    ledger = LedgerActivities(settings, engine)
    notify = NotifyActivities(settings, engine)
    calls = UpsamplerActivities(settings, engine, upsampler)
    payments = PaymentsActivities(settings, engine)
    shop_events = ShopEventActivities(settings, engine)
    reconciliation = ReconciliationActivities(settings, engine)
    # Database and image work is blocking: it runs on these threads, not the event loop.
    threads = ThreadPoolExecutor(max_workers=8)
    grace = timedelta(seconds=shutdown_grace)  # see serve_until_signalled
    jobs = Worker(
        client,
        task_queue=task_queue,
        workflows=[
            UpscaleWorkflow,
            RefundWorkflow,
            ResendLinkWorkflow,
            RetentionWorkflow,
            ShopEventWorkflow,
            ReconciliationWorkflow,
        ],
        activities=[
            storage.fetch_original,
            storage.compress_original,
            storage.download_result,
            storage.validate_result,
            storage.store_result,
            storage.check_and_store,
            storage.cleanup,
            ledger.update_job,
            ledger.record_estimate,
            ledger.record_cost,
            ledger.check_budget,
            ledger.budget_gate,
            ledger.issue_download_token,
            ledger.book_result,
            ledger.complete,
            notify.send_email,
            notify.send_budget_alert,
            payments.refund,
            shop_events.build_event,
            shop_events.deliver,
            storage.retention_inventory,
            storage.delete_retained,
            ledger.retention_plan,
            ledger.forget_results,
            ledger.delete_expired_tokens,
            reconciliation.reconciliation_page,
            reconciliation.settle,
            reconciliation.record,
            reconciliation.send_summary,
        ],
        activity_executor=threads,
        graceful_shutdown_timeout=grace,
    )
    # Upsampler calls have a queue of their own whose rate limit the server enforces for all
    # workers together: Upsampler's per-minute quota. The hourly one is kept in UpsamplerActivities.
    upsampler_calls = Worker(
        client,
        task_queue=task_queue + UPSAMPLER_QUEUE_SUFFIX,
        activities=[calls.submit_upscale, calls.check_status, calls.adopt_submission],
        max_task_queue_activities_per_second=settings.upsampler_requests_per_minute / 60,
        activity_executor=threads,
        graceful_shutdown_timeout=grace,
    )
    return WorkerGroup(jobs, upsampler_calls)


async def run(settings: Settings | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully and return."""
    settings = settings or get_settings()
    grace = settings.worker_shutdown_seconds
    with stop_on_signals(grace) as stop:  # first: a signal during start-up is a graceful stop too
        runtime = worker_runtime(settings.worker_metrics_address) if settings.worker_metrics_address else None
        client = await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=data_converter(settings.payload_codec()),  # encrypts payloads when a key is set
            runtime=runtime,
        )
        if runtime:
            log.info("worker metrics on http://%s/metrics", settings.worker_metrics_address)
        engine = make_engine(settings.database_url)
        migrate(engine)  # the process's start: bring the schema to head (a cheap query when it is there)
        engine.dispose()
        workers = create_worker(client, settings, shutdown_grace=grace)
        log.info(
            "worker polling task queues %s and %s%s on %s",
            settings.task_queue,
            settings.task_queue,
            UPSAMPLER_QUEUE_SUFFIX,
            settings.temporal_address,
        )
        try:
            if await ensure_retention_schedule(client, settings):
                log.info("created the retention schedule (daily, 03:00 UTC)")
        except Exception:  # the worker is still needed; the next worker start tries again
            log.exception("could not create the retention schedule")
        try:
            if await ensure_reconciliation_schedule(client, settings):
                log.info("created the reconciliation schedule (daily, 04:00 UTC, the day before)")
        except Exception:
            log.exception("could not create the reconciliation schedule")
        await serve_until(stop, workers)


@contextmanager
def stop_on_signals(grace: float):
    """An event set by the first SIGTERM or SIGINT; the handlers are removed on leaving."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.info("%s: already stopping (SIGKILL stops at once)", name)
            return
        log.info("%s: stopping: no new tasks; running activities have %g s to finish", name, grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield stop
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def serve_until(stop: asyncio.Event, workers: WorkerGroup) -> None:
    """Run the workers until `stop` is set, then shut down gracefully.

    Shutdown polls no more and lets running activities finish for the grace period (the Workers'
    graceful_shutdown_timeout); those still running are then cancelled. Their heartbeats (the
    download's bytes done) let the next attempt, on another worker, resume where they stopped.
    """
    running = asyncio.ensure_future(workers.run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:  # stopped, or this task cancelled: either way no worker is left polling
        stopping.cancel()
        if not running.done():
            await workers.shutdown()
        await running  # a worker's fatal error comes out here
    log.info("worker stopped")


def main(settings: Settings | None = None) -> None:
    """`smi worker` and `python worker.py`: exits 0 after a graceful stop."""
    asyncio.run(run(settings))
    # The SDK's native threads can still call into Python while the interpreter finalizes
    # (seen: an abort in PyGILState_Release, exit -6, about once in 20 stops under load).
    # Everything is stopped and flushed: leave without finalizing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    from smi.logs import setup_logging

    setup_logging(logging.INFO)
    main()
