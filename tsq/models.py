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

from tsq.contract import (
    DOMAIN_PATTERN,
    AuditEventType,
    DecisionKind,
    TsqState,
    bulk_tally,
    operator_key,
)
from tsq.durations import LONGEST, parse_duration
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


def _visible_name(text: str | None) -> str | None:
    """A name is compared by its `operator_key`: one with nothing visible names nobody."""
    if text is not None and not operator_key(text):
        raise ValueError("must name someone (it is blank once invisible characters are removed)")
    return text


Reason = Annotated[
    str,
    StringConstraints(max_length=2000),
    AfterValidator(_storable),
    AfterValidator(_no_blank),
]
Operator = Annotated[
    str,
    StringConstraints(max_length=200),
    AfterValidator(_storable),
    AfterValidator(_visible_name),
]
# Who approves, rejects, claims: four eyes need two names, so a name is required.
NamedOperator = Annotated[
    str,
    StringConstraints(max_length=200),
    AfterValidator(_storable),
    AfterValidator(_no_blank),
    AfterValidator(_visible_name),
]
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

# What an edit is for: the command's data, the part of the message its handler reads. The
# envelope (ids, type, domain, correlation, reply queue, times) says which command this is and
# where its answer goes: an edited message is still the same command, with the same reply.
EDITABLE = "data"


def _merge_patch(value: dict[str, Any]) -> dict[str, Any]:
    others = sorted(key for key in value if key != EDITABLE)
    if others:
        raise ValueError(
            f'edits the command\'s data only ({{"{EDITABLE}": {{...}}}}), not '
            f"{', '.join(others)}: the rest of the message says which command it is and where "
            "its reply goes"
        )
    if EDITABLE not in value:
        raise ValueError(f'is empty: give {{"{EDITABLE}": {{...}}}}, or leave it out')
    if not isinstance(value[EDITABLE], dict) or not value[EDITABLE]:
        raise ValueError(
            f"{EDITABLE} must be a non-empty JSON object merged into the command's data "
            "(RFC 7396: null removes a key)"
        )
    stored = _storable_json(value)
    assert stored is not None
    return stored


# A JSON merge patch (RFC 7396) of the original message's data: objects merge, null removes a
# key, anything else replaces.
MergePatch = Annotated[dict[str, Any], AfterValidator(_merge_patch)]


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


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    if value > LONGEST:
        raise ValueError("must be at most ten years")
    return value


PositiveDuration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_positive)]

# How long a proposal waits for a second operator when its policy does not say, and how long a
# claim lasts when its operator does not say.
APPROVAL_EXPIRES = timedelta(hours=24)
CLAIM_LASTS = timedelta(hours=1)


class Policy(_Model):
    """What happens to a parked command nobody decides: `tsq policy set` (see `tsq.policy`)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_storable)]
    escalate_after: PositiveDuration | None = None
    expire_after: PositiveDuration | None = None
    expire_decision: Literal[DecisionKind.CANCEL, DecisionKind.COMPLETE] | None = None
    expire_reason: Reason | None = None
    expire_result_data: ResultData = None
    # Decisions that become proposals, carried out once another operator approves. Every
    # policy that matches the command adds its own: a more specific policy never removes one.
    require_approval: list[DecisionKind] = Field(default_factory=list)
    approval_expires_after: PositiveDuration | None = None


class Proposal(_Model):
    """A decision that waits for a second operator's approval (`PENDING_APPROVAL`)."""

    decision: DecisionKind
    # The decision's input as the proposer gave it (reason, result data, patch, not_before).
    request: dict[str, Any]
    proposed_by: str
    proposed_at: datetime
    expires_at: datetime
    request_id: str
    # How the decision came: an operator's signal or update, or (when the policy asks approval
    # for its kind) the policy's own expiry or a retry scheduled before that policy was set.
    via: Literal["signal", "update", "policy", "schedule"]


class Claim(_Model):
    """An operator on the command: others' decisions are refused unless forced (audited)."""

    by: str
    since: datetime
    until: datetime


class Note(_Model):
    operator: str | None
    text: str
    at: datetime


