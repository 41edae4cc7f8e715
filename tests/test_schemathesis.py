"""Schemathesis (a property-based API tester no one here wrote, pinned in pyproject.toml) against the live API,
every route of /openapi.json, once with the storefront's key and once with the admin's: no 5xx for any input,
and every answer's status, media type, headers and body as the document says (issue 13). What it found on the
way is fixed, each with a regression test in tests/test_openapi.py.

Bounded and repeatable: a fixed number of cases per operation, derandomized (`--generation-deterministic`:
the same cases every run, no example database), each request and the whole run under a deadline. The
phases: the document's examples, the coverage phase (boundary and invalid values of every parameter and
body field, the wrong media types, missing keys) and fuzzing, positive and negative.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import order
from worker import create_worker

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Every check but positive_data_acceptance: a request the schema allows may still be refused for what it says
# (an image_url that does not answer, an empty upload), which no JSON schema can express. Among them: no 5xx,
# the status, media type, headers and body documented, invalid input refused, a key required where the document
# names a scheme, `Allow` on a 405 and a 405 for a method the document does not list.
CHECKS = ["all"]
EXCLUDED_CHECKS = ["positive_data_acceptance"]
EXAMPLES_PER_OPERATION = 40
RUN_DEADLINE_SECONDS = 150


async def schemathesis_run(api_url: str, key: str, workdir: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--exclude-checks",
        ",".join(EXCLUDED_CHECKS),
        "--header",
        f"Authorization: Bearer {key}",
        "--phases",
        "examples,coverage,fuzzing",
        "--mode",
        "all",
        "--max-examples",
        str(EXAMPLES_PER_OPERATION),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        cwd=workdir,  # no schemathesis.toml of anyone's is discovered
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_DEADLINE_SECONDS)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"schemathesis ran past its deadline of {RUN_DEADLINE_SECONDS} s")
    return process.returncode or 0, output.decode(errors="replace")


@pytest.mark.timeout(2 * RUN_DEADLINE_SECONDS + 60)
async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(dev_env, stack_factory, tmp_path):
    # The whole stack, a worker included: an order Schemathesis manages to place runs (and its workflow answers
    # the admin's retry and refund).
    stack = stack_factory(dev_env, metrics_token="schemathesis-metrics-token")
    operations = sum(len(methods) for methods in httpx.get(f"{stack.api.url}/openapi.json").json()["paths"].values())
    async with create_worker(dev_env.client, stack.settings):
        for who, key in (("storefront", STOREFRONT_KEY), ("admin", ADMIN_KEY)):
            code, output = await schemathesis_run(stack.api.url, key, tmp_path)
            assert code == 0, f"schemathesis with the {who} key:\n{output}"
            assert re.search(rf"Operations:\s+{operations} selected / {operations} total", output), output
            assert re.search(rf"Tested:\s+{operations}\b", output), output
            assert key not in output  # its output sanitized: the key is never printed


async def test_an_admin_action_on_a_workflow_no_worker_answers_is_a_503_at_once(dev_env, stack_factory):
    """Schemathesis found it: with no worker polling, retry and refund of a running job asked the workflow's
    state with Temporal's default deadline, held the request past a client's timeout, then answered 500."""
    stack = stack_factory(dev_env)
    image_url = stack.shop.publish(png_bytes(40, 30))
    created = await asyncio.to_thread(stack.client().post, "/v1/jobs", json=order(image_url, "no-worker-1"))
    assert created.status_code == 202, created.text  # its workflow started; no worker runs here
    job_id = created.json()["job_id"]
    admin = stack.client(ADMIN_KEY)
    for action in ("retry", "refund"):
        started = time.monotonic()
        reply = await asyncio.to_thread(admin.post, f"/v1/admin/jobs/{job_id}/{action}")
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "workflow_unresponsive"
        assert time.monotonic() - started < 15
