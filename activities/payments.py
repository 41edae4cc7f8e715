"""Money going back: the refund, through one of three adapters, at most once per job.

The refund row (primary key: the job) is written as `pending` before any money moves and
names the adapter; every later run of the activity finds it and either reports it done or
finishes it with the same idempotency key, so no retry, reset or admin click pays twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi.db import Job, LedgerEntry, Refund, utcnow
from smi.settings import Settings
from smi.vocabulary import ErrorCode, RefundOutcome, RefundRequest

DONE = ("refunded", "owed")


def idempotency_key(job_id: str) -> str:
    return f"smi-refund-{job_id}"


class PaymentsActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    @activity.defn
    def refund(self, request: RefundRequest) -> RefundOutcome:
        with Session(self.engine) as session:
            job = session.get(Job, request.job_id)
            if job is None:
                raise ApplicationError(
                    f"job {request.job_id} has no record", type=ErrorCode.REFUND_FAILED, non_retryable=True
                )
            row = session.get(Refund, job.job_id)
            if row is None:
                row = Refund(
                    job_id=job.job_id,
                    status="pending",
                    amount_cents=job.amount_paid_cents,
                    currency=job.currency,
                    reason=request.reason,
                    adapter=self.settings.refund_adapter,
                    created_at=utcnow(),
                )
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                row = session.get_one(Refund, job.job_id)  # ours, or the one a concurrent run inserted
            if row.status not in DONE:
                row.status, row.external_id = self._pay_back(row, job)
                row.completed_at = utcnow()
                session.add(row)
                # The money going back, as negative revenue, in the same transaction as the refund's status.
                if (
                    session.exec(
                        select(LedgerEntry).where(LedgerEntry.job_id == job.job_id, LedgerEntry.purpose == "refund")
                    ).first()
                    is None
                ):
                    session.add(
                        LedgerEntry(
                            job_id=job.job_id,
                            purpose="refund",
                            created_at=row.completed_at,
                            revenue_usd=-row.amount_cents / 100,
                        )
                    )
                session.commit()
            return RefundOutcome(row.status, row.amount_cents, row.currency, row.adapter)

    def _pay_back(self, row: Refund, job: Job) -> tuple[str, str | None]:
        if row.amount_cents == 0:
            return "refunded", None
        if row.adapter == "webhook":
            return "refunded", self._via_webhook(row, job)
        if row.adapter == "stripe":
            return "refunded", self._via_stripe(row, job)
        return "owed", None  # adapter "none": recorded for a human, who is told by email

    def _via_webhook(self, row: Refund, job: Job) -> str | None:
        """POST a signed refund request to the storefront; retried (by policy) until it answers 2xx."""
        url = self.settings.refund_webhook_url
        if not url:  # settings insist on it outside SMI_ENV=dev
            raise ApplicationError(
                "SMI_REFUND_WEBHOOK_URL is not set", type=ErrorCode.REFUND_FAILED, non_retryable=True
            )
        body = json.dumps(
            {
                "job_id": job.job_id,
                "order_id": job.order_id,
                "payment_reference": job.payment_reference,
                "amount_cents": row.amount_cents,
                "currency": row.currency,
                "reason": row.reason,
                "idempotency_key": idempotency_key(job.job_id),
            },
            sort_keys=True,
        ).encode()
        secret = self.settings.secret("webhook_secret").encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(job.job_id),
            "X-SMI-Signature": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
        }
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=30)
        except httpx.TransportError as exc:
            raise ApplicationError(
                f"refund webhook unreachable: {type(exc).__name__}", type=ErrorCode.REFUND_PENDING
            ) from None
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise ApplicationError(f"refund webhook answered {response.status_code}", type=ErrorCode.REFUND_PENDING)
        if not response.is_success:  # the storefront refuses for good: a human decides
            raise ApplicationError(
                f"refund webhook refused the refund ({response.status_code})",
                type=ErrorCode.REFUND_FAILED,
                non_retryable=True,
            )
        try:
            reply = response.json()
        except ValueError:
            return None
        return str(reply.get("id")) if isinstance(reply, dict) and reply.get("id") else None

    def _via_stripe(self, row: Refund, job: Job) -> str:
        import stripe

        if not job.payment_reference:
            raise ApplicationError(
                "the order has no payment_reference to refund", type=ErrorCode.REFUND_FAILED, non_retryable=True
            )
        client = stripe.StripeClient(
            self.settings.secret("stripe_api_key"),
            base_addresses={"api": self.settings.stripe_api_base},
            max_network_retries=0,
        )
        try:
            refund = client.v1.refunds.create(
                params={
                    "payment_intent": job.payment_reference,
                    "amount": row.amount_cents,
                    "metadata": {"job_id": job.job_id, "reason": row.reason},
                },
                options={"idempotency_key": idempotency_key(job.job_id)},
            )
        except stripe.InvalidRequestError as exc:
            if exc.code == "charge_already_refunded":
                return "already_refunded"
            raise ApplicationError(
                f"Stripe refused the refund: {exc.code or 'invalid request'}",
                type=ErrorCode.REFUND_FAILED,
                non_retryable=True,
            ) from None
        except stripe.StripeError as exc:
            raise ApplicationError(f"Stripe error: {type(exc).__name__}", type=ErrorCode.REFUND_PENDING) from None
        return refund.id
