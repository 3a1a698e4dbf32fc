"""What operators ask for: a decision, an approval or rejection, a note, a claim, a snooze,
an unschedule; each checked against the life, then a step, or refused."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from tsq.contract import (
    AuditEventType,
    CommandStatus,
    DecisionKind,
    TsqState,
    same_operator,
)
from tsq.durations import LONGEST
from tsq.errors import (
    AlreadyDecidedError,
    ClaimedError,
    InvalidInputError,
    InvalidOperationError,
    StaleParkingError,
)
from tsq.models import (
    APPROVAL_EXPIRES,
    REQUEST_MODELS,
    ApproveRequest,
    Claim,
    ClaimRequest,
    DecisionOutcome,
    DecisionRequest,
    Note,
    NoteRequest,
    Proposal,
    RejectRequest,
    ReleaseRequest,
    RetryRequest,
    ScheduledRetry,
    SnoozeRequest,
    UnscheduleRequest,
)
from tsq.workflows.rules._life import (
    KEPT,
    Deadline,
    Life,
    NewId,
    Pending,
    Publish,
    Record,
    Refused,
    Step,
    Via,
    decided,
    escalate_at,
    evolve,
    expire_at,
    later,
    live_claim,
    needs_approval,
    policy_name,
    snoozable,
    undefer,
)

# -- checks -------------------------------------------------------------------------------------


def _check_mismatch(life: Life) -> None:
    if life.mismatch:
        raise Refused(InvalidOperationError, life.mismatch)


def _check_undecided(life: Life) -> None:
    if decided(life):
        kind = life.pending.kind.value if life.pending else "a decision"
        raise Refused(
            AlreadyDecidedError,
            f"command {life.command_id} already has a decision ({kind}); a second one is refused",
        )


def _check_running(life: Life) -> None:
    """Notes and claims are for a command still to be decided here."""
    _check_mismatch(life)
    if life.outcome is not None:
        raise Refused(
            AlreadyDecidedError,
            f"command {life.command_id} is decided already ({life.state.value})",
        )


def _check_parking(life: Life, request: DecisionRequest) -> None:
    """A caller that names the parking it decided for is refused by a workflow finishing
    another one (it can wait for this one to end, then reach the right one)."""
    _check_mismatch(life)
    mine = life.parking_id
    if request.parking_id is not None and mine is not None and request.parking_id != mine:
        raise Refused(
            StaleParkingError,
            f"this workflow run decides parking {mine} of command {life.command_id}, not "
            f"parking {request.parking_id}: it is ending; try again in a moment",
        )


def _check_schedule(request: DecisionRequest, now: datetime) -> None:
    """A retry for later: its time must be ahead, and no more than ten years."""
    if not isinstance(request, RetryRequest) or request.not_before is None:
        return
    if request.not_before <= now:
        raise Refused(
            InvalidInputError,
            f"invalid input: not_before {request.not_before.isoformat()} is not in the future "
            f"(it is {now.isoformat()} now); retry without it to retry now",
        )
    if request.not_before > now + LONGEST:
        raise Refused(
            InvalidInputError,
            f"invalid input: not_before {request.not_before.isoformat()} is more than ten "
            "years ahead",
        )


def _check_claim(life: Life, operators: tuple[str | None, ...], force: bool, now: datetime) -> None:
    claim = live_claim(life, now)
    if claim is None or force or any(same_operator(claim.by, who) for who in operators):
        return
    raise Refused(
        ClaimedError,
        f"command {life.command_id} is claimed by {claim.by} until "
        f"{claim.until.isoformat(timespec='seconds')}: ask them, wait for the claim to end, or "
        "force it (audited)",
    )


def _check_decision(
    life: Life, kind: DecisionKind, request: DecisionRequest, now: datetime
) -> None:
    """An operator's decision: none other made or proposed, the command not claimed by
    someone else (unless forced), and a name to propose it under if it needs approval."""
    _check_undecided(life)
    proposal = life.proposal
    if proposal is not None:
        raise Refused(
            AlreadyDecidedError,
            f"command {life.command_id} has a decision awaiting approval "
            f"({proposal.decision.value} proposed by {proposal.proposed_by}): approve or "
            "reject it first",
        )
    _check_claim(life, (request.operator,), request.force, now)
    if needs_approval(life, kind) and not (request.operator or "").strip():
        raise Refused(
            InvalidInputError,
            f"invalid input: a {kind.value} of this command needs another operator's approval "
            f"(policy {policy_name(life)}), so it must name its operator",
        )


def _check_approval(life: Life, operator: str, verb: str, now: datetime) -> Proposal:
    _check_mismatch(life)
    proposal = life.proposal
    pending = life.pending
    if proposal is None and pending is not None and pending.approval is not None:
        raise Refused(
            AlreadyDecidedError,
            f"the {pending.kind.value} of command {life.command_id} proposed by "
            f"{pending.request.operator} was approved by {pending.approval.operator}: nothing "
            f"left to {verb}",
        )
    if proposal is None:
        raise Refused(
            InvalidOperationError,
            f"no decision of command {life.command_id} awaits approval (it is "
            f"{life.state.value}): nothing to {verb}",
        )
    if same_operator(operator, proposal.proposed_by):
        raise Refused(
            InvalidOperationError,
            f"four eyes: {proposal.proposed_by} proposed this {proposal.decision.value}, so "
            f"another operator must {verb} it",
        )
    if verb == "approve":
        force = bool(proposal.request.get("force"))
        _check_claim(life, (proposal.proposed_by, operator), force, now)
    return proposal


# -- an operator decides ------------------------------------------------------------------------
# Every operator's request takes the life, the request, the time it came at, and a way to name
# what it creates.


def decide(
    life: Life,
    kind: DecisionKind,
    request: DecisionRequest,
    via: Literal["signal", "update"],
    now: datetime,
    new_id: NewId,
) -> Step:
    """An operator's cancel, retry or complete: carried out now, scheduled (a retry for
    later), or proposed (the policy asks another operator's approval)."""
    _check_parking(life, request)
    _check_schedule(request, now)
    _check_decision(life, kind, request, now)
    if needs_approval(life, kind):
        assert request.operator is not None
        return propose(life, kind, request, request.operator.strip(), via, now, new_id)
    return _decided(life, kind, request, via, now, new_id)


def propose(
    life: Life,
    kind: DecisionKind,
    request: DecisionRequest,
    proposed_by: str,
    via: Literal["signal", "update", "policy", "schedule"],
    now: datetime,
    new_id: NewId,
    *,
    records: tuple[Record, ...] = (),
) -> Step:
    policy = life.policy
    expires = (policy.approval_expires_after if policy else None) or APPROVAL_EXPIRES
    proposal = Proposal(
        decision=kind,
        request=request.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
        proposed_by=proposed_by,
        proposed_at=now,
        expires_at=later(now, expires) or now + LONGEST,
        request_id=new_id(),
        via=via,
    )
    proposed = Record(
        AuditEventType.TSQ_PROPOSED,
        {
            "operator": proposal.proposed_by,
            "decision": kind.value,
            "request": proposal.request,
            "policy": policy_name(life),
            "expires_at": proposal.expires_at.isoformat(),
            "proposal_id": proposal.request_id,
        }
        | ({"via": via} if via in ("policy", "schedule") else {}),
        proposal=proposal,
        # A scheduled retry that came due as this proposal is no longer scheduled.
        unschedule=via == "schedule",
    )
    return Step(
        evolve(life, proposal=proposal, state=TsqState.PENDING_APPROVAL),
        records=(*records, proposed),
        publish=Publish.STATE,
        replan=True,
        accepted=proposal,
    )


def _decided(
    life: Life,
    kind: DecisionKind,
    request: DecisionRequest,
    via: Via,
    now: datetime,
    new_id: NewId,
    approval: ApproveRequest | None = None,
) -> Step:
    """A decision accepted: to carry out now, or (a retry for later) scheduled. A retry that
    was scheduled before is replaced, and the audit trail says so."""
    records: list[Record] = []
    superseded = life.scheduled
    if superseded is not None:
        records.append(
            Record(
                AuditEventType.TSQ_RETRY_UNSCHEDULED,
                {
                    "operator": request.operator,
                    "superseded_by": kind.value,
                    "scheduled_for": superseded.at.isoformat(),
                    "scheduled_by": superseded.request.operator,
                },
                unschedule=True,
            )
        )
    life = evolve(life, scheduled=None, deferred=undefer(life, Deadline.RETRY))
    if isinstance(request, RetryRequest) and request.not_before is not None:
        scheduled = ScheduledRetry(
            request=request,
            at=request.not_before,
            requested_at=now,
            request_id=new_id(),
            approved_by=approval.operator if approval else None,
            approval_comment=approval.comment if approval else None,
        )
        if approval is not None:
            # Carried out later by its timer: the approval is audited now, and the database's
            # hold of the proposal ends with it. (A decision carried out now has its approval
            # audited, and the hold ended, in its own transaction.)
            records.insert(
                0,
                Record(
                    AuditEventType.TSQ_APPROVED,
                    {
                        "operator": approval.operator,
                        "proposed_by": request.operator,
                        "decision": DecisionKind.RETRY.value,
                        "comment": approval.comment,
                        "not_before": scheduled.at.isoformat(),
                    },
                    withdraw=True,
                ),
            )
        records.append(
            Record(
                AuditEventType.TSQ_RETRY_SCHEDULED,
                {"operator": request.operator, "not_before": scheduled.at.isoformat()},
                schedule=scheduled,
            )
        )
        return Step(
            evolve(life, scheduled=scheduled, state=TsqState.RETRY_SCHEDULED),
            records=tuple(records),
            publish=Publish.STATE,
            replan=True,
            accepted=scheduled,
        )
    pending = Pending(kind, request, via, new_id(), now, approval)
    return Step(evolve(life, pending=pending), records=tuple(records), accepted=pending)


# -- four eyes ----------------------------------------------------------------------------------


def approve(life: Life, request: ApproveRequest, now: datetime, new_id: NewId) -> Step:
    """The proposal becomes the decision, at once: a second approval finds none left."""
    proposal = _check_approval(life, request.operator, "approve", now)
    life = evolve(life, proposal=None, state=TsqState.AWAITING_OPERATOR)
    decision = REQUEST_MODELS[proposal.decision].model_validate(proposal.request)
    if isinstance(decision, RetryRequest) and decision.not_before is not None:
        if decision.not_before <= now:
            decision = decision.model_copy(update={"not_before": None})
    return _decided(life, proposal.decision, decision, "approval", now, new_id, request)


def reject(life: Life, request: RejectRequest, now: datetime, new_id: NewId) -> Step:
    proposal = _check_approval(life, request.operator, "reject", now)
    return end_proposal(
        life,
        proposal,
        Record(
            AuditEventType.TSQ_REJECTED,
            {
                "operator": request.operator,
                "reason": request.reason,
                "decision": proposal.decision.value,
                "proposed_by": proposal.proposed_by,
                "proposal_id": proposal.request_id,
            },
            withdraw=True,
        ),
    )


def end_proposal(life: Life, proposal: Proposal, record: Record) -> Step:
    """A proposal rejected or expired: the command waits again. A proposal the policy's
    expiry made ends the expiry with it: an operator decides now."""
    scheduled = life.scheduled is not None
    life = evolve(
        life,
        proposal=None,
        state=TsqState.RETRY_SCHEDULED if scheduled else TsqState.AWAITING_OPERATOR,
        expiry_given_up=life.expiry_given_up or proposal.via == "policy",
        deferred={},
    )
    return Step(life, records=(record,), publish=Publish.STATE, replan=True)


# -- notes and claims ---------------------------------------------------------------------------


def note(life: Life, request: NoteRequest, now: datetime, new_id: NewId) -> Step:
    _check_running(life)
    kept = (*life.notes, Note(operator=request.operator, text=request.text, at=now))[-KEPT:]
    return Step(
        evolve(life, notes=kept, notes_count=life.notes_count + 1),
        records=(
            Record(AuditEventType.TSQ_NOTE, {"operator": request.operator, "text": request.text}),
        ),
        publish=Publish.DETAILS,
    )


def _check_claimable(life: Life, request: ClaimRequest, now: datetime) -> Claim | None:
    _check_running(life)
    _check_undecided(life)
    claim = live_claim(life, now)
    if claim is not None and not request.force and not same_operator(claim.by, request.operator):
        raise Refused(
            ClaimedError,
            f"command {life.command_id} is claimed by {claim.by} until "
            f"{claim.until.isoformat(timespec='seconds')}: ask them, or force it (audited)",
        )
    return claim


def claim(life: Life, request: ClaimRequest, now: datetime, new_id: NewId) -> Step:
    before = _check_claimable(life, request, now)
    by = request.operator.strip()
    kept = before is not None and same_operator(before.by, by)
    taken = Claim(
        by=by,
        since=before.since if before and kept else now,
        until=later(now, request.for_) or now + LONGEST,
    )
    details: dict[str, Any] = {"operator": by, "until": taken.until.isoformat()}
    if before is not None and not kept:
        details |= {"taken_from": before.by, "forced": True}
    return Step(
        evolve(life, claim=taken),
        records=(Record(AuditEventType.TSQ_CLAIMED, details, claim=taken),),
        publish=Publish.DETAILS,
        claim_set=by,
        replan=True,
    )


def _check_releasable(life: Life, request: ReleaseRequest, now: datetime) -> Claim:
    _check_running(life)
    claim = live_claim(life, now)
    if claim is None:
        raise Refused(
            InvalidOperationError,
            f"command {life.command_id} is not claimed: nothing to release",
        )
    if not request.force and not same_operator(claim.by, request.operator):
        raise Refused(
            ClaimedError,
            f"command {life.command_id} is claimed by {claim.by}, not by {request.operator}: "
            "only they release it, or force it (audited)",
        )
    return claim


def release(life: Life, request: ReleaseRequest, now: datetime, new_id: NewId) -> Step:
    claim = _check_releasable(life, request, now)
    details: dict[str, Any] = {"operator": request.operator, "claimed_by": claim.by}
    if not same_operator(claim.by, request.operator):
        details["forced"] = True
    return Step(
        evolve(life, claim=None),
        records=(Record(AuditEventType.TSQ_RELEASED, details, release=True),),
        publish=Publish.DETAILS,
        claim_unset=True,
        replan=True,
    )


# -- time ---------------------------------------------------------------------------------------


def _check_time(life: Life) -> None:
    _check_mismatch(life)
    _check_undecided(life)


def snooze(life: Life, request: SnoozeRequest, now: datetime, new_id: NewId) -> Step:
    """The escalation and expiry not yet passed move later by `for` (above zero, and never
    more than ten years past now)."""
    _check_time(life)
    if not snoozable(life):
        raise Refused(
            InvalidOperationError,
            f"nothing to snooze: command {life.command_id} has no escalation or expiry ahead "
            "(no policy gives it one, they have passed, or a retry is scheduled)",
        )
    if not timedelta(0) < request.for_ <= LONGEST:
        raise Refused(
            InvalidInputError, "invalid input: for: must be above zero, ten years at most"
        )
    moved = evolve(life, snoozed=life.snoozed + request.for_)
    escalate, expire = escalate_at(moved), expire_at(moved)
    furthest = now + LONGEST
    for before, after in ((escalate_at(life), escalate), (expire_at(life), expire)):
        if before is not None and (after is None or after > furthest):
            raise Refused(
                InvalidOperationError,
                f"a snooze moves the deadlines of command {life.command_id} at most ten years "
                "past now: this one would move them further",
            )
    return Step(
        evolve(moved, deferred={}),
        records=(
            Record(
                AuditEventType.TSQ_SNOOZED,
                {
                    "operator": request.operator,
                    "reason": request.reason,
                    "for_s": request.for_.total_seconds(),
                    "snoozed_s": moved.snoozed.total_seconds(),
                    "escalate_at": escalate.isoformat() if escalate else None,
                    "expire_at": expire.isoformat() if expire else None,
                },
            ),
        ),
        publish=Publish.DETAILS,
        replan=True,
    )


def unschedule(life: Life, request: UnscheduleRequest, now: datetime, new_id: NewId) -> Step:
    _check_time(life)
    scheduled = life.scheduled
    if scheduled is None:
        raise Refused(InvalidOperationError, f"no retry of command {life.command_id} is scheduled")
    return Step(
        evolve(
            life,
            scheduled=None,
            state=TsqState.PENDING_APPROVAL if life.proposal else TsqState.AWAITING_OPERATOR,
            deferred=undefer(life, Deadline.RETRY),
        ),
        records=(
            Record(
                AuditEventType.TSQ_RETRY_UNSCHEDULED,
                {
                    "operator": request.operator,
                    "reason": request.reason,
                    "scheduled_for": scheduled.at.isoformat(),
                    "scheduled_by": scheduled.request.operator,
                },
                unschedule=True,
            ),
        ),
        publish=Publish.STATE,
        replan=True,
    )


def outcome_of_proposal(life: Life, proposal: Proposal, kind: DecisionKind) -> DecisionOutcome:
    """An update's answer when its decision became a proposal."""
    return DecisionOutcome(
        decision=kind,
        carried_out=False,
        status=CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
        operator=proposal.proposed_by,
        request_id=proposal.request_id,
        domain=life.domain,
        command_id=life.command_id,
        parking_id=life.parking_id,
        proposal=proposal,
        detail=(
            f"{kind.value} proposed: policy {policy_name(life)} asks another operator to "
            f"approve it by {proposal.expires_at.isoformat(timespec='seconds')}"
        ),
    )


def outcome_of_schedule(life: Life, scheduled: ScheduledRetry) -> DecisionOutcome:
    """An update's answer when its retry was scheduled for later."""
    return DecisionOutcome(
        decision=DecisionKind.RETRY,
        carried_out=False,
        status=CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
        operator=scheduled.request.operator,
        request_id=scheduled.request_id,
        domain=life.domain,
        command_id=life.command_id,
        parking_id=life.parking_id,
        scheduled_for=scheduled.at,
        detail=f"retry scheduled for {scheduled.at.isoformat()}",
    )
