"""UpscaleWorkflow: one paid order, from the storefront's image to the customer's email.

The workflow only decides; every effect on the world is an activity. It reads top to
bottom as the numbered process in DESIGN.md.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.notify import NotifyActivities
    from activities.storage import StorageActivities
    from activities.upsampler import UpsamplerActivities
    from workflows.types import (
        COMPLETED,
        DOWNLOADING,
        FAILED,
        MANUAL_REVIEW,
        PROCESSING,
        QUEUED,
        CostRecord,
        DownloadRequest,
        EmailRequest,
        FetchRequest,
        JobPolicy,
        JobState,
        JobUpdate,
        StoreRequest,
        SubmitRequest,
        TokenRequest,
        UpscaleInput,
        UpsamplerResult,
        ValidateRequest,
        WebhookHint,
    )

UPSCALE_STATUS = SearchAttributeKey.for_keyword("UpscaleStatus")
MAX_OUTPUT_PIXELS = 50_000_000

# Errors that no retry can mend: the activity raises them as non-retryable ApplicationErrors.
FINAL_ERRORS = [
    "unsupported_format",
    "too_large",
    "fetch_failed",
    "invalid_result",
    "result_expired",
    "upsampler_unauthorized",
    "upsampler_invalid_input",
    "upsampler_not_found",
]

# How the job ends when a step finally fails, by error kind. Anything unlisted goes to a human.
FAILURE_ANSWERS = {
    "unsupported_format": FAILED,
    "too_large": FAILED,
    "fetch_failed": FAILED,
    "upsampler_invalid_input": FAILED,
}

# Retry policies: transient trouble (network, 5xx, 429 after Retry-After) retries with backoff.
UPSAMPLER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    non_retryable_error_types=FINAL_ERRORS,
)
TRANSFER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=8,
    non_retryable_error_types=FINAL_ERRORS,
)
LOCAL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


class JobStopped(Exception):
    """A decision of the workflow that the job cannot go on; carries the error kind."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@workflow.defn