class ScheduledRetry(_Model):
    """A retry an operator asked for at a later time."""

    request: RetryRequest
    at: datetime
    requested_at: datetime
    request_id: str
    # A retry proposed for later and approved: carried out as approved (the approval is in the
    # audit trail already).
    approved_by: str | None = None
    approval_comment: str | None = None


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
    proposal: Proposal | None = None
    claim: Claim | None = None
    notes: list[Note] = Field(default_factory=list)
    notes_count: int = 0
    # Deadlines held by a claim or a proposal, and what the audit trail was told of it.
    deferred: dict[str, str] = Field(default_factory=dict)
    expiry_given_up: bool = False


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
    # The version of the rules the workflow follows (`workflows/rules.py`); None: a workflow
    # started before them, which takes them at its next event (see `workflows/compat.py`).
    rules: int | None = None


# Each request may name the parking it was decided for (the SDK and the CLI do): a workflow
# still finishing an earlier parking of the command refuses it, so the caller can wait for the
# workflow of the current one.
ParkingId = Annotated[int | None, Field(default=None, ge=1)]


class CancelRequest(_Model):
    """Input of the `cancel` signal and the `operator_cancel` update."""

    reason: Reason
    operator: Operator | None = None
    parking_id: ParkingId = None
    # Decide a command another operator has claimed (audited as TSQ_CLAIM_FORCED).
    force: bool = False


class RetryRequest(_Model):
    """Input of the `retry` signal and the `operator_retry` update. With `not_before` (an
    ISO 8601 time with its offset) the retry waits until then: RETRY_SCHEDULED meanwhile."""

    operator: Operator | None = None
    parking_id: ParkingId = None
    not_before: AwareDatetime | None = None
    patch: MergePatch | None = None
    force: bool = False


class SnoozeRequest(_Model):
    """Input of the `snooze` signal and the `operator_snooze` update: the escalation and
    expiry not yet passed move later by `for` (`2h`, `30m`, or seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    for_: PositiveDuration = Field(alias="for")
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
    force: bool = False


class ApproveRequest(_Model):
    """Input of the `approve` signal and the `operator_approve` update: the proposal waiting
    is carried out. The approver is never the proposer."""

    operator: NamedOperator
    comment: Reason | None = None


class RejectRequest(_Model):
    """Input of the `reject` signal and the `operator_reject` update: the proposal waiting is
    dropped and the command waits again."""

    operator: NamedOperator
    reason: Reason


class NoteRequest(_Model):
    """Input of the `note` signal and the `operator_note` update."""

    text: Reason
    operator: Operator | None = None


class ClaimRequest(_Model):
    """Input of the `claim` signal and the `operator_claim` update: `for` how long (`1h` when
    not given); `force` takes over another operator's claim (audited)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    operator: NamedOperator
    for_: PositiveDuration = Field(default=CLAIM_LASTS, alias="for")
    force: bool = False


