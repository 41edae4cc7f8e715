"""Experiments, not production code: UpscaleWorkflow with the changes the benchmarks propose.

The benchmarks can run our worker with one of these in place of UpscaleWorkflow (same
workflow type name, so the API starts it), to measure a proposed change before anyone makes
it in workflows/upscale.py. A real change there needs `workflow.patched(...)` so that the
histories of running jobs still replay (README, Benchmarks).

- BookkeepingAfterDownloadWorkflow (`bench/webhook_latency.py --book-after-download`):
  today, between the status check that confirms the result and the download, three local
  activities run one after the other (record_cost, check_budget, update_job "downloading"),
  and the download's schedule command waits for all three: a workflow task that runs local
  activities completes (and sends its other commands) only when they are done, so starting
  the download "beside" them gains nothing. This one sets `downloading`, downloads, and
  books the cost (and checks the budget) after the download instead of before it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.storage import StorageActivities
    from smi.vocabulary import (
        DOWNLOADING,
        DownloadRequest,
        JobState,
        StoredImage,
        StoreRequest,
        UpsamplerResult,
        UpscaleInput,
        ValidateRequest,
        WebhookHint,
    )
    from workflows.upscale import TRANSFER_RETRY, UpscaleWorkflow


@workflow.defn(name="UpscaleWorkflow")
class BookkeepingAfterDownloadWorkflow(UpscaleWorkflow):
    def __init__(self) -> None:
        super().__init__()
        self._cost_due: tuple[UpsamplerResult, UpsamplerResult] | None = None

    @workflow.query
    def state(self) -> JobState:
        return super().state()

    @workflow.signal
    def upsampler_webhook(self, hint: WebhookHint) -> None:
        super().upsampler_webhook(hint)

    @workflow.signal
    def admin_decision(self, decision: str) -> None:
        super().admin_decision(decision)

    @workflow.signal
    def budget_released(self) -> None:
        super().budget_released()

    @workflow.run
    async def run(self, job: UpscaleInput) -> JobState:
        return await super().run(job)

    async def _book_cost(self, submission: UpsamplerResult, result: UpsamplerResult) -> None:
        self._cost_due = (submission, result)  # booked after the download, below

    async def _download_and_check(self, result: UpsamplerResult, width: int, height: int) -> StoredImage:
        job = self._job
        await self._set_status(DOWNLOADING)
        try:
            downloaded = await self._activity(
                StorageActivities.download_result,
                DownloadRequest(job.job_id, result.image_url or "", self._state.attempt),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=TRANSFER_RETRY,
            )
        finally:  # the cost is owed whether or not the download worked
            if self._cost_due is not None:
                due, self._cost_due = self._cost_due, None
                await UpscaleWorkflow._book_cost(self, *due)
        return await self._check_and_store(downloaded, width, height)

    async def _check_and_store(self, downloaded, width: int, height: int) -> StoredImage:
        job = self._job
        await self._activity(
            StorageActivities.validate_result,
            ValidateRequest(job.job_id, downloaded.path, width, height),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=TRANSFER_RETRY,
        )
        return await self._activity(
            StorageActivities.store_result,
            StoreRequest(job.job_id, downloaded.path, job.format),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=TRANSFER_RETRY,
        )
