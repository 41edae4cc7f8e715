"""Schemathesis (a property-based API tester no one here wrote, pinned in pyproject.toml) against the live API,
every route of /openapi.json, once with the storefront's key and once with the admin's: no 5xx for any input,
and every answer's status, media type, headers and body as the document says (issue 13).

Bounded and repeatable: a fixed number of cases per operation, derandomized (`--generation-deterministic`:
the same cases every run, no example database), each request and the whole run under a deadline. The
phases: the document's examples, the coverage phase (boundary and invalid values of every parameter and
body field, the wrong media types, missing keys) and fuzzing, positive and negative.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, STOREFRONT_KEY

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]
EXAMPLES_PER_OPERATION = 40
RUN_DEADLINE_SECONDS = 150


async def schemathesis_run(api_url: str, key: str, workdir: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
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
    stack = stack_factory(dev_env, metrics_token="schemathesis-metrics-token")
    operations = sum(len(methods) for methods in httpx.get(f"{stack.api.url}/openapi.json").json()["paths"].values())
    for who, key in (("storefront", STOREFRONT_KEY), ("admin", ADMIN_KEY)):
        code, output = await schemathesis_run(stack.api.url, key, tmp_path)
        assert code == 0, f"schemathesis with the {who} key:\n{output}"
        assert re.search(rf"Operations:\s+{operations} selected / {operations} total", output), output
        assert re.search(rf"Tested:\s+{operations}\b", output), output
        assert key not in output  # its output sanitized: the key is never printed
