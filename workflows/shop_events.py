"""ShopEventWorkflow: one job event delivered to the shop, on its own.

A job's workflow starts one of these per outcome (`start_shop_event`), as a child it does not wait
for (ParentClosePolicy.ABANDON): a shop that is down delays neither the customer's email nor the
job's end. The child's ID is the event's id, fixed by job, run and outcome, and a duplicate ID is
refused even after the child closed, so a reset of the job's workflow that reaches the same outcome
again cannot send an accepted event a second time.

Delivery retries with exponential backoff, at most an hour between tries; after three days the
admin is told by the usual admin notice.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, RetryState, TimeoutError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.notify import NotifyActivities
    from activities.shop_events import SHOP_URL_REFUSED, ShopEventActivities
    from smi.vocabulary import EmailRequest, JobPolicy, ShopDelivery, ShopEvent, ShopEventType

GIVE_UP_AFTER = timedelta(days=3)
MAX_RETRY_INTERVAL = timedelta(hours=1)
BUILD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
NOTICE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=10), maximum_attempts=10
)


def delivery_retry(first_retry_seconds: float) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=first_retry_seconds),
        backoff_coefficient=2.0,
        maximum_interval=MAX_RETRY_INTERVAL,
        non_retryable_error_types=[SHOP_URL_REFUSED],
    )


def event_id(job_id: str, run: int | None, kind: str, step: int | None = None) -> str:
    """Deterministic: the job, its run (an admin's retry is a new run; None for the once-only refund of a
    finished job), the outcome, and for an outcome that can repeat within a run (manual review) the
    submission it followed."""
    parts = [f"evt-{job_id}"] + ([f"r{run}"] if run is not None else []) + [kind.removeprefix("job.")]
    return "-".join(parts + ([str(step)] if step is not None else []))


async def start_shop_event(
    job_id: str, run: int | None, kind: ShopEventType, policy: JobPolicy | None, step: int | None = None
) -> bool:
    """From a workflow: start the event's delivery and return at once. Nothing when the job's policy has no
    shop events (no SMI_STOREFRONT_WEBHOOK_URL; histories from before the events: not even a patch marker).
    False when this event was started before (by an earlier run of a reset workflow): not sent again."""
    if policy is None or not policy.shop_events or not workflow.patched("shop-events"):
        return False
    name = event_id(job_id, run, kind, step)
    event = ShopEvent(name, job_id, kind, workflow.now().isoformat(), policy.shop_event_first_retry_seconds)
    try:
        await workflow.start_child_workflow(
            ShopEventWorkflow.run,
            event,
            id=name,
            parent_close_policy=ParentClosePolicy.ABANDON,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:
        workflow.logger.info("event %s was started before; not sent again", name)
        return False
    return True


@workflow.defn
class ShopEventWorkflow:
    @workflow.run
    async def run(self, event: ShopEvent) -> bool:
        """True once the shop answered 2xx; False when it gave up and told the admin."""
        body = await workflow.execute_activity_method(
            ShopEventActivities.build_event,
            event,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=BUILD_RETRY,
        )
        try:
            await workflow.execute_activity_method(
                ShopEventActivities.deliver,
                ShopDelivery(event.event_id, event.job_id, body),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=GIVE_UP_AFTER,
                retry_policy=delivery_retry(event.first_retry_seconds),
            )
            return True
        except ActivityError as err:
            why = _why(err)
            workflow.logger.warning("event %s given up: %s", event.event_id, why)
        await workflow.execute_activity_method(
            NotifyActivities.send_email,
            EmailRequest(
                event.job_id,
                "admin_notice",
                purpose=f"admin:{event.event_id}",
                note=f"The shop did not accept the event {event.type} ({event.event_id}): {why}",
            ),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=NOTICE_RETRY,
        )
        return False


def _why(err: ActivityError) -> str:
    """What the admin reads: never the URL (it may carry a token) nor the secret."""
    cause = err.cause
    if isinstance(cause, TimeoutError):  # the give-up timeout struck during an attempt: the last failure is inside
        cause = cause.cause
    last = getattr(cause, "message", None) or "no answer"
    if err.retry_state == RetryState.TIMEOUT:
        return f"no 2xx answer within {GIVE_UP_AFTER.days} days (last: {last})"
    return last
