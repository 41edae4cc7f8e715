"""UpscaleWorkflow's decisions, fast: the time-skipping test server and fake activities.

Every activity the workflow calls (local ones too) is a fake registered under the real
activity's name, the way Temporal's own samples test a workflow with mocked activities. The
fakes record what they receive and answer as
scripted, failing the way the real activities do: `ApplicationError(message, type=<error
code>, non_retryable=...)`. Nothing else runs: no database, no Upsampler, no mail.

Time is locked (timers run in real time) until a test awaits the workflow's result; tests that
must act while the job waits (a webhook, a signal) act first and then let time skip.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType, RetryState
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.payments import PaymentsActivities
from activities.storage import StorageActivities
from activities.upsampler import UpsamplerActivities
from smi.imaging import ImageInfo
from smi.vocabulary import (
    UPSAMPLER_QUEUE_SUFFIX,
    AdoptRequest,
    BudgetAlertInfo,
    BudgetGate,
    CheckAndStoreRequest,
    Completion,
    CompressRequest,
    CostRecord,
    DownloadedFile,
    DownloadLink,
    DownloadRequest,
    EmailRequest,
    EstimateRecord,
    FetchRequest,
    JobPolicy,
    JobState,
    JobUpdate,
    RefundOutcome,
    RefundRequest,
    ResultBooking,
    StoredImage,
    StoreRequest,
    SubmitRequest,
    TokenRequest,
    UpsamplerResult,
    UpscaleInput,
    ValidateRequest,
    WebhookHint,
)
from tests.helpers import event_count, eventually, timer_seconds
from workflows.upscale import FAILURE_TABLE, UpscaleWorkflow

pytestmark = pytest.mark.fast

IMAGE_URL = "https://shop.test/img/photo.png"
ORIGINAL = StoredImage("/data/jobs/j/original.png", 64, 48, "png", 10_000, "ab" * 32)
STORED = StoredImage("/data/upscaled_256x192.png", 256, 192, "png", 40_000, "ef" * 32)
LINK = DownloadLink(1, datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
REFUNDED = RefundOutcome("refunded", 1299, "USD", "webhook")
MB = 1024 * 1024
# The local activities of a job's bookkeeping (and clean-up).
LOCAL_ROUNDS = {
    "update_job",
    "record_estimate",
    "record_cost",
    "check_budget",
    "issue_download_token",
    "complete",
    "cleanup",
}


def fail(code: str, retryable: bool = False, message: str = "") -> ApplicationError:
    """A failure the way the real activities raise it: the error code is the type."""
    return ApplicationError(message or f"fake {code}", type=code, non_retryable=not retryable)


def result_url(upsampler_id: str, fresh: int = 0) -> str:
    return f"https://results.test/{upsampler_id}.png" + (f"?fresh={fresh}" if fresh else "")


def completed(upsampler_id: str, credits: float | None = 2.5, fresh: int = 0) -> UpsamplerResult:
    return UpsamplerResult(upsampler_id, "completed", credits, result_url(upsampler_id, fresh))


def upsampler_failed(upsampler_id: str, kind: str = "upsampler_failed") -> UpsamplerResult:
    return UpsamplerResult(upsampler_id, "failed", error=f"Upsampler says {kind}", error_kind=kind)


class Fakes:
    """Every activity of the job, recording its arguments and answering as scripted.

    `calls[name]` holds the arguments each call received, `log` the names in call order.
    `script(name, *outcomes)` queues what the next calls do; `always(name, outcome)` what every
    call does after those. An outcome is a value to return, an exception to raise, or a function
    of the argument giving either (it may be async). Unscripted, a fake answers as a healthy
    system would.
    """

    def __init__(self, env: WorkflowEnvironment):
        self.env = env  # the time-skipping test server
        self.calls: dict[str, list] = defaultdict(list)
        self.log: list[str] = []
        self._scripts: dict[str, list] = defaultdict(list)
        self._always: dict[str, object] = {}

    def script(self, name: str, *outcomes) -> None:
        self._scripts[name].extend(outcomes)

    def always(self, name: str, outcome) -> None:
        self._always[name] = outcome

    async def _answer(self, arg, default, name: str | None = None):
        """The scripted answer of activity `name` (default: the running activity, the only one `log` names)."""
        if name is None:
            name = activity.info().activity_type
            self.log.append(name)
        self.calls[name].append(arg)
        outcome = self._scripts[name].pop(0) if self._scripts[name] else self._always.get(name, default)
        if callable(outcome):
            outcome = outcome(arg)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def statuses(self) -> list[str]:
        return [update.status for update in self.calls["update_job"]]

    def emails(self, kind: str) -> list[EmailRequest]:
        return [request for request in self.calls["send_email"] if request.kind == kind]

    def admin_notes(self) -> list[str]:
        return [request.note for request in self.emails("admin_notice")]

    # The job's task queue: storage, ledger (local activities), mail, payments.
    @activity.defn(name="fetch_original")
    async def fetch_original(self, request: FetchRequest) -> StoredImage:
        return await self._answer(request, ORIGINAL)

    @activity.defn(name="compress_original")
    async def compress_original(self, request: CompressRequest) -> StoredImage:
        copy = StoredImage(f"/data/q{request.quality}.jpg", 64, 48, "jpg", 5_000, "cd" * 32)
        return await self._answer(request, copy)

    @activity.defn(name="download_result")
    async def download_result(self, request: DownloadRequest) -> DownloadedFile:
        return await self._answer(request, DownloadedFile(f"/data/tmp/result-{request.attempt}", 40_000, "ef" * 32))

    @activity.defn(name="validate_result")
    async def validate_result(self, request: ValidateRequest) -> ImageInfo:
        return await self._answer(request, ImageInfo(request.width, request.height, "png"))

    @activity.defn(name="store_result")
    async def store_result(self, request: StoreRequest) -> StoredImage:
        return await self._answer(request, STORED)

    @activity.defn(name="check_and_store")
    async def check_and_store(self, request: CheckAndStoreRequest) -> StoredImage:
        self.log.append("check_and_store")
        info = ImageInfo(request.width, request.height, "png")
        await self._answer(
            ValidateRequest(request.job_id, request.path, request.width, request.height), info, "validate_result"
        )
        return await self._answer(StoreRequest(request.job_id, request.path, request.format), STORED, "store_result")

    @activity.defn(name="cleanup")
    async def cleanup(self, job_id: str) -> int:
        return await self._answer(job_id, 1)

    @activity.defn(name="update_job")
    async def update_job(self, update: JobUpdate) -> None:
        await self._answer(update, None)
        if update.estimate is not None:  # the real one books it in the same round (so: not in `log`)
            await self._answer(update.estimate, 0.75, "record_estimate")

    # The merged rounds record what the real ones do under the names of the parts they merge.
    @activity.defn(name="book_result")
    async def book_result(self, booking: ResultBooking) -> list[BudgetAlertInfo]:
        self.log.append("book_result")
        await self._answer(booking.cost, booking.cost.credits * booking.cost.credit_price_usd, "record_cost")
        await self._answer(booking.update, None, "update_job")
        return await self._answer(booking.cost.job_id, [], "check_budget")

    @activity.defn(name="complete")
    async def complete(self, completion: Completion) -> DownloadLink:
        self.log.append("complete")
        link = await self._answer(completion.token, LINK, "issue_download_token")
        completion.update.download = link
        await self._answer(completion.update, None, "update_job")
        return link

    @activity.defn(name="record_estimate")
    async def record_estimate(self, record: EstimateRecord) -> float:
        return await self._answer(record, 0.75)

    @activity.defn(name="record_cost")
    async def record_cost(self, record: CostRecord) -> float:
        return await self._answer(record, record.credits * record.credit_price_usd)

    @activity.defn(name="check_budget")
    async def check_budget(self, job_id: str) -> list[BudgetAlertInfo]:
        return await self._answer(job_id, [])

    @activity.defn(name="budget_gate")
    async def budget_gate(self, job_id: str) -> BudgetGate:
        return await self._answer(job_id, BudgetGate(True, 0.0))

    @activity.defn(name="issue_download_token")
    async def issue_download_token(self, request: TokenRequest) -> DownloadLink:
        return await self._answer(request, LINK)

    @activity.defn(name="send_email")
    async def send_email(self, request: EmailRequest) -> bool:
        return await self._answer(request, True)

    @activity.defn(name="send_budget_alert")
    async def send_budget_alert(self, alert: BudgetAlertInfo) -> bool:
        return await self._answer(alert, True)

    @activity.defn(name="refund")
    async def refund(self, request: RefundRequest) -> RefundOutcome:
        return await self._answer(request, REFUNDED)

    # The Upsampler task queue.
    @activity.defn(name="submit_upscale")
    async def submit_upscale(self, request: SubmitRequest) -> UpsamplerResult:
        return await self._answer(request, UpsamplerResult(f"up-{request.attempt}", "queued", 1.0))

    @activity.defn(name="check_status")
    async def check_status(self, upsampler_id: str) -> UpsamplerResult:
        return await self._answer(upsampler_id, completed(upsampler_id))

    @activity.defn(name="adopt_submission")
    async def adopt_submission(self, request: AdoptRequest) -> UpsamplerResult:
        return await self._answer(request, completed(request.upsampler_id))

    def job_activities(self) -> list:
        return [
            self.fetch_original,
            self.compress_original,
            self.download_result,
            self.validate_result,
            self.store_result,
            self.check_and_store,
            self.cleanup,
            self.update_job,
            self.record_estimate,
            self.record_cost,
            self.check_budget,
            self.budget_gate,
            self.issue_download_token,
            self.book_result,
            self.complete,
            self.send_email,
            self.send_budget_alert,
            self.refund,
        ]

    def upsampler_activities(self) -> list:
        return [self.submit_upscale, self.check_status, self.adopt_submission]


@pytest.fixture
def fakes(time_skipping_env) -> Fakes:
    return Fakes(time_skipping_env)


@asynccontextmanager
async def running(fakes: Fakes, *, run: int = 1, attempts_before: int = 0, **policy):
    """Workers with the fakes on a fresh task queue (and its Upsampler queue), and a job started on it."""
    env = fakes.env
    task_queue = f"fast-{uuid.uuid4().hex[:8]}"
    job = UpscaleInput(uuid.uuid4().hex, IMAGE_URL, 4, "auto", JobPolicy(**policy), run, attempts_before)
    async with (
        Worker(env.client, task_queue=task_queue, workflows=[UpscaleWorkflow], activities=fakes.job_activities()),
        Worker(env.client, task_queue=task_queue + UPSAMPLER_QUEUE_SUFFIX, activities=fakes.upsampler_activities()),
    ):
        yield await env.client.start_workflow(
            UpscaleWorkflow.run, job, id=f"upscale-{job.job_id}", task_queue=task_queue
        )


def job_id_of(handle: WorkflowHandle) -> str:
    return handle.id.removeprefix("upscale-")


async def state_of(handle: WorkflowHandle) -> JobState:
    return await handle.query(UpscaleWorkflow.state)


async def submitted(handle: WorkflowHandle) -> JobState:
    """Waits (in real time, time locked) until the workflow knows its Upsampler id."""
    return await eventually(lambda: _with_upsampler_id(handle), what="the submission's id in the state")


async def _with_upsampler_id(handle: WorkflowHandle) -> JobState | None:
    state = await state_of(handle)
    return state if state.upsampler_id else None


async def _in_review(handle: WorkflowHandle, fakes: Fakes, nth: int) -> bool:
    notices = [note for note in fakes.admin_notes() if note.startswith("Manual review needed")]
    return len(notices) >= nth and (await state_of(handle)).awaiting_decision


async def finish(handle: WorkflowHandle, fakes: Fakes, *decisions: str, timeout: float = 30.0) -> JobState:
    """Let time skip to the job's end; at its n-th manual review, send the n-th admin decision.

    Time skips while the result is awaited, and with nothing left to wait for but a signal the test
    server skips to the workflow's 10-year timeout. So a review is reached by skipping one day (every
    timer before a review is shorter), then the review is found, with time locked again, and decided.
    """
    for nth, decision in enumerate(decisions, 1):
        await fakes.env.sleep(timedelta(days=1))
        await eventually(lambda nth=nth: _in_review(handle, fakes, nth), timeout, what=f"manual review #{nth}")
        await handle.signal(UpscaleWorkflow.admin_decision, decision)
    return await asyncio.wait_for(handle.result(), timeout)


async def activity_events(handle: WorkflowHandle) -> list[tuple[int, int, str | None, object]]:
    """(event id, event type, activity name, attributes) of every history event; the name only on
    the events of an activity task (scheduled, started, completed, failed), else None."""
    names: dict[int, str] = {}
    found = []
    async for event in handle.fetch_history_events():
        attributes, name = None, None
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            name = names[event.event_id] = attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attributes = event.activity_task_completed_event_attributes
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            attributes = event.activity_task_failed_event_attributes
        if attributes is not None and name is None:
            name = names.get(attributes.scheduled_event_id)
        found.append((event.event_id, event.event_type, name, attributes))
    return found


async def activity_attempts(handle: WorkflowHandle, name: str) -> tuple[int, list[int]]:
    """How often the workflow scheduled activity `name`, and the retry state of each final failure."""
    events = [(kind, attributes) for _, kind, of, attributes in await activity_events(handle) if of == name]
    scheduled = sum(1 for kind, _ in events if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    return scheduled, [a.retry_state for kind, a in events if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED]


async def first_event_id(handle: WorkflowHandle, event_type, activity_name: str | None = None) -> int:
    """The first event of the type (of that activity, if named)."""
    for event_id, kind, name, _ in await activity_events(handle):
        if kind == event_type and (activity_name is None or name == activity_name):
            return event_id
    raise AssertionError(f"no {EventType.Name(event_type)} {activity_name or ''} in the history")


# --- The fakes are what the workflow calls ------------------------------------------------------


def test_every_fake_is_registered_under_the_real_activity_name(fakes):
    real = [
        StorageActivities.fetch_original,
        StorageActivities.compress_original,
        StorageActivities.download_result,
        StorageActivities.validate_result,
        StorageActivities.store_result,
        StorageActivities.check_and_store,
        StorageActivities.cleanup,
        LedgerActivities.update_job,
        LedgerActivities.record_estimate,
        LedgerActivities.record_cost,
        LedgerActivities.check_budget,
        LedgerActivities.budget_gate,
        LedgerActivities.issue_download_token,
        LedgerActivities.book_result,
        LedgerActivities.complete,
        NotifyActivities.send_email,
        NotifyActivities.send_budget_alert,
        PaymentsActivities.refund,
        UpsamplerActivities.submit_upscale,
        UpsamplerActivities.check_status,
        UpsamplerActivities.adopt_submission,
    ]
    names = lambda functions: sorted(activity._Definition.must_from_callable(f).name for f in functions)  # noqa: E731
    assert names(fakes.job_activities() + fakes.upsampler_activities()) == names(real)
    assert len(set(names(real))) == 21


# --- A job that goes well -----------------------------------------------------------------------


async def test_a_job_calls_every_step_with_the_right_arguments(fakes):
    async with running(fakes) as handle:
        state = await finish(handle, fakes)
    job_id = job_id_of(handle)

    assert state.status == "completed" and state.upsampler_id == "up-1" and state.attempt == 1
    assert (state.polls, state.webhooks, state.error_code, state.awaiting_decision) == (1, 0, None, False)
    assert fakes.calls["fetch_original"] == [FetchRequest(job_id, IMAGE_URL)]
    assert fakes.calls["record_estimate"] == [EstimateRecord(job_id, 64, 48, 4, 0.25, 0.04)]
    assert fakes.calls["compress_original"] == []  # 10 kB is under Upsampler's input limit
    assert fakes.calls["budget_gate"] == []  # no hard stop in this policy
    assert fakes.calls["submit_upscale"] == [SubmitRequest(job_id, 1, 4, "", expected_seconds=30.0)]
    assert fakes.calls["check_status"] == ["up-1"]
    # The cost Upsampler reports with the result (2.5) wins over the submission's estimate (1.0).
    assert fakes.calls["record_cost"] == [CostRecord(job_id, "up-1", 2.5, 0.04)]
    assert fakes.calls["check_budget"] == [job_id]
    assert fakes.calls["download_result"] == [DownloadRequest(job_id, result_url("up-1"), 1)]
    assert fakes.calls["validate_result"] == [ValidateRequest(job_id, "/data/tmp/result-1", 256, 192)]
    assert fakes.calls["store_result"] == [StoreRequest(job_id, "/data/tmp/result-1", "auto")]
    assert fakes.calls["issue_download_token"] == [TokenRequest(job_id, "run:1", 24.0)]
    assert fakes.calls["send_email"] == [EmailRequest(job_id, "completed", 1)]
    assert fakes.calls["refund"] == [] and fakes.calls["send_budget_alert"] == []
    assert fakes.calls["cleanup"] == [job_id] and fakes.log[-1] == "cleanup"

    updates = fakes.calls["update_job"]
    # The submit activity writes the Upsampler id and the estimated time into the record itself.
    assert fakes.statuses() == ["queued", "downloading", "completed"]
    assert updates[0].input == ORIGINAL and updates[0].estimate == fakes.calls["record_estimate"][0]
    assert updates[2].output == STORED
    assert updates[2].download == LINK and updates[2].error_code == ""
    assert await timer_seconds(handle) == [30.0]
    # At most 4 bookkeeping rounds per job, 3 of them local: the queued update with the estimate, the
    # link with `completed`, the clean-up; the cost, budget check and `downloading` run beside the download.
    assert [name for name in fakes.log if name in LOCAL_ROUNDS] == ["update_job", "complete", "cleanup"]
    assert fakes.log.count("book_result") == 1
    assert fakes.log.count("check_and_store") == 1 and "validate_result" not in fakes.log  # one activity for both


async def test_a_retry_run_numbers_its_submissions_after_the_earlier_runs(fakes):
    async with running(fakes, run=2, attempts_before=3) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.attempt == 4
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [4]
    assert [request.purpose for request in fakes.calls["issue_download_token"]] == ["run:2"]
    assert [request.attempt for request in fakes.calls["download_result"]] == [4]


async def test_budget_alerts_are_sent_and_one_that_fails_does_not_stop_the_job(fakes):
    alert = BudgetAlertInfo("day:2026-11-21:80", "day:2026-11-21", 80, 8.5, 10.0)
    fakes.script("check_budget", [alert])
    fakes.always("send_budget_alert", lambda _: fail("SMTPRecipientsRefused"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert fakes.calls["send_budget_alert"] == [alert]
    assert state.status == "completed" and state.error_code is None
    assert [request.kind for request in fakes.calls["send_email"]] == ["completed"]


# --- Waiting for Upsampler: polls, timeout, webhooks ----------------------------------------------


async def test_first_poll_at_the_initial_delay_then_backoff_doubles_up_to_the_cap(fakes):
    fakes.script("check_status", *[UpsamplerResult("up-1", "processing")] * 4)
    async with running(fakes, poll_initial_delay_seconds=7, poll_max_interval_seconds=40) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.polls == 5
    assert await timer_seconds(handle) == [7.0, 14.0, 28.0, 40.0, 40.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 5
    assert fakes.calls["check_status"] == ["up-1"] * 5
    assert fakes.statuses() == ["queued", "processing", "downloading", "completed"]


async def test_no_result_within_the_processing_timeout_goes_to_manual_review(fakes):
    fakes.always("check_status", lambda upsampler_id: UpsamplerResult(upsampler_id, "processing"))
    async with running(
        fakes, poll_initial_delay_seconds=30, poll_max_interval_seconds=40, processing_timeout_seconds=100
    ) as handle:
        # "refund" at the review: the job is refunded for the reason it was reviewed for.
        state = await finish(handle, fakes, "refund")

    timers = await timer_seconds(handle)
    # 30 + 40, then what is left of the 100 s (less the real time the status calls took).
    assert timers[:2] == [30.0, 40.0] and len(timers) == 3 and 29.0 < timers[2] <= 30.0
    assert fakes.calls["check_status"] == ["up-1"] * 3
    assert fakes.statuses() == ["queued", "processing", "manual_review", "failed"]
    review = fakes.calls["update_job"][2]
    assert review.error_code == "timeout" and "100 s" in review.error_message
    assert fakes.admin_notes()[0] == "Manual review needed (timeout)"
    assert fakes.calls["download_result"] == [] and fakes.calls["record_cost"] == []
    assert fakes.calls["refund"] == [RefundRequest(job_id_of(handle), "timeout")]
    assert state.status == "failed" and state.error_code == "timeout" and state.refund == REFUNDED


async def test_a_webhook_ends_the_wait_at_once_and_check_status_confirms_it(fakes):
    async with running(fakes) as handle:
        await submitted(handle)  # time is locked: the 30 s poll timer runs in real time
        await handle.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint("up-1", "completed"))
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.webhooks == 1 and state.polls == 1
    assert fakes.calls["check_status"] == ["up-1"]  # the webhook is only a hint: the status call confirms it
    assert await timer_seconds(handle) == [30.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_CANCELED) == 1


async def test_a_webhook_the_status_call_contradicts_only_brings_the_poll_forward(fakes):
    fakes.script("check_status", UpsamplerResult("up-1", "processing"))
    async with running(fakes) as handle:
        await submitted(handle)
        await handle.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint("up-1", "completed"))  # forged or early
        await eventually(lambda: fakes.calls["check_status"], what="the status call the webhook triggers")
        assert (await state_of(handle)).status != "completed"
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.webhooks == 1 and state.polls == 2
    # The wait starts again at the initial delay (no backoff: the first wait did not time out).
    assert await timer_seconds(handle) == [30.0, 30.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 1
    assert fakes.statuses() == ["queued", "processing", "downloading", "completed"]


def _signalling_submit(fakes: Fakes, names_id: str):
    """A submit whose Upsampler job finishes, and calls the webhook (naming `names_id`), before it replies."""

    async def submit(request: SubmitRequest) -> UpsamplerResult:
        workflow = fakes.env.client.get_workflow_handle(activity.info().workflow_id)
        await workflow.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint(names_id, "completed"))
        return UpsamplerResult(f"up-{request.attempt}", "queued", 1.0)

    return submit


async def test_a_webhook_that_comes_before_the_submit_returns_is_kept(fakes):
    fakes.script("submit_upscale", _signalling_submit(fakes, "up-1"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)  # time skips at once: a lost webhook would show as a fired timer

    assert state.status == "completed" and state.webhooks == 1 and state.polls == 1
    assert await first_event_id(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) < await first_event_id(
        handle, EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED, "submit_upscale"
    )
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0


async def test_an_early_webhook_for_another_submission_is_dropped(fakes):
    fakes.script("submit_upscale", _signalling_submit(fakes, "up-someone-else"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.webhooks == 1 and state.polls == 1
    assert await timer_seconds(handle) == [30.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 1  # it waited for the poll


# --- A submit whose reply was lost: adopt the job its webhook names, else submit again ----------------


def _lost_reply(fakes: Fakes, names_id: str | None):
    """A submit whose POST reached Upsampler but whose reply did not reach us: the retried activity
    raises submission_unknown; Upsampler's job calls the webhook whose nonce names attempt 1 (unless None)."""

    async def submit(request: SubmitRequest) -> UpsamplerResult:
        if names_id is not None:
            workflow = fakes.env.client.get_workflow_handle(activity.info().workflow_id)
            await workflow.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint(names_id, "completed", attempt=1))
        return fail("submission_unknown")

    return submit


