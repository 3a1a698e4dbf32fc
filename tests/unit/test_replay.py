"""Workflow code changes must replay the histories of workflows already running in production."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tsq.workflows.troubleshooting import TroubleshootingWorkflow

HISTORIES = sorted((Path(__file__).parent.parent / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_stored_history_replays(path: Path) -> None:
    """The current workflow code makes the same decisions as the code that wrote the history."""
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[TroubleshootingWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
