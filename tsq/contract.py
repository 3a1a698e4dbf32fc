"""The contract other tools depend on, in one place, importing nothing but the standard library.

Workflow type, task queue, workflow id format, search attribute names, activity names, the
statuses and audit events tsq reads and writes, and what each decision does. The workflow, the
activities, the SDK, the CLI and the docs read these; change them only with care: operators'
saved queries, other services and waiting workflows depend on them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

WORKFLOW_TYPE = "TroubleshootingWorkflow"
BULK_WORKFLOW_TYPE = "TsqBulkOperation"
DEFAULT_TASK_QUEUE = "troubleshooting"

# The version of the rules of a command's life (`workflows/rules.py`) a workflow started now
# follows; its input says so (`CommandSnapshot.rules`).
RULES = 1

DOMAIN_PATTERN = r"^[A-Za-z0-9_]{1,40}$"
_WORKFLOW_ID = re.compile(r"^tsq:([A-Za-z0-9_]{1,40}):([0-9a-fA-F-]{36})$")


def workflow_id(domain: str, command_id: UUID | str) -> str:
    """`tsq:<domain>:<command_id>`: deterministic, so starting a workflow twice is harmless."""
    return f"tsq:{domain}:{command_id}"


def bulk_workflow_id(bulk_id: UUID | str) -> str:
    """`tsq-bulk:<bulk_id>`: a bulk operation's workflow."""
    return f"tsq-bulk:{bulk_id}"


def parse_workflow_id(wid: str) -> tuple[str, UUID] | None:
    """The domain and command id a workflow id names, or None if it is not a tsq id."""
    match = _WORKFLOW_ID.fullmatch(wid)
    if match is None:
        return None
    try:
        return match[1], UUID(match[2])
    except ValueError:
        return None


class SearchAttribute(StrEnum):
    """tsq's search attributes, registered by `tsq migrate` and the worker: Keyword, but for
    `TsqEscalated` (Bool, set true when a policy's escalation passed undecided). `TsqClaimedBy`
    names the operator who claimed the command, while the claim lasts."""

    @property
    def kind(self) -> str:
        return "Bool" if self is SearchAttribute.TSQ_ESCALATED else "Keyword"

    COMMAND_DOMAIN = "CommandDomain"
    COMMAND_TYPE = "CommandType"
    TSQ_STATE = "TsqState"
    LAST_ERROR_CODE = "LastErrorCode"
    TSQ_ESCALATED = "TsqEscalated"
    TSQ_CLAIMED_BY = "TsqClaimedBy"


# The server refuses Keyword values over 2 KB; tsq keeps well under it and marks the cut.
KEYWORD_LIMIT = 1000


def keyword(value: str) -> str:
    """`value` cut to KEYWORD_LIMIT bytes of UTF-8, ending in `…` where cut."""
    data = value.encode("utf-8", "replace")
    if len(data) <= KEYWORD_LIMIT:
        return value
    return data[: KEYWORD_LIMIT - 3].decode("utf-8", "ignore") + "…"


