"""Saved histories of finished jobs replay against today's workflow code: a change that would
break running jobs (a non-deterministic edit without `workflow.patched`) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.admin import RefundWorkflow, ResendLinkWorkflow
from workflows.upscale import UpscaleWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_path_has_a_saved_history():
    paths = {"completed", "refunded", "review_then_retried"}
    versions = ("", "-fewer-rounds")  # before and after workflow.patched("fewer-rounds")
    assert {p.stem for p in HISTORIES} == {path + version for path in paths for version in versions}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_saved_history_replays(path: Path):
    history = WorkflowHistory.from_json(f"upscale-{path.stem}", path.read_text())
    assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    patched = any(
        event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED and b"fewer-rounds" in event.SerializeToString()
        for event in history.events
    )
    assert patched == path.stem.endswith("-fewer-rounds")  # each version's path is the one replayed
    result = await Replayer(workflows=[UpscaleWorkflow, RefundWorkflow, ResendLinkWorkflow]).replay_workflow(history)
    assert result.replay_failure is None