async def test_a_lost_submit_reply_adopts_the_job_its_webhook_names_and_pays_for_no_second(fakes):
    fakes.script("submit_upscale", _lost_reply(fakes, "up-lost"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)
    job_id = job_id_of(handle)

    assert state.status == "completed" and state.upsampler_id == "up-lost" and state.attempt == 1
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1]  # no second POST
    assert fakes.calls["adopt_submission"] == [AdoptRequest(job_id, 1, "up-lost")]
    assert fakes.calls["check_status"] == []  # the adoption's status check found it finished
    assert fakes.calls["record_cost"] == [CostRecord(job_id, "up-lost", 2.5, 0.04)]
    assert fakes.calls["download_result"] == [DownloadRequest(job_id, result_url("up-lost"), 1)]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0


async def test_without_a_webhook_within_the_processing_timeout_it_submits_again(fakes):
    fakes.script("submit_upscale", _lost_reply(fakes, None))
    async with running(fakes, processing_timeout_seconds=600) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.upsampler_id == "up-2" and state.attempt == 2
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1, 2]
    assert fakes.calls["adopt_submission"] == []
    assert (await timer_seconds(handle))[0] == 600.0  # the wait for the lost reply's webhook
    assert [cost.upsampler_id for cost in fakes.calls["record_cost"]] == ["up-2"]


