"""Records the histories that tests/test_replay.py replays. Not collected by `make test`;
run it by hand after a deliberate, versioned workflow change (with a new VERSION):

    .venv/bin/python -m pytest tests/histories/record.py

It drives one job down each path (completed; refunded; manual review, then retried by an
admin) through the real API, worker and emulator on the dev server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import order, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

HERE = Path(__file__).parent


async def _job(stack, order_id: str) -> str:
    client = stack.client()
    reply = await asyncio.to_thread(
        client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(40, 30)), order_id)
    )
    assert reply.status_code == 202, reply.text
    return reply.json()["job_id"]


# The histories of each versioned change are kept: the unsuffixed ones are from before
# workflow.patched("fewer-rounds"); running jobs of every version must still replay.
VERSION = "-fewer-rounds"


async def _save(env, job_id: str, name: str) -> None:
    handle = env.client.get_workflow_handle(f"upscale-{job_id}")
    await handle.result()
    history = await handle.fetch_history()
    (HERE / f"{name}{VERSION}.json").write_text(history.to_json())


async def test_record_histories(dev_env, stack_factory, faults):
    stack = stack_factory(dev_env)
    async with create_worker(dev_env.client, stack.settings):
        faults(delay_seconds=0.2)
        await _save(dev_env, await _job(stack, "replay-completed"), "completed")

        faults(refuse_with="unsupported image format")
        await _save(dev_env, await _job(stack, "replay-refunded"), "refunded")

        faults(fail_with="model crashed", delay_seconds=0.1)
        job_id = await _job(stack, "replay-review")
        await wait_for_status(stack.client(), job_id, {"manual_review"})
        handle = dev_env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
        while not (await handle.query(UpscaleWorkflow.state)).awaiting_decision:
            await asyncio.sleep(0.05)
        faults(delay_seconds=0.1)
        retried = await asyncio.to_thread(  # off the event loop: the in-process worker answers the API's query
            httpx.post,
            f"{stack.api.url}/v1/admin/jobs/{job_id}/retry",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert retried.status_code == 202, retried.text
        await _save(dev_env, job_id, "review_then_retried")