class CommandStatus(StrEnum):
    """`commandbus.command.status`, as the reference command bus writes it."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    IN_TROUBLESHOOTING_QUEUE = "IN_TROUBLESHOOTING_QUEUE"


TERMINAL_STATUSES = (CommandStatus.COMPLETED, CommandStatus.CANCELED)


class AuditEventType(StrEnum):
    """`commandbus.audit.event_type` values tsq writes: the reference library's names for the
    same events, and tsq's own (prefixed `TSQ_`) for events it has no name for."""

    MOVED_TO_TSQ = "MOVED_TO_TSQ"
    OPERATOR_CANCEL = "OPERATOR_CANCEL"
    OPERATOR_RETRY = "OPERATOR_RETRY"
    OPERATOR_COMPLETE = "OPERATOR_COMPLETE"
    TSQ_SIGNAL_REFUSED = "TSQ_SIGNAL_REFUSED"
    TSQ_POLICY_CHANGED = "TSQ_POLICY_CHANGED"
    TSQ_ESCALATED = "TSQ_ESCALATED"
    TSQ_SNOOZED = "TSQ_SNOOZED"
    TSQ_RETRY_SCHEDULED = "TSQ_RETRY_SCHEDULED"
    TSQ_RETRY_UNSCHEDULED = "TSQ_RETRY_UNSCHEDULED"
    TSQ_PROPOSED = "TSQ_PROPOSED"
    TSQ_APPROVED = "TSQ_APPROVED"
    TSQ_REJECTED = "TSQ_REJECTED"
    TSQ_PROPOSAL_EXPIRED = "TSQ_PROPOSAL_EXPIRED"
    TSQ_NOTE = "TSQ_NOTE"
    TSQ_CLAIMED = "TSQ_CLAIMED"
    TSQ_RELEASED = "TSQ_RELEASED"
    TSQ_CLAIM_FORCED = "TSQ_CLAIM_FORCED"
    # A policy's expiry or a scheduled retry that came due while a claim or a proposal held
    # the command: it happens once that ends.
    TSQ_DEADLINE_DEFERRED = "TSQ_DEADLINE_DEFERRED"
    # A policy's expiry or a scheduled retry that could not be carried out (the database
    # refused it for good): an operator decides instead.
    TSQ_DEADLINE_GIVEN_UP = "TSQ_DEADLINE_GIVEN_UP"
    # A proposal that ended because the command was decided otherwise (a bulk operation,
    # another tool) before anyone approved or rejected it.
    TSQ_PROPOSAL_VOIDED = "TSQ_PROPOSAL_VOIDED"


class TsqState(StrEnum):
    """Value of the `TsqState` search attribute and of `state().state`."""

    AWAITING_OPERATOR = "AWAITING_OPERATOR"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    RETRY_SCHEDULED = "RETRY_SCHEDULED"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"
    RETRYING = "RETRYING"
    RETRIED = "RETRIED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    DECIDED_ELSEWHERE = "DECIDED_ELSEWHERE"


# Characters that show nothing: Unicode's default-ignorable code points (zero-width spaces and
# joiners, soft hyphens, bidirectional marks, variation selectors, Hangul fillers, tags). With
# every other format character (category Cf), they are dropped before names are compared.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def operator_key(name: str | None) -> str:
    """What an operator name is compared by: NFKC, without invisible and format characters,
    case folded, whitespace trimmed and runs of it made one space. `alice`, ` ALICE `, `alice`
    followed by a zero-width space and `alice` in fullwidth letters have one key. The database
    never normalizes: it compares the keys computed here (`operator_key` in tsq.decide's
    input)."""
    if name is None:
        return ""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(c for c in _INVISIBLE.sub("", text) if unicodedata.category(c) != "Cf")
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def same_operator(a: str | None, b: str | None) -> bool:
    """Whether two operator names are one person's (see `operator_key`); a missing or blank
    name is nobody's."""
    key = operator_key(a)
    return bool(key) and key == operator_key(b)


class DecisionKind(StrEnum):
    CANCEL = "cancel"
    RETRY = "retry"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Decision:
    """What one kind of decision does: the one table the activity, the workflow's details and
    handler descriptions, the CLI's help, the SDK's docstrings and the README follow."""

    kind: DecisionKind
    status_after: CommandStatus
    audit_event: AuditEventType
    # The outcome in the reply to the sender; None: no reply (the command runs again).
    reply_outcome: str | None
    # The reference command bus's batch counter update for this decision.
    batch_update: str
    working_state: TsqState
    done_state: TsqState
    past: str
    effect: str
    example: dict[str, object]

    @property
    def update(self) -> str:
        """The update's name; the signal is named `kind`."""
        return f"operator_{self.kind.value}"