async def test_a_job_the_status_endpoint_does_not_know_is_not_adopted(fakes):
    fakes.script("submit_upscale", _lost_reply(fakes, "up-unknown"))
    fakes.script("adopt_submission", fail("upsampler_not_found"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.upsampler_id == "up-2"
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1, 2]
    assert [cost.upsampler_id for cost in fakes.calls["record_cost"]] == ["up-2"]


async def test_a_lost_reply_hint_for_a_submit_that_replied_after_all_is_its_early_webhook(fakes):
    async def submit(request: SubmitRequest) -> UpsamplerResult:  # the API sent it for adoption meanwhile
        workflow = fakes.env.client.get_workflow_handle(activity.info().workflow_id)
        await workflow.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint("up-1", "completed", attempt=1))
        return UpsamplerResult("up-1", "queued", 1.0)

    fakes.script("submit_upscale", submit)
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and fakes.calls["adopt_submission"] == []
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0  # not left waiting for the poll


async def test_an_adopted_job_still_running_is_waited_for_like_any_submission(fakes):
    fakes.script("submit_upscale", _lost_reply(fakes, "up-lost"))
    fakes.script("adopt_submission", lambda request: UpsamplerResult(request.upsampler_id, "processing", 1.0))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.upsampler_id == "up-lost"
    assert fakes.calls["check_status"] == ["up-lost"]
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1]


