"""The job as `GET /v1/jobs/{job_id}` shows it, as plain JSON: the API answers with it (api/service.py
validates it into its JobView model) and the job events to the shop carry it (activities/shop_events.py)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from smi import signing
from smi.db import DownloadToken, Job, Refund, as_utc
from smi.settings import Settings
from smi.vocabulary import JobStatus


def status_page_url(cfg: Settings, job_id: str) -> str:
    """The customer's status page (no API key needed: the link carries a view token)."""
    return signing.status_page_url(cfg.public_base_url, cfg.secret("webhook_secret"), job_id)


def iso(value) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value else None


def live_download_url(session: Session, cfg: Settings, job: Job) -> str | None:
    """The job's current link; after a secret rotation it may have been derived from the previous secret."""
    for secret in cfg.webhook_secrets():
        token = signing.download_token(secret, job.job_id, job.download_generation)
        if session.get(DownloadToken, signing.token_sha256(token)) is not None:
            return f"{cfg.public_base_url.rstrip('/')}/downloads/{token}"
    return None


def job_json(job: Job, cfg: Settings, session: Session, refund: Refund | None = None) -> dict[str, Any]:
    completed = job.status == JobStatus.COMPLETED and job.download_generation > 0
    return {
        "job_id": job.job_id,
        "order_id": job.order_id,
        "status": job.status,
        "status_page_url": status_page_url(cfg, job.job_id),
        "scale_factor": job.scale_factor,
        "format": job.format,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "estimated_completion": iso(job.estimated_completion),
        "input": {"width": job.input_width, "height": job.input_height} if job.input_width else None,
        "output": (
            {
                "width": job.output_width,
                "height": job.output_height,
                "bytes": job.output_bytes,
                "format": job.output_format,
                "sha256": job.output_sha256,
            }
            if job.output_sha256
            else None
        ),
        "download_url": live_download_url(session, cfg, job) if completed else None,
        "download_expires_at": iso(job.download_expires_at) if completed else None,
        "cost": {"credits": job.cost_credits, "usd": job.cost_usd} if job.cost_credits is not None else None,
        "refund": {"status": refund.status, "amount_cents": refund.amount_cents, "reason": refund.reason}
        if refund
        else None,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
    }