_OPERATOR = "you@example.com"
DECISIONS: dict[DecisionKind, Decision] = {
    DecisionKind.CANCEL: Decision(
        kind=DecisionKind.CANCEL,
        status_after=CommandStatus.CANCELED,
        audit_event=AuditEventType.OPERATOR_CANCEL,
        reply_outcome="CANCELED",
        batch_update="tsq_cancel",
        working_state=TsqState.CANCELING,
        done_state=TsqState.CANCELED,
        past="canceled",
        effect="status CANCELED, OPERATOR_CANCEL audit, CANCELED reply with the reason",
        example={"reason": "Invalid account", "operator": _OPERATOR},
    ),
    DecisionKind.RETRY: Decision(
        kind=DecisionKind.RETRY,
        status_after=CommandStatus.PENDING,
        audit_event=AuditEventType.OPERATOR_RETRY,
        reply_outcome=None,
        batch_update="tsq_retry",
        working_state=TsqState.RETRYING,
        done_state=TsqState.RETRIED,
        past="retried",
        effect=(
            "the original message is sent again to the command's queue, status PENDING, "
            "attempts 0, OPERATOR_RETRY audit; no reply"
        ),
        example={"operator": _OPERATOR},
    ),
    DecisionKind.COMPLETE: Decision(
        kind=DecisionKind.COMPLETE,
        status_after=CommandStatus.COMPLETED,
        audit_event=AuditEventType.OPERATOR_COMPLETE,
        reply_outcome="SUCCESS",
        batch_update="tsq_complete",
        working_state=TsqState.COMPLETING,
        done_state=TsqState.COMPLETED,
        past="completed",
        effect="status COMPLETED, OPERATOR_COMPLETE audit, SUCCESS reply with result_data",
        example={"result_data": {"note": "done by hand"}, "operator": _OPERATOR},
    ),
}


class Activity(StrEnum):
    """Registered activity names (the workflow calls them by these)."""

    CARRY_OUT = "tsq.carry_out"
    RECORD_REFUSAL = "tsq.record_refusal"
    RECORD_REFUSALS = "tsq.record_refusals"
    OBSERVE = "tsq.observe"
    RECORD_EVENT = "tsq.record_event"
    RECORD = "tsq.record"
    BULK_RUN = "tsq.bulk_run"
    BULK_PROGRESS = "tsq.bulk_progress"
    BULK_FINISH = "tsq.bulk_finish"
    BULK_VERDICT = "tsq.bulk_verdict"


# What each item of a bulk operation came to, in the order its summary lists them: carried
# out, skipped (nothing to do: decided already, or gone), failed (refused: someone must look).
BULK_CARRIED_OUT = ("carried_out",)
BULK_SKIPPED = ("already_decided", "not_in_troubleshooting_queue", "not_found")
BULK_FAILED = (
    "needs_approval",
    "proposal_pending",
    "claimed",
    "payload_not_found",
    "invalid",
    "error",
)


def bulk_tally(counts: dict[str, int]) -> tuple[int, int, int]:
    """A bulk operation's counts per result as (carried out, skipped, failed)."""

    def total(group: tuple[str, ...]) -> int:
        return sum(counts.get(result, 0) for result in group)

    return total(BULK_CARRIED_OUT), total(BULK_SKIPPED), total(BULK_FAILED)


class Metric(StrEnum):
    """tsq's Prometheus metrics (counters get `_total` on the endpoint)."""

    COMMANDS_WAITING = "tsq_commands_waiting"
    OLDEST_WAITING = "tsq_oldest_waiting_seconds"
    DECISIONS = "tsq_decisions"
    REFUSED_REQUESTS = "tsq_refused_requests"
    DECISIONS_HELD_UP = "tsq_decisions_held_up"
    DISCOVERY_LAG = "tsq_discovery_lag_seconds"
    DRIFT_LAG = "tsq_drift_lag_seconds"
    NOTIFICATIONS = "tsq_notifications"
    COMMANDS_SKIPPED = "tsq_commands_skipped"
