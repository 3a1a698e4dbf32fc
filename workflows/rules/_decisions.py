"""The database: the parking read again, and the result of carrying a decision out."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from tsq.contract import (
    DECISIONS,
    AuditEventType,
    TsqState,
)
from tsq.errors import (
    ApprovalRequiredError,
)
from tsq.models import (
    DecisionOutcome,
    Observed,
)
from tsq.workflows.rules._life import (
    KEPT,
    Deadline,
    Life,
    NewId,
    Publish,
    Record,
    Step,
    evolve,
    policy_name,
)
from tsq.workflows.rules._requests import propose

# -- the database -------------------------------------------------------------------------------


def observed(life: Life, seen: Observed) -> Step:
    """The parking read again: the policy it follows now, and whether the command is still in
    it. A command that left (decided by a bulk operation, another tool, or deleted) ends the
    parking, and whatever was under way for it ends with an audit row saying so."""
    changes: dict[str, Any] = {}
    publish = Publish.NONE
    replan = False
    if seen.parking_id != life.parking_id:
        changes["parking_id"] = seen.parking_id
    if seen.policy != life.policy:
        changes["policy"] = seen.policy
        publish, replan = Publish.DETAILS, True
    life = evolve(life, **changes)
    if seen.open or life.pending is not None:
        # A decision in flight finds out for itself, in its transaction.
        return Step(life, publish=publish, replan=replan)
    outcome = seen.outcome
    assert outcome is not None
    return _finish(life, outcome, _ended_by(life, outcome))


def _ended_by(life: Life, outcome: DecisionOutcome) -> tuple[Record, ...]:
    """What was under way when the command was decided elsewhere: a proposal voided, a
    scheduled retry dropped."""
    why = outcome.detail
    records: list[Record] = []
    if life.proposal is not None:
        records.append(
            Record(
                AuditEventType.TSQ_PROPOSAL_VOIDED,
                {
                    "decision": life.proposal.decision.value,
                    "proposed_by": life.proposal.proposed_by,
                    "proposal_id": life.proposal.request_id,
                    "why": why,
                },
                withdraw=True,
            )
        )
    if life.scheduled is not None:
        records.append(
            Record(
                AuditEventType.TSQ_RETRY_UNSCHEDULED,
                {
                    "superseded_by": outcome.decision.value if outcome.decision else "elsewhere",
                    "scheduled_for": life.scheduled.at.isoformat(),
                    "scheduled_by": life.scheduled.request.operator,
                    "why": why,
                },
                unschedule=True,
            )
        )
    return tuple(records)


def _finish(life: Life, outcome: DecisionOutcome, records: tuple[Record, ...] = ()) -> Step:
    state = (
        DECISIONS[outcome.decision].done_state
        if outcome.carried_out and outcome.decision is not None
        else TsqState.DECIDED_ELSEWHERE
    )
    return Step(
        evolve(
            life,
            outcome=outcome,
            state=state,
            claim=None,
            proposal=None,
            scheduled=None,
            deferred={},
        ),
        records=records,
        publish=Publish.STATE,
        claim_unset=life.claim is not None,
        finished=outcome,
    )


# -- carrying a decision out --------------------------------------------------------------------


def carrying_out(life: Life) -> Step:
    """The pending decision goes to the database: the details say CANCELING (or RETRYING,
    COMPLETING) at once; `TsqState` changes once, to the outcome, unless it is held up."""
    assert life.pending is not None
    state = DECISIONS[life.pending.kind].working_state
    return Step(evolve(life, state=state), publish=Publish.DETAILS)


def held_up() -> Publish:
    """The first attempt failed (database away, row locked): the list shows the working
    state from now on, while the attempts go on with backoff."""
    return Publish.STATE


def carried_out(life: Life, outcome: DecisionOutcome) -> Step:
    """The decision's transaction committed, or found the parking decided already (by another
    request of this workflow, a bulk operation, the run it was reset from, another tool)."""
    pending = life.pending
    assert pending is not None
    step = _finish(life, outcome)
    if outcome.request_id not in (None, pending.request_id):
        kind = outcome.decision.value if outcome.decision else "decided"
        lost = (
            f"command {life.command_id} was already decided: {kind} by "
            f"{outcome.operator or 'an unnamed operator'}"
        )
        return dataclasses.replace(step, lost=lost)
    return step


def refused(life: Life, error: str | None, message: str, now: datetime, new_id: NewId) -> Step:
    """The database refused the pending decision for good (nothing changed). An operator's
    decision is refused to its caller and the command waits again. A deadline's decision: one
    that needs approval becomes a proposal (a policy the workflow had not read yet asks for
    it); any other is given up, audited, with a notice."""
    pending = life.pending
    assert pending is not None
    failed = (*life.failed, f"{pending.kind.value} refused: {message}")[-KEPT:]
    life = evolve(
        life,
        pending=None,
        state=TsqState.AWAITING_OPERATOR,
        failed=failed,
        failed_count=life.failed_count + 1,
    )
    if pending.via not in ("policy", "schedule"):
        # A policy asking for approval was set since this workflow last read it: read it.
        return Step(life, publish=Publish.STATE, observe=error == ApprovalRequiredError.__name__)
    if error == ApprovalRequiredError.__name__:
        proposed_by = (
            pending.request.operator if pending.via == "schedule" else None
        ) or f"policy:{policy_name(life)}"
        step = propose(life, pending.kind, pending.request, proposed_by, pending.via, now, new_id)
        return dataclasses.replace(step, observe=True)
    deadline = Deadline.EXPIRY if pending.via == "policy" else Deadline.RETRY
    given_up = Record(
        AuditEventType.TSQ_DEADLINE_GIVEN_UP,
        {
            "deadline": deadline.value,
            "decision": pending.kind.value,
            "operator": pending.request.operator,
            "problem": message,
        },
        notice="given_up",
        unschedule=deadline is Deadline.RETRY,
    )
    return Step(
        evolve(life, expiry_given_up=life.expiry_given_up or deadline is Deadline.EXPIRY),
        records=(given_up,),
        publish=Publish.STATE,
    )
