"""Admin actions on jobs whose UpscaleWorkflow has finished: a refund, a fresh download link.

They are workflows too, so they retry like the rest and show in the Temporal UI.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.notify import NotifyActivities
    from activities.payments import PaymentsActivities
    from smi.vocabulary import (
        DownloadLink,
        EmailRequest,
        JobPolicy,
        JobUpdate,
        RefundOutcome,
        RefundRequest,
        ResendInput,
        ShopEventType,
        TokenRequest,
    )
    from workflows.shop_events import start_shop_event
    from workflows.upscale import MAIL_RETRY, REFUND_RETRY


@workflow.defn
class RefundWorkflow:
    """An admin's refund of a finished job. Its ID is `refund-<job_id>`; the refund row makes it once-only."""

    @workflow.run
    async def run(self, job_id: str, policy: JobPolicy | None = None) -> RefundOutcome:
        """`policy`: the settings' when the admin asked (None in histories from before the shop events)."""
        outcome = await workflow.execute_activity_method(
            PaymentsActivities.refund,
            RefundRequest(job_id, "admin"),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=REFUND_RETRY,
        )
        await start_shop_event(job_id, None, ShopEventType.REFUNDED, policy)
        for request in (
            EmailRequest(job_id, "refunded", purpose="refunded"),
            EmailRequest(
                job_id, "admin_notice", purpose="admin:refund:admin", note=f"Refund {outcome.status} by an admin"
            ),
        ):
            await workflow.execute_activity_method(
                NotifyActivities.send_email,
                request,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=MAIL_RETRY,
            )
        return outcome


@workflow.defn
class ResendLinkWorkflow:
    """A new download link with a new expiry, emailed again; the old link stops working."""

    @workflow.run
    async def run(self, request: ResendInput) -> DownloadLink:
        link = await workflow.execute_local_activity_method(
            LedgerActivities.issue_download_token,
            TokenRequest(request.job_id, f"resend:{request.request_id}", request.ttl_hours),
            start_to_close_timeout=timedelta(seconds=30),
        )
        await workflow.execute_local_activity_method(
            LedgerActivities.update_job,
            JobUpdate(request.job_id, request.status, download=link),
            start_to_close_timeout=timedelta(seconds=30),
        )
        await workflow.execute_activity_method(
            NotifyActivities.send_email,
            EmailRequest(request.job_id, "completed", link.generation),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=MAIL_RETRY,
        )
        return link
