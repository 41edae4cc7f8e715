"""UpscaleWorkflow on the time-skipping server, with the real API, worker, emulator and SMTP server.

The test server locks time skipping for each workflow a plain client (here: the API)
starts; `let_time_skip` releases that lock. Until then timers run in real time, which
lets a webhook win the race against the first poll.
"""

from __future__ import annotations

import asyncio

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.api.testservice.v1 import UnlockTimeSkippingRequest

from tests.conftest import UPSAMPLER_KEY, png_bytes
from tests.helpers import event_count, ledger_rows, mail_rows, order, timer_seconds, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow


async def let_time_skip(env) -> None:
    await env.client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())


async def start(stack, order_id: str, **overrides):
    image_url = stack.shop.publish(png_bytes(64, 48))
    client = stack.client()
    reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(image_url, order_id, **overrides))
    assert reply.status_code == 202, reply.text
    return client, reply.json()["job_id"]


async def test_webhook_ends_the_wait_without_polling(time_skipping_env, stack_factory, faults):
    faults(delay_seconds=0.3)
    stack = stack_factory(time_skipping_env)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "wf-webhook")
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"})
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        await let_time_skip(time_skipping_env)
        state = await handle.result()

    assert job["status"] == "completed"
    assert state.polls == 1 and state.webhooks >= 1  # one status call, to confirm the webhook
    assert await timer_seconds(handle) == [30.0]  # the first poll's timer, cancelled by the webhook
    assert job["output"]["width"] == 256 and job["output"]["height"] == 192
    assert len(stack.mailbox.wait_for(1)) == 1


async def test_a_webhook_before_the_submit_reply_is_kept(time_skipping_env, stack_factory, faults):
    """Upsampler finishes and calls the webhook while its reply to our submit is still on the way."""
    faults(delay_seconds=0, submit_reply_delay_seconds=1.0)
    stack = stack_factory(time_skipping_env)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "wf-early-webhook")
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"})
        await let_time_skip(time_skipping_env)
        state = await handle.result()

    assert job["status"] == "completed" and state.webhooks >= 1
    assert state.polls == 1  # the status call that confirms the webhook
    # Kept, the webhook ended the wait at once: no poll timer fired (before, it waited 30 s for one).
    assert await event_count(handle, EventType.EVENT_TYPE_TIMER_FIRED) == 0


async def test_without_webhook_polls_at_30s_then_backs_off(time_skipping_env, stack_factory, faults):
    faults(webhook="drop", polls_until_done=3)
    stack = stack_factory(time_skipping_env)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "wf-poll")
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        await let_time_skip(time_skipping_env)
        state = await handle.result()

    assert state.status == "completed"
    assert state.polls == 3
    assert await timer_seconds(handle) == [30.0, 60.0, 120.0]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["download_url"]
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1


async def test_no_result_in_15_minutes_goes_to_manual_review(time_skipping_env, stack_factory, faults):
    faults(webhook="drop", never_finish=True)
    stack = stack_factory(time_skipping_env)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "wf-timeout")
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        # Skip 16 minutes of workflow time (only while nothing runs); the job then waits for an admin.
        await time_skipping_env.sleep(16 * 60)
        state = await handle.query(UpscaleWorkflow.state)
        timers = await timer_seconds(handle)
        job = client.get(f"/v1/jobs/{job_id}").json()
        admin_mail = stack.mailbox.wait_for(1)

    assert state.status == "manual_review" and state.error_code == "timeout" and state.awaiting_decision
    assert timers[:3] == [30.0, 60.0, 120.0] and max(timers) == 120.0
    # The waits add up to the processing timeout, less the real seconds the status calls took.
    assert 895.0 < sum(timers) <= 900.0 and timers[-1] < 120.0
    assert job["status"] == "manual_review" and job["error"]["code"] == "timeout"
    assert job["download_url"] is None
    assert ledger_rows(stack.settings.database_url, job_id) == []
    assert [m["To"] for m in admin_mail] == ["admin@localhost"]
    assert "Manual review needed (timeout)" in admin_mail[0]["Subject"]


async def test_duplicate_and_late_webhooks_change_nothing(time_skipping_env, stack_factory, faults):
    faults(delay_seconds=0.2, webhook="duplicate")
    stack = stack_factory(time_skipping_env)
    async with create_worker(time_skipping_env.client, stack.settings):
        client, job_id = await start(stack, "wf-duplicate")
        await wait_for_status(client, job_id, {"completed"})
        handle = time_skipping_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        await let_time_skip(time_skipping_env)
        state = await handle.result()
        first = client.get(f"/v1/jobs/{job_id}").json()

        # A late copy of the webhook, after the job is done: accepted, delivered nowhere.
        emulated = httpx.get(f"{stack.emulator.url}/_emulator/jobs").json()
        sent = next(j for j in emulated if j["id"] == state.upsampler_id)
        assert [w["status"] for w in sent["webhooks_sent"]] == ["SUCCESS", "SUCCESS"]
        status = httpx.get(
            f"{stack.emulator.url}/api/v1/status/{state.upsampler_id}",
            headers={"Authorization": f"Bearer {UPSAMPLER_KEY}"},
        ).json()
        late = httpx.post(sent["webhook"], json=status)
        assert late.status_code == 200 and late.json()["delivered"] is False

    assert state.status == "completed"
    assert await event_count(handle, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) == state.webhooks >= 1
    assert client.get(f"/v1/jobs/{job_id}").json() == first
    # The workflow has ended (its result is in hand above): no mail can follow the one counted here.
    assert len(stack.mailbox.messages) == 1
    assert len(ledger_rows(stack.settings.database_url, job_id)) == 1
    assert [m.status for m in mail_rows(stack.settings.database_url, job_id)] == ["sent"]
