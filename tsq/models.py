"""What crosses the Temporal boundary: one model per workflow, message and activity.

Operators type these as JSON in the Web UI and the `temporal` CLI, so every model refuses
unknown fields (a typo such as `"reasn"` must not pass as a cancel without a reason) and every
text field refuses what PostgreSQL cannot store (NUL characters).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from tsq.contract import DOMAIN_PATTERN, DecisionKind, TsqState

# PGMQ keeps each queue in tables named q_<name> / a_<name>; it refuses names of 48+ characters.
QUEUE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,46}$")


def _storable(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return text


def _no_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


Reason = Annotated[
    str,
    StringConstraints(max_length=2000),
    AfterValidator(_storable),
    AfterValidator(_no_blank),
]
Operator = Annotated[str, StringConstraints(max_length=200), AfterValidator(_storable)]
Domain = Annotated[str, StringConstraints(pattern=DOMAIN_PATTERN)]

RESULT_DATA_LIMIT = 64_000


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _storable_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if _has_nul(value):
        raise ValueError("must not contain NUL (\\u0000) characters")
    text = json.dumps(value, allow_nan=False)  # jsonb has no NaN or Infinity
    if len(text) > RESULT_DATA_LIMIT:
        raise ValueError(f"must be at most {RESULT_DATA_LIMIT} characters as JSON")
    return value


ResultData = Annotated[dict[str, Any] | None, AfterValidator(_storable_json)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandSnapshot(_Model):
    """What the workflow knows of its command: given at start, shown in the UI, never re-read."""

    domain: Domain
    command_id: UUID
    command_type: str
    correlation_id: UUID | None = None
    reply_queue: str = ""
    attempts: int = 0
    max_attempts: int | None = None
    last_error_type: str | None = None
    last_error_code: str | None = None
    last_error_msg: str | None = None
    batch_id: UUID | None = None
    created_at: datetime | None = None
    parked_at: datetime | None = None


class CancelRequest(_Model):
    """Input of the `cancel` signal and the `operator_cancel` update."""

    reason: Reason
    operator: Operator | None = None


class RetryRequest(_Model):
    """Input of the `retry` signal and the `operator_retry` update."""

    operator: Operator | None = None


class CompleteRequest(_Model):
    """Input of the `complete` signal and the `operator_complete` update."""

    result_data: ResultData = None
    operator: Operator | None = None


DecisionRequest = CancelRequest | RetryRequest | CompleteRequest
REQUEST_MODELS: dict[DecisionKind, type[DecisionRequest]] = {
    DecisionKind.CANCEL: CancelRequest,
    DecisionKind.RETRY: RetryRequest,
    DecisionKind.COMPLETE: CompleteRequest,
}


class CarryOut(_Model):
    """Input of the activity that carries out a decision."""

    effect_key: str
    workflow_id: str
    domain: Domain
    command_id: UUID
    decision: DecisionKind
    reason: str | None = None
    operator: str | None = None
    result_data: dict[str, Any] | None = None
    via: Literal["signal", "update"]
    request_id: str | None = None


class DecisionOutcome(_Model):
    """What happened to a decision; the workflow's result and the update's answer."""

    decision: DecisionKind
    carried_out: bool
    status: str | None = Field(description="Command status after the decision, None if missing")
    operator: str | None = None
    reason: str | None = None
    reply_queue: str | None = None
    reply_msg_id: int | None = None
    new_msg_id: int | None = Field(default=None, description="Retry: the re-sent message")
    result_data: dict[str, Any] | None = None
    audit_id: int | None = None
    detail: str
    request_id: str | None = Field(
        default=None, description="The update id (or signal's id) whose decision this was"
    )


class RefusedRequest(_Model):
    """A signal the workflow could not accept, kept visible in the UI, the query and the audit."""

    handler: str
    problem: str
    received: str


class RecordRefusal(_Model):
    """Input of the activity that writes a refused signal to the audit trail."""

    effect_key: str
    workflow_id: str
    domain: Domain
    command_id: UUID
    refusal: RefusedRequest


class StateView(_Model):
    """Answer of the `state` query."""

    command: CommandSnapshot
    state: TsqState
    decision: DecisionKind | None = None
    decided_by: str | None = None
    reason: str | None = None
    result_data: dict[str, Any] | None = None
    requested_at: datetime | None = None
    steps: dict[str, str] = Field(default_factory=dict)
    outcome: DecisionOutcome | None = None
    refused: list[RefusedRequest] = Field(default_factory=list)


def describe_input(raw: Any, limit: int = 500) -> str:
    """A short, storable rendering of whatever a caller sent, for refusals."""
    text = repr(raw)
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def describe_validation_error(err: ValidationError) -> str:
    """One line an operator can act on: `reason: must not be blank; operator: ...`."""
    parts = []
    for error in err.errors():
        where = ".".join(str(p) for p in error["loc"]) or "input"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
