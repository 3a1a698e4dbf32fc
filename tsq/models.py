"""What crosses the Temporal boundary: one model per workflow, message and activity.

Operators type these as JSON in the Web UI and the `temporal` CLI, so every model refuses
unknown fields (a typo such as `"reasn"` must not pass as a cancel without a reason) and every
text field refuses what PostgreSQL cannot store (NUL characters).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from tsq.contract import DOMAIN_PATTERN, AuditEventType, DecisionKind, TsqState
from tsq.durations import parse_duration
from tsq.errors import InvalidInputError

# PGMQ keeps each queue in tables named q_<name> / a_<name>; it refuses names of 48+ characters.
QUEUE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,46}$")


def check_queue_name(name: str) -> str:
    """A PGMQ queue name becomes part of table names: refuse anything but a plain identifier."""
    if not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"{name!r} is not a valid PGMQ queue name (letters, digits and _, "
            "starting with a letter or _, at most 47 characters)"
        )
    return name


# Deeper JSON than this is refused: PostgreSQL and the converters stop somewhere past it, and
# no decision needs it.
MAX_DEPTH = 100
RESULT_DATA_LIMIT = 64_000


def _unstorable(text: str) -> str | None:
    """Why PostgreSQL cannot store `text`, or None."""
    if "\x00" in text:
        return "must not contain NUL (\\u0000) characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate such as \\ud800)"
    return None


def _storable(text: str) -> str:
    problem = _unstorable(text)
    if problem:
        raise ValueError(problem)
    return text


def storable_text(text: str) -> str:
    """`text` with what PostgreSQL cannot store (NUL, lone surrogates) written as escapes."""
    if _unstorable(text) is None:
        return text
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


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


def json_problem(value: Any) -> str | None:
    """Why `value` cannot be stored as jsonb (NUL, lone surrogates, NaN, too deep), or None.

    Walks iteratively: a hostile value nested thousands deep must not exhaust the stack.
    """
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            return f"must not be nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            problem = _unstorable(item)
            if problem:
                return problem
        elif isinstance(item, float) and (item != item or item in (float("inf"), float("-inf"))):
            return "must not contain NaN or Infinity (jsonb has neither)"
        elif isinstance(item, dict):
            for key, child in item.items():
                todo.append((key, depth))
                todo.append((child, depth + 1))
        elif isinstance(item, list):
            todo.extend((child, depth + 1) for child in item)
    return None


def _storable_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    problem = json_problem(value)
    if problem:
        raise ValueError(problem)
    if len(json.dumps(value)) > RESULT_DATA_LIMIT:
        raise ValueError(f"must be at most {RESULT_DATA_LIMIT} characters as JSON")
    return value


ResultData = Annotated[dict[str, Any] | None, AfterValidator(_storable_json)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RefusedRequest(_Model):
    """A signal the workflow could not accept, kept visible in the UI, the query and the audit."""

    handler: str
    problem: str
    received: str


def _duration(value: Any) -> Any:
    """A duration as people type it (`2h`, `90s`), as a number of seconds, or in ISO 8601
    (`PT2H`, as the converter writes it)."""
    if isinstance(value, str) and not value.startswith("P"):
        return parse_duration(value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class Policy(_Model):
    """What happens to a parked command nobody decides: `tsq policy set` (see `tsq.policy`)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_storable)]
    escalate_after: Duration | None = None
    expire_after: Duration | None = None
    expire_decision: Literal[DecisionKind.CANCEL, DecisionKind.COMPLETE] | None = None
    expire_reason: Reason | None = None
    expire_result_data: ResultData = None


class ScheduledRetry(_Model):
    """A retry an operator asked for at a later time."""

    request: RetryRequest
    at: datetime
    requested_at: datetime
    request_id: str


class Continued(_Model):
    """What a workflow carries into its next run when its history grows long."""

    refused_count: int = 0
    refused: list[RefusedRequest] = Field(default_factory=list)
    failed_count: int = 0
    failed: list[str] = Field(default_factory=list)
    runs: int = 1
    events: int = 0
    escalated: bool = False
    snoozed: timedelta = timedelta(0)
    scheduled: ScheduledRetry | None = None


class CommandSnapshot(_Model):
    """The workflow's input: its command as it was parked, and the parking it decides.

    Given at start, shown in the UI, never re-read: what the command is now, the workflow asks
    the database (`tsq.observe`). `parking_id` is None only for workflows started by tsq 0.1,
    which are bound to their parking when they first run this version's code.
    """

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
    parking_id: int | None = None
    policy: Policy | None = None
    continued: Continued | None = None


# Each request may name the parking it was decided for (the SDK and the CLI do): a workflow
# still finishing an earlier parking of the command refuses it, so the caller can wait for the
# workflow of the current one.
ParkingId = Annotated[int | None, Field(default=None, ge=1)]


