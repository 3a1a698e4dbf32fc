"""A parking's life: its state, a step of it, and when its deadlines come."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Any, Literal
from uuid import UUID

from tsq.contract import (
    AuditEventType,
    DecisionKind,
    TsqState,
    same_operator,
)
from tsq.errors import (
    TroubleshootingError,
)
from tsq.models import (
    ApproveRequest,
    Claim,
    DecisionOutcome,
    DecisionRequest,
    Note,
    Policy,
    Proposal,
    ScheduledRetry,
)

# How many notes and failed decisions a life keeps (the audit trail has them all).
KEPT = 5
# Records one event may ask for, at most: a burst of any event costs a bounded amount each.
MAX_RECORDS_PER_STEP = 3

Via = Literal["signal", "update", "approval", "policy", "schedule"]
NewId = Callable[[], str]

# What holds a decision back, by how it came: the rules below and the database's `tsq.decide`
# hold back the same (tests/integration/test_where_features_meet.py checks every pair). A
# claim, unless forced or the claimer's own decision or approval; a proposal waiting, all but
# its approval; a policy asking approval for the kind, any decision without one.
HELD_BACK_BY: dict[str, frozenset[str]] = {
    "claim": frozenset({"signal", "update", "bulk", "approval", "policy", "schedule"}),
    "proposal": frozenset({"signal", "update", "bulk", "policy", "schedule"}),
    "approval": frozenset({"signal", "update", "bulk", "policy", "schedule"}),
}


class Refused(Exception):
    """An event the rules refuse: nothing changed. `error` is the class the caller gets."""

    def __init__(self, error: type[TroubleshootingError], message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Publish(IntEnum):
    """What the workflow shows after a step: nothing new, its details, or its details and the
    `TsqState` search attribute (each upsert is a history event: only where the state moves)."""

    NONE = 0
    DETAILS = 1
    STATE = 2


class Deadline(StrEnum):
    """The two deadlines that decide: a policy's expiry and a scheduled retry."""

    EXPIRY = "expiry"
    RETRY = "retry"


@dataclass(frozen=True)
class Record:
    """An audit row the workflow writes (with the holds the database keeps beside it)."""

    event: AuditEventType
    details: dict[str, Any]
    notice: Literal["escalations", "given_up"] | None = None
    # The claim taken (kept in `tsq.claim`, for decisions outside the workflow to respect),
    # or, with `release`, given up.
    claim: Claim | None = None
    release: bool = False
    # The proposal made (kept in `tsq.proposal`: the database refuses other decisions while
    # it waits), or, with `withdraw`, ended without being carried out.
    proposal: Proposal | None = None
    withdraw: bool = False
    # The retry scheduled (kept in `tsq.scheduled_retry`, for readers without Temporal), or,
    # with `unschedule`, no longer.
    schedule: ScheduledRetry | None = None
    unschedule: bool = False


@dataclass(frozen=True)
class Pending:
    """The decision being carried out."""

    kind: DecisionKind
    request: DecisionRequest
    via: Via
    request_id: str
    requested_at: datetime
    approval: ApproveRequest | None = None
    # An approval written to the audit trail already (a retry approved for later).
    approval_audited: bool = False


@dataclass(frozen=True)
class Life:
    """One parking of a command, as far as tsq's rules are concerned."""

    domain: str
    command_id: UUID
    parking_id: int | None
    parked_at: datetime
    policy: Policy | None = None
    state: TsqState = TsqState.AWAITING_OPERATOR
    snoozed: timedelta = timedelta(0)
    escalated: bool = False
    scheduled: ScheduledRetry | None = None
    proposal: Proposal | None = None
    claim: Claim | None = None
    pending: Pending | None = None
    outcome: DecisionOutcome | None = None
    # The policy's expiry could not be carried out, or its proposal was turned down: it is
    # not tried again; an operator decides.
    expiry_given_up: bool = False
    # Deadlines held back now, and why (what the audit trail was told).
    deferred: dict[str, str] = field(default_factory=dict)
    notes: tuple[Note, ...] = ()
    notes_count: int = 0
    failed: tuple[str, ...] = ()
    failed_count: int = 0
    # Set when the workflow's id does not name its command: it decides nothing.
    mismatch: str | None = None


