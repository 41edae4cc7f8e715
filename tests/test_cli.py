"""The operator's commands against the live API: `smi jobs`, `retry`, `refund`, `resend`, `erase`, `submit`,
`--version`, each run as the installed `smi` in a process of its own with only the environment an operator
sets (SMI_PUBLIC_BASE_URL, the keys), from a folder without var/dev.env. Their errors are one line on
stderr, no traceback, a non-zero exit.

Where no workflow is needed the API runs alone (the `site` fixture, jobs written into its database);
the rest runs on the Temporal dev server with a worker, the emulator and the SMTP sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

from sqlmodel import Session

import cli
from smi.db import Job, utcnow
from smi.serve import free_port
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import CUSTOMER_EMAIL, eventually, wait_for_status
from worker import create_worker
from workflows.admin import RefundWorkflow

SMI = str(Path(sys.executable).parent / "smi")
QUICK = {"upsampler_requests_per_minute": 6000}  # no waiting on Upsampler's quota (as in test_refunds_and_admin)
BUYER = "cli.buyer@example.com"


def smi(cwd: Path, api: str | None, *args: str, stdin: str = "", timeout: float = 90, **settings: str):
    """`smi ARGS` as an operator runs it: the API's address and the settings given, no other SMI_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMI_")}
    if api:
        env["SMI_PUBLIC_BASE_URL"] = api
    env.update({f"SMI_{name.upper()}": value for name, value in settings.items()})
    return subprocess.run([SMI, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def admin(cwd: Path, api: str, *args: str, **settings: str):
    return smi(cwd, api, *args, **{"admin_api_key": ADMIN_KEY, **settings})


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def one_line_error(result, *fragments: str, code: int | None = None) -> str:
    """The command failed with exactly one line on stderr, holding every fragment; returns that line."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def table(stdout: str) -> list[list[str]]:
    """`smi jobs`' rows (under the header), split into cells."""
    header, *rows = stdout.splitlines()
    assert header.split()[:3] == ["JOB", "ID", "STATUS"], header
    return [row.split() for row in rows]


# --- the API alone -------------------------------------------------------------------------------------------


def test_jobs_lists_newest_first_filters_and_limits(site, tmp_path):
    now = utcnow()
    failed = site.add_job("failed", created_at=now - timedelta(minutes=3), error_code="unsupported_format")
    done = site.add_job("completed", created_at=now - timedelta(minutes=2))
    running = site.add_job("processing", created_at=now - timedelta(minutes=1))

    rows = table(ok(admin(tmp_path, site.url, "jobs")))
    assert [(r[0], r[1]) for r in rows] == [(running, "processing"), (done, "completed"), (failed, "failed")]
    assert rows[2][2] == f"wc-{failed[:8]}" and rows[2][3] == "4x" and rows[2][-1] == "unsupported_format"

    assert [r[0] for r in table(ok(admin(tmp_path, site.url, "jobs", "--status", "failed")))] == [failed]
    assert [r[0] for r in table(ok(admin(tmp_path, site.url, "jobs", "--limit", "2")))] == [running, done]
    assert ok(admin(tmp_path, site.url, "jobs", "--status", "manual_review")) == "no manual_review jobs\n"
    everything = ok(admin(tmp_path, site.url, "jobs"))
    assert CUSTOMER_EMAIL not in everything  # the table names no customer

    # The key from its _FILE form (Docker secrets), and --api over SMI_PUBLIC_BASE_URL.
    (tmp_path / "admin.key").write_text(ADMIN_KEY + "\n")
    dead = f"http://127.0.0.1:{free_port()}"
    from_file = smi(tmp_path, dead, "jobs", "--api", site.url, admin_api_key_file=str(tmp_path / "admin.key"))
    assert ok(from_file) == everything


def test_admin_errors_are_one_line(site, tmp_path):
    failed = site.add_job("failed", error_code="unsupported_format")
    unknown = "0" * 32

    # The API down: nothing listens on the port.
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["jobs"], ["retry", failed], ["refund", failed], ["resend", failed], ["erase", "--yes", BUYER]):
        one_line_error(admin(tmp_path, dead, *args), f"cannot reach the API at {dead}", "Connection refused", code=1)

    # A wrong key: the API's 401 message.
    for args in (["jobs"], ["retry", failed], ["erase", "--yes", BUYER]):
        one_line_error(
            smi(tmp_path, site.url, *args, admin_api_key="wrong-key"),
            "401",
            "unauthorized: a valid admin API key is required",
            code=1,
        )
    # The storefront's key is not the admin's.
    one_line_error(smi(tmp_path, site.url, "jobs", admin_api_key=STOREFRONT_KEY), "401", code=1)

    # An unknown job: the API's 404; a job that cannot have its link resent: its 409.
    for command in ("retry", "refund", "resend"):
        one_line_error(admin(tmp_path, site.url, command, unknown), "404", "job_not_found: no job has this job_id")
    one_line_error(admin(tmp_path, site.url, "resend", failed), "409", "not_completed: the job is failed")

    # A missing setting, named; a _FILE naming no file.
    for args in (["jobs"], ["retry", failed], ["erase", "--yes", BUYER]):
        one_line_error(smi(tmp_path, site.url, *args), "SMI_ADMIN_API_KEY is not set", code=1)
    one_line_error(
        smi(tmp_path, site.url, "jobs", admin_api_key_file=str(tmp_path / "absent.key")), "absent.key", code=1
    )

    # Bad arguments, refused before any request: exit 2.
    for args, fragment in (
        (["jobs", "--status", "done"], "invalid choice: 'done'"),
        (["jobs", "--limit", "0"], "'0' is not a whole number from 1 to 1000"),
        (["jobs", "--limit", "many"], "'many' is not a whole number"),
        (["retry", "not-a-job"], "a job id is 32 hex digits"),
        (["refund", failed + "0"], "a job id is 32 hex digits"),
        (["jobs", "--api", "127.0.0.1:8000"], "not an http(s) URL"),
        (["usage", "--from", "2026-13-45"], "'2026-13-45' is not a date"),
        (["usage", "--to", "yesterday"], "'yesterday' is not a date"),
        (["submit", "photo.png"], "--email"),
        (["submit", "https://shop.test/a.png", "--email", BUYER, "--timeout", "0"], "not a positive number"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ):
        one_line_error(admin(tmp_path, site.url, *args), fragment, code=2)
    one_line_error(admin(tmp_path, site.url, "erase", "--yes", "nobody"), "must be an e-mail address", code=1)

    # Nothing happened to the job the refused calls named.
    with Session(site.engine) as session:
        job = session.get(Job, failed)
        assert (job.status, job.runs, job.customer_email) == ("failed", 1, CUSTOMER_EMAIL)


def test_erase_asks_first_and_refuses_while_a_job_runs(site, tmp_path):
    running = site.add_job("processing", customer_email=BUYER)

    # Not confirmed: nothing erased, nothing asked of the API (the answer would be 409 here).
    refused = admin(tmp_path, site.url, "erase", BUYER, stdin="n\n")
    one_line_error(refused, "not confirmed; nothing was erased", code=1)
    assert "Erase this customer's personal data" in refused.stdout
    one_line_error(admin(tmp_path, site.url, "erase", BUYER, stdin=""), "not confirmed", code=1)  # stdin closed

    # Confirmed, but a job of the address still runs: the API's 409, in one line without the address.
    line = one_line_error(admin(tmp_path, site.url, "erase", BUYER, stdin="yes\n"), "409", "customer_jobs_busy")
    assert BUYER not in line
    with Session(site.engine) as session:
        assert session.get(Job, running).customer_email == BUYER

    # An address no job has: nothing to erase.
    assert "nothing to erase" in ok(admin(tmp_path, site.url, "erase", "--yes", "nobody@example.com"))


def test_submit_errors_are_one_line(site, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    image = "https://shop.test/a.png"
    one_line_error(
        smi(tmp_path, dead, "submit", image, "--email", BUYER, storefront_api_key=STOREFRONT_KEY),
        f"cannot reach the API at {dead}",
        code=1,
    )
    one_line_error(smi(tmp_path, site.url, "submit", image, "--email", BUYER), "SMI_STOREFRONT_API_KEY is not set")
    one_line_error(
        smi(tmp_path, site.url, "submit", image, "--email", BUYER, storefront_api_key="wrong"),
        "401",
        "a valid storefront API key is required",
    )
    one_line_error(
        smi(tmp_path, site.url, "submit", "missing.png", "--email", BUYER, storefront_api_key=STOREFRONT_KEY),
        "no such file: missing.png",
    )


def test_version_and_every_option_described(tmp_path):
    assert ok(smi(tmp_path, None, "--version")) == f"smi {version('smi-upscale')}\n"
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undescribed = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not action.help
    ]
    assert undescribed == []
    assert set(commands.choices) >= {"jobs", "retry", "refund", "resend", "erase", "submit"}
    for name in ("jobs", "retry", "refund", "resend", "erase", "submit"):
        assert "--api URL" in ok(smi(tmp_path, None, name, "--help"))


# --- with Temporal, a worker, the emulator and the mail sink --------------------------------------------------


async def run(cwd: Path, api: str, *args: str, **settings: str):
    """`smi` off the event loop: the in-process worker must keep running meanwhile."""
    keys = {"admin_api_key": ADMIN_KEY, "storefront_api_key": STOREFRONT_KEY}
    return await asyncio.to_thread(smi, cwd, api, *args, **{**keys, **settings})


async def test_submit_follows_the_stream_then_the_admin_commands(dev_env, stack_factory, faults, tmp_path):
    faults()
    stack = stack_factory(dev_env, **QUICK)
    api = stack.api.url
    async with create_worker(dev_env.client, stack.settings):
        image = stack.shop.publish(png_bytes(40, 30))
        submitted = await run(tmp_path, api, "submit", image, "--scale", "2", "--email", BUYER, "--timeout", "60")
        out = ok(submitted)
        job_id = re.match(r"job ([0-9a-f]{32}) \(order cli-", out).group(1)
        statuses = re.findall(r"^\s+\d+\.\d s  (\w+)$", out, re.MULTILINE)
        order = ["received", "queued", "processing", "downloading", "completed"]
        assert statuses[-1] == "completed" and len(set(statuses)) == len(statuses), out  # each change once
        assert statuses == sorted(statuses, key=order.index), out
        assert "done: 80x60 png" in out and f"download: {api}/downloads/" in out
        upscale = dev_env.client.get_workflow_handle(f"upscale-{job_id}")
        await upscale.result()
        await asyncio.to_thread(stack.mailbox.wait_for, 1)

        [row] = table(ok(await run(tmp_path, api, "jobs", "--status", "completed")))
        assert row[:2] == [job_id, "completed"]

        resent = ok(await run(tmp_path, api, "resend", job_id))
        assert re.fullmatch(
            rf"resend-email {job_id}: link generation 2 sent; the new link is valid until \S+\n", resent
        )
        assert len(await asyncio.to_thread(stack.mailbox.wait_for, 2)) == 2

        retried = ok(await run(tmp_path, api, "retry", job_id))
        assert retried == f"retry {job_id}: started run 2 of the workflow\n"
        await upscale.result()  # the newest run: the job made again
        assert len(await asyncio.to_thread(stack.mailbox.wait_for, 3)) == 3  # its completion email
        await wait_for_status(stack.client(), job_id, {"completed"})

        refunded = ok(await run(tmp_path, api, "refund", job_id))
        assert refunded == f"refund {job_id}: started workflow refund-{job_id}\n"
        outcome = await dev_env.client.get_workflow_handle_for(RefundWorkflow.run, f"refund-{job_id}").result()
        assert (outcome.status, outcome.amount_cents) == ("refunded", 0)  # `smi submit`'s orders are free
        one_line_error(await run(tmp_path, api, "retry", job_id), "409", "already_refunded", code=1)

        erased = ok(await run(tmp_path, api, "erase", "--yes", BUYER.upper()))
        assert re.fullmatch(r"erased: 1 jobs, \d+ files, \d+ download tokens, \d+ sent-mail records\n", erased)
        assert "nothing to erase" in ok(await run(tmp_path, api, "erase", "--yes", BUYER))
        one_line_error(await run(tmp_path, api, "resend", job_id), "409", code=1)  # no file left to link


async def test_submit_gives_up_at_its_deadline(dev_env, stack_factory, faults, tmp_path):
    faults(never_finish=True, webhook="drop")
    stack = stack_factory(dev_env, **QUICK)
    api = stack.api.url
    streams = stack.api.server.config.app.state.services.event_streams
    keys = {"SMI_ADMIN_API_KEY": ADMIN_KEY, "SMI_STOREFRONT_API_KEY": STOREFRONT_KEY, "SMI_PUBLIC_BASE_URL": api}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMI_")} | keys
    async with create_worker(dev_env.client, stack.settings):
        image = stack.shop.publish(png_bytes(40, 30))
        started = time.monotonic()
        follow = subprocess.Popen(
            [SMI, "submit", image, "--email", BUYER, "--timeout", "6"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # While it waits, the command holds the job's event stream open (it does not poll).
        await eventually(lambda: streams.open.total() == 1, timeout=6, what="the CLI's open event stream")
        out, err = await asyncio.to_thread(follow.communicate, timeout=30)
        elapsed = time.monotonic() - started
        result = subprocess.CompletedProcess(follow.args, follow.returncode, out, err)
        line = one_line_error(result, "did not end within 6 s (last status: ", "); it goes on", code=1)
        assert 6 <= elapsed < 15, elapsed
        await eventually(lambda: streams.open.total() == 0, timeout=5, what="the stream closed with the command")
        job_id = re.match(r"job ([0-9a-f]{32})", out).group(1)
        last = out.split()[-1]  # the last status printed is the one the message names
        assert job_id in line and f"(last status: {last})" in line and last in {"received", "queued", "processing"}

        # The job went on; the operator refunds it, which ends it.
        refunded = ok(await run(tmp_path, api, "refund", job_id))
        assert refunded == f"refund {job_id}: signalled the running workflow\n"
        ended = await wait_for_status(stack.client(), job_id, {"failed", "completed"}, timeout=20)
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
    assert ended["status"] == "failed" and ended["error"]["code"] == "admin_refund"