class UpscaleWorkflow:
    def __init__(self) -> None:
        self._state = JobState()
        self._hint: WebhookHint | None = None

    @workflow.query
    def state(self) -> JobState:
        return self._state

    @workflow.signal
    def upsampler_webhook(self, hint: WebhookHint) -> None:
        """Upsampler's webhook, delivered by the API. Duplicates and stale ones only wake the poll."""
        self._state.webhooks += 1
        if hint.upsampler_id == self._state.upsampler_id:
            self._hint = hint

    @workflow.run
    async def run(self, job: UpscaleInput) -> JobState:
        try:
            await self._fulfil(job)
        except JobStopped as stop:
            await self._stop(job, stop.code, str(stop))
        except ActivityError as err:
            code, message = _failure_of(err)
            await self._stop(job, code, message)
        return self._state

    async def _fulfil(self, job: UpscaleInput) -> None:
        policy = job.policy

        # 1. Fetch the original, check it is an image, keep it.
        original = await workflow.execute_activity_method(
            StorageActivities.fetch_original,
            FetchRequest(job.job_id, job.image_url),
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=TRANSFER_RETRY,
        )
        width, height = original.width * job.scale_factor, original.height * job.scale_factor
        if width * height > MAX_OUTPUT_PIXELS:
            raise JobStopped("too_large", f"the output would be {width}x{height}, over Upsampler's pixel limit")
        await self._set_status(job, QUEUED, input=original)

        # 2. Submit to Upsampler with a temporary signed URL of the original and a signed webhook.
        submission = await self._submit(job)

        # 3. Wait for the webhook or poll, until the processing timeout.
        result = await self._wait_for_result(job, submission, policy)

        # 4. Download the result, streamed and hashed.
        await self._set_status(job, DOWNLOADING)
        downloaded = await workflow.execute_activity_method(
            StorageActivities.download_result,
            DownloadRequest(job.job_id, result.image_url or "", self._state.attempt),
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=TRANSFER_RETRY,
        )

        # 5. Validate: input x scale, a known format, decodes whole; then put it in place.
        await workflow.execute_activity_method(
            StorageActivities.validate_result,
            ValidateRequest(job.job_id, downloaded.path, width, height),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=TRANSFER_RETRY,
        )
        stored = await workflow.execute_activity_method(
            StorageActivities.store_result,
            StoreRequest(job.job_id, downloaded.path, job.format),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=TRANSFER_RETRY,
        )

        # 6. Book the cost, issue the download link, tell the customer, clean up.
        credits = result.credit_cost if result.credit_cost is not None else submission.credit_cost or 0.0
        usd = await self._local(
            LedgerActivities.record_cost,
            CostRecord(job.job_id, submission.upsampler_id, credits, policy.credit_price_usd),
        )
        link = await self._local(LedgerActivities.issue_download_token, TokenRequest(job.job_id, 1, policy.download_ttl_hours))
        await self._set_status(job, COMPLETED, output=stored, credits=credits, usd=usd, download=link)
        await workflow.execute_activity_method(
            NotifyActivities.send_email,
            EmailRequest(job.job_id, "completed", link.generation),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5)),
        )
        await self._local(StorageActivities.cleanup, job.job_id)

    async def _submit(self, job: UpscaleInput) -> UpsamplerResult:
        self._state.attempt += 1
        submission = await workflow.execute_activity_method(
            UpsamplerActivities.submit_upscale,
            SubmitRequest(job.job_id, self._state.attempt, job.scale_factor),
            start_to_close_timeout=timedelta(minutes=1),
            schedule_to_close_timeout=timedelta(minutes=30),
            retry_policy=UPSAMPLER_RETRY,
        )
        if submission.status == FAILED:
            raise JobStopped("upsampler_failed", f"Upsampler refused the job: {submission.error or 'no reason given'}")
        self._state.upsampler_id = submission.upsampler_id
        expected = workflow.now() + timedelta(seconds=job.policy.poll_initial_delay_seconds)
        await self._set_status(job, QUEUED, upsampler_id=submission.upsampler_id, estimated_completion=expected)
        return submission

    async def _wait_for_result(self, job: UpscaleInput, submission: UpsamplerResult, policy: JobPolicy) -> UpsamplerResult:
        """A webhook ends the wait at once; without one, poll at the initial delay, then back off.

        Either way the status endpoint has the last word, so a forged or stale webhook can
        only make us ask a little earlier.
        """
        deadline = workflow.now() + timedelta(seconds=policy.processing_timeout_seconds)
        delay = policy.poll_initial_delay_seconds
        while True:
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                raise JobStopped("timeout", f"no result from Upsampler within {policy.processing_timeout_seconds:.0f} s")
            try:
                await workflow.wait_condition(lambda: self._hint is not None, timeout=min(delay, remaining))
            except asyncio.TimeoutError:
                delay = min(delay * 2, policy.poll_max_interval_seconds)
            self._hint = None
            self._state.polls += 1
            status = await workflow.execute_activity_method(
                UpsamplerActivities.check_status,
                submission.upsampler_id,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=10),
                retry_policy=UPSAMPLER_RETRY,
            )
            if status.status == COMPLETED:
                return status
            if status.status == FAILED:
                raise JobStopped("upsampler_failed", f"Upsampler failed the job: {status.error or 'no reason given'}")
            if status.status == PROCESSING and self._state.status != PROCESSING:
                await self._set_status(job, PROCESSING)

    async def _stop(self, job: UpscaleInput, code: str, message: str) -> None:
        self._state.error_code, self._state.error_message = code, message
        status = FAILURE_ANSWERS.get(code, MANUAL_REVIEW)
        await self._set_status(job, status, error_code=code, error_message=message)

    async def _set_status(self, job: UpscaleInput, status: str, **fields) -> None:
        """Every status change: the query state, the UpscaleStatus search attribute, the record."""
        if status != self._state.status:
            self._state.status = status
            workflow.upsert_search_attributes([UPSCALE_STATUS.value_set(status)])
        await self._local(LedgerActivities.update_job, JobUpdate(job.job_id, status, **fields))

    async def _local(self, activity, arg):
        """Quick database and disk bookkeeping: a local activity, retried until it succeeds."""
        return await workflow.execute_local_activity_method(
            activity, arg, start_to_close_timeout=timedelta(seconds=30), retry_policy=LOCAL_RETRY
        )


def _failure_of(err: ActivityError) -> tuple[str, str]:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "internal", cause.message
    if isinstance(cause, TimeoutError):
        return "timeout", "a step of the job timed out"
    return "internal", str(cause or err)
