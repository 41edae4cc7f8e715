"""End to end on the Temporal dev server: storefront -> API -> worker -> emulator -> webhook
through the API -> email on a real SMTP server -> the link downloads the right bytes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from datetime import timedelta

import httpx
from PIL import Image
from sqlmodel import Session, create_engine, select

from smi import signing
from smi.db import DownloadToken, Job, utcnow
from smi.mailsink import text_of
from tests.conftest import WEBHOOK_SECRET, png_bytes
from tests.helpers import ledger_rows, mail_rows, order, wait_for_status
from worker import create_worker


def jobs_in_db(database_url: str) -> list[Job]:
    engine = create_engine(database_url)
    with Session(engine) as session:
        found = list(session.exec(select(Job)).all())
    engine.dispose()
    return found


async def test_paid_order_end_to_end(dev_env, stack_factory, faults):
    faults(delay_seconds=0.3)
    stack = stack_factory(dev_env, metrics_token="e2e-metrics-token")
    image_url = stack.shop.publish(png_bytes(120, 80))
    body = order(image_url, "wc-1042", scale_factor=4)
    client = stack.client()

    async with create_worker(dev_env.client, stack.settings):
        created = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        assert created.json()["status_url"].endswith(f"/v1/jobs/{job_id}")

        again = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
        assert again.status_code == 200 and again.json()["job_id"] == job_id

        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=90)
        assert job["status"] == "completed", job
        messages = await asyncio.to_thread(stack.mailbox.wait_for, 1)
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()  # through its clean-up

        # The same order once more after completion: still one job, nothing new started.
        late = await asyncio.to_thread(client.post, "/v1/jobs", json=body)
        assert late.status_code == 200 and late.json()["job_id"] == job_id

        # Admins filter by the UpscaleStatus search attribute in the UI; the same query here.
        listed = [
            w.id
            async for w in dev_env.client.list_workflows(f'UpscaleStatus="completed" AND WorkflowId="upscale-{job_id}"')
        ]
        assert listed == [f"upscale-{job_id}"]

    # The email: to the customer, with the link and the support address.
    assert len(messages) == 1
    mail = messages[0]
    assert mail["To"] == "ana@example.com"
    text = text_of(mail)
    link = re.search(r"http://\S+/downloads/[0-9a-f]{64}", text).group(0)
    assert link == job["download_url"]
    assert "help@shop.test" in text and "480×320" in text
    assert mail.get_body(preferencelist=("html",)) is not None

    # The link downloads exactly input x scale, with the recorded hash.
    download = httpx.get(link)
    assert download.status_code == 200
    assert download.headers["content-disposition"].startswith("attachment")
    assert download.headers["accept-ranges"] == "bytes"
    assert Image.open(io.BytesIO(download.content)).size == (480, 320)
    assert hashlib.sha256(download.content).hexdigest() == job["output"]["sha256"]
    assert job["output"] == {
        "width": 480,
        "height": 320,
        "bytes": len(download.content),
        "format": "png",
        "sha256": job["output"]["sha256"],
    }
    assert job["input"] == {"width": 120, "height": 80}
    assert job["cost"]["credits"] == 1.0 and job["cost"]["usd"] == 0.04

    # A Range request gets the right slice; HEAD gets the headers alone.
    part = httpx.get(link, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == download.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(download.content)}"
    head = httpx.head(link)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(download.content)

    # One job, one email, one ledger row, whatever the retries.
    assert [j.order_id for j in jobs_in_db(stack.settings.database_url)] == ["wc-1042"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
    # The workflow has ended (its result awaited above): no mail can follow the one counted here.
    assert len(stack.mailbox.messages) == 1

    # Operators see it in the metrics.
    scraped = httpx.get(f"{stack.api.url}/metrics", headers={"Authorization": "Bearer e2e-metrics-token"})
    assert scraped.headers["content-type"].startswith("text/plain")
    lines = scraped.text.splitlines()
    assert 'smi_db_jobs{status="completed"} 1.0' in lines and "smi_db_credits_spent_total 1.0" in lines
    assert 'smi_db_upsampler_requests_total{kind="submit",outcome="ok"} 1.0' in lines
    assert "# TYPE smi_db_upsampler_requests_total counter" in lines

    # The file is stored where the contract says.
    assert (stack.settings.storage_dir / "jobs" / job_id / "upscaled_480x320.png").is_file()
    assert not (stack.settings.storage_dir / "jobs" / job_id / "tmp").exists()


async def test_converted_format_and_webhook_checks(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2, webhook="duplicate")
    stack = stack_factory(dev_env)
    body = order(stack.shop.publish(png_bytes(50, 40)), "wc-webp", scale_factor=2, format="webp")
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        job_id = client.post("/v1/jobs", json=body).json()["job_id"]
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=90)
        assert job["status"] == "completed", job
        await asyncio.to_thread(stack.mailbox.wait_for, 1)

        hook = signing.webhook_url(stack.settings.public_base_url, WEBHOOK_SECRET, job_id)
        status_body = {"id": "forged", "status": "SUCCESS", "imageUrl": "http://127.0.0.1:9/evil.png"}
        forged = httpx.post(hook.replace(hook.split("sig=")[1], "0" * 64), json=status_body)
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "bad_signature"
        unsigned = httpx.post(f"{stack.api.url}/smi-webhook/upsampler/?job={job_id}", json=status_body)
        assert unsigned.status_code == 401
        other_job = httpx.post(hook.replace(job_id, "f" * 32), json=status_body)
        assert other_job.status_code == 401
        malformed = httpx.post(hook, content=b"{not json")
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_webhook"
        wrong_shape = httpx.post(hook, json={"status": "DONE"})
        assert wrong_shape.status_code == 400

    download = httpx.get(job["download_url"])
    image = Image.open(io.BytesIO(download.content))
    assert (image.format, image.size) == ("WEBP", (100, 80))
    assert job["output"]["format"] == "webp"
    assert (stack.settings.storage_dir / "jobs" / job_id / "upscaled_100x80.webp").is_file()
    assert len(stack.mailbox.messages) == 1  # the duplicate webhook sent no second mail
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1


async def test_bad_requests_change_nothing(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    client = stack.client()
    good = order(stack.shop.publish(png_bytes()), "wc-good")

    cases = {
        "scale 1": dict(scale_factor=1),
        "scale 17": dict(scale_factor=17),
        "scale 2.5": dict(scale_factor=2.5),
        "order id": dict(order_id="has space"),
        "format": dict(format="gif"),
        "email": dict(customer_email="not-an-address"),
        "url": dict(image_url="ftp://shop.example/img.jpg"),
        "currency": dict(currency="usd"),
        "unknown field": dict(coupon="FREE"),
    }
    for name, change in cases.items():
        reply = client.post("/v1/jobs", json={**good, **change})
        assert reply.status_code == 422, name
        error = reply.json()["error"]
        assert error["code"] == "invalid_request" and error["message"], name
        assert "not-an-address" not in reply.text  # the submitted value is not echoed back
    missing = client.post("/v1/jobs", json={k: v for k, v in good.items() if k != "image_url"})
    assert missing.status_code == 422 and "image_url" in missing.json()["error"]["message"]

    assert httpx.post(f"{stack.api.url}/v1/jobs", json=good).status_code == 401
    assert stack.client("wrong-key").post("/v1/jobs", json=good).status_code == 401
    assert jobs_in_db(stack.settings.database_url) == []
    assert [w async for w in dev_env.client.list_workflows(f'TaskQueue="{stack.settings.task_queue}"')] == []

    # A different body for a known order is a conflict and changes nothing.
    first = client.post("/v1/jobs", json=good)
    assert first.status_code == 202
    conflict = client.post("/v1/jobs", json={**good, "scale_factor": 8})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "order_conflict"
    assert [j.scale_factor for j in jobs_in_db(stack.settings.database_url)] == [4]
    assert client.get(f"/v1/jobs/{'0' * 32}").status_code == 404
    assert client.get("/v1/jobs/..%2F..%2Fetc").status_code == 404


async def test_download_links_expire_and_unknown_tokens_are_404(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    engine = create_engine(stack.settings.database_url)
    token = signing.download_token(WEBHOOK_SECRET, "a" * 32, 1)
    with Session(engine) as session:
        session.add(
            DownloadToken(
                token_sha256=signing.token_sha256(token),
                job_id="a" * 32,
                purpose="run:1",
                generation=1,
                expires_at=utcnow() - timedelta(minutes=1),
                created_at=utcnow(),
            )
        )
        session.commit()
    engine.dispose()

    expired = httpx.get(f"{stack.api.url}/downloads/{token}")
    assert expired.status_code == 410 and expired.json()["error"]["code"] == "link_expired"
    assert "expired" in expired.json()["error"]["message"]
    assert httpx.get(f"{stack.api.url}/downloads/{'b' * 64}").status_code == 404
    assert httpx.get(f"{stack.api.url}/downloads/not-a-token").status_code == 404
    assert httpx.get(f"{stack.api.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.api.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "storage": "ok", "temporal": "ok"}
    assert "/v1/jobs" in httpx.get(f"{stack.api.url}/openapi.json").json()["paths"]
