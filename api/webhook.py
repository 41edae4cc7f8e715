"""Upsampler's webhook: checked, then handed to the job's workflow as a signal.

The signal is only a hint; the workflow asks Upsampler's status endpoint before it acts,
so a replayed or late webhook changes nothing.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, Request
from temporalio.service import RPCError, RPCStatusCode

from api import deps
from api.errors import ApiError
from smi import signing
from smi.upsampler import UpsamplerJob
from workflows.types import WebhookHint
from workflows.upscale import UpscaleWorkflow

router = APIRouter(tags=["upsampler"])
log = logging.getLogger("smi.api.webhook")

MAX_BODY = 1024 * 1024


@router.post("/smi-webhook/upsampler/", summary="Upsampler's completion webhook",
             dependencies=[Depends(deps.public_rate_limit)])
async def upsampler_webhook(request: Request, job: str | None = None, sig: str | None = None,
                            svc: deps.Services = Depends(deps.services)):
    if not job or not signing.verify(svc.settings.webhook_secrets(), job, sig):
        raise ApiError(401, "bad_signature", "the webhook URL's signature does not match")
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, "too_large", "webhook bodies are limited to 1 MB")
    body = b""
    async for chunk in request.stream():  # capped while reading, whatever Content-Length claimed
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, "too_large", "webhook bodies are limited to 1 MB")
    try:
        update = UpsamplerJob.from_wire(json.loads(body))
    except ValueError as exc:  # JSONDecodeError is a ValueError too
        raise ApiError(400, "malformed_webhook", f"the body is not an Upsampler status: {exc}") from None
    handle = (await svc.temporal_client()).get_workflow_handle(f"upscale-{job}")
    try:
        await handle.signal(UpscaleWorkflow.upsampler_webhook, WebhookHint(update.id, update.status))
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise ApiError(503, "temporal_unavailable", "the workflow service is not reachable; try again") from None
        log.info("webhook for job %s ignored: its workflow is not running", job)
        return {"received": True, "delivered": False}
    return {"received": True, "delivered": True}
