"""The Temporal side of tsq: one `TroubleshootingWorkflow` per parked command.

The names it is known by (type, task queue, id format, search attribute names) are in
`tsq.contract`; here are the search attribute keys the workflow and the client set.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

from tsq.contract import SearchAttribute

COMMAND_DOMAIN = SearchAttributeKey.for_keyword(SearchAttribute.COMMAND_DOMAIN.value)
COMMAND_TYPE = SearchAttributeKey.for_keyword(SearchAttribute.COMMAND_TYPE.value)
TSQ_STATE = SearchAttributeKey.for_keyword(SearchAttribute.TSQ_STATE.value)
LAST_ERROR_CODE = SearchAttributeKey.for_keyword(SearchAttribute.LAST_ERROR_CODE.value)
TSQ_ESCALATED = SearchAttributeKey.for_bool(SearchAttribute.TSQ_ESCALATED.value)
TSQ_CLAIMED_BY = SearchAttributeKey.for_keyword(SearchAttribute.TSQ_CLAIMED_BY.value)
SEARCH_ATTRIBUTES = (
    COMMAND_DOMAIN,
    COMMAND_TYPE,
    TSQ_STATE,
    LAST_ERROR_CODE,
    TSQ_ESCALATED,
    TSQ_CLAIMED_BY,
)

__all__ = [
    "COMMAND_DOMAIN",
    "COMMAND_TYPE",
    "LAST_ERROR_CODE",
    "SEARCH_ATTRIBUTES",
    "TSQ_CLAIMED_BY",
    "TSQ_ESCALATED",
    "TSQ_STATE",
]
