"""The rules of a command's life, checked by machine: thousands of random interleavings of every
event that can reach a parking, with hostile values, and the invariants checked after each step.

The machine plays the workflow (it feeds events to `workflows/rules.py` and carries the steps
out) and the database (it carries decisions out as `tsq.decide` would: refusing what a claim, a
waiting proposal or a policy's approval holds back). Requests are parsed from raw JSON values
by the same models the workflow parses them with, so hostile values meet the same validation.
In CI (`CI` set), or with `HYPOTHESIS_PROFILE=ci`, it runs many more examples.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pydantic import ValidationError

from tsq.contract import AuditEventType, DecisionKind, TsqState, operator_key
from tsq.durations import LONGEST
from tsq.errors import ApprovalRequiredError, InvalidInputError, PayloadNotFoundError
from tsq.models import (
    REQUEST_MODELS,
    ApproveRequest,
    ClaimRequest,
    DecisionOutcome,
    NoteRequest,
    Observed,
    Policy,
    Proposal,
    RejectRequest,
    ReleaseRequest,
    ScheduledRetry,
    SnoozeRequest,
    UnscheduleRequest,
)
from tsq.workflows import rules
from tsq.workflows.rules import Deadline, Life, Pending, Refused, Step

settings.register_profile(
    "quick",
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "quick")
)

START = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
# Names, with lookalikes of alice: every one of them is alice to four eyes and claims.
NAMES = [
    "alice",
    " ALICE ",
    "alice\u200b",
    "\uff41\uff4c\uff49\uff43\uff45",
    "al\u00adice",
    "bob",
    "Bob\u2003",
    "carol",
    "",
    "   ",
    "\u200b\u200d",
    None,
    "policy:p",
    "x" * 201,
]
# Mostly people who can act, with every kind of hostile name among them.
PEOPLE = ["alice", "bob", "carol", "alice", "bob", "carol", *NAMES]
# Durations as operators and hostile callers send them.
DURATIONS: list[Any] = [
    -604800,
    -1,
    0,
    0.5,
    1,
    59,
    3600,
    "2h",
    "7d",
    "0s",
    "-5m",
    "nonsense",
    86400 * 3650,
    86400 * 3654,
    300_000_000_000,
    10**30,
    float("inf"),
    float("nan"),
    True,
    None,
    "PT1H",
]
ADVANCES = [timedelta(0), timedelta(seconds=1), timedelta(seconds=3), timedelta(minutes=1)]
ADVANCES += [timedelta(hours=2), timedelta(hours=2)]
ADVANCES += [timedelta(days=1), timedelta(days=8), timedelta(days=4000)]
MAX_TICKS = 20


def _policies() -> st.SearchStrategy[Policy | None]:
    durations = st.sampled_from([None, "1s", "1m", "1m", "2h", "7d", "3653d"])
    return st.one_of(
        st.none(),
        st.builds(
            lambda esc, exp, kind, approval, approval_after: _policy(
                esc, exp, kind, approval, approval_after
            ),
            durations,
            durations,
            st.sampled_from([DecisionKind.CANCEL, DecisionKind.COMPLETE]),
            st.lists(st.sampled_from(list(DecisionKind)), min_size=0, max_size=3, unique=True)
            | st.just([DecisionKind.RETRY]),
            st.sampled_from([None, "1m", "1h"]),
        ),
    )


def _policy(
    escalate: str | None,
    expire: str | None,
    kind: DecisionKind,
    approval: list[DecisionKind],
    approval_after: str | None,
) -> Policy | None:
    if escalate is None and expire is None and not approval:
        return None
    return Policy.model_validate(
        {
            "name": "p",
            "escalate_after": escalate,
            "expire_after": expire,
            "expire_decision": kind if expire else None,
            "expire_reason": "expired" if expire and kind is DecisionKind.CANCEL else None,
            "require_approval": approval,
            "approval_expires_after": approval_after if approval else None,
        }
    )


def _parse(model: type[Any], raw: Any) -> Any | None:
    """As the workflow parses a request; None when it would refuse it as invalid input."""
    try:
        return model.model_validate(raw)
    except (ValidationError, ValueError, OverflowError, TypeError):
        return None


class CommandLife(RuleBasedStateMachine):
    """One parking, its workflow and its database, driven by hostile operators and time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.ids = (f"id-{n}" for n in itertools.count())
        self.life = Life(domain="payments", command_id=uuid4(), parking_id=1, parked_at=START)
        # What the database holds: the policy as set now (the workflow reads it when told).
        self.db_policy: Policy | None = None
        self.carried: list[tuple[Pending, Policy | None]] = []
        self.records: list[rules.Record] = []

    def new_id(self) -> str:
        return next(self.ids)

    # -- feeding the rules ----------------------------------------------------------------------

    def apply(self, step: Step) -> None:
        """Carry a step out, checking what holds of every step."""
        before = self.life
        assert len(step.records) <= rules.MAX_RECORDS_PER_STEP, step.records
        self._check_deadlines_end_once(before, step)
        self._check_approvals(step)
        self.life = step.life
        self.records += step.records
        for record in step.records:
            hypothesis.event(record.event.value)
        if isinstance(step.accepted, Pending):
            hypothesis.event(f"decision via {step.accepted.via}")

    def event(self, rule: Any, *args: Any) -> Step | None:
        try:
            step: Step = rule(self.life, *args)
        except Refused as refusal:
            assert refusal.message
            return None
        self.apply(step)
        return step

    def settle(self) -> None:
        """What the workflow's run loop does after every event (each wakes it) and at every
        deadline: tick until quiet, or until a
        decision is to be carried out (the database answers it as an event of its own, so
        that other requests can come in meanwhile)."""
        for _ in range(MAX_TICKS):
            if rules.decided(self.life):
                return
            step = rules.tick(self.life, self.now, self.new_id)
            if step.life == self.life and not step.records:
                return
            self.apply(step)
        raise AssertionError(f"no quiet after {MAX_TICKS} ticks: {self.life}")

    def carry_out_as_database(self, result: str = "ok") -> None:
        """`tsq.decide` on the pending decision: it holds back what `HELD_BACK_BY` says."""
        pending = self.life.pending
        assert pending is not None
        claim = rules.live_claim(self.life, self.now)
        names = (pending.request.operator, pending.approval.operator if pending.approval else None)
        holds = {
            "claim": claim is not None
            and not pending.request.force
            and not any(operator_key(claim.by) == operator_key(n) for n in names if n),
            "proposal": self.life.proposal is not None,
            "approval": self.db_policy is not None
            and pending.kind in self.db_policy.require_approval
            and pending.approval is None,
        }
        held = {
            hold for hold, on in holds.items() if on and pending.via in rules.HELD_BACK_BY[hold]
        }
        # The workflow never sends what a claim or a proposal it knows of holds back; only a
        # policy it has not read yet can hold one back.
        assert held <= {"approval"}, (held, pending)
        if held:
            refusal = ApprovalRequiredError.__name__
            self.apply(rules.refused(self.life, refusal, "needs", self.now, self.new_id))
            return
        if result != "ok":
            self.apply(
                rules.refused(self.life, result, f"{result}: refused", self.now, self.new_id)
            )
            return
        outcome = DecisionOutcome(
            decision=pending.kind,
            carried_out=True,
            status="DONE",
            operator=pending.request.operator,
            request_id=pending.request_id,
            detail="carried out",
        )
        self.carried.append((pending, self.db_policy))
        self.apply(rules.carried_out(self.life, outcome))

    # -- the events -----------------------------------------------------------------------------

    @initialize(policy=_policies())
    def parked(self, policy: Policy | None) -> None:
        """The command is parked under a policy (or none), which its workflow starts with."""
        self.db_policy = policy
        self.life = rules.Life(
            domain="payments", command_id=self.life.command_id, parking_id=1, parked_at=START,
            policy=policy,
        )  # fmt: skip

    @rule(advance=st.sampled_from(ADVANCES))
    def time_passes(self, advance: timedelta) -> None:
        self.now += advance
        self.settle()

    @rule(
        kind=st.sampled_from(list(DecisionKind)),
        operator=st.sampled_from(PEOPLE),
        force=st.booleans(),
        via=st.sampled_from(["signal", "update"]),
        patch=st.sampled_from([None, {"data": {"amount": 1}}, {"reply_to": "eve"}, {}]),
    )
    def operator_decides(
        self, kind: DecisionKind, operator: str | None, force: bool, via: str,
        patch: dict[str, Any] | None,
    ) -> None:  # fmt: skip
        raw: dict[str, Any] = {"operator": operator, "force": force}
        if kind is DecisionKind.CANCEL:
            raw["reason"] = "hostile"
        if kind is DecisionKind.RETRY and patch is not None:
            raw["patch"] = patch
        self._decide(kind, raw, via)

    @rule(
        operator=st.sampled_from(PEOPLE),
        later=st.sampled_from([-60, 0, 2, 2, 60, 3600, 86400 * 30, 86400 * 3654, "naive"]),
        force=st.booleans(),
    )
    def operator_schedules_a_retry(self, operator: str | None, later: Any, force: bool) -> None:
        if later == "naive":
            at = (self.now + timedelta(hours=1)).replace(tzinfo=None).isoformat()
        else:
            at = (self.now + timedelta(seconds=later)).isoformat()
        raw = {"operator": operator, "not_before": at, "force": force}
        self._decide(DecisionKind.RETRY, raw, "update")

    def _decide(self, kind: DecisionKind, raw: dict[str, Any], via: str) -> None:
        request = _parse(REQUEST_MODELS[kind], raw)
        if request is None:
            return
        self.event(rules.decide, kind, request, via, self.now, self.new_id)
        self.settle()

    @precondition(lambda self: self.life.proposal is not None)
    @rule(operator=st.sampled_from(["alice", "bob", "carol", "policy:p"]), approve=st.booleans())
    def an_operator_answers_the_proposal(self, operator: str, approve: bool) -> None:
        self.second_operator(operator, approve)

    @rule(operator=st.sampled_from(PEOPLE), approve=st.booleans())
    def second_operator(self, operator: str | None, approve: bool) -> None:
        if approve:
            request = _parse(ApproveRequest, {"operator": operator, "comment": "ok"})
            if request is not None:
                self.event(rules.approve, request, self.now, self.new_id)
        else:
            request = _parse(RejectRequest, {"operator": operator, "reason": "no"})
            if request is not None:
                self.event(rules.reject, request, self.now, self.new_id)
        self.settle()

    @rule(for_=st.sampled_from(DURATIONS), operator=st.sampled_from(NAMES))
    def snooze(self, for_: Any, operator: str | None) -> None:
        request = _parse(SnoozeRequest, {"for": for_, "reason": "later", "operator": operator})
        if request is not None:
            self.event(rules.snooze, request, self.now, self.new_id)
        self.settle()

    @rule(operator=st.sampled_from(NAMES))
    def unschedule(self, operator: str | None) -> None:
        request = _parse(UnscheduleRequest, {"operator": operator})
        if request is not None:
            self.event(rules.unschedule, request, self.now, self.new_id)
        self.settle()

    @rule(operator=st.sampled_from(NAMES), count=st.sampled_from([1, 1, 3, 30]))
    def notes(self, operator: str | None, count: int) -> None:
        for n in range(count):
            request = _parse(NoteRequest, {"text": f"note {n}", "operator": operator})
            if request is not None:
                self.event(rules.note, request, self.now, self.new_id)
        self.settle()

    @rule(
        operator=st.sampled_from(PEOPLE),
        for_=st.sampled_from(DURATIONS),
        force=st.booleans(),
        release=st.booleans(),
    )
    def claims(self, operator: str | None, for_: Any, force: bool, release: bool) -> None:
        if release:
            request = _parse(ReleaseRequest, {"operator": operator, "force": force})
            if request is not None:
                self.event(rules.release, request, self.now, self.new_id)
        else:
            request = _parse(ClaimRequest, {"operator": operator, "for": for_, "force": force})
            if request is not None:
                self.event(rules.claim, request, self.now, self.new_id)
        self.settle()

    @rule(policy=_policies(), told=st.booleans())
    def policy_changes(self, policy: Policy | None, told: bool) -> None:
        """A policy set (or deleted); the watcher tells the workflow, or has not yet."""
        self.db_policy = policy
        if told:
            self.workflow_reads_the_database()

    @rule()
    def workflow_reads_the_database(self) -> None:
        self.event(rules.observed, Observed(parking_id=1, open=True, policy=self.db_policy))
        self.settle()

    @precondition(lambda self: self.life.pending is not None and self.life.outcome is None)
    @rule(
        result=st.sampled_from(
            ["ok", "ok", "ok", InvalidInputError.__name__, PayloadNotFoundError.__name__]
        )
    )
    def database_answers(self, result: str) -> None:
        """The decision's transaction: committed, or refused for good."""
        hypothesis.event(f"decision: {result}")
        self.carry_out_as_database(result)
        self.settle()

    @rule(by_bulk=st.booleans(), now=st.sampled_from([True, False, False, False]))
    def decided_elsewhere(self, by_bulk: bool, now: bool) -> None:
        """Another tool, or a bulk operation (which the database holds to the same rules)."""
        if not now or self.life.outcome is not None or self.life.pending is not None:
            return
        approval = self.db_policy is not None and DecisionKind.CANCEL in (
            self.db_policy.require_approval
        )
        held = self.life.proposal is not None or rules.live_claim(self.life, self.now) is not None
        if by_bulk and (held or approval):
            return  # the database refuses the item; nothing changes
        outcome = DecisionOutcome(
            decision=DecisionKind.CANCEL if by_bulk else None,
            carried_out=by_bulk,
            status="CANCELED",
            detail="decided elsewhere",
            bulk_id="b" if by_bulk else None,
        )
        self.event(rules.observed, Observed(parking_id=1, open=False, outcome=outcome))

    # -- what holds after every step ------------------------------------------------------------

    def _check_approvals(self, step: Step) -> None:
        """No decision that needs approval goes out without one by a different operator."""
        accepted = step.accepted
        if not isinstance(accepted, Pending):
            return
        policy = step.life.policy
        if policy is not None and accepted.kind in policy.require_approval:
            approval = accepted.approval
            assert approval is not None, f"{accepted.kind} needs approval: {accepted}"
            assert operator_key(approval.operator), approval
            assert operator_key(approval.operator) != operator_key(accepted.request.operator)

    def _check_deadlines_end_once(self, before: Life, step: Step) -> None:
        """A scheduled retry and a policy's expiry end once, each with its trace: carried out
        (or proposed), or a record that says why not."""
        events = [record.event for record in step.records]
        scheduled = before.scheduled
        if scheduled is not None and step.life.scheduled != scheduled:
            fired = (
                isinstance(step.accepted, Pending | Proposal)
                and getattr(step.accepted, "via", None) == "schedule"
            )
            ended = events.count(AuditEventType.TSQ_RETRY_UNSCHEDULED)
            assert fired + ended == 1, (scheduled, step)
        if not before.expiry_given_up and step.life.expiry_given_up:
            traced = {
                AuditEventType.TSQ_DEADLINE_GIVEN_UP,
                AuditEventType.TSQ_REJECTED,
                AuditEventType.TSQ_PROPOSAL_EXPIRED,
            }
            assert traced & set(events), step

    @invariant()
    def one_decision_at_most(self) -> None:
        assert len(self.carried) <= 1
        if self.life.outcome is not None:
            assert self.life.proposal is None and self.life.scheduled is None

    @invariant()
    def every_decision_carried_out_was_approved_where_asked(self) -> None:
        for pending, policy in self.carried:
            if policy is not None and pending.kind in policy.require_approval:
                assert pending.approval is not None
                assert operator_key(pending.approval.operator) != operator_key(
                    pending.request.operator
                )

    @invariant()
    def time_stays_where_dates_can_hold_it(self) -> None:
        furthest = self.now + LONGEST + timedelta(days=3653)
        for at in (rules.escalate_at(self.life), rules.expire_at(self.life)):
            assert at is None or at <= furthest + (self.now - START)
        if self.life.policy is not None and self.life.policy.escalate_after is not None:
            assert rules.escalate_at(self.life) is not None
        rules.next_wake(self.life, self.now)
        assert len(self.life.notes) <= rules.KEPT and len(self.life.failed) <= rules.KEPT

    @invariant()
    def nothing_due_is_left_waiting_unsaid(self) -> None:
        """Quiet now: a deadline due is either held back (and the audit trail says by what),
        or gone; once what held it ends, it goes out."""
        life = self.life
        if rules.decided(life):
            return
        due: list[tuple[Deadline, datetime]] = []
        if life.scheduled is not None:
            due.append((Deadline.RETRY, life.scheduled.at))
        elif (at := rules.expiry_ahead(life)) is not None:
            due.append((Deadline.EXPIRY, at))
        for deadline, at in due:
            if at > self.now:
                continue
            holder = rules.held_by(life, deadline, self.now)
            assert holder is not None, f"{deadline} due at {at} and not held: {life}"
            assert life.deferred.get(deadline.value) == holder, (deadline, holder, life.deferred)

    @invariant()
    def what_is_accepted_can_be_held(self) -> None:
        life = self.life
        if life.claim is not None:
            assert life.claim.until - life.claim.since <= LONGEST + timedelta(days=3653)
            assert operator_key(life.claim.by)
        if life.proposal is not None:
            assert life.state is TsqState.PENDING_APPROVAL
            assert operator_key(life.proposal.proposed_by)
        if isinstance(life.scheduled, ScheduledRetry):
            assert life.scheduled.at <= life.scheduled.requested_at + LONGEST


CommandLife.TestCase.settings = settings()
test_command_life = pytest.mark.unit(CommandLife.TestCase)


def test_lookalike_names_have_one_key() -> None:
    """NFKC, format characters, case and whitespace do not make two people of one."""
    keys = {operator_key(name) for name in NAMES[:5]}
    assert keys == {"alice"}
    assert operator_key("bob") != operator_key("alice")
    assert operator_key("\u200b\u200d") == "" and operator_key(None) == ""
