"""The baselines' workflow: bare no-op steps and one signal, nothing else (no I/O, no database).

Kept in a module of its own that imports only temporalio, so the workflow sandbox re-imports
nothing heavy for it (our UpscaleWorkflow passes its imports through the sandbox too).

A `BareJob` runs a list of steps in order:
  "A"   a no-op activity on the job task queue
  "U"   a no-op activity on "<task queue>-upsampler" (where our Upsampler calls run)
  "U!"  the same, and after it the bench signals the workflow (as the emulator's webhook would)
  "L"   a no-op local activity
  "S"   wait for the `hint` signal
  "A&A" activities started at once (one workflow task scheduled them together), awaited together
The benchmarks build the list from a real job's history, so the bare job has exactly as many
activities and local activities as ours, in the same order, and one signal.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from temporalio import activity, workflow

UPSAMPLER_SUFFIX = "-upsampler"

# Set by the bench in the worker's process: a Temporal client (to send the signal) and, for the
# latency benchmarks (RECORD), the wall-clock moment each no-op activity started and the moment the
# signal after "U!" was sent, by workflow id.
CLIENT = None
RECORD = False
STAMPS: dict[str, dict[str, float]] = {}
SIGNAL_DELAY = 0.0  # seconds between the "U!" no-op and its signal (the emulator's delay_seconds)
_SIGNALLING: set[asyncio.Task] = set()


async def _signal_soon(workflow_id: str) -> None:
    await asyncio.sleep(SIGNAL_DELAY)
    if RECORD:
        STAMPS.setdefault(workflow_id, {})["signal_sent"] = time.time()
    await CLIENT.get_workflow_handle(workflow_id).signal("hint", "done")


@activity.defn(name="bare_noop")
async def noop(arg: str) -> str:
    info = activity.info()
    if RECORD:
        STAMPS.setdefault(info.workflow_id, {}).setdefault(f"started:{arg}", time.time())
    if arg == "U!":
        task = asyncio.get_running_loop().create_task(_signal_soon(info.workflow_id))
        _SIGNALLING.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(_SIGNALLING.discard)
    return arg


@activity.defn(name="bare_noop_local")
async def noop_local(arg: str) -> str:
    return arg


@workflow.defn(name="BareJob")
class BareJob:
    def __init__(self) -> None:
        self._hint: str | None = None
        self._waiting = False

    @workflow.signal
    def hint(self, value: str) -> None:
        self._hint = value

    @workflow.query
    def waiting(self) -> bool:
        """True while the workflow waits for its signal."""
        return self._waiting

    @workflow.run
    async def run(self, steps: list[str]) -> int:
        for index, step in enumerate(steps):
            if step == "L":
                await workflow.execute_local_activity(noop_local, step, start_to_close_timeout=timedelta(seconds=30))
            elif step == "S":
                self._waiting = True
                await workflow.wait_condition(lambda: self._hint is not None)
                self._waiting = False
            elif "&" in step:
                await asyncio.gather(*(_activity(part, f"{index}.{k}") for k, part in enumerate(step.split("&"))))
            else:
                await _activity(step, str(index))
        return len(steps)


async def _activity(step: str, index: str) -> str:
    """One no-op activity: "A<index>" on the job task queue, "U" or "U!" on the Upsampler queue."""
    queue = workflow.info().task_queue
    return await workflow.execute_activity(
        noop,
        f"A{index}" if step == "A" else step,
        task_queue=queue + UPSAMPLER_SUFFIX if step.startswith("U") else queue,
        start_to_close_timeout=timedelta(seconds=60),
    )


def bare_workers(client, task_queue: str):
    """The two workers the bare job needs, with the same queue split as ours (worker.create_worker)."""
    from temporalio.worker import Worker

    return (
        Worker(client, task_queue=task_queue, workflows=[BareJob], activities=[noop, noop_local]),
        Worker(client, task_queue=task_queue + UPSAMPLER_SUFFIX, activities=[noop]),
    )
