"""Workflow code changes must replay the histories of workflows already running in production."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tsq.contract import BULK_WORKFLOW_TYPE, bulk_workflow_id, workflow_id
from tsq.temporal import DATA_CONVERTER
from tsq.workflows.bulk import BulkOperationWorkflow
from tsq.workflows.troubleshooting import TroubleshootingWorkflow

# Histories of each released version in a folder of its own (v0.1/), this version's beside.
ROOT = Path(__file__).parent.parent / "histories"
HISTORIES = sorted(ROOT.rglob("*.json"))


def _history(path: Path) -> WorkflowHistory:
    """The stored history under the workflow id it ran with (it names its command, or its
    bulk operation)."""
    text = path.read_text()
    started = json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]
    first = json.loads(base64.b64decode(started["input"]["payloads"][0]["data"]))
    if started["workflowType"]["name"] == BULK_WORKFLOW_TYPE:
        return WorkflowHistory.from_json(bulk_workflow_id(first["bulk_id"]), text)
    return WorkflowHistory.from_json(workflow_id(first["domain"], first["command_id"]), text)


@pytest.mark.parametrize("path", HISTORIES, ids=[str(p.relative_to(ROOT)) for p in HISTORIES])
async def test_stored_history_replays(path: Path) -> None:
    """The current workflow code makes the same decisions as the code that wrote the history."""
    replayer = Replayer(
        workflows=[TroubleshootingWorkflow, BulkOperationWorkflow], data_converter=DATA_CONVERTER
    )
    await replayer.replay_workflow(_history(path))