# --- The failure table: the n-th failure of a kind gets the n-th answer ----------------------------

# code -> the activity that fails with it; the first failure is refunded.
REFUND_ROWS = {
    "unsupported_format": "fetch_original",
    "fetch_failed": "fetch_original",
    "image_url_refused": "fetch_original",
    "upsampler_invalid_input": "submit_upscale",
    "output_too_large": None,  # the workflow's own check: input x scale over Upsampler's pixel limit
}
# code -> the activity that fails with it; the first failure goes to manual review.
REVIEW_ROWS = {
    "refund_failed": "download_result",
    "result_url_refused": "download_result",
    "upsampler_unauthorized": "submit_upscale",
    "upsampler_not_found": "check_status",
    "a_code_the_table_does_not_know": "store_result",  # the default answer
}
# Rows with tests of their own below.
SEQUENCE_ROWS = {"too_large", "upsampler_failed", "invalid_result", "result_expired", "timeout", "admin_refund"}
SEQUENCE_ROWS |= {"submission_unknown"}  # tested above: "A submit whose reply was lost"


def test_every_row_of_the_failure_table_has_a_test():
    assert {str(code) for code in FAILURE_TABLE} == (set(REFUND_ROWS) | set(REVIEW_ROWS) | SEQUENCE_ROWS) - {
        "a_code_the_table_does_not_know"
    }