class ReleaseRequest(_Model):
    """Input of the `release` signal and the `operator_release` update; `force` releases
    another operator's claim (audited)."""

    operator: NamedOperator
    force: bool = False


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
    # How the decision came: an operator's signal or update, a second operator's approval of
    # a proposal, or the workflow's own timer (a policy's expiry, a scheduled retry).
    via: Literal["signal", "update", "approval", "policy", "schedule"]
    request_id: str | None = None
    patch: dict[str, Any] | None = None
    force: bool = False
    approved_by: str | None = None
    approval_comment: str | None = None
    # The approval is in the audit trail already (a retry approved for later).
    approval_audited: bool = False


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
    proposal: Proposal | None = Field(
        default=None, description="The decision needs approval: the proposal waiting for it"
    )
    approved_by: str | None = None
    bulk_id: str | None = Field(
        default=None, description="The bulk operation that made this decision, if one did"
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
    # The workflow's count of its own events: a claim written late never undoes a later one.
    seq: int = 0
    notice: Literal["escalations", "given_up"] | None = None
    error_code: str | None = None
    # A claim taken (kept in `tsq.claim` for decisions outside the workflow to respect) or,
    # with None and `release`, given up; in the same transaction as the audit row.
    claim: Claim | None = None
    release: bool = False
    parking_id: int | None = None


class AuditRecord(_Model):
    """One row a workflow writes to the audit trail, once (under `effect_key`), with what the
    database keeps beside it: a claim taken or released, a proposal made or ended (`seq` is
    the workflow's count of its own events: a hold written late never undoes a later one), and
    for the notifier, one more in its count."""

    effect_key: str
    event: AuditEventType
    details: dict[str, Any]
    seq: int = 0
    notice: Literal["escalations", "given_up"] | None = None
    claim: Claim | None = None
    release: bool = False
    proposal: Proposal | None = None
    withdraw: bool = False
    schedule: ScheduledRetry | None = None
    unschedule: bool = False


class AuditRecords(_Model):
    """Input of the activity that writes a batch of a workflow's audit records in one
    transaction: a burst of notes, claims or refused signals costs one activity per batch."""

    workflow_id: str
    domain: Domain
    command_id: UUID
    parking_id: int | None
    error_code: str | None = None
    records: list[AuditRecord]


def refusal_details(refusal: RefusedRequest, workflow_id: str) -> dict[str, Any]:
    """A refused request as its audit row keeps it; what a caller sent may hold what PostgreSQL
    cannot store (a NUL in a signal's name), written as escapes."""
    return {
        "handler": storable_text(refusal.handler),
        "problem": storable_text(refusal.problem),
        "received": storable_text(refusal.received),
        "workflow_id": workflow_id,
    }


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


class BulkStart(_Model):
    """Input of a bulk operation's workflow; its selection and request are in `tsq.bulk`.
    Under four eyes (`approval_expires_at` set), it waits for another operator than
    `operator` to approve (or reject) it, until then."""

    bulk_id: UUID
    domain: Domain
    decision: DecisionKind
    total: int
    rate: float | None = Field(default=None, gt=0, description="Decisions per second at most")
    operator: str | None = None
    approval_expires_at: datetime | None = None


class BulkApproval(_Model):
    """Input of a bulk operation's `approve` and `reject` updates: another operator than the
    one who started it; a rejection says why."""

    operator: NamedOperator
    comment: Reason | None = None
    reason: Reason | None = None


class BulkVerdict(_Model):
    """Input of the activity that ends a bulk proposal: approved (it runs), rejected, or
    expired."""

    bulk_id: UUID
    verdict: Literal["approved", "rejected", "expired"]
    operator: str | None = None
    text: str | None = None


class BulkRun(_Model):
    """Input of the activity that decides a bulk operation's items, chunk after chunk."""

    bulk_id: UUID
    rate: float | None = Field(default=None, gt=0)


class BulkProgress(_Model):
    """What a chunk did, and where the operation stands."""

    done: int
    remaining: int
    stopped: bool
    counts: dict[str, int]


class BulkFinish(_Model):
    """Input of the activity that ends a bulk operation; `stopped_by` when a stop came as a
    signal (from the Web UI, say) rather than from `tsq bulk stop`."""

    bulk_id: UUID
    stopped_by: str | None = None


class BulkOperation(_Model):
    """A bulk operation as `tsq.bulk` has it."""

    bulk_id: UUID
    domain: str
    decision: DecisionKind
    operator: str
    selection: str
    total: int
    rate: float | None
    counts: dict[str, int]
    status: Literal["proposed", "running", "stopped", "finished", "rejected", "expired"]
    created_at: datetime
    stop_requested_by: str | None
    stop_requested_at: datetime | None
    last_effect_at: datetime | None
    finished_at: datetime | None
    operator_key: str | None = None
    needing_approval: int = Field(
        default=0, description="Commands of the selection a policy asks approval for"
    )
    approval_expires_at: datetime | None = None
    approved_by: str | None = None
    approved_by_key: str | None = None
    approved_at: datetime | None = None
    approval_comment: str | None = None
    rejected_by: str | None = None
    rejection_reason: str | None = None

    @property
    def carried_out(self) -> int:
        return bulk_tally(self.counts)[0]

    @property
    def skipped(self) -> int:
        return bulk_tally(self.counts)[1]

    @property
    def failed(self) -> int:
        return bulk_tally(self.counts)[2]

    @property
    def remaining(self) -> int:
        return self.total - sum(self.counts.values())


class BulkItem(_Model):
    """One command of a bulk operation; `result` None while it is not decided."""

    seq: int
    command_id: UUID
    parking_id: int | None
    result: str | None
    detail: str | None
    decided_at: datetime | None


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
    require_approval: list[DecisionKind] = Field(
        default_factory=list, description="Decisions the policy makes proposals of"
    )
    proposal: Proposal | None = Field(default=None, description="A decision awaiting approval")
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    notes: list[Note] = Field(default_factory=list, description="The latest notes")
    notes_count: int = 0
    deferred: dict[str, str] = Field(
        default_factory=dict,
        description="Deadlines due but held back (expiry, retry), and what holds each",
    )
    expiry_given_up: bool = Field(
        default=False, description="The policy's expiry will not be tried again"
    )


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
