"""A full run leaves no secret and no customer address in logs or Temporal histories."""

from __future__ import annotations

import asyncio
import logging

from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, UPSAMPLER_KEY, WEBHOOK_SECRET, png_bytes
from tests.helpers import order, wait_for_status
from worker import create_worker

SECRETS = [STOREFRONT_KEY, ADMIN_KEY, WEBHOOK_SECRET, UPSAMPLER_KEY]
EMAIL = "ana@example.com"


async def test_no_secret_or_address_in_logs_or_histories(dev_env, stack_factory, faults, caplog):
    caplog.set_level(logging.DEBUG)
    faults(delay_seconds=0.1)
    stack = stack_factory(dev_env)
    client = stack.client()
    async with create_worker(dev_env.client, stack.settings):
        body = order(stack.shop.publish(png_bytes(30, 20)), "leak-1", customer_email=EMAIL)
        job_id = (await asyncio.to_thread(client.post, "/v1/jobs", json=body)).json()["job_id"]
        await wait_for_status(client, job_id, {"completed"})
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
        faults(refuse_with="unsupported image format")  # a failed, refunded job too
        failed = (
            await asyncio.to_thread(
                client.post,
                "/v1/jobs",
                json=order(stack.shop.publish(png_bytes(30, 20)), "leak-2", customer_email=EMAIL),
            )
        ).json()["job_id"]
        await dev_env.client.get_workflow_handle(f"upscale-{failed}").result()
        job = client.get(f"/v1/jobs/{job_id}").json()

    histories = ""
    for workflow_id in (f"upscale-{job_id}", f"upscale-{failed}"):
        histories += (await dev_env.client.get_workflow_handle(workflow_id).fetch_history()).to_json()
        description = await dev_env.client.get_workflow_handle(workflow_id).describe()
        assert EMAIL not in str(description.search_attributes) and EMAIL not in str(description.memo)
    # Everything the service logs; "mail.log" is the test's own SMTP server, standing in for the mail provider.
    ours = [r for r in caplog.records if not r.name.startswith("mail.log")]
    logs = "\n".join(record.getMessage() + str(record.args) for record in ours)
    assert len(histories) > 10_000 and len(ours) > 50
    for secret in SECRETS + [EMAIL]:
        assert secret not in histories, secret
        assert secret not in logs, secret
    token = job["download_url"].rsplit("/", 1)[1]
    assert token not in histories  # the link's token never passes through Temporal


def test_access_log_lines_are_redacted():
    import logging

    from api.redact import RedactSensitive

    token = "ab" * 32

    def access(method: str, path: str) -> logging.LogRecord:
        """An access-log record as uvicorn writes one."""
        arguments = ("127.0.0.1:5000", method, path, "1.1", 200)
        return logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', arguments, None
        )

    records = [
        access("GET", f"/downloads/{token}"),
        access("DELETE", f"/v1/admin/customers/{EMAIL}"),
        access("POST", f"/smi-webhook/upsampler/?job=x&sig={token}"),
        access("GET", f"/status/{'c' * 32}/events?v={token}"),
    ]
    for item in records:
        assert RedactSensitive().filter(item)
    lines = [r.getMessage() for r in records]
    assert all(token not in line and EMAIL not in line for line in lines)
    assert lines[0].endswith('"GET /downloads/<redacted> HTTP/1.1" 200')
    assert lines[3].endswith(f'"GET /status/{"c" * 32}/events?v=<redacted> HTTP/1.1" 200')