@pytest.mark.parametrize("code", REFUND_ROWS)
async def test_failures_answered_by_a_refund(fakes, code):
    if code == "output_too_large":
        fakes.script("fetch_original", StoredImage("/data/original.png", 2000, 1800, "png", 900_000, "ab" * 32))
    else:
        fakes.script(REFUND_ROWS[code], fail(code))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)
    job_id = job_id_of(handle)

    assert state.status == "failed" and state.error_code == code and state.refund == REFUNDED
    assert fakes.calls["refund"] == [RefundRequest(job_id, code)]
    assert fakes.statuses()[-1] == "failed" and "manual_review" not in fakes.statuses()
    assert fakes.calls["update_job"][-1].error_code == code
    assert fakes.emails("failed") == [EmailRequest(job_id, "failed", purpose="failed:1")]
    assert fakes.admin_notes() == [f"Refunded ({code})"]
    assert len(fakes.calls["fetch_original"]) == 1
    assert len(fakes.calls["submit_upscale"]) == (1 if code == "upsampler_invalid_input" else 0)
    assert fakes.calls["download_result"] == [] and fakes.calls["issue_download_token"] == []
    assert fakes.calls["cleanup"] == [job_id]


@pytest.mark.parametrize("code", REVIEW_ROWS)
async def test_failures_answered_by_manual_review(fakes, code):
    fakes.script(REVIEW_ROWS[code], fail(code))
    async with running(fakes) as handle:
        state = await finish(handle, fakes, "refund")
    job_id = job_id_of(handle)

    assert fakes.admin_notes()[0] == f"Manual review needed ({code})"
    assert fakes.emails("admin_notice")[0].purpose == "admin:review:1:1"
    review = fakes.calls["update_job"][fakes.statuses().index("manual_review")]
    assert review.error_code == code and review.error_message == f"fake {code}"
    assert len(fakes.calls["submit_upscale"]) == 1  # no resubmission before the admin decided
    assert len(fakes.calls[REVIEW_ROWS[code]]) == 1  # and no retry of the step
    # The admin's "refund" refunds it for the reason it was reviewed for.
    assert fakes.calls["refund"] == [RefundRequest(job_id, code)]
    assert state.status == "failed" and state.error_code == code


