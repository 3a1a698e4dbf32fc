"""The Temporal side of tsq: one `TroubleshootingWorkflow` per parked command.

This package is the one place that defines the contract other tools depend on: the workflow
type, the default task queue, the workflow id format and the search attributes.
"""

from __future__ import annotations

from uuid import UUID

from temporalio.common import SearchAttributeKey

WORKFLOW_TYPE = "TroubleshootingWorkflow"
DEFAULT_TASK_QUEUE = "troubleshooting"

COMMAND_DOMAIN = SearchAttributeKey.for_keyword("CommandDomain")
COMMAND_TYPE = SearchAttributeKey.for_keyword("CommandType")
TSQ_STATE = SearchAttributeKey.for_keyword("TsqState")
LAST_ERROR_CODE = SearchAttributeKey.for_keyword("LastErrorCode")
SEARCH_ATTRIBUTES = (COMMAND_DOMAIN, COMMAND_TYPE, TSQ_STATE, LAST_ERROR_CODE)


def workflow_id(domain: str, command_id: UUID | str) -> str:
    """`tsq:<domain>:<command_id>`: deterministic, so starting a workflow twice is harmless."""
    return f"tsq:{domain}:{command_id}"


__all__ = [
    "COMMAND_DOMAIN",
    "COMMAND_TYPE",
    "DEFAULT_TASK_QUEUE",
    "LAST_ERROR_CODE",
    "SEARCH_ATTRIBUTES",
    "TSQ_STATE",
    "WORKFLOW_TYPE",
    "workflow_id",
]
