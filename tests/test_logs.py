"""Structured logs (smi/logs.py): JSON lines off a terminal, text on one, job_id on every line
about a job, never a customer's address."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from temporalio import activity, workflow
from temporalio.worker import Worker

from smi.logs import JobIdFromRequest, current_job_id, make_handler
from smi.serve import free_port

SMI = str(Path(sys.executable).parent / "smi")
JOB = "0123456789abcdef0123456789abcdef"
EMAIL = "ana@example.com"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def capture(stream=None) -> tuple[logging.Logger, io.StringIO]:
    """A fresh logger writing through our handler to a string (not a terminal unless given one)."""
    stream = stream or io.StringIO()
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex[:8]}")
    logger.handlers, logger.propagate = [make_handler(stream)], False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def root_capture():
    """Our handler on the root logger for one test, as setup_logging puts it in each process."""
    stream = io.StringIO()
    handler = make_handler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_job_from_every_source():
    log, out = capture()
    log.info("no job here")
    log.info("explicit", extra={"job_id": JOB})
    activity_context = {"workflow_id": f"upscale-{JOB}", "activity_type": "download_result", "attempt": 2}
    log.info("from an activity", extra={"temporal_activity": activity_context})
    for workflow_id in (f"refund-{JOB}", f"resend-{JOB}-r1"):
        log.info("from a workflow", extra={"temporal_workflow": {"workflow_id": workflow_id}})
    log.info("the retention pass", extra={"temporal_workflow": {"workflow_id": "smi-retention-run"}})
    token = current_job_id.set(JOB)
    try:
        log.warning("in a request about the job")
    finally:
        current_job_id.reset(token)

    plain, explicit, from_activity, refund, resend, retention, request = lines(out)
    assert set(plain) == {"ts", "level", "logger", "message", "pid"}
    assert datetime.fromisoformat(plain["ts"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert (plain["level"], plain["message"], plain["pid"]) == ("INFO", "no job here", os.getpid())
    assert explicit["job_id"] == JOB
    assert from_activity == {
        **from_activity,
        "job_id": JOB,
        "workflow_id": f"upscale-{JOB}",
        "activity": "download_result",
        "attempt": 2,
    }
    assert refund["job_id"] == resend["job_id"] == JOB
    assert "job_id" not in retention and retention["workflow_id"] == "smi-retention-run"
    assert (request["level"], request["job_id"]) == ("WARNING", JOB)


def test_email_addresses_are_masked_in_message_arguments_and_tracebacks():
    log, out = capture()
    log.info("mail for %s", EMAIL)
    log.info("a dict %s", {"to": "Bob.B+x@mail.example.org"})
    log.info("in a URL path /v1/admin/customers/ana%40example.com")
    try:
        raise ValueError(f"no such customer {EMAIL}")
    except ValueError:
        log.exception("lookup failed for %s", EMAIL)
    text = out.getvalue()
    assert "example.com" not in text and "example.org" not in text
    first, second, third, failed = lines(out)
    assert first["message"] == "mail for <email>"
    assert second["message"] == "a dict {'to': '<email>'}"
    assert third["message"] == "in a URL path /v1/admin/customers/<email>"
    assert failed["message"] == "lookup failed for <email>" and failed["exc"].endswith("no such customer <email>")


def test_masking_keeps_the_arguments_other_formatters_unpack():
    from smi.logs import MaskEmails

    args = ("127.0.0.1:5000", "GET", "/v1/jobs/x?to=ana@example.com", "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
    assert MaskEmails().filter(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/v1/jobs/x?to=<email>", "1.1", 200)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /v1/jobs/x?to=<email> HTTP/1.1" 200'


def test_a_terminal_gets_readable_text():
    log, out = capture(Terminal())
    log.info(
        "downloading for %s",
        EMAIL,
        extra={
            "temporal_activity": {"workflow_id": f"upscale-{JOB}", "activity_type": "download_result", "attempt": 1}
        },
    )
    log.info("started")
    first, second = out.getvalue().splitlines()
    assert not first.startswith("{")
    assert first.endswith(f"INFO {log.name}: downloading for <email> [job_id={JOB} activity=download_result]")
    assert second.endswith(f"INFO {log.name}: started")


async def test_api_requests_naming_a_job_log_its_job_id():
    log, out = capture()
    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    @app.post("/v1/admin/jobs/{job_id}/refund")
    @app.post("/smi-webhook/upsampler/")
    @app.get("/status/{job_id}/events")
    @app.get("/healthz")
    async def handler():
        log.info("handled")
        return {}

    app.add_middleware(JobIdFromRequest)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as client:
        for response in [
            await client.get(f"/v1/jobs/{JOB}"),
            await client.post(f"/v1/admin/jobs/{JOB}/refund"),
            await client.post(f"/smi-webhook/upsampler/?job={JOB}&sig=x"),
            await client.get(f"/status/{JOB}/events?v=t"),
            await client.get("/healthz"),
            await client.get("/v1/jobs/not-a-job-id"),
        ]:
            assert response.status_code == 200
    assert [line.get("job_id") for line in lines(out)] == [JOB, JOB, JOB, JOB, None, None]
    assert current_job_id.get() is None


# --- a real workflow and activity on the Temporal dev server --------------------------------------


@activity.defn
async def say_done(job_id: str) -> None:
    activity.logger.info("activity step done for %s", EMAIL)


@workflow.defn(sandboxed=False)  # a test workflow: nothing to guard against
class LoggingWorkflow:
    @workflow.run
    async def run(self, job_id: str) -> None:
        workflow.logger.info("workflow step")
        await workflow.execute_activity(say_done, job_id, start_to_close_timeout=timedelta(seconds=10))


async def test_workflow_and_activity_lines_of_a_real_run_carry_the_job_id(dev_env, root_capture):
    job_id = uuid.uuid4().hex
    queue = f"logs-{job_id[:8]}"
    async with Worker(dev_env.client, task_queue=queue, workflows=[LoggingWorkflow], activities=[say_done]):
        await dev_env.client.execute_workflow(LoggingWorkflow.run, job_id, id=f"upscale-{job_id}", task_queue=queue)
    ours = [line for line in lines(root_capture) if line.get("workflow_id") == f"upscale-{job_id}"]
    by_message = {line["message"].split(" (")[0]: line for line in ours}  # Temporal may append its context
    assert by_message["workflow step"]["job_id"] == job_id and "activity" not in by_message["workflow step"]
    step = by_message["activity step done for <email>"]
    assert (step["job_id"], step["activity"], step["attempt"]) == (job_id, "say_done", 1)
    assert EMAIL not in root_capture.getvalue()


# --- `smi api`: uvicorn's lines, the access log included, go through ours ------------------------


def test_smi_api_writes_json_lines_redacted_and_with_the_job_id(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMI_")}
    env.update(
        SMI_ENV="dev",
        SMI_API_PORT=str(port),
        SMI_DATABASE_URL=f"sqlite:///{tmp_path}/smi.db",
        SMI_STOREFRONT_API_KEY="k-store",
        SMI_ADMIN_API_KEY="k-admin",
        SMI_WEBHOOK_SECRET="k-hook",
        SMI_STORAGE_DIR=str(tmp_path / "storage"),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        api = subprocess.Popen([SMI, "api"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert api.poll() is None, log_path.read_text()
            try:
                httpx.get(f"{base}/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/jobs/{JOB}", headers={"Authorization": "Bearer k-store"}).status_code == 404
        httpx.get(f"{base}/downloads/{'ab' * 32}")
        httpx.delete(f"{base}/v1/admin/customers/{EMAIL}", headers={"Authorization": "Bearer nope"})
        deadline = time.monotonic() + 10
        while log_path.read_text().count("uvicorn.access") < 4:  # the health check's line and these three
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        api.terminate()
        api.wait(timeout=15)
    text = log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert len(access) == 4, text
    job_line = next(e for e in access if "/v1/jobs/" in e["message"])
    assert job_line["job_id"] == JOB and job_line["message"].endswith("404")
    assert all("job_id" not in e for e in access if e is not job_line)
    assert "ab" * 32 not in text and EMAIL not in text  # the token redacted, the address too
    assert any(e["logger"] == "uvicorn.error" and "Uvicorn running" in e["message"] for e in entries)