async def test_too_large_is_compressed_three_times_then_refunded(fakes):
    fakes.always("submit_upscale", lambda request: upsampler_failed(f"up-{request.attempt}", "too_large"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert [request.quality for request in fakes.calls["compress_original"]] == [85, 70, 55]
    assert [(r.attempt, r.variant) for r in fakes.calls["submit_upscale"]] == [
        (1, ""),
        (2, "q85"),
        (3, "q70"),
        (4, "q55"),
    ]
    assert fakes.calls["check_status"] == []  # a refused submission is not waited for
    assert fakes.calls["refund"] == [RefundRequest(job_id_of(handle), "too_large")]
    assert state.status == "failed" and state.error_code == "too_large"


async def test_an_original_over_the_input_limit_is_compressed_until_it_fits_before_the_first_submit(fakes):
    sizes = {85: 25 * MB, 70: 15 * MB}
    fakes.script("fetch_original", StoredImage("/data/original.png", 64, 48, "png", 30 * MB, "ab" * 32))
    fakes.always(
        "compress_original",
        lambda request: StoredImage(f"/data/q{request.quality}.jpg", 64, 48, "jpg", sizes[request.quality], ""),
    )
    async with running(fakes, upsampler_max_input_bytes=20 * MB) as handle:
        state = await finish(handle, fakes)

    assert [request.quality for request in fakes.calls["compress_original"]] == [85, 70]
    assert [request.variant for request in fakes.calls["submit_upscale"]] == ["q70"]
    assert fakes.log.index("compress_original") < fakes.log.index("submit_upscale")
    assert state.status == "completed"


async def test_upsampler_failed_is_resubmitted_then_reviewed_and_a_retry_starts_the_table_afresh(fakes):
    # up-1 and up-2 fail: resubmit, then review. After the admin's retry up-3 fails: the table starts
    # afresh, so that is a resubmission again, not a second review; up-4 succeeds.
    fakes.always(
        "check_status",
        lambda upsampler_id: upsampler_failed(upsampler_id) if upsampler_id != "up-4" else completed(upsampler_id),
    )
    async with running(fakes) as handle:
        state = await finish(handle, fakes, "retry")

    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1, 2, 3, 4]
    assert fakes.calls["check_status"] == ["up-1", "up-2", "up-3", "up-4"]
    assert fakes.admin_notes() == ["Manual review needed (upsampler_failed)"]
    assert fakes.emails("admin_notice")[0].purpose == "admin:review:1:2"
    statuses = fakes.statuses()
    after_review = fakes.calls["update_job"][statuses.index("manual_review") + 1]
    assert after_review.status == "queued" and after_review.error_code == ""  # the error is cleared
    assert state.status == "completed" and state.error_code is None and state.upsampler_id == "up-4"
    assert fakes.calls["refund"] == []


async def test_invalid_result_is_resubmitted_then_reviewed_and_a_refund_decision_refunds(fakes):
    fakes.script("validate_result", fail("invalid_result"), fail("invalid_result"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes, "refund")
    job_id = job_id_of(handle)

    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1, 2]
    assert fakes.calls["download_result"] == [
        DownloadRequest(job_id, result_url("up-1"), 1),
        DownloadRequest(job_id, result_url("up-2"), 2),
    ]
    assert [(r.width, r.height) for r in fakes.calls["validate_result"]] == [(256, 192)] * 2
    assert fakes.admin_notes() == ["Manual review needed (invalid_result)", "Refunded (invalid_result)"]
    assert fakes.calls["refund"] == [RefundRequest(job_id, "invalid_result")]
    assert fakes.statuses()[-2:] == ["manual_review", "failed"]
    assert state.status == "failed" and state.error_code == "invalid_result"
    assert fakes.calls["store_result"] == [] and fakes.calls["issue_download_token"] == []


async def test_result_expired_refreshes_the_link_then_resubmits_then_reviews(fakes):
    fakes.script("download_result", *[fail("result_expired")] * 3)
    # The poll of up-1 gives the first link, the refresh a fresh one.
    fakes.script("check_status", completed("up-1"), completed("up-1", fresh=1))
    async with running(fakes) as handle:
        state = await finish(handle, fakes, "retry")

    assert [(r.url, r.attempt) for r in fakes.calls["download_result"]] == [
        (result_url("up-1"), 1),  # expired: refresh
        (result_url("up-1", fresh=1), 1),  # expired again: resubmit
        (result_url("up-2"), 2),  # expired a third time: review; the admin retries
        (result_url("up-3"), 3),
    ]
    assert fakes.calls["check_status"] == ["up-1", "up-1", "up-2", "up-3"]
    assert [request.attempt for request in fakes.calls["submit_upscale"]] == [1, 2, 3]
    assert await timer_seconds(handle) == [30.0] * 3  # the refresh asks at once, without a timer
    assert fakes.admin_notes() == ["Manual review needed (result_expired)"]
    assert state.status == "completed" and fakes.calls["refund"] == []


async def test_an_admin_refund_ends_the_wait_for_upsampler(fakes):
    async with running(fakes) as handle:
        await submitted(handle)
        await handle.signal(UpscaleWorkflow.admin_decision, "refund")
        state = await finish(handle, fakes)

    assert state.status == "failed" and state.error_code == "admin_refund"
    assert fakes.calls["refund"] == [RefundRequest(job_id_of(handle), "admin_refund")]
    assert fakes.calls["check_status"] == [] and fakes.calls["download_result"] == []
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0
    assert fakes.admin_notes() == ["Refunded (admin_refund)"]
    assert [request.kind for request in fakes.calls["send_email"]] == ["failed", "admin_notice"]


async def test_a_retry_decision_outside_manual_review_is_ignored(fakes):
    async with running(fakes) as handle:
        await submitted(handle)
        await handle.signal(UpscaleWorkflow.admin_decision, "retry")
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.attempt == 1
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 1  # the wait was not cut short
    assert fakes.calls["check_status"] == ["up-1"]


async def test_a_retry_decision_before_a_review_does_not_decide_it(fakes):
    fakes.script("download_result", fail("result_url_refused"))
    async with running(fakes) as handle:
        await submitted(handle)
        await handle.signal(UpscaleWorkflow.admin_decision, "retry")  # while no review is open
        state = await finish(handle, fakes, "refund")  # the review that follows waits for its own decision

    assert fakes.admin_notes()[0] == "Manual review needed (result_url_refused)"
    assert len(fakes.calls["submit_upscale"]) == 1
    assert state.status == "failed" and state.error_code == "result_url_refused"


async def test_a_late_webhook_for_a_failed_submission_does_not_cut_the_next_wait_short(fakes):
    async def download_with_a_duplicate_webhook(request: DownloadRequest) -> DownloadedFile:
        workflow = fakes.env.client.get_workflow_handle(activity.info().workflow_id)
        await workflow.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint("up-1", "completed"))
        return DownloadedFile("/data/tmp/result-1", 40_000, "ef" * 32)

    fakes.script("download_result", download_with_a_duplicate_webhook)
    fakes.script("validate_result", fail("invalid_result"))  # resubmit
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.upsampler_id == "up-2" and state.webhooks == 1
    assert await timer_seconds(handle) == [30.0, 30.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 2  # up-2 was polled, not woken


async def test_a_refused_refund_is_not_retried_and_leaves_the_job_in_manual_review(fakes):
    fakes.script("fetch_original", fail("unsupported_format"))
    fakes.always("refund", lambda _: fail("refund_failed", retryable=True, message="the shop refused (403)"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert len(fakes.calls["refund"]) == 1
    assert state.status == "manual_review" and state.error_code == "refund_failed" and state.refund is None
    assert fakes.statuses() == ["manual_review"]
    assert fakes.admin_notes() == ["The refund failed; pay it back by hand"]
    assert fakes.emails("failed") == []  # the customer is not told of a refund that did not happen
    scheduled, failures = await activity_attempts(handle, "refund")
    assert scheduled == 1 and failures == [RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE]


# --- Retries: final errors never, transient ones until the policy gives up --------------------------

FINAL_ERRORS = [
    "unsupported_format",
    "too_large",
    "fetch_failed",
    "image_url_refused",
    "result_url_refused",
    "invalid_result",
    "result_expired",
    "upsampler_unauthorized",
    "upsampler_invalid_input",
    "upsampler_not_found",
    "refund_failed",
]
REVIEWED_FIRST = {"result_url_refused", "upsampler_unauthorized", "upsampler_not_found", "refund_failed"}


@pytest.mark.parametrize(
    "name,code",
    [("download_result", code) for code in FINAL_ERRORS]
    + [
        ("submit_upscale", code)
        for code in ("upsampler_unauthorized", "upsampler_invalid_input", "upsampler_not_found")
    ],
)
async def test_final_errors_are_not_retried_even_when_raised_retryable(fakes, name, code):
    fakes.script(name, fail(code, retryable=True))  # only the retry policy can stop the retries
    async with running(fakes) as handle:
        state = await finish(handle, fakes, *(["refund"] if code in REVIEWED_FIRST else []))

    scheduled, failures = await activity_attempts(handle, name)
    assert len(fakes.calls[name]) == scheduled  # one call per time the workflow asked: no retry
    assert failures == [RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE]
    assert state.status in ("completed", "failed")


async def test_transient_errors_are_retried_within_the_activity(fakes):
    fakes.script("download_result", fail("transient", retryable=True), fail("transient", retryable=True))
    fakes.script("submit_upscale", *[fail("rate_limited", retryable=True)] * 3)
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert state.status == "completed" and state.attempt == 1
    assert len(fakes.calls["download_result"]) == 3 and await activity_attempts(handle, "download_result") == (1, [])
    # Every retry of the submission carries the same attempt number: the key that stops a double charge.
    assert fakes.calls["submit_upscale"] == [SubmitRequest(job_id_of(handle), 1, 4, "", expected_seconds=30.0)] * 4
    assert await activity_attempts(handle, "submit_upscale") == (1, [])


async def test_transient_errors_that_outlast_the_retries_go_to_manual_review(fakes):
    fakes.always("download_result", lambda _: fail("transient", retryable=True, message="connection reset"))
    async with running(fakes) as handle:
        state = await finish(handle, fakes, "refund")

    assert len(fakes.calls["download_result"]) == 8  # TRANSFER_RETRY's maximum_attempts
    assert await activity_attempts(handle, "download_result") == (1, [RetryState.RETRY_STATE_MAXIMUM_ATTEMPTS_REACHED])
    assert fakes.admin_notes()[0] == "Manual review needed (transient)"
    assert state.status == "failed" and state.error_code == "transient"


# --- Budget hard stop -------------------------------------------------------------------------------


async def test_a_crossed_budget_holds_the_job_until_the_gate_opens(fakes):
    fakes.script("budget_gate", BudgetGate(False, 600.0))
    async with running(fakes, budget_hard_stop=True) as handle:
        state = await finish(handle, fakes)

    assert fakes.calls["budget_gate"] == [job_id_of(handle)] * 2
    assert [name for name in fakes.log if name in ("budget_gate", "submit_upscale")] == [
        "budget_gate",
        "budget_gate",
        "submit_upscale",
    ]
    assert await timer_seconds(handle) == [600.0, 30.0]  # the gate's recheck, then the first poll
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 2
    assert state.status == "completed"


async def test_a_budget_release_ends_the_hold_at_once(fakes):
    fakes.script("budget_gate", BudgetGate(False, 3600.0))
    async with running(fakes, budget_hard_stop=True) as handle:
        await eventually(lambda: fakes.calls["budget_gate"], what="the budget gate asked")
        held = await state_of(handle)
        await handle.signal(UpscaleWorkflow.budget_released)
        state = await finish(handle, fakes)

    assert held.status == "queued" and held.upsampler_id is None
    assert len(fakes.calls["budget_gate"]) == 2
    assert await timer_seconds(handle) == [3600.0, 30.0]
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 1  # only the poll's: the hold was cut short
    # Nothing went to Upsampler before the release.
    assert await first_event_id(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) < await first_event_id(
        handle, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, "submit_upscale"
    )
    assert state.status == "completed"


async def test_an_admin_refund_ends_a_budget_hold(fakes):
    fakes.always("budget_gate", BudgetGate(False, 3600.0))
    async with running(fakes, budget_hard_stop=True) as handle:
        await eventually(lambda: fakes.calls["budget_gate"], what="the budget gate asked")
        await handle.signal(UpscaleWorkflow.admin_decision, "refund")
        state = await finish(handle, fakes)

    assert fakes.calls["submit_upscale"] == [] and len(fakes.calls["budget_gate"]) == 1
    assert fakes.calls["refund"] == [RefundRequest(job_id_of(handle), "admin_refund")]
    assert state.status == "failed" and state.error_code == "admin_refund"


# --- Mail ---------------------------------------------------------------------------------------------


async def test_a_completion_email_that_will_not_go_keeps_the_job_completed_with_mail_failed(fakes):
    fakes.always(
        "send_email",
        lambda request: (
            fail("SMTPRecipientsRefused", retryable=True, message="550 no such user")
            if request.kind == "completed"
            else True
        ),
    )
    async with running(fakes) as handle:
        state = await finish(handle, fakes)

    assert len(fakes.emails("completed")) == 10  # MAIL_RETRY's maximum_attempts
    assert state.status == "completed" and state.error_code == "mail_failed"
    assert "550 no such user" in state.error_message
    last = fakes.calls["update_job"][-1]
    assert (last.status, last.error_code) == ("completed", "mail_failed")
    assert fakes.admin_notes() == ["The completion email could not be sent"]
    assert fakes.emails("admin_notice")[0].purpose == "admin:mail:1"
    assert fakes.calls["refund"] == []
