"""Mail side effects: the customer's emails, each sent once per job and purpose."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity

from smi import mail, signing
from smi.db import Job, SentMail, as_utc, utcnow
from smi.settings import Settings
from workflows.types import EmailRequest


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} bytes"


def download_url(settings: Settings, job_id: str, generation: int) -> str:
    token = signing.download_token(settings.secret("webhook_secret"), job_id, generation)
    return f"{settings.public_base_url.rstrip('/')}/downloads/{token}"


class NotifyActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    @activity.defn
    async def send_email(self, request: EmailRequest) -> bool:
        """Send the customer the `kind` email; False when an earlier run already sent it."""
        purpose = f"{request.kind}:{request.generation}"
        message_id = f"<{request.job_id}.{request.kind}.{request.generation}@{self.settings.public_host.split(':')[0]}>"
        with Session(self.engine) as session:
            job = session.get(Job, request.job_id)
            if job is None:
                raise ValueError(f"job {request.job_id} has no record")
            sent = session.exec(select(SentMail).where(SentMail.job_id == job.job_id, SentMail.purpose == purpose)).first()
            if sent is not None and sent.status == "sent":
                return False
            if sent is None:
                session.add(SentMail(job_id=job.job_id, purpose=purpose, message_id=message_id, created_at=utcnow()))
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
            expires = as_utc(job.download_expires_at)
            message = mail.build_message(
                self.settings,
                to=job.customer_email,
                kind=request.kind,
                message_id=message_id,
                name=job.customer_name,
                order_id=job.order_id,
                scale_factor=job.scale_factor,
                width=job.output_width,
                height=job.output_height,
                format=job.output_format or "",
                size=human_size(job.output_bytes or 0),
                download_url=download_url(self.settings, job.job_id, request.generation),
                expires_at=expires.strftime("%Y-%m-%d %H:%M") if expires else "",
            )
        await mail.send(self.settings, message)
        with Session(self.engine) as session:
            row = session.exec(select(SentMail).where(SentMail.job_id == request.job_id, SentMail.purpose == purpose)).one()
            row.status, row.sent_at = "sent", utcnow()
            session.add(row)
            session.commit()
        return True