class CancelRequest(_Model):
    """Input of the `cancel` signal and the `operator_cancel` update."""

    reason: Reason
    operator: Operator | None = None
    parking_id: ParkingId = None


class RetryRequest(_Model):
    """Input of the `retry` signal and the `operator_retry` update. With `not_before` (an
    ISO 8601 time with its offset) the retry waits until then: RETRY_SCHEDULED meanwhile."""

    operator: Operator | None = None
    parking_id: ParkingId = None
    not_before: AwareDatetime | None = None


class SnoozeRequest(_Model):
    """Input of the `snooze` signal and the `operator_snooze` update: the escalation and
    expiry not yet passed move later by `for` (`2h`, `30m`, or seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    for_: Duration = Field(alias="for")
    reason: Reason
    operator: Operator | None = None


class UnscheduleRequest(_Model):
    """Input of the `unschedule` signal and the `operator_unschedule` update: a scheduled
    retry is dropped and the command waits again."""

    operator: Operator | None = None
    reason: Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)] | None = (
        None
    )


class CompleteRequest(_Model):
    """Input of the `complete` signal and the `operator_complete` update."""

    result_data: ResultData = None
    operator: Operator | None = None
    parking_id: ParkingId = None


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
    # None: a decision of a workflow started by tsq 0.1, guarded by the status alone.
    parking_id: int | None = None
    reason: str | None = None
    operator: str | None = None
    result_data: dict[str, Any] | None = None
    # How the decision came: an operator's signal or update, or the workflow's own timer
    # (a policy's expiry, a scheduled retry).
    via: Literal["signal", "update", "policy", "schedule"]
    request_id: str | None = None


class DecisionOutcome(_Model):
    """What happened to a decision; the workflow's result and the update's answer.

    `decision` is None when the command left the troubleshooting queue by another hand while
    nobody had decided it here (`carried_out` False, status and detail say what happened).
    """

    decision: DecisionKind | None
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
    domain: str | None = None
    command_id: UUID | None = None
    parking_id: int | None = None
    changed_at: datetime | None = Field(
        default=None, description="Decided elsewhere: when the command left the queue"
    )
    scheduled_for: datetime | None = Field(
        default=None, description="A retry scheduled for later: when it will be carried out"
    )


class RecordRefusal(_Model):
    """Input of the activity that writes a refused signal to the audit trail (tsq 0.1)."""

    effect_key: str
    workflow_id: str
    domain: Domain
    command_id: UUID
    refusal: RefusedRequest


class RecordRefusals(_Model):
    """Input of the activity that writes refused signals to the audit trail, numbered from
    `first` so that a retried batch writes each once."""

    workflow_id: str
    domain: Domain
    command_id: UUID
    parking_id: int | None
    first: int
    refusals: list[RefusedRequest]


class RecordEvent(_Model):
    """Input of the activity that writes one of the workflow's own events to the audit trail
    (escalated, snoozed, retry scheduled ...), once; `notice` counts it for the notifier."""

    effect_key: str
    workflow_id: str
    domain: Domain
    command_id: UUID
    event: AuditEventType
    details: dict[str, Any]
    notice: Literal["escalations"] | None = None
    error_code: str | None = None


class Observe(_Model):
    """Input of the activity that reads the command's parking as the database has it now."""

    workflow_id: str
    domain: Domain
    command_id: UUID
    parking_id: int | None
    parked_at: datetime | None


class Observed(_Model):
    """The parking the workflow is bound to, and whether the command is still in it.

    `parking_id` None: no parking of the command matches the workflow (a workflow of tsq 0.1
    started for a parking that has ended). `outcome`: a decision tsq recorded for the parking
    elsewhere than in this workflow (a bulk operation), or what happened when another hand
    moved the command out.
    """

    parking_id: int | None
    open: bool
    outcome: DecisionOutcome | None = None
    policy: Policy | None = None


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
    refused: list[RefusedRequest] = Field(
        default_factory=list, description="The latest refused requests (at most a few)"
    )
    refused_count: int = Field(default=0, description="Refused requests in all")
    policy: str | None = Field(default=None, description="The policy this command follows")
    escalate_at: datetime | None = None
    escalated: bool = False
    expire_at: datetime | None = None
    expire_decision: DecisionKind | None = None
    snoozed: timedelta = timedelta(0)
    retry_scheduled_for: datetime | None = None
    retry_scheduled_by: str | None = None


def describe_input(raw: Any, limit: int = 500) -> str:
    """A short, storable rendering of whatever a caller sent, for refusals."""
    text = storable_text(repr(raw))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def describe_validation_error(err: ValidationError) -> str:
    """One line an operator can act on: `reason: must not be blank; operator: ...`."""
    parts = []
    for error in err.errors():
        where = ".".join(str(p) for p in error["loc"]) or "input"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
