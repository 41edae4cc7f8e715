"""Database side effects: the job's business record, its cost, its download tokens.

Each write is keyed by job and purpose, so running an activity again changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity

from smi import signing
from smi.db import DownloadToken, Job, LedgerEntry, as_utc, utcnow
from smi.settings import Settings
from workflows.types import CostRecord, DownloadLink, JobUpdate, TokenRequest


class LedgerActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    @activity.defn
    def update_job(self, update: JobUpdate) -> None:
        with Session(self.engine) as session:
            job = session.get(Job, update.job_id)
            if job is None:
                raise ValueError(f"job {update.job_id} has no record")
            job.status = update.status
            job.updated_at = utcnow()
            if update.estimated_completion is not None:
                job.estimated_completion = update.estimated_completion
            if update.input is not None:
                job.input_width, job.input_height = update.input.width, update.input.height
            if update.output is not None:
                out = update.output
                job.output_width, job.output_height = out.width, out.height
                job.output_bytes, job.output_format, job.output_sha256 = out.bytes, out.format, out.sha256
                job.result_path = out.path
            if update.upsampler_id is not None:
                job.upsampler_id = update.upsampler_id
            if update.download is not None:
                job.download_generation = update.download.generation
                job.download_expires_at = update.download.expires_at
            if update.error_code is not None:  # "" clears the error
                job.error_code, job.error_message = update.error_code or None, update.error_message or None
            session.add(job)
            session.commit()

    @activity.defn
    def record_cost(self, record: CostRecord) -> float:
        """Book what Upsampler charged for one submission, once; the job's cost becomes the sum of its rows."""
        with Session(self.engine) as session:
            session.add(LedgerEntry(job_id=record.job_id, purpose=f"upscale:{record.upsampler_id}",
                                    credits=record.credits, usd=round(record.credits * record.credit_price_usd, 6),
                                    created_at=utcnow()))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # booked by an earlier run of this activity
            entries = session.exec(select(LedgerEntry).where(LedgerEntry.job_id == record.job_id)).all()
            job = session.get(Job, record.job_id)
            job.cost_credits = round(sum(entry.credits for entry in entries), 6)
            job.cost_usd = round(sum(entry.usd for entry in entries), 6)
            session.add(job)
            session.commit()
            return job.cost_usd

    @activity.defn
    def issue_download_token(self, request: TokenRequest) -> DownloadLink:
        """The download link for this purpose, made once; every older link of the job stops working."""
        with Session(self.engine) as session:
            row = session.exec(select(DownloadToken).where(
                DownloadToken.job_id == request.job_id, DownloadToken.purpose == request.purpose)).first()
            if row is None:
                generations = session.exec(select(DownloadToken.generation).where(
                    DownloadToken.job_id == request.job_id)).all()
                generation = max(generations, default=0) + 1
                token = signing.download_token(self.settings.secret("webhook_secret"), request.job_id, generation)
                now = utcnow()
                row = DownloadToken(token_sha256=signing.token_sha256(token), job_id=request.job_id,
                                    purpose=request.purpose, generation=generation,
                                    expires_at=now + timedelta(hours=request.ttl_hours), created_at=now)
                session.add(row)
            for old in session.exec(select(DownloadToken).where(
                    DownloadToken.job_id == request.job_id, DownloadToken.generation < row.generation)).all():
                old.revoked = True
                session.add(old)
            session.commit()
            session.refresh(row)
            return DownloadLink(row.generation, as_utc(row.expires_at))
