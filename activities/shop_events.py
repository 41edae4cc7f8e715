"""Job events to the shop: the event's body, built once from the job's record, and its signed POST.

The body is the event as the shop receives it:

    {"id": "evt-<job>-r1-completed", "type": "job.completed", "created": 1764600000,
     "created_at": "2026-12-01T18:00:00+00:00", "data": {"job": <the job as GET /v1/jobs/{id} shows it>, ...}}

signed per attempt (smi/shop_webhooks.py: `SMI-Signature: t=<now>,v1=<HMAC of "t.body">`). Neither the
secret, the customer's address nor the shop's URL (it may carry a token) is ever logged.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from smi import fetch, shop_webhooks
from smi.db import Job, Refund
from smi.jobview import job_json
from smi.settings import Settings
from smi.vocabulary import ShopDelivery, ShopEvent, ShopEventType

# The shop's URL fails the fetch guard (a private address not allow-listed, a port not allowed): retrying
# cannot help, the admin is told at once.
SHOP_URL_REFUSED = "shop_url_refused"
DELIVERY_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
USER_AGENT = "smi-upscale-events/1"


class ShopEventActivities:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    @activity.defn
    def build_event(self, event: ShopEvent) -> str:
        """The event's JSON body: the job as it is now (right after the outcome was recorded)."""
        with Session(self.engine) as session:
            job = session.get(Job, event.job_id)
            if job is None:
                raise ApplicationError(f"job {event.job_id} has no record", non_retryable=True)
            refund = session.get(Refund, job.job_id)
            view = job_json(job, self.settings, session, refund)
        data: dict[str, Any] = {"job": view}
        if event.type == ShopEventType.COMPLETED:
            data |= {"download_url": view["download_url"], "download_expires_at": view["download_expires_at"]}
        elif event.type in (ShopEventType.FAILED, ShopEventType.MANUAL_REVIEW):
            data["reason"] = view["error"]
        if event.type in (ShopEventType.FAILED, ShopEventType.REFUNDED):
            data["refund"] = view["refund"]
        created = datetime.fromisoformat(event.created)
        body = {
            "id": event.event_id,
            "type": event.type,
            "created": int(created.timestamp()),
            "created_at": created.isoformat(),
            "data": data,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @activity.defn
    async def deliver(self, delivery: ShopDelivery) -> int:
        """POST the body, signed now, to the checked address of the shop's URL; the status on 2xx. Anything
        else raises, and the workflow's retry policy tries again later. 0 when the URL was unset since."""
        url = self.settings.storefront_webhook_url
        if not url:
            activity.logger.warning("event %s not sent: SMI_STOREFRONT_WEBHOOK_URL is no longer set", delivery.event_id)
            return 0
        try:
            target, address = await fetch.check(url, self.settings.image_fetch_policy)
        except fetch.FetchRefused as refused:
            raise ApplicationError(
                f"the shop's URL is refused: {refused}", type=SHOP_URL_REFUSED, non_retryable=True
            ) from None
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            shop_webhooks.HEADER: shop_webhooks.sign(body, self.settings.storefront_webhook_secrets()),
        }
        extensions = {}
        if address is not None:  # connect to the address checked, speak to the host by name (smi/fetch.py)
            headers["Host"] = target.netloc.decode()
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            target = target.copy_with(host=address)
        attempt = activity.info().attempt
        try:
            async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT, follow_redirects=False) as client:
                request = client.build_request("POST", target, content=body, headers=headers, extensions=extensions)
                response = await client.send(request)
        except httpx.HTTPError as exc:
            activity.logger.info("event %s attempt %d: %s", delivery.event_id, attempt, type(exc).__name__)
            raise ApplicationError(f"the shop could not be reached: {type(exc).__name__}") from None
        if not response.is_success:
            activity.logger.info(
                "event %s attempt %d: the shop answered %d", delivery.event_id, attempt, response.status_code
            )
            raise ApplicationError(f"the shop answered {response.status_code}")
        activity.logger.info("event %s delivered on attempt %d (%d)", delivery.event_id, attempt, response.status_code)
        return response.status_code
