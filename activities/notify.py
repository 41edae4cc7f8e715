"""Mail side effects: the customer's and the admin's emails, each sent once per job and purpose."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity

from smi import mail, signing
from smi.db import Job, Refund, SentMail, as_utc, utcnow
from smi.settings import Settings
from smi.vocabulary import BudgetAlertInfo, EmailRequest, ErrorCode

# What the customer is told, by error kind (ErrorCode keys, found by the job's stored code, a plain str);
# technical detail stays in the admin's notice.
CUSTOMER_REASONS: dict[str, str] = {
    ErrorCode.UNSUPPORTED_FORMAT: "the file is not an image we can process (we take PNG, JPEG and WebP)",
    ErrorCode.TOO_LARGE: "the image is too large for the upscaler, even after compressing it",
    ErrorCode.FETCH_FAILED: "we could not download the image from the shop",
    ErrorCode.ADMIN_REFUND: "our team cancelled it",
}
DEFAULT_REASON = "the upscaler could not complete the job"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def download_url(settings: Settings, job_id: str, generation: int) -> str:
    token = signing.download_token(settings.secret("webhook_secret"), job_id, generation)
    return f"{settings.public_base_url.rstrip('/')}/downloads/{token}"


def money(cents: int, currency: str) -> str:
    return f"{cents / 100:.2f} {currency}"


class NotifyActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    def _context(self, session: Session, job: Job, request: EmailRequest) -> dict:
        refund = session.get(Refund, job.job_id)
        expires = as_utc(job.download_expires_at)
        return dict(
            job_id=job.job_id,
            name=job.customer_name,
            order_id=job.order_id,
            status=job.status,
            scale_factor=job.scale_factor,
            width=job.output_width,
            height=job.output_height,
            format=job.output_format or "",
            size=human_size(job.output_bytes or 0),
            download_url=download_url(self.settings, job.job_id, request.generation) if request.generation else "",
            expires_at=expires.strftime("%Y-%m-%d %H:%M") if expires else "",
            reason=CUSTOMER_REASONS.get(job.error_code or "", DEFAULT_REASON),
            error_code=job.error_code,
            error_message=job.error_message,
            refund_status=refund.status if refund else None,
            refund_amount=money(refund.amount_cents, refund.currency) if refund else "",
            note=request.note,
        )

    @activity.defn
    async def send_budget_alert(self, alert: BudgetAlertInfo) -> bool:
        """The admin's budget email, once per period and threshold."""
        return await self.send_once(
            "budget",
            alert.key,
            self.settings.admin_email,
            "budget_alert",
            period=alert.period,
            threshold=alert.threshold,
            spent=f"{alert.spent_usd:.2f}",
            budget=f"{alert.budget_usd:.2f}",
        )

    async def send_once(self, job_id: str, purpose: str, to: str, kind: str, /, **context) -> bool:
        """Send unless a SentMail row says it went; the row is `sending` before and `sent` after."""
        host = self.settings.public_host.split(":")[0]
        message_id = f"<{job_id}.{purpose.replace(':', '.')}@{host}>"
        with Session(self.engine) as session:
            sent = session.exec(select(SentMail).where(SentMail.job_id == job_id, SentMail.purpose == purpose)).first()
            if sent is not None and sent.status == "sent":
                return False
            if sent is None:
                session.add(SentMail(job_id=job_id, purpose=purpose, message_id=message_id, created_at=utcnow()))
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
        message = mail.build_message(self.settings, to=to, kind=kind, message_id=message_id, **context)
        await mail.send(self.settings, message)
        with Session(self.engine) as session:
            row = session.exec(select(SentMail).where(SentMail.job_id == job_id, SentMail.purpose == purpose)).one()
            row.status, row.sent_at = "sent", utcnow()
            session.add(row)
            session.commit()
        return True

    @activity.defn
    async def send_email(self, request: EmailRequest) -> bool:
        """Send the `kind` email once per purpose; False when an earlier run already sent it."""
        with Session(self.engine) as session:
            job = session.get(Job, request.job_id)
            if job is None:
                raise ValueError(f"job {request.job_id} has no record")
            to = self.settings.admin_email if request.kind.startswith("admin_") else job.customer_email
            context = self._context(session, job, request)
        purpose = request.purpose or f"{request.kind}:{request.generation}"
        sent = await self.send_once(request.job_id, purpose, to, request.kind, **context)
        # Never the address: the job_id on the line says whose it was.
        activity.logger.info("%s email %s", purpose, "sent" if sent else "was sent before")
        return sent
