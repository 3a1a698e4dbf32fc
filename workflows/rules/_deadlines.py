"""Time: what comes due for a waiting command, and what it leads to."""

from __future__ import annotations

from datetime import datetime

from tsq.contract import (
    AuditEventType,
    DecisionKind,
)
from tsq.models import (
    ApproveRequest,
    CancelRequest,
    CompleteRequest,
    DecisionRequest,
)
from tsq.workflows.rules._life import (
    Deadline,
    Life,
    NewId,
    Pending,
    Publish,
    Record,
    Step,
    decided,
    escalate_at,
    evolve,
    expiry_ahead,
    held_by,
    needs_approval,
    undefer,
)
from tsq.workflows.rules._requests import end_proposal, propose


def tick(life: Life, now: datetime, new_id: NewId) -> Step:
    """Time has come to `now`: the most decisive thing due, if anything is (one per step)."""
    if decided(life):
        return Step(life)
    proposal = life.proposal
    if proposal is not None and proposal.expires_at <= now:
        return end_proposal(
            life,
            proposal,
            Record(
                AuditEventType.TSQ_PROPOSAL_EXPIRED,
                {
                    "decision": proposal.decision.value,
                    "proposed_by": proposal.proposed_by,
                    "proposed_at": proposal.proposed_at.isoformat(),
                    "expires_at": proposal.expires_at.isoformat(),
                    "proposal_id": proposal.request_id,
                },
                withdraw=True,
            ),
        )
    if life.claim is not None and life.claim.until <= now:
        return Step(
            evolve(life, claim=None), publish=Publish.DETAILS, claim_unset=True, replan=True
        )
    scheduled = life.scheduled
    if scheduled is not None:
        if scheduled.at > now:
            return Step(life)
        return _due(life, Deadline.RETRY, scheduled.at, now, new_id)
    expire = expiry_ahead(life)
    if expire is not None and expire <= now:
        step = _due(life, Deadline.EXPIRY, expire, now, new_id)
        if step.records or step.accepted:
            return step
    escalate = None if life.escalated else escalate_at(life)
    if escalate is not None and escalate <= now:
        return _escalate(life)
    return Step(life)


def _due(life: Life, deadline: Deadline, due_at: datetime, now: datetime, new_id: NewId) -> Step:
    """A deadline that decides has come: carried out, proposed (the policy asks approval for
    its kind), or deferred while something holds the command (audited once per hold)."""
    holder = held_by(life, deadline, now)
    if holder is not None:
        if life.deferred.get(deadline.value) == holder:
            return Step(life)
        return Step(
            evolve(life, deferred={**life.deferred, deadline.value: holder}),
            records=(
                Record(
                    AuditEventType.TSQ_DEADLINE_DEFERRED,
                    {
                        "deadline": deadline.value,
                        "due_at": due_at.isoformat(),
                        "blocked_by": holder,
                        "until": "it ends",
                    },
                ),
            ),
            publish=Publish.DETAILS,
            replan=True,
        )
    life = evolve(life, deferred=undefer(life, deadline))
    if deadline is Deadline.RETRY:
        scheduled = life.scheduled
        assert scheduled is not None
        life = evolve(life, scheduled=None)
        request = scheduled.request.model_copy(update={"not_before": None})
        if scheduled.approved_by is None and needs_approval(life, DecisionKind.RETRY):
            # Scheduled before the policy asked approval for retries: its operator proposes it.
            return propose(
                life,
                DecisionKind.RETRY,
                request,
                (scheduled.request.operator or "").strip() or "an unnamed operator",
                "schedule",
                now,
                new_id,
            )
        approval = (
            ApproveRequest(operator=scheduled.approved_by, comment=scheduled.approval_comment)
            if scheduled.approved_by
            else None
        )
        pending = Pending(
            DecisionKind.RETRY,
            request,
            "schedule",
            new_id(),
            now,
            approval,
            approval_audited=approval is not None,
        )
        return Step(evolve(life, pending=pending), accepted=pending)
    policy = life.policy
    assert policy is not None and policy.expire_decision is not None
    operator = f"policy:{policy.name}"
    decision: DecisionRequest
    if policy.expire_decision is DecisionKind.CANCEL:
        assert policy.expire_reason is not None
        decision = CancelRequest(reason=policy.expire_reason, operator=operator)
    else:
        decision = CompleteRequest(result_data=policy.expire_result_data, operator=operator)
    if needs_approval(life, policy.expire_decision):
        return propose(life, policy.expire_decision, decision, operator, "policy", now, new_id)
    pending = Pending(policy.expire_decision, decision, "policy", new_id(), now)
    return Step(evolve(life, pending=pending), accepted=pending)


def _escalate(life: Life) -> Step:
    policy = life.policy
    assert policy is not None
    return Step(
        evolve(life, escalated=True),
        records=(
            Record(
                AuditEventType.TSQ_ESCALATED,
                {
                    "policy": policy.name,
                    "escalate_after_s": policy.escalate_after.total_seconds()
                    if policy.escalate_after
                    else None,
                    "parked_at": life.parked_at.isoformat(),
                },
                notice="escalations",
            ),
        ),
        publish=Publish.DETAILS,
        escalated=True,
    )
