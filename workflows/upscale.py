"""UpscaleWorkflow: one paid order, from the storefront's image to the customer's email.

The workflow only decides; every effect on the world is an activity. `run` reads as the
numbered process (the README's "Architecture" lists the same steps); what happens when a
step fails is declared once, in smi.vocabulary.FAILURE_TABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Required, TypedDict, TypeVar, Unpack, overload

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError
from temporalio.types import MethodAsyncSingleParam, MethodSyncSingleParam

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.notify import NotifyActivities
    from activities.payments import PaymentsActivities
    from activities.storage import StorageActivities
    from activities.upsampler import UpsamplerActivities
    from smi.pricing import MAX_OUTPUT_PIXELS
    from smi.vocabulary import (
        DEFAULT_RULE,
        FAILURE_TABLE,
        FINAL_ERRORS,
        UPSAMPLER_QUEUE_SUFFIX,
        AdoptRequest,
        Answer,
        BudgetAlertInfo,
        CheckAndStoreRequest,
        Completion,
        CompressRequest,
        CostRecord,
        Decision,
        DownloadRequest,
        EmailRequest,
        ErrorCode,
        EstimateRecord,
        FetchRequest,
        JobState,
        JobStatus,
        JobUpdate,
        RefundRequest,
        ResultBooking,
        ShopEventType,
        StoredImage,
        StoreRequest,
        SubmitRequest,
        TokenRequest,
        UpsamplerResult,
        UpscaleInput,
        ValidateRequest,
        WebhookHint,
    )
    from workflows.shop_events import start_shop_event

UPSCALE_STATUS = SearchAttributeKey.for_keyword("UpscaleStatus")

MAX_EARLY_HINTS = 8  # webhooks kept while a submission's id is not known yet
COMPRESS_QUALITIES = [85, 70, 55]

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
REFUND_RETRY = RetryPolicy(  # "retried until it answers 2xx": no attempt limit
    initial_interval=timedelta(seconds=5),
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=[ErrorCode.REFUND_FAILED],
)
MAIL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=10), maximum_attempts=10
)
LOCAL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))

A = TypeVar("A")  # an activity's argument
R = TypeVar("R")  # what it returns


class ActivityOptions(TypedDict, total=False):
    """How an activity of this workflow runs (workflow.execute_activity_method's options of the same names)."""

    start_to_close_timeout: Required[timedelta]
    retry_policy: Required[RetryPolicy]
    schedule_to_close_timeout: timedelta
    heartbeat_timeout: timedelta
    task_queue: str


class Problem(Exception):
    """A step failed for good; `code` is its row in FAILURE_TABLE."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@workflow.defn
class UpscaleWorkflow:
    # Set when run() starts.
    _job: UpscaleInput
    _stage_entered: datetime  # when the job entered its current status

    def __init__(self) -> None:
        self._state = JobState()
        self._hint: WebhookHint | None = None
        self._early_hints: dict[str, WebhookHint] = {}  # webhooks that came before our submit reported its id
        self._decision: str | None = None
        self._budget_released = False
        self._failures: dict[str, int] = {}
        self._qualities = list(COMPRESS_QUALITIES)
        self._lost_replies: dict[int, WebhookHint] = {}  # attempt -> the job a webhook named for a lost submit reply
        self._cost_due: tuple[UpsamplerResult, UpsamplerResult] | None = None  # booked beside the download
        self._adopted_result: UpsamplerResult | None = None  # an adopted job that had already finished
        self._merged_rounds = False  # set in run(); False for histories from before the bookkeeping was merged

    @workflow.query
    def state(self) -> JobState:
        return self._state

    @workflow.signal
    def upsampler_webhook(self, hint: WebhookHint) -> None:
        """Upsampler's webhook, delivered by the API. Duplicates and stale ones only wake the poll."""
        self._state.webhooks += 1
        if hint.attempt and hint.upsampler_id != self._state.upsampler_id:
            # Names the job of a submission whose reply did not come (yet): by its URL's nonce.
            if hint.attempt not in self._lost_replies and len(self._lost_replies) < MAX_EARLY_HINTS:
                self._lost_replies[hint.attempt] = hint
        elif hint.upsampler_id == self._state.upsampler_id:
            self._hint = hint
        elif len(self._early_hints) < MAX_EARLY_HINTS:  # Upsampler may call before the submit activity returns
            self._early_hints[hint.upsampler_id] = hint

    @workflow.signal
    def admin_decision(self, decision: str) -> None:
        """A Decision: refund at any time, retry only while in manual review."""
        if decision == Decision.REFUND or (decision == Decision.RETRY and self._state.awaiting_decision):
            self._decision = decision

    @workflow.signal
    def budget_released(self) -> None:
        """An admin released a crossed budget: a job held by the hard stop looks again at once."""
        self._budget_released = True

    @workflow.run
    async def run(self, job: UpscaleInput) -> JobState:
        self._job = job
        # Fewer rounds per job (README, Benchmarks): 9 local activities became at most 4, and the
        # result is validated and stored by one activity.
        self._merged_rounds = workflow.patched("fewer-rounds")
        self._state.attempt = job.attempts_before
        self._stage_entered = workflow.info().start_time
        _count(
            "smi_jobs_started",
            "Job runs started (an admin's retry after a run ended is a new run).",
            run="first" if job.run == 1 else "retry",
        )
        try:
            stored = await self._make_image()
        except Problem as problem:
            await self._refund_and_tell(problem)
        else:
            await self._deliver(stored)
        await self._local(StorageActivities.cleanup, job.job_id)
        return self._state

    async def _make_image(self) -> StoredImage:
        """Steps 1-5, answering each failure from the table until there is a valid image or a refund."""
        original = variant = submission = result = None
        refresh = False
        while True:
            try:
                if self._decision == Decision.REFUND:
                    raise Problem(ErrorCode.ADMIN_REFUND, "an admin asked for a refund")
                if original is None:
                    # 1. Fetch the original, check it is an image, keep it.
                    original = await self._fetch_original()
                    await self._queue(original)
                    if original.bytes > self._job.policy.upsampler_max_input_bytes:
                        variant = await self._compress()
                if submission is None:
                    # 2. Submit a temporary signed URL of the original (or its compressed copy).
                    submission = await self._submit(variant)
                    # 3. Wait for the webhook or poll, until the processing timeout; book the cost.
                    result = await self._wait_for_result(submission)
                    await self._owe(submission, result)
                elif refresh:  # the result links expired: Upsampler's status reply carries fresh ones
                    refresh = False
                    result = await self._fresh_result(submission.upsampler_id)
                # 4-5. Download, validate, put in place.
                assert result is not None, "a submission that stands has its result"
                return await self._download_and_check(result, *self._output_size(original))
            except Problem as problem:
                answer = self._answer_to(problem)
                if answer == Answer.REFRESH:
                    refresh = True
                    continue
                submission = None
                if answer == Answer.COMPRESS:
                    variant = await self._compress()
                elif answer == Answer.REVIEW:
                    await self._manual_review(problem)
                elif answer == Answer.REFUND:
                    raise

    def _output_size(self, original: StoredImage) -> tuple[int, int]:
        return original.width * self._job.scale_factor, original.height * self._job.scale_factor

    async def _queue(self, original: StoredImage) -> None:
        """The output within Upsampler's pixel limit; then the job is queued and its estimate booked."""
        job = self._job
        width, height = self._output_size(original)
        if width * height > MAX_OUTPUT_PIXELS:
            raise Problem(ErrorCode.OUTPUT_TOO_LARGE, f"the output would be {width}x{height}, over Upsampler's limit")
        estimate = EstimateRecord(
            job.job_id,
            original.width,
            original.height,
            job.scale_factor,
            job.policy.credits_per_megapixel,
            job.policy.credit_price_usd,
        )
        if self._merged_rounds:
            await self._set_status(JobStatus.QUEUED, input=original, estimate=estimate)
        else:
            await self._set_status(JobStatus.QUEUED, input=original)
            await self._local(LedgerActivities.record_estimate, estimate)

    def _answer_to(self, problem: Problem) -> str:
        count = self._failures.get(problem.code, 0)
        self._failures[problem.code] = count + 1
        answers = FAILURE_TABLE.get(problem.code, DEFAULT_RULE).answers
        return answers[min(count, len(answers) - 1)]

    async def _fetch_original(self) -> StoredImage:
        return await self._activity(
            StorageActivities.fetch_original,
            FetchRequest(self._job.job_id, self._job.image_url),
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=TRANSFER_RETRY,
        )

    async def _compress(self) -> str:
        """Re-encode the original one quality step lower; returns the variant's name."""
        while self._qualities:
            quality = self._qualities.pop(0)
            copy = await self._activity(
                StorageActivities.compress_original,
                CompressRequest(self._job.job_id, quality),
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=TRANSFER_RETRY,
            )
            if copy.bytes <= self._job.policy.upsampler_max_input_bytes:
                return f"q{quality}"
        raise Problem(ErrorCode.TOO_LARGE, "the image is too large for Upsampler even compressed")

    async def _submit(self, variant: str | None) -> UpsamplerResult:
        """A new attempt at Upsampler; under the hard stop, once the budget allows.

        When a submit's reply was lost (Upsampler may hold a job we never heard of), the job its
        webhook names is adopted instead of paying for a second one; only without one is it sent again.
        """
        job = self._job
        if job.policy.budget_hard_stop:
            await self._wait_for_budget()
        delay = job.policy.poll_initial_delay_seconds
        while True:
            self._state.attempt += 1
            self._hint = None
            try:
                submission = await self._activity(
                    UpsamplerActivities.submit_upscale,
                    SubmitRequest(
                        job.job_id,
                        self._state.attempt,
                        job.scale_factor,
                        variant or "",
                        expected_seconds=delay if self._merged_rounds else None,  # the record's update, in one go
                    ),
                    task_queue=workflow.info().task_queue + UPSAMPLER_QUEUE_SUFFIX,
                    start_to_close_timeout=timedelta(minutes=1),
                    heartbeat_timeout=timedelta(seconds=10),  # a worker dead mid-POST: the retry adopts sooner
                    schedule_to_close_timeout=timedelta(minutes=30),
                    retry_policy=UPSAMPLER_RETRY,
                )
                break
            except Problem as problem:
                if problem.code != ErrorCode.SUBMISSION_UNKNOWN:
                    raise
            adopted = await self._adopt(self._state.attempt)
            if adopted is not None:
                submission = adopted
                break
        if submission.status == JobStatus.FAILED:
            raise Problem(
                submission.error_kind or ErrorCode.UPSAMPLER_FAILED, f"Upsampler refused the job: {submission.error}"
            )
        self._state.upsampler_id = submission.upsampler_id
        early = self._early_hints.pop(submission.upsampler_id, None)
        self._early_hints.clear()
        lost = self._lost_replies.pop(self._state.attempt, None)  # sent for adoption, but the reply came after all
        if early is None and lost is not None and lost.upsampler_id == submission.upsampler_id:
            early = lost
        # Histories from before this change dropped such a webhook and waited for the first poll.
        if early is not None and workflow.patched("keep-early-webhook"):
            self._hint = early
        if not self._merged_rounds:  # else the submit activity wrote both into the record
            expected = workflow.now() + timedelta(seconds=delay)
            await self._set_status(
                JobStatus.QUEUED, upsampler_id=submission.upsampler_id, estimated_completion=expected
            )
        return submission

    async def _adopt(self, attempt: int) -> UpsamplerResult | None:
        """Wait for the webhook of the submission whose reply was lost; the job it names, once the status
        endpoint confirms it, is the submission. None when no webhook came within the processing timeout:
        whatever Upsampler holds for it then has ended or will be booked as an orphan when it calls."""
        policy = self._job.policy
        try:
            await workflow.wait_condition(
                lambda: attempt in self._lost_replies or self._decision == Decision.REFUND,
                timeout=policy.processing_timeout_seconds,
            )
        except asyncio.TimeoutError:
            workflow.logger.warning("no webhook for attempt %d's lost submit reply: submitting again", attempt)
            return None
        if self._decision == Decision.REFUND:
            raise Problem(ErrorCode.ADMIN_REFUND, "an admin asked for a refund")
        hint = self._lost_replies.pop(attempt)
        self._state.polls += 1
        try:
            adopted = await self._activity(
                UpsamplerActivities.adopt_submission,
                AdoptRequest(self._job.job_id, attempt, hint.upsampler_id),
                task_queue=workflow.info().task_queue + UPSAMPLER_QUEUE_SUFFIX,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=10),
                retry_policy=UPSAMPLER_RETRY,
            )
        except Problem as problem:
            if problem.code != ErrorCode.UPSAMPLER_NOT_FOUND:
                raise
            return None  # the status endpoint does not know it: nothing to adopt
        _count("smi_submissions_adopted", "Upsampler jobs adopted after a lost submit reply.")
        if adopted.status == JobStatus.COMPLETED:
            self._adopted_result = adopted
        return adopted

    async def _wait_for_result(self, submission: UpsamplerResult) -> UpsamplerResult:
        """A webhook ends the wait at once; without one, poll at the initial delay, then back off.

        Either way the status endpoint has the last word, so a forged or stale webhook can
        only make us ask a little earlier.
        """
        if self._adopted_result is not None:  # the adoption's status check found it finished
            result, self._adopted_result = self._adopted_result, None
            return result
        policy = self._job.policy
        deadline = workflow.now() + timedelta(seconds=policy.processing_timeout_seconds)
        delay = policy.poll_initial_delay_seconds
        while True:
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                raise Problem(
                    ErrorCode.TIMEOUT, f"no result from Upsampler within {policy.processing_timeout_seconds:.0f} s"
                )
            try:
                await workflow.wait_condition(
                    lambda: self._hint is not None or self._decision == Decision.REFUND, timeout=min(delay, remaining)
                )
            except asyncio.TimeoutError:
                delay = min(delay * 2, policy.poll_max_interval_seconds)
            if self._decision == Decision.REFUND:
                raise Problem(ErrorCode.ADMIN_REFUND, "an admin asked for a refund")
            woken_by_webhook = self._hint is not None
            self._hint = None
            status = await self._check_status(submission.upsampler_id)
            if status.status == JobStatus.COMPLETED:
                _count(
                    "smi_results_learned",
                    "Finished Upsampler jobs, by what told us: webhook or poll.",
                    via="webhook" if woken_by_webhook else "poll",
                )
                return status
            if status.status == JobStatus.FAILED:
                raise Problem(
                    status.error_kind or ErrorCode.UPSAMPLER_FAILED, f"Upsampler failed the job: {status.error}"
                )
            if status.status == JobStatus.PROCESSING and self._state.status != JobStatus.PROCESSING:
                await self._set_status(JobStatus.PROCESSING)

    async def _fresh_result(self, upsampler_id: str) -> UpsamplerResult:
        """The finished result again, with fresh links (they expire)."""
        result = await self._check_status(upsampler_id)
        if result.status != JobStatus.COMPLETED:
            raise Problem(ErrorCode.RESULT_EXPIRED, f"no fresh result link: Upsampler says {result.status}")
        return result

    async def _check_status(self, upsampler_id: str) -> UpsamplerResult:
        self._state.polls += 1
        return await self._activity(
            UpsamplerActivities.check_status,
            upsampler_id,
            task_queue=workflow.info().task_queue + UPSAMPLER_QUEUE_SUFFIX,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=timedelta(minutes=10),
            retry_policy=UPSAMPLER_RETRY,
        )

    def _cost(self, submission: UpsamplerResult, result: UpsamplerResult) -> CostRecord:
        """What Upsampler charged for this submission."""
        job = self._job
        credits = result.credit_cost if result.credit_cost is not None else submission.credit_cost or 0.0
        return CostRecord(job.job_id, submission.upsampler_id, credits, job.policy.credit_price_usd)

    async def _owe(self, submission: UpsamplerResult, result: UpsamplerResult) -> None:
        """Upsampler charged for this submission: booked beside the download (step 4), or at once before
        "fewer-rounds"."""
        if self._merged_rounds:
            self._cost_due = (submission, result)
        else:
            await self._book_cost(submission, result)

    async def _book_cost(self, submission: UpsamplerResult, result: UpsamplerResult) -> None:
        """(Histories from before "fewer-rounds".) The cost, then the budget alerts it may have set off."""
        await self._local(LedgerActivities.record_cost, self._cost(submission, result))
        await self._send_budget_alerts(await self._local(LedgerActivities.check_budget, self._job.job_id))

    async def _book_result(self, submission: UpsamplerResult, result: UpsamplerResult) -> None:
        """The cost, the budget check and `downloading` in one round; then the budget alerts it set off.

        A regular activity, not a local one: a workflow task that runs a local activity sends its
        other commands only when it is done, and the download's schedule must not wait for this.
        """
        booking = ResultBooking(self._cost(submission, result), self._note_status(JobStatus.DOWNLOADING))
        alerts = await self._activity(
            LedgerActivities.book_result,
            booking,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=LOCAL_RETRY,
        )
        await self._send_budget_alerts(alerts)

    async def _send_budget_alerts(self, alerts: list[BudgetAlertInfo]) -> None:
        for alert in alerts:
            try:
                await self._activity(
                    NotifyActivities.send_budget_alert,
                    alert,
                    start_to_close_timeout=timedelta(minutes=1),
                    retry_policy=MAIL_RETRY,
                )
            except Problem:
                workflow.logger.warning("budget alert %s could not be sent", alert.key)

    async def _wait_for_budget(self) -> None:
        """Hard stop: wait in `queued` while this period's budget is spent, until the next period or a release."""
        while not (gate := await self._local(LedgerActivities.budget_gate, self._job.job_id)).open:
            self._budget_released = False
            try:
                await workflow.wait_condition(
                    lambda: self._budget_released or self._decision == Decision.REFUND, timeout=gate.recheck_seconds
                )
            except asyncio.TimeoutError:
                pass
            if self._decision == Decision.REFUND:
                raise Problem(ErrorCode.ADMIN_REFUND, "an admin asked for a refund")

    async def _download_and_check(self, result: UpsamplerResult, width: int, height: int) -> StoredImage:
        job = self._job
        # 4. Download the result, streamed and hashed; a new result's cost is booked beside it, and is
        #    owed whether or not the download works.
        booking = None
        if self._cost_due is not None:
            booking = asyncio.ensure_future(self._book_result(*self._cost_due))  # runs once the download is scheduled
            self._cost_due = None
        elif not self._merged_rounds or self._state.status != JobStatus.DOWNLOADING:
            await self._set_status(JobStatus.DOWNLOADING)
        try:
            downloaded = await self._activity(
                StorageActivities.download_result,
                DownloadRequest(job.job_id, result.image_url or "", self._state.attempt),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=10),  # a dead worker's download resumes elsewhere soon
                retry_policy=TRANSFER_RETRY,
            )
        finally:
            if booking is not None:
                await booking
        # 5. Validate: input x scale, a known format, decodes whole; then put it in place.
        if self._merged_rounds:
            return await self._activity(
                StorageActivities.check_and_store,
                CheckAndStoreRequest(job.job_id, downloaded.path, width, height, job.format),
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=TRANSFER_RETRY,
            )
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

    async def _deliver(self, stored: StoredImage) -> None:
        """6. Issue the download link, tell the customer. A mail that will not go keeps the job completed."""
        job = self._job
        token = TokenRequest(job.job_id, f"run:{job.run}", job.policy.download_ttl_hours)
        if self._merged_rounds:
            completed = self._note_status(JobStatus.COMPLETED, output=stored, error_code="", error_message="")
            link = await self._local(LedgerActivities.complete, Completion(token, completed))
        else:
            link = await self._local(LedgerActivities.issue_download_token, token)
            await self._set_status(JobStatus.COMPLETED, output=stored, download=link, error_code="", error_message="")
        await self._shop_event(ShopEventType.COMPLETED)  # started, not awaited: the email does not wait for the shop
        try:
            await self._activity(
                NotifyActivities.send_email,
                EmailRequest(job.job_id, "completed", link.generation),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=MAIL_RETRY,
            )
        except Problem as problem:
            await self._set_status(JobStatus.COMPLETED, error_code=ErrorCode.MAIL_FAILED, error_message=str(problem))
            await self._tell_admin("The completion email could not be sent", f"mail:{job.run}")

    async def _manual_review(self, problem: Problem) -> None:
        """Tell the admin and wait, durably, for a decision. Returns on retry; raises on refund."""
        # Decisions are taken from here on, even while the admin's notice is still being sent.
        self._state.awaiting_decision = True
        await self._set_status(JobStatus.MANUAL_REVIEW, error_code=problem.code, error_message=str(problem))
        await self._shop_event(ShopEventType.MANUAL_REVIEW, step=self._state.attempt)
        await self._tell_admin(
            f"Manual review needed ({problem.code})", f"review:{self._job.run}:{self._state.attempt}"
        )
        await workflow.wait_condition(lambda: self._decision is not None)
        self._state.awaiting_decision = False
        decision, self._decision = self._decision, None
        if decision == Decision.REFUND:
            raise Problem(problem.code, str(problem))
        self._failures.clear()  # an admin's retry starts the table afresh
        self._qualities = list(COMPRESS_QUALITIES)
        await self._set_status(JobStatus.QUEUED, error_code="", error_message="")

    async def _refund_and_tell(self, problem: Problem) -> None:
        job = self._job
        try:
            self._state.refund = await self._activity(
                PaymentsActivities.refund,
                RefundRequest(job.job_id, problem.code),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=REFUND_RETRY,
            )
        except Problem as refusal:
            await self._set_status(JobStatus.MANUAL_REVIEW, error_code=refusal.code, error_message=str(refusal))
            await self._shop_event(ShopEventType.MANUAL_REVIEW, step=0)  # 0: the refund's, not a submission's
            await self._tell_admin("The refund failed; pay it back by hand", f"refund:{job.run}")
            return
        await self._set_status(JobStatus.FAILED, error_code=problem.code, error_message=str(problem))
        await self._shop_event(ShopEventType.FAILED)
        _count("smi_jobs_refunded", "Jobs refunded, by reason.", reason=problem.code)
        await self._activity(
            NotifyActivities.send_email,
            EmailRequest(job.job_id, "failed", purpose=f"failed:{job.run}"),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=MAIL_RETRY,
        )
        headline = "Refunded" if self._state.refund.status == "refunded" else "Refund owed: pay it back by hand"
        await self._tell_admin(f"{headline} ({problem.code})", f"refund:{job.run}")

    async def _shop_event(self, kind: ShopEventType, step: int | None = None) -> None:
        """The outcome to the shop (SMI_STOREFRONT_WEBHOOK_URL), by its own workflow that this one does not wait for."""
        await start_shop_event(self._job.job_id, self._job.run, kind, self._job.policy, step)

    async def _tell_admin(self, note: str, purpose: str) -> None:
        """An admin notice; one that cannot be sent is not a reason to stop the job."""
        try:
            await self._activity(
                NotifyActivities.send_email,
                EmailRequest(self._job.job_id, "admin_notice", purpose=f"admin:{purpose}", note=note),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=MAIL_RETRY,
            )
        except Problem:
            workflow.logger.warning("admin notice for job %s could not be sent", self._job.job_id)

    async def _set_status(self, status: JobStatus, **fields) -> None:
        """Every status change: the query state, the UpscaleStatus search attribute, the record."""
        await self._local(LedgerActivities.update_job, self._note_status(status, **fields))

    def _note_status(self, status: JobStatus, **fields) -> JobUpdate:
        """A status change in the query state and the search attribute; returns the record's update."""
        if status != self._state.status:
            now = workflow.now()
            workflow.metric_meter().create_histogram_timedelta(
                "smi_stage_duration", "Time a job spent in each stage.", "duration"
            ).record(now - self._stage_entered, {"stage": self._state.status})
            self._stage_entered = now
            if status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.MANUAL_REVIEW):
                _count(
                    "smi_job_outcomes",
                    "Jobs reaching completed, failed or manual review, by error code.",
                    outcome=status,
                    reason=fields.get("error_code") or "none",
                )
            workflow.logger.info("status: %s -> %s", self._state.status, status)  # not repeated on replay
            self._state.status = status
            workflow.upsert_search_attributes([UPSCALE_STATUS.value_set(status)])
        if "error_code" in fields:
            self._state.error_code = fields["error_code"] or None
            self._state.error_message = fields.get("error_message") or None
        return JobUpdate(self._job.job_id, status, **fields)

    # Typed as the SDK's execute_activity_method is: the activity's argument and result types are checked
    # (an async activity method, then a sync one).
    @overload
    async def _activity(
        self, activity: MethodAsyncSingleParam[Any, A, R], arg: A, **options: Unpack[ActivityOptions]
    ) -> R: ...
    @overload
    async def _activity(
        self, activity: MethodSyncSingleParam[Any, A, R], arg: A, **options: Unpack[ActivityOptions]
    ) -> R: ...
    async def _activity(self, activity: Callable[..., Any], arg: Any, **options: Unpack[ActivityOptions]) -> Any:
        """Run an activity; its final failure becomes a Problem named by the error's type."""
        try:
            return await workflow.execute_activity_method(activity, arg, **options)
        except ActivityError as err:
            raise Problem(*_failure_of(err)) from None

    @overload
    async def _local(self, activity: MethodAsyncSingleParam[Any, A, R], arg: A) -> R: ...
    @overload
    async def _local(self, activity: MethodSyncSingleParam[Any, A, R], arg: A) -> R: ...
    async def _local(self, activity: Callable[..., Any], arg: Any) -> Any:
        """Quick database and disk bookkeeping: a local activity, retried until it succeeds."""
        return await workflow.execute_local_activity_method(
            activity, arg, start_to_close_timeout=timedelta(seconds=30), retry_policy=LOCAL_RETRY
        )


def _count(name: str, description: str, **attributes: str) -> None:
    """One more of our workflow counters; the SDK records nothing while a workflow replays."""
    workflow.metric_meter().create_counter(name, description).add(1, attributes)


def _failure_of(err: ActivityError) -> tuple[str, str]:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type or ErrorCode.INTERNAL, cause.message
    if isinstance(cause, TimeoutError):
        return ErrorCode.TIMEOUT, "a step of the job timed out"
    return ErrorCode.INTERNAL, str(cause or err)
