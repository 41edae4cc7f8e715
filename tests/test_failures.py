"""Each row of the failure table, driven by the emulator's faults through the real API and worker
on the dev server (webhooks drive the waits, so nothing here waits long)."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta

import httpx
from PIL import Image

from activities.upsampler import as_application_error
from smi.upsampler import UpsamplerRateLimited, failure_kind
from tests.conftest import png_bytes
from tests.helpers import ledger_rows, mail_rows, order, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

END = {"completed", "failed", "manual_review"}


def noisy_png(width: int, height: int) -> bytes:
    """Noise compresses badly: a PNG several times larger than its JPEG copies."""
    return png_bytes(width, height)


async def run(stack, env, order_id: str, image: bytes | None = None, **overrides) -> tuple[httpx.Client, str, dict]:
    client = stack.client()
    image_url = stack.shop.publish(image or png_bytes(40, 30))
    reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(image_url, order_id, **overrides))
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    job = await wait_for_status(client, job_id, END, timeout=60)
    if job["status"] != "manual_review":  # let the workflow finish its emails and clean-up
        await env.client.get_workflow_handle(f"upscale-{job_id}").result()
    return client, job_id, client.get(f"/v1/jobs/{job_id}").json()


def emulator_jobs(stack) -> list[dict]:
    return httpx.get(f"{stack.emulator.url}/_emulator/jobs").json()


def subjects(mailbox, count: int) -> list[tuple[str, str]]:
    return sorted((m["To"], m["Subject"]) for m in mailbox.wait_for(count))


async def test_unreadable_original_is_refunded_with_emails(dev_env, stack_factory, faults):
    stack = stack_factory(dev_env)
    truncated = png_bytes(80, 60)[:-300]  # the header reads fine; the pixels do not
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-truncated", truncated)
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_format"
    assert job["refund"] == {"status": "owed", "amount_cents": 1299, "reason": "unsupported_format"}
    mails = subjects(stack.mailbox, 2)
    assert mails[0][0] == "admin@localhost" and "Refund owed" in mails[0][1]
    assert mails[1] == ("ana@example.com", "We could not upscale your image (order f-truncated)")
    customer = next(m for m in stack.mailbox.messages if m["To"] == "ana@example.com")
    assert "12.99 USD" in customer.get_body(preferencelist=("plain",)).get_content()
    assert emulator_jobs(stack) == []  # nothing was sent to Upsampler, nothing spent
    assert ledger_rows(stack.settings.database_url, job_id) == []
    assert not list((stack.settings.storage_dir / "jobs" / job_id).glob("original.*"))


async def test_upsampler_refusing_the_format_is_refunded(dev_env, stack_factory, faults):
    faults(refuse_with="unsupported image format")
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-format")
    assert job["status"] == "failed" and job["error"]["code"] == "unsupported_format"
    assert job["refund"]["status"] == "owed"
    assert len(emulator_jobs(stack)) == 1  # no resubmission for a format Upsampler will never take
    assert len(mail_rows(stack.settings.database_url, job_id)) == 2


async def test_too_large_for_upsampler_is_compressed_and_resubmitted(dev_env, stack_factory, faults):
    image = noisy_png(240, 160)
    faults(max_input_bytes=len(image) // 2, delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        client, job_id, job = await run(stack, dev_env, "f-compress", image, scale_factor=2)
    assert job["status"] == "completed", job
    submitted = emulator_jobs(stack)
    assert [j["status"] for j in submitted] == ["FAILED", "SUCCESS"]
    assert f"/files/originals/{job_id}-q85?" in submitted[1]["imageUrl"]  # the compressed copy
    assert job["output"]["width"] == 480 and job["output"]["height"] == 320  # same pixel size as asked
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1  # a refused submission costs nothing
    compressed = stack.settings.storage_dir / "jobs" / job_id / "compressed_q85.jpg"
    assert Image.open(compressed).size == (240, 160)


async def test_original_over_the_input_limit_is_compressed_before_submitting(dev_env, stack_factory, faults):
    image = noisy_png(240, 160)
    stack = stack_factory(dev_env, upsampler_max_input_bytes=len(image) // 2)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-precompress", image, scale_factor=2)
    assert job["status"] == "completed"
    submitted = emulator_jobs(stack)
    assert len(submitted) == 1 and f"{job_id}-q85" in submitted[0]["imageUrl"]


async def test_too_large_even_compressed_is_refunded_after_bounded_tries(dev_env, stack_factory, faults):
    faults(max_input_bytes=500)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-huge", noisy_png(200, 150))
    assert job["status"] == "failed" and job["error"]["code"] == "too_large"
    assert job["refund"]["status"] == "owed"
    assert len(emulator_jobs(stack)) == 4  # the original, then three compression steps (85, 70, 55)
    assert {j["status"] for j in emulator_jobs(stack)} == {"FAILED"}


async def test_output_over_the_pixel_limit_is_refused_before_payment(dev_env, stack_factory):
    stack = stack_factory(dev_env)
    client = stack.client()
    big = stack.shop.publish(png_bytes(2000, 1600))
    quote = client.post("/v1/quotes", json={"image_url": big, "scale_factor": 5}).json()
    assert quote["accepted"] is False and quote["max_scale_factor"] == 3
    assert "50,000,000" in quote["reason"]
    by_size = client.post("/v1/quotes", json={"width": 2000, "height": 1600, "scale_factor": 3}).json()
    assert by_size["accepted"] is True and by_size["output"] == {"width": 6000, "height": 4800, "megapixels": 28.8}
    assert by_size["credits"] == 7.2 and by_size["cost_usd"] == 0.288

    refused = client.post("/v1/jobs", json=order(big, "f-pixels", scale_factor=5))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "output_too_large"
    assert refused.json()["error"]["details"] == {"max_scale_factor": 3}
    svg = stack.shop.publish(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>' + b" " * 70000)
    not_image = client.post("/v1/jobs", json=order(svg, "f-svg"))
    assert not_image.status_code == 422 and not_image.json()["error"]["code"] == "unsupported_format"
    missing = client.post("/v1/jobs", json=order(f"{stack.shop.url}/img/nothing-here", "f-404"))
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "image_unreachable"
    assert client.get("/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"}).json()["jobs"] == []


async def test_upsampler_failure_is_resubmitted_once(dev_env, stack_factory, faults):
    faults(fail_with="model crashed", faulty_jobs=1, delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-failed-once")
    assert job["status"] == "completed"
    assert [j["status"] for j in emulator_jobs(stack)] == ["FAILED", "SUCCESS"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1


async def test_upsampler_failing_twice_goes_to_manual_review(dev_env, stack_factory, faults):
    faults(fail_with="model crashed", delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-failed-twice")
        handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        for _ in range(100):  # the admin notice goes out first, then the wait begins
            state = await handle.query(UpscaleWorkflow.state)
            if state.awaiting_decision:
                break
            await asyncio.sleep(0.05)
    assert job["status"] == "manual_review" and job["error"]["code"] == "upsampler_failed"
    assert "model crashed" in job["error"]["message"]
    assert state.awaiting_decision and state.attempt == 2
    assert len(emulator_jobs(stack)) == 2
    assert subjects(stack.mailbox, 1)[0][0] == "admin@localhost"


async def test_invalid_results_are_resubmitted_once_then_reviewed(dev_env, stack_factory, faults):
    for fault in ("wrong_size", "truncated", "corrupt"):
        faults(result=fault, faulty_jobs=1, delay_seconds=0.1)
        stack = stack_factory(dev_env)
        async with create_worker(dev_env.client, stack.settings):
            _, job_id, job = await run(stack, dev_env, f"f-{fault}-once")
        assert job["status"] == "completed", (fault, job)
        assert len(emulator_jobs(stack)) == 2
        assert len(ledger_rows(stack.settings.database_url, job_id)) == 2, fault  # both results were paid for
        assert job["cost"]["credits"] == 2.0
        httpx.post(f"{stack.emulator.url}/_emulator/reset")

    faults(result="truncated", delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-truncated-always")
    assert job["status"] == "manual_review" and job["error"]["code"] == "invalid_result"
    assert len(emulator_jobs(stack)) == 2


async def test_expired_result_link_is_refreshed_from_the_status_endpoint(dev_env, stack_factory, faults):
    faults(cdn_errors=[403], delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-expired-once")
    assert job["status"] == "completed"
    assert len(emulator_jobs(stack)) == 1  # a fresh URL, no second Upsampler job


async def test_result_link_expiring_again_is_resubmitted(dev_env, stack_factory, faults):
    faults(result_url_ttl_seconds=0.000001, faulty_jobs=1, delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-expired-always")
    assert job["status"] == "completed"
    assert len(emulator_jobs(stack)) == 2


async def test_rate_limits_and_server_errors_are_retried(dev_env, stack_factory, faults):
    faults(submit_errors=[429, 503], status_errors=[502], retry_after_seconds=1, delay_seconds=0.1)
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        _, job_id, job = await run(stack, dev_env, "f-429")
    assert job["status"] == "completed"
    assert httpx.get(f"{stack.emulator.url}/_emulator/requests").json()["submit"] == 3
    assert len(emulator_jobs(stack)) == 1


def test_retry_after_becomes_the_activity_retry_delay():
    error = as_application_error(UpsamplerRateLimited("slow down", retry_after=7))
    assert error.type == "rate_limited" and not error.non_retryable
    assert error.next_retry_delay == timedelta(seconds=7)


def test_upsampler_failure_texts_are_sorted_into_kinds():
    assert failure_kind("input image too large: 9 bytes") == "too_large"
    assert failure_kind("Unsupported image format") == "unsupported_format"
    assert failure_kind("model crashed") == "upsampler_failed"
    assert failure_kind(None) == "upsampler_failed"


def test_compressed_copy_keeps_the_pixel_size(tmp_path):
    from smi import imaging

    source = tmp_path / "in.png"
    source.write_bytes(noisy_png(120, 90))
    imaging.convert(source, tmp_path / "out", "jpg", quality=55)
    out = Image.open(io.BytesIO((tmp_path / "out").read_bytes()))
    assert out.format == "JPEG" and out.size == (120, 90)
    assert (tmp_path / "out").stat().st_size < source.stat().st_size