@dataclass(frozen=True)
class Step:
    """The next life, and what the workflow does about it, in this order: search attributes,
    what it shows, the records, then (in its run loop) the decision, if one is pending."""

    life: Life
    records: tuple[Record, ...] = ()
    publish: Publish = Publish.NONE
    # Set `TsqClaimedBy` to this name / unset it.
    claim_set: str | None = None
    claim_unset: bool = False
    escalated: bool = False
    # Read the command's parking from the database again.
    observe: bool = False
    # A deadline moved: wait anew.
    replan: bool = False
    # What an operator's request came to: a decision to carry out now, a retry scheduled, a
    # proposal (for an update's answer).
    accepted: Pending | ScheduledRetry | Proposal | None = None
    # The parking is done with: the workflow ends with this.
    finished: DecisionOutcome | None = None
    # A decision another request made for this parking won: the loser's problem.
    lost: str | None = None


def evolve(life: Life, **changes: Any) -> Life:
    return dataclasses.replace(life, **changes)


# -- reading the life ---------------------------------------------------------------------------


def decided(life: Life) -> bool:
    return life.pending is not None or life.outcome is not None


def live_claim(life: Life, now: datetime) -> Claim | None:
    claim = life.claim
    return claim if claim is not None and claim.until > now else None


def needs_approval(life: Life, kind: DecisionKind) -> bool:
    return life.policy is not None and kind in life.policy.require_approval


def later(at: datetime, by: timedelta) -> datetime | None:
    """`at + by`, or None (never) past what a date can hold."""
    try:
        return at + by
    except OverflowError:
        return None


def escalate_at(life: Life) -> datetime | None:
    policy = life.policy
    if policy is None or policy.escalate_after is None:
        return None
    return later(life.parked_at, policy.escalate_after + life.snoozed)


def expire_at(life: Life) -> datetime | None:
    policy = life.policy
    if policy is None or policy.expire_after is None:
        return None
    return later(life.parked_at, policy.expire_after + life.snoozed)


def held_by(life: Life, deadline: Deadline, now: datetime) -> str | None:
    """What holds a deadline back now: a proposal waiting, or a claim by someone other than
    the deadline's own author (the policy is nobody; a scheduled retry is its operator's)."""
    if life.proposal is not None:
        return f"proposal of a {life.proposal.decision.value} by {life.proposal.proposed_by}"
    claim = live_claim(life, now)
    if claim is None:
        return None
    if deadline is Deadline.RETRY and life.scheduled is not None:
        if same_operator(claim.by, life.scheduled.request.operator):
            return None
    return f"claim by {claim.by}"


def next_wake(life: Life, now: datetime) -> datetime | None:
    """The next moment something may be due; None: nothing ever is. A deadline held back by a
    claim or a proposal wakes the workflow once (to say so), then waits for that to end, whose
    end is itself a moment here."""
    if decided(life):
        return None
    times = [
        at
        for at in (
            life.proposal.expires_at if life.proposal else None,
            life.claim.until if life.claim else None,
        )
        if at is not None
    ]
    if life.scheduled is not None:
        # An operator decided; the policy waits with them.
        if _waking(life, Deadline.RETRY, now):
            times.append(life.scheduled.at)
        return min(times, default=None)
    escalate = None if life.escalated else escalate_at(life)
    if escalate is not None:
        times.append(escalate)
    expire = expiry_ahead(life)
    if expire is not None and _waking(life, Deadline.EXPIRY, now):
        times.append(expire)
    return min(times, default=None)


def _waking(life: Life, deadline: Deadline, now: datetime) -> bool:
    """Whether a deadline's time wakes the workflow: unless it is held back and said so."""
    holder = held_by(life, deadline, now)
    return holder is None or life.deferred.get(deadline.value) != holder


def expiry_ahead(life: Life) -> datetime | None:
    if life.expiry_given_up or life.policy is None or life.policy.expire_decision is None:
        return None
    return expire_at(life)


def snoozable(life: Life) -> bool:
    """Whether a snooze has anything to move: the policy's escalation or expiry ahead."""
    if life.scheduled is not None:
        return False
    escalate = None if life.escalated else escalate_at(life)
    return escalate is not None or expiry_ahead(life) is not None


def undefer(life: Life, deadline: Deadline) -> dict[str, str]:
    return {name: why for name, why in life.deferred.items() if name != deadline.value}


def policy_name(life: Life) -> str:
    return life.policy.name if life.policy is not None else "none"
