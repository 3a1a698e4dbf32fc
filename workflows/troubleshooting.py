"""`TroubleshootingWorkflow`: waits, durably, for an operator's decision on one parking.

Versions. Workflows started by tsq 0.1 wait for days on the code that started them, so their
histories must replay.
- A workflow whose input names its parking (`parking_id`) was started by this version: its
  decision is bound to its parking; refused requests are counted, kept few and written to the
  audit trail in batches; it continues as new before its history grows too long; it follows
  the database when the command leaves the queue by another hand; Request Cancellation never
  interrupts a decision. The input tells the versions apart, so a new workflow records no
  version marker (a patch marker costs each start two more events and a visibility write).
- A workflow without one (tsq 0.1) replays its history the old way. At its first new event (a
  signal or update after the upgrade) it takes this version's behaviour behind
  `workflow.patched("tsq-2-upgrade@<history length>")` and binds itself to its parking; the
  marker names the history length, so each workflow has its own and finds it when replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Sequence
from datetime import timedelta
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

with workflow.unsafe.imports_passed_through():
    from tsq.contract import (
        DECISIONS,
        WORKFLOW_TYPE,
        Activity,
        AuditEventType,
        CommandStatus,
        DecisionKind,
        Metric,
        TsqState,
        keyword,
        same_operator,
        workflow_id,
    )
    from tsq.converter import UndecodableInput
    from tsq.durations import LONGEST
    from tsq.errors import (
        AlreadyDecidedError,
        ApprovalRequiredError,
        ClaimedError,
        InvalidInputError,
        InvalidOperationError,
        StaleParkingError,
    )
    from tsq.models import (
        APPROVAL_EXPIRES,
        REQUEST_MODELS,
        ApproveRequest,
        CancelRequest,
        CarryOut,
        Claim,
        ClaimRequest,
        CommandSnapshot,
        CompleteRequest,
        Continued,
        DecisionOutcome,
        DecisionRequest,
        Note,
        NoteRequest,
        Observe,
        Observed,
        Proposal,
        RecordEvent,
        RecordRefusal,
        RecordRefusals,
        RefusedRequest,
        RejectRequest,
        ReleaseRequest,
        RetryRequest,
        ScheduledRetry,
        SnoozeRequest,
        StateView,
        UnscheduleRequest,
        describe_input,
        describe_validation_error,
        json_problem,
    )
    from tsq.workflows import TSQ_CLAIMED_BY, TSQ_ESCALATED, TSQ_STATE
    from tsq.workflows.deadlines import Deadlines, Due
    from tsq.workflows.details import (
        APPROVE_EXAMPLE,
        CLAIM_EXAMPLE,
        NOTE_EXAMPLE,
        REJECT_EXAMPLE,
        RELEASE_EXAMPLE,
        render_details,
        render_static_details,
        steps_of,
    )

UPGRADE = "tsq-2-upgrade"

# Each attempt gets this long; attempts go on, with backoff, until the database answers.
ACTIVITY_TIMEOUT = timedelta(seconds=30)
_NON_RETRYABLE = [
    "CommandNotFoundError",
    "InvalidOperationError",
    "PayloadNotFoundError",
    "InvalidInputError",
    "ClaimedError",
    "ApprovalRequiredError",
]
ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=_NON_RETRYABLE,
)
# A decision's first attempt, on its own: when it fails, the workflow list is told the decision
# is held up before the attempts go on.
FIRST_ATTEMPT = RetryPolicy(maximum_attempts=1, non_retryable_error_types=_NON_RETRYABLE)

# Refused requests kept in memory (the audit trail has them all) and written per activity.
KEPT = 5
REFUSALS_PER_WRITE = 200

_ANSWER = (
    " Answers once it is done; refused, with the reason, if the input is wrong or the "
    "command was already decided."
)
_SNOOZE = (
    "Snooze: the escalation and expiry not yet passed move later by `for`, audited. "
    'Input: {"for": "2h", "reason": "waiting for the ledger team", "operator": "you@example.com"}'
)
_UNSCHEDULE = (
    "Unschedule: a retry scheduled for later is dropped and the command waits again, audited. "
    'Input: {"operator": "you@example.com", "reason": "fixed by hand"}'
)
_APPROVE = (
    "Approve: the decision proposed (PENDING_APPROVAL) is carried out; by an operator other "
    f"than the proposer, audited. Input: {json.dumps(APPROVE_EXAMPLE)}"
)
_REJECT = (
    "Reject: the decision proposed is dropped and the command waits again; by an operator "
    f"other than the proposer, audited. Input: {json.dumps(REJECT_EXAMPLE)}"
)
_NOTE = f"Note: kept with the command, audited. Input: {json.dumps(NOTE_EXAMPLE)}"
_CLAIM = (
    "Claim: you are on this command; other operators' decisions are refused unless forced "
    f"until the claim ends (default 1h). Input: {json.dumps(CLAIM_EXAMPLE)}"
)
_RELEASE = (
    f"Release your claim (another's with force, audited). Input: {json.dumps(RELEASE_EXAMPLE)}"
)
_CANCELLATION_REFUSED = (
    "cancelling the workflow does not decide the command; send the `cancel` signal "
    "(or `retry`, `complete`) instead. The workflow keeps waiting"
)
_CANCELLATION_DURING_DECISION = (
    "cancelling the workflow does not stop a decision being carried out: it goes on, and the "
    "workflow ends with its outcome"
)


def _describe(kind: DecisionKind, answer: str = "") -> str:
    decision = DECISIONS[kind]
    return (
        f"{kind.value.capitalize()}: {decision.effect}.{answer} "
        f"Input: {json.dumps(decision.example)}"
    )


_Via = Literal["signal", "update", "approval", "policy", "schedule"]


class _Pending:
    """The decision being carried out, and the callers waiting on it."""

    def __init__(
        self,
        kind: DecisionKind,
        request: DecisionRequest,
        via: _Via,
        approval: ApproveRequest | None = None,
    ) -> None:
        self.kind = kind
        self.request = request
        self.via = via
        self.approval = approval
        # Names the request in the recorded outcome: the update's id, or a fresh one.
        update = workflow.current_update_info()
        self.request_id = update.id if update is not None else str(workflow.uuid4())
        self.requested_at = workflow.now()
        self.outcome: DecisionOutcome | None = None
        self.error: ApplicationError | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None or self.error is not None


@workflow.defn(name=WORKFLOW_TYPE)
class TroubleshootingWorkflow:
    """One per parking of a command in the troubleshooting queue; id `tsq:<domain>:<id>`."""

    @workflow.init
    def __init__(self, command: CommandSnapshot) -> None:
        self._command = command
        self._v2 = command.parking_id is not None
        carried = command.continued or Continued()
        self._state = TsqState.AWAITING_OPERATOR
        self._pending: _Pending | None = None
        self._outcome: DecisionOutcome | None = None
        self._refused: deque[RefusedRequest] = deque(carried.refused, maxlen=KEPT)
        self._refused_count = carried.refused_count
        self._failed: deque[str] = deque(carried.failed, maxlen=KEPT)
        self._failed_count = carried.failed_count
        self._runs = carried.runs
        self._events = carried.events
        # A scheduled retry that the decision being accepted replaces.
        self._superseded: ScheduledRetry | None = None
        self._deadlines = Deadlines(
            parked_at=command.parked_at or workflow.info().start_time,
            policy=command.policy,
            snoozed=carried.snoozed,
            escalated=carried.escalated,
            scheduled=carried.scheduled,
            proposal=carried.proposal,
            claim=carried.claim,
        )
        self._notes: deque[Note] = deque(carried.notes, maxlen=KEPT)
        self._notes_count = carried.notes_count
        if carried.scheduled is not None:
            self._state = TsqState.RETRY_SCHEDULED
        if carried.proposal is not None:
            self._state = TsqState.PENDING_APPROVAL
        # Refusals not yet in the audit trail, and the number of the first of them.
        self._unwritten: list[RefusedRequest] = []
        # Asked to read the parking from the database (by the watcher, or after an upgrade).
        self._observe = False
        # The deadlines changed (a snooze, a policy, a retry scheduled): wake and wait anew.
        self._replan = False
        self._details_due = False
        wid = workflow.info().workflow_id
        self._mismatch = (
            None
            if wid == workflow_id(command.domain, command.command_id)
            else (
                f"workflow {wid} does not name its command: its input is command "
                f"{command.command_id} of domain {command.domain}, whose workflow is "
                f"{workflow_id(command.domain, command.command_id)}; it decides nothing"
            )
        )

    @workflow.run
    async def run(self, command: CommandSnapshot) -> DecisionOutcome:
        if self._v2 and self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidInputError.__name__, non_retryable=True
            )
        self._publish()
        while True:
            try:
                outcome = await self._next()
            except asyncio.CancelledError:
                # "Request Cancellation" is the Web UI's most prominent button, and it is not a
                # decision: ending here would leave the command parked with no workflow. Keep
                # waiting and say so.
                self._take_new_behaviour()
                await self._refuse(
                    "Request Cancellation", "a workflow cancellation request", _CANCELLATION_REFUSED
                )
                continue
            if outcome is not None:
                break
        # Signals refused while the decision ran still write their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._write_refusals()
        return outcome

    async def _next(self) -> DecisionOutcome | None:
        """Wait for something to do, do it; the outcome once the workflow is done."""
        await self._wait()
        if self._observe:
            self._observe = False
            outcome = await self._follow_database()
            if outcome is not None:
                return outcome
        if self._unwritten:
            await self._write_refusals()
        if self._v2 and self._pending is None:
            await self._act_on_deadlines()
        if self._pending is not None:
            return await self._carry_out(self._pending)
        if self._v2 and workflow.info().is_continue_as_new_suggested():
            await self._continue_as_new()
        return None

    async def _wait(self) -> None:
        """Until there is work, or (this version) the next deadline."""
        self._replan = False
        if self._has_work():
            return
        deadline = self._deadlines.next() if self._v2 else None
        if deadline is None:
            await workflow.wait_condition(self._has_work)
            return
        timeout = (deadline - workflow.now()).total_seconds()
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(self._has_work, timeout=timeout)

    def _has_work(self) -> bool:
        if self._pending is not None:
            return True
        if not self._v2:
            return False
        return (
            self._observe
            or self._replan
            or bool(self._unwritten)
            or workflow.info().is_continue_as_new_suggested()
        )

    # -- following the database -------------------------------------------------------------

    async def _follow_database(self) -> DecisionOutcome | None:
        """Read the parking; the outcome to end with when the command is no longer in it."""
        observed: Observed = await self._activity(
            Activity.OBSERVE,
            Observe(
                workflow_id=workflow.info().workflow_id,
                domain=self._command.domain,
                command_id=self._command.command_id,
                parking_id=self._command.parking_id,
                parked_at=self._command.parked_at,
            ),
            ACTIVITY_RETRY,
            Observed,
        )
        if observed.parking_id != self._command.parking_id:
            self._command = self._command.model_copy(update={"parking_id": observed.parking_id})
            workflow.upsert_memo({"tsq": {"parking_id": observed.parking_id}})
        if observed.policy != self._deadlines.policy:
            # A policy set, changed or deleted since: the deadlines follow it.
            self._deadlines.policy = observed.policy
            self._command = self._command.model_copy(update={"policy": observed.policy})
            self._replan = True
            self._publish_soon()
        if observed.open or self._pending is not None:
            # A decision in flight finds out for itself, in its transaction.
            return None
        outcome = observed.outcome
        assert outcome is not None
        self._outcome = outcome
        self._drop_claim()
        self._state = (
            DECISIONS[outcome.decision].done_state
            if outcome.carried_out and outcome.decision is not None
            else TsqState.DECIDED_ELSEWHERE
        )
        self._publish()
        return outcome

    # -- time: escalation, expiry, scheduled retries -----------------------------------------

    async def _act_on_deadlines(self) -> None:
        due = self._deadlines.due(workflow.now())
        if due is Due.PROPOSAL_EXPIRED:
            await self._expire_proposal()
        elif due is Due.CLAIM_EXPIRED:
            self._deadlines.claim = None
            workflow.upsert_search_attributes([TSQ_CLAIMED_BY.value_unset()])
            self._publish_soon()
        elif due is Due.RETRY:
            scheduled = self._deadlines.scheduled
            assert scheduled is not None
            self._deadlines.scheduled = None
            request = scheduled.request.model_copy(update={"not_before": None})
            self._pending = _Pending(DecisionKind.RETRY, request, via="schedule")
        elif due is Due.EXPIRE:
            self._pending = self._policy_decision()
        elif due is Due.ESCALATE:
            await self._escalate()

    def _policy_decision(self) -> _Pending:
        """What the policy decides when its time has come, named after it."""
        policy = self._deadlines.policy
        assert policy is not None and policy.expire_decision is not None
        operator = f"policy:{policy.name}"
        request: DecisionRequest
        if policy.expire_decision is DecisionKind.CANCEL:
            assert policy.expire_reason is not None
            request = CancelRequest(reason=policy.expire_reason, operator=operator)
        else:
            request = CompleteRequest(result_data=policy.expire_result_data, operator=operator)
        return _Pending(policy.expire_decision, request, via="policy")

    async def _escalate(self) -> None:
        policy = self._deadlines.policy
        assert policy is not None
        self._deadlines.escalated = True
        workflow.upsert_search_attributes([TSQ_ESCALATED.value_set(True)])
        self._publish_soon()
        await self._record(
            AuditEventType.TSQ_ESCALATED,
            {
                "policy": policy.name,
                "escalate_after_s": policy.escalate_after.total_seconds()
                if policy.escalate_after
                else None,
                "parked_at": self._deadlines.parked_at.isoformat(),
            },
            notice="escalations",
        )

    async def _record(
        self,
        event: AuditEventType,
        details: dict[str, Any],
        *,
        notice: str | None = None,
        claim: Claim | None = None,
        release: bool = False,
    ) -> None:
        """One of the workflow's own events into the audit trail, once (the key counts them)."""
        self._events += 1
        info = workflow.info()
        try:
            await self._activity(
                Activity.RECORD_EVENT,
                RecordEvent(
                    effect_key=f"{info.workflow_id}/parking/{self._command.parking_id}"
                    f"/event/{self._events}",
                    workflow_id=info.workflow_id,
                    domain=self._command.domain,
                    command_id=self._command.command_id,
                    event=event,
                    details=details,
                    seq=self._events,
                    notice="escalations" if notice else None,
                    error_code=self._command.last_error_code,
                    claim=claim,
                    release=release,
                    parking_id=self._command.parking_id,
                ),
                ACTIVITY_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("%s not written to the audit trail: %s", event.value, err)

    # -- carrying out a decision ------------------------------------------------------------

    async def _carry_out(self, pending: _Pending) -> DecisionOutcome | None:
        decision = DECISIONS[pending.kind]
        self._state = decision.working_state
        # The details say CANCELING (or RETRYING, COMPLETING) at once. The TsqState search
        # attribute changes once, to the outcome, when the first attempt succeeds, as nearly
        # all do: each upsert is one more history event and visibility write per decision.
        self._publish(search_attribute=False)
        info = workflow.info()
        request = pending.request
        parking = self._command.parking_id if self._v2 else None
        carry_out = CarryOut(
            # One decision per parking, whatever the run: a reset run finds the record of the
            # run it was reset from. (Workflows of tsq 0.1 keyed it by their run.)
            effect_key=(
                f"{info.workflow_id}/parking/{parking}/decision"
                if self._v2
                else f"{info.workflow_id}/{info.run_id}/decision"
            ),
            workflow_id=info.workflow_id,
            domain=self._command.domain,
            command_id=self._command.command_id,
            decision=pending.kind,
            parking_id=parking,
            reason=request.reason if isinstance(request, CancelRequest) else None,
            operator=request.operator,
            result_data=(request.result_data if isinstance(request, CompleteRequest) else None),
            via=pending.via,
            request_id=pending.request_id,
            patch=request.patch if isinstance(request, RetryRequest) else None,
            force=request.force,
            approved_by=pending.approval.operator if pending.approval else None,
            approval_comment=pending.approval.comment if pending.approval else None,
        )
        try:
            outcome: DecisionOutcome
            try:
                outcome = await self._carry_out_activity(carry_out, FIRST_ATTEMPT)
            except (ActivityError, ApplicationError) as err:
                if _refused(err):
                    raise
                # Held up (database away, row locked): the workflow list shows it from now on,
                # and the attempts go on with backoff until the database takes the decision.
                _count(Metric.DECISIONS_HELD_UP, kind=pending.kind.value)
                self._publish()
                outcome = await self._carry_out_activity(carry_out, ACTIVITY_RETRY)
        except (ActivityError, ApplicationError) as err:
            if _cancelled(err) and (self._take_new_behaviour() or self._v2):
                # A workflow of tsq 0.1 took its activity's cancellation for a refusal; the
                # attempt may have committed. Carried on now, the record of it is found.
                outcome = await self._carry_out_activity(carry_out, ACTIVITY_RETRY)
            else:
                # Only non-retryable errors get here: the transaction rolled back, nothing
                # changed. The command goes back to waiting, and the refusal stays visible.
                # (A local activity's non-retryable failure arrives as the ApplicationError.)
                cause = err.cause if isinstance(err, ActivityError) else err
                message = str(cause) if cause is not None else str(err)
                error_type = cause.type if isinstance(cause, ApplicationError) else None
                _count(
                    Metric.DECISIONS, kind=pending.kind.value, channel=pending.via, result="refused"
                )
                self._failed.append(f"{pending.kind.value} refused: {message}")
                self._failed_count += 1
                if pending.via == "policy":
                    self._deadlines.expiry_refused = True
                if error_type == ApprovalRequiredError.__name__:
                    # A policy asking for approval was set since this workflow last read it.
                    self._observe = True
                pending.error = ApplicationError(message, type=error_type, non_retryable=True)
                self._pending = None
                self._state = TsqState.AWAITING_OPERATOR
                self._publish()
                return None
        self._outcome = outcome
        self._state = (
            DECISIONS[outcome.decision].done_state
            if outcome.carried_out and outcome.decision is not None
            else TsqState.DECIDED_ELSEWHERE
        )
        _count(
            Metric.DECISIONS,
            kind=pending.kind.value,
            channel=pending.via,
            result="carried_out" if outcome.carried_out else "decided_elsewhere",
        )
        self._drop_claim()
        if outcome.request_id not in (None, pending.request_id):
            # The decision of another request was recorded for this parking first: a request
            # whose update the server dropped with a rejected workflow task, the run this one
            # was reset from, or a bulk operation. The recorded outcome is what happened.
            await self._lost_to(pending, outcome)
        else:
            pending.outcome = outcome
        self._publish()
        return outcome

    async def _carry_out_activity(self, carry_out: CarryOut, retry: RetryPolicy) -> DecisionOutcome:
        outcome: DecisionOutcome = await self._activity(
            Activity.CARRY_OUT, carry_out, retry, DecisionOutcome
        )
        return outcome

    async def _activity(
        self, name: str, arg: Any, retry: RetryPolicy, result_type: type | None = None
    ) -> Any:
        """Run a local activity; Request Cancellation cannot interrupt it (tsq 0.1's workflows
        let it, and took a decision's cancellation for a refusal)."""
        call = _timeouts_as_activity_errors(
            name,
            workflow.execute_local_activity(
                name,
                arg,
                start_to_close_timeout=ACTIVITY_TIMEOUT,
                retry_policy=retry,
                result_type=result_type,
            ),
        )
        if not self._v2:
            return await call
        task = asyncio.ensure_future(call)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                self._note_refusal(
                    "Request Cancellation",
                    "a workflow cancellation request",
                    _CANCELLATION_DURING_DECISION if self._pending else _CANCELLATION_REFUSED,
                )

    async def _lost_to(self, pending: _Pending, outcome: DecisionOutcome) -> None:
        kind = outcome.decision.value if outcome.decision else "decided"
        problem = (
            f"command {self._command.command_id} was already decided: {kind} "
            f"by {outcome.operator or 'an unnamed operator'}"
        )
        if pending.via == "update":
            pending.error = ApplicationError(
                problem, type=AlreadyDecidedError.__name__, non_retryable=True
            )
        else:
            await self._refuse(pending.kind.value, describe_input(pending.request), problem)

    async def _continue_as_new(self) -> None:
        """Before the history gets long: a fresh run with the same command, parking, counts
        and latest refusals. Only between decisions, once every handler has finished."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._write_refusals()
        if self._pending is not None or self._unwritten or self._observe:
            return  # something arrived meanwhile: do it first
        workflow.continue_as_new(
            self._command.model_copy(
                update={
                    "continued": Continued(
                        refused_count=self._refused_count,
                        refused=list(self._refused),
                        failed_count=self._failed_count,
                        failed=list(self._failed),
                        runs=self._runs + 1,
                        events=self._events,
                        escalated=self._deadlines.escalated,
                        snoozed=self._deadlines.snoozed,
                        scheduled=self._deadlines.scheduled,
                        proposal=self._deadlines.proposal,
                        claim=self._deadlines.claim,
                        notes=list(self._notes),
                        notes_count=self._notes_count,
                    ),
                    "policy": self._deadlines.policy,
                }
            )
        )

    # -- messages: one signal and one update per decision -----------------------------------

    @workflow.signal(name="cancel", description=_describe(DecisionKind.CANCEL))
    async def cancel(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.CANCEL, raw, extra)

    @workflow.signal(name="retry", description=_describe(DecisionKind.RETRY))
    async def retry(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.RETRY, raw, extra)

    @workflow.signal(name="complete", description=_describe(DecisionKind.COMPLETE))
    async def complete(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.COMPLETE, raw, extra)

    @workflow.update(name="operator_cancel", description=_describe(DecisionKind.CANCEL, _ANSWER))
    async def operator_cancel(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.CANCEL, raw)  # the validator refused `extra`

    @operator_cancel.validator
    def _validate_operator_cancel(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.CANCEL, raw, extra)

    @workflow.update(name="operator_retry", description=_describe(DecisionKind.RETRY, _ANSWER))
    async def operator_retry(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.RETRY, raw)  # the validator refused `extra`

    @operator_retry.validator
    def _validate_operator_retry(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.RETRY, raw, extra)

    @workflow.update(
        name="operator_complete", description=_describe(DecisionKind.COMPLETE, _ANSWER)
    )
    async def operator_complete(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.COMPLETE, raw)  # the validator refused `extra`

    @operator_complete.validator
    def _validate_operator_complete(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.COMPLETE, raw, extra)

    @workflow.signal(
        name="tsq_refresh",
        description=(
            "Read the command's status from the database again; sent by tsq's watcher when the "
            "command leaves the troubleshooting queue by another hand. Harmless by hand."
        ),
    )
    async def tsq_refresh(self, *ignored: Any) -> None:
        self._take_new_behaviour()
        if self._v2:
            self._observe = True

    @workflow.update(
        name="tsq_observe",
        description=(
            "The tsq_refresh signal as an update, which is how tsq's watcher sends it: the "
            "server writes it to the history with the workflow task that takes it, where a "
            "signal is a write of its own. Harmless by hand."
        ),
    )
    async def tsq_observe(self, *ignored: Any) -> None:
        await self.tsq_refresh()

    @workflow.signal(name="snooze", description=_SNOOZE)
    async def snooze(self, raw: Any = None, *extra: Any) -> None:
        await self._on_time_signal("snooze", raw, extra)

    @workflow.update(name="operator_snooze", description=f"{_SNOOZE} Answers with the state.")
    async def operator_snooze(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        await self._snooze(_snooze_request(raw))
        return self.state()

    @operator_snooze.validator
    def _validate_operator_snooze(self, raw: Any = None, *extra: Any) -> None:
        self._check_time(_snooze_request(raw), extra)

    @workflow.signal(name="unschedule", description=_UNSCHEDULE)
    async def unschedule(self, raw: Any = None, *extra: Any) -> None:
        await self._on_time_signal("unschedule", raw, extra)

    @workflow.update(
        name="operator_unschedule", description=f"{_UNSCHEDULE} Answers with the state."
    )
    async def operator_unschedule(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        await self._unschedule(_unschedule_request(raw))
        return self.state()

    @operator_unschedule.validator
    def _validate_operator_unschedule(self, raw: Any = None, *extra: Any) -> None:
        self._check_time(_unschedule_request(raw), extra)

    # -- four eyes: a proposal approved or rejected by another operator ---------------------

    @workflow.signal(name="approve", description=_APPROVE)
    async def approve(self, raw: Any = None, *extra: Any) -> None:
        if await self._unknown_to_legacy("approve", raw, extra):
            return
        try:
            _no_extra(extra)
            request = _parsed(ApproveRequest, raw)
            accepted = self._approve(request)
        except ApplicationError as err:
            await self._refuse("approve", describe_input(raw), err.message)
            return
        await self._record_approved(accepted, request)

    @workflow.update(name="operator_approve", description=f"{_APPROVE}{_ANSWER}")
    async def operator_approve(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        self._take_new_behaviour()
        request = _parsed(ApproveRequest, raw)
        accepted = self._approve(request)
        await self._record_approved(accepted, request)
        if isinstance(accepted, ScheduledRetry):
            return self._scheduled_answer(accepted)
        return await self._answer(accepted)

    @operator_approve.validator
    def _validate_operator_approve(self, raw: Any = None, *extra: Any) -> None:
        _no_extra(extra)
        self._check_approval(_parsed(ApproveRequest, raw), "approve")

    @workflow.signal(name="reject", description=_REJECT)
    async def reject(self, raw: Any = None, *extra: Any) -> None:
        if await self._unknown_to_legacy("reject", raw, extra):
            return
        try:
            _no_extra(extra)
            request = _parsed(RejectRequest, raw)
            self._check_approval(request, "reject")
        except ApplicationError as err:
            await self._refuse("reject", describe_input(raw), err.message)
            return
        await self._reject(request)

    @workflow.update(name="operator_reject", description=f"{_REJECT} Answers with the state.")
    async def operator_reject(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        request = _parsed(RejectRequest, raw)
        self._check_approval(request, "reject")
        await self._reject(request)
        return self.state()

    @operator_reject.validator
    def _validate_operator_reject(self, raw: Any = None, *extra: Any) -> None:
        _no_extra(extra)
        self._check_approval(_parsed(RejectRequest, raw), "reject")

    def _check_approval(self, request: ApproveRequest | RejectRequest, verb: str) -> None:
        if self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidOperationError.__name__, non_retryable=True
            )
        proposal = self._deadlines.proposal
        pending = self._pending
        if proposal is None and pending is not None and pending.approval is not None:
            raise ApplicationError(
                f"the {pending.kind.value} of command {self._command.command_id} proposed by "
                f"{pending.request.operator} was approved by {pending.approval.operator}: "
                f"nothing left to {verb}",
                type=AlreadyDecidedError.__name__,
                non_retryable=True,
            )
        if proposal is None:
            raise ApplicationError(
                f"no decision of command {self._command.command_id} awaits approval (it is "
                f"{self._state.value}): nothing to {verb}",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )
        if same_operator(request.operator, proposal.proposed_by):
            raise ApplicationError(
                f"four eyes: {proposal.proposed_by} proposed this {proposal.decision.value}, so "
                f"another operator must {verb} it",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )

    def _approve(self, request: ApproveRequest) -> _Pending | ScheduledRetry:
        """The proposal becomes the decision, at once: a second approval finds none left."""
        self._check_approval(request, "approve")
        proposal = self._deadlines.proposal
        assert proposal is not None
        self._deadlines.proposal = None
        self._state = TsqState.AWAITING_OPERATOR
        decision = REQUEST_MODELS[proposal.decision].model_validate(proposal.request)
        if isinstance(decision, RetryRequest) and decision.not_before is not None:
            if decision.not_before <= workflow.now():
                decision = decision.model_copy(update={"not_before": None})
        return self._decided(proposal.decision, decision, "approval", request)

    async def _record_approved(
        self, accepted: _Pending | ScheduledRetry, approval: ApproveRequest
    ) -> None:
        if isinstance(accepted, ScheduledRetry):
            # Carried out later by its timer: the approval is audited now. (A decision carried
            # out now has its approval audited in its own transaction.)
            await self._record(
                AuditEventType.TSQ_APPROVED,
                {
                    "operator": approval.operator,
                    "proposed_by": accepted.request.operator,
                    "decision": DecisionKind.RETRY.value,
                    "comment": approval.comment,
                    "not_before": accepted.at.isoformat(),
                },
            )
        kind = accepted.kind if isinstance(accepted, _Pending) else DecisionKind.RETRY
        await self._record_accepted(kind, accepted.request, accepted)

    async def _reject(self, request: RejectRequest) -> None:
        proposal = self._deadlines.proposal
        assert proposal is not None
        self._end_proposal()
        await self._record(
            AuditEventType.TSQ_REJECTED,
            {
                "operator": request.operator,
                "reason": request.reason,
                "decision": proposal.decision.value,
                "proposed_by": proposal.proposed_by,
                "proposal_id": proposal.request_id,
            },
        )

    async def _expire_proposal(self) -> None:
        proposal = self._deadlines.proposal
        assert proposal is not None
        self._end_proposal()
        await self._record(
            AuditEventType.TSQ_PROPOSAL_EXPIRED,
            {
                "decision": proposal.decision.value,
                "proposed_by": proposal.proposed_by,
                "proposed_at": proposal.proposed_at.isoformat(),
                "expires_at": proposal.expires_at.isoformat(),
                "proposal_id": proposal.request_id,
            },
        )

    def _end_proposal(self) -> None:
        self._deadlines.proposal = None
        scheduled = self._deadlines.scheduled is not None
        self._state = TsqState.RETRY_SCHEDULED if scheduled else TsqState.AWAITING_OPERATOR
        self._replan = True
        self._publish()

    # -- notes and claims -------------------------------------------------------------------

    @workflow.signal(name="note", description=_NOTE)
    async def note(self, raw: Any = None, *extra: Any) -> None:
        if await self._unknown_to_legacy("note", raw, extra):
            return
        try:
            _no_extra(extra)
            request = _parsed(NoteRequest, raw)
            self._check_running()
        except ApplicationError as err:
            await self._refuse("note", describe_input(raw), err.message)
            return
        await self._note(request)

    @workflow.update(name="operator_note", description=f"{_NOTE} Answers with the state.")
    async def operator_note(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        await self._note(_parsed(NoteRequest, raw))
        return self.state()

    @operator_note.validator
    def _validate_operator_note(self, raw: Any = None, *extra: Any) -> None:
        _no_extra(extra)
        _parsed(NoteRequest, raw)
        self._check_running()

    async def _note(self, request: NoteRequest) -> None:
        self._check_running()
        self._notes.append(Note(operator=request.operator, text=request.text, at=workflow.now()))
        self._notes_count += 1
        self._publish_soon()
        await self._record(
            AuditEventType.TSQ_NOTE, {"operator": request.operator, "text": request.text}
        )

    @workflow.signal(name="claim", description=_CLAIM)
    async def claim(self, raw: Any = None, *extra: Any) -> None:
        if await self._unknown_to_legacy("claim", raw, extra):
            return
        try:
            _no_extra(extra)
            request = _parsed(ClaimRequest, raw)
            self._check_claimable(request)
        except ApplicationError as err:
            await self._refuse("claim", describe_input(raw), err.message)
            return
        await self._claim(request)

    @workflow.update(name="operator_claim", description=f"{_CLAIM} Answers with the state.")
    async def operator_claim(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        await self._claim(_parsed(ClaimRequest, raw))
        return self.state()

    @operator_claim.validator
    def _validate_operator_claim(self, raw: Any = None, *extra: Any) -> None:
        _no_extra(extra)
        self._check_claimable(_parsed(ClaimRequest, raw))

    @workflow.signal(name="release", description=_RELEASE)
    async def release(self, raw: Any = None, *extra: Any) -> None:
        if await self._unknown_to_legacy("release", raw, extra):
            return
        try:
            _no_extra(extra)
            request = _parsed(ReleaseRequest, raw)
            self._check_releasable(request)
        except ApplicationError as err:
            await self._refuse("release", describe_input(raw), err.message)
            return
        await self._release(request)

    @workflow.update(name="operator_release", description=f"{_RELEASE} Answers with the state.")
    async def operator_release(self, raw: Any = None, *extra: Any) -> StateView:
        self._take_new_behaviour()
        await self._release(_parsed(ReleaseRequest, raw))
        return self.state()

    @operator_release.validator
    def _validate_operator_release(self, raw: Any = None, *extra: Any) -> None:
        _no_extra(extra)
        self._check_releasable(_parsed(ReleaseRequest, raw))

    def _check_running(self) -> None:
        """Notes and claims are for a command still to be decided here."""
        if self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidOperationError.__name__, non_retryable=True
            )
        if self._outcome is not None:
            raise ApplicationError(
                f"command {self._command.command_id} is decided already ({self._state.value})",
                type=AlreadyDecidedError.__name__,
                non_retryable=True,
            )

    def _live_claim(self) -> Claim | None:
        claim = self._deadlines.claim
        return claim if claim is not None and claim.until > workflow.now() else None

    def _check_claimable(self, request: ClaimRequest) -> None:
        self._check_running()
        self._check_undecided()
        claim = self._live_claim()
        if (
            claim is not None
            and not request.force
            and not same_operator(claim.by, request.operator)
        ):
            raise ApplicationError(
                f"command {self._command.command_id} is claimed by {claim.by} until "
                f"{claim.until.isoformat(timespec='seconds')}: ask them, or take it over with "
                '"force": true (audited)',
                type=ClaimedError.__name__,
                non_retryable=True,
            )

    def _check_releasable(self, request: ReleaseRequest) -> None:
        self._check_running()
        claim = self._live_claim()
        if claim is None:
            raise ApplicationError(
                f"command {self._command.command_id} is not claimed: nothing to release",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )
        if not request.force and not same_operator(claim.by, request.operator):
            raise ApplicationError(
                f"command {self._command.command_id} is claimed by {claim.by}, not by "
                f'{request.operator}: only they release it, unless "force": true (audited)',
                type=ClaimedError.__name__,
                non_retryable=True,
            )

    async def _claim(self, request: ClaimRequest) -> None:
        self._check_claimable(request)
        before = self._live_claim()
        now = workflow.now()
        by = request.operator.strip()
        kept = before is not None and same_operator(before.by, by)
        claim = Claim(
            by=by, since=before.since if before and kept else now, until=now + request.for_
        )
        self._deadlines.claim = claim
        self._replan = True
        workflow.upsert_search_attributes([TSQ_CLAIMED_BY.value_set(keyword(by))])
        self._publish_soon()
        details: dict[str, Any] = {"operator": by, "until": claim.until.isoformat()}
        if before is not None and not kept:
            details |= {"taken_from": before.by, "forced": True}
        await self._record(AuditEventType.TSQ_CLAIMED, details, claim=claim)

    async def _release(self, request: ReleaseRequest) -> None:
        self._check_releasable(request)
        claim = self._deadlines.claim
        assert claim is not None
        self._drop_claim()
        self._replan = True
        self._publish_soon()
        details: dict[str, Any] = {"operator": request.operator, "claimed_by": claim.by}
        if not same_operator(claim.by, request.operator):
            details["forced"] = True
        await self._record(AuditEventType.TSQ_RELEASED, details, release=True)

    def _drop_claim(self) -> None:
        if self._deadlines.claim is not None:
            self._deadlines.claim = None
            workflow.upsert_search_attributes([TSQ_CLAIMED_BY.value_unset()])

    async def _unknown_to_legacy(self, name: str, raw: Any, extra: tuple[Any, ...]) -> bool:
        """A workflow of tsq 0.1 that has not taken this version's behaviour knew no such
        signal: it is refused as unknown, as 0.1 did, so its history replays."""
        self._take_new_behaviour()
        if self._v2:
            return False
        count = len(extra) + (raw is not None)
        await self._refuse(
            name,
            f"{count} argument(s)",
            f"unknown signal {name!r}: the decisions are cancel, retry and complete",
        )
        return True

    @workflow.signal(dynamic=True, description="Any other signal name is refused, visibly.")
    async def unknown_signal(self, name: str, args: Sequence[RawValue]) -> None:
        # Without this, a misspelt `cancle` would wait unseen in the worker's buffer forever.
        self._take_new_behaviour()
        await self._refuse(
            name,
            f"{len(args)} argument(s)",
            f"unknown signal {name!r}: the decisions are cancel, retry and complete",
        )

    @workflow.query(name="state", description="Command, decision, step progress and refusals.")
    def state(self) -> StateView:
        scheduled = self._deadlines.scheduled
        claim = self._deadlines.claim
        pending = self._pending
        request = pending.request if pending else None
        outcome = self._outcome
        return StateView(
            command=self._command,
            state=self._state,
            decision=(outcome.decision if outcome else pending.kind if pending else None),
            decided_by=outcome.operator if outcome else request.operator if request else None,
            reason=outcome.reason
            if outcome
            else (request.reason if isinstance(request, CancelRequest) else None),
            result_data=outcome.result_data
            if outcome
            else (request.result_data if isinstance(request, CompleteRequest) else None),
            requested_at=pending.requested_at if pending else None,
            steps=self._steps(),
            outcome=self._outcome,
            refused=list(self._refused),
            refused_count=self._refused_count,
            policy=self._deadlines.policy.name if self._deadlines.policy else None,
            escalate_at=self._deadlines.escalate_at(),
            escalated=self._deadlines.escalated,
            expire_at=self._deadlines.expire_at(),
            expire_decision=self._deadlines.policy.expire_decision
            if self._deadlines.policy
            else None,
            snoozed=self._deadlines.snoozed,
            retry_scheduled_for=scheduled.at if scheduled else None,
            retry_scheduled_by=scheduled.request.operator if scheduled else None,
            require_approval=self._deadlines.policy.require_approval
            if self._deadlines.policy
            else [],
            proposal=self._deadlines.proposal,
            claimed_by=claim.by if claim else None,
            claimed_until=claim.until if claim else None,
            notes=list(self._notes),
            notes_count=self._notes_count,
        )

    # -- internals ------------------------------------------------------------------------

    def _take_new_behaviour(self) -> bool:
        """A workflow of tsq 0.1 takes this version's behaviour at a new event (see the module
        docstring); True when it did just now."""
        if self._v2:
            return False
        if not workflow.patched(f"{UPGRADE}@{workflow.info().get_current_history_length()}"):
            return False
        self._v2 = True
        self._observe = True  # bind it to its parking
        return True

    async def _on_signal(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        # A signal handler never raises: a bad signal is recorded as refused instead.
        self._take_new_behaviour()
        if extra:
            # The SDK passes every argument sent; a handler that could not take them would
            # fail the workflow task again and again, and the workflow would be stuck.
            await self._refuse(
                kind.value,
                describe_input([raw, *extra]),
                f"input: one JSON object expected, {1 + len(extra)} arguments received",
            )
            return
        if isinstance(raw, UndecodableInput) and not self._v2:
            # tsq 0.1 never saw such a signal (the SDK dropped it): its histories replay so.
            workflow.logger.warning("signal %s dropped: %s", kind.value, raw.problem)
            return
        try:
            request = _validated(kind, raw)
            self._check_parking(request)
            self._check_schedule(request)
            accepted = self._accept(kind, request, via="signal")
        except ApplicationError as err:
            await self._refuse(kind.value, describe_input(raw), err.message)
            return
        await self._record_accepted(kind, request, accepted)

    async def _on_update(self, kind: DecisionKind, raw: Any) -> DecisionOutcome:
        self._take_new_behaviour()
        request = _validated(kind, raw)
        self._check_parking(request)
        self._check_schedule(request)
        accepted = self._accept(kind, request, via="update")
        await self._record_accepted(kind, request, accepted)
        if isinstance(accepted, Proposal):
            return DecisionOutcome(
                decision=kind,
                carried_out=False,
                status=CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
                operator=accepted.proposed_by,
                request_id=accepted.request_id,
                domain=self._command.domain,
                command_id=self._command.command_id,
                parking_id=self._command.parking_id,
                proposal=accepted,
                detail=(
                    f"{kind.value} proposed: policy {self._policy_name()} asks another operator "
                    f"to approve it by {accepted.expires_at.isoformat(timespec='seconds')}"
                ),
            )
        if isinstance(accepted, ScheduledRetry):
            return self._scheduled_answer(accepted)
        return await self._answer(accepted)

    def _scheduled_answer(self, accepted: ScheduledRetry) -> DecisionOutcome:
        return DecisionOutcome(
            decision=DecisionKind.RETRY,
            carried_out=False,
            status=CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
            operator=accepted.request.operator,
            request_id=accepted.request_id,
            domain=self._command.domain,
            command_id=self._command.command_id,
            parking_id=self._command.parking_id,
            scheduled_for=accepted.at,
            detail=f"retry scheduled for {accepted.at.isoformat()}",
        )

    async def _answer(self, pending: _Pending) -> DecisionOutcome:
        """An update's answer: the outcome of its decision, once carried out."""
        await workflow.wait_condition(lambda: pending.finished)
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        if not pending.outcome.carried_out:
            raise ApplicationError(
                pending.outcome.detail, type=AlreadyDecidedError.__name__, non_retryable=True
            )
        return pending.outcome

    def _validate(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        try:
            self._check_update(kind, raw, extra)
        except ApplicationError:
            _count(Metric.REFUSED_REQUESTS, request=kind.value, channel="update")
            raise

    def _check_update(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        if self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidOperationError.__name__, non_retryable=True
            )
        if extra:
            raise ApplicationError(
                f"invalid input: one JSON object expected, {1 + len(extra)} arguments received",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )
        request = _validated(kind, raw)
        self._check_parking(request)
        self._check_schedule(request)
        self._check_decision(kind, request, "update")

    async def _on_time_signal(self, name: str, raw: Any, extra: tuple[Any, ...]) -> None:
        self._take_new_behaviour()
        try:
            request: SnoozeRequest | UnscheduleRequest = (
                _snooze_request(raw) if name == "snooze" else _unschedule_request(raw)
            )
            self._check_time(request, extra)
        except ApplicationError as err:
            await self._refuse(name, describe_input(raw), err.message)
            return
        if isinstance(request, SnoozeRequest):
            await self._snooze(request)
        else:
            await self._unschedule(request)

    def _check_time(
        self, request: SnoozeRequest | UnscheduleRequest, extra: tuple[Any, ...]
    ) -> None:
        """Snooze and unschedule: for a command still waiting, with something to move."""
        if extra:
            raise ApplicationError(
                f"invalid input: one JSON object expected, {1 + len(extra)} arguments received",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )
        if self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidOperationError.__name__, non_retryable=True
            )
        self._check_undecided()
        command = self._command.command_id
        if isinstance(request, UnscheduleRequest) and self._deadlines.scheduled is None:
            raise ApplicationError(
                f"no retry of command {command} is scheduled",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )
        if isinstance(request, SnoozeRequest) and not (self._v2 and self._deadlines.snoozable()):
            raise ApplicationError(
                f"nothing to snooze: command {command} has no escalation or expiry ahead "
                "(no policy gives it one, they have passed, or a retry is scheduled)",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )

    async def _snooze(self, request: SnoozeRequest) -> None:
        self._check_time(request, ())
        self._deadlines.snoozed += request.for_
        self._replan = True
        self._publish_soon()
        escalate, expire = self._deadlines.escalate_at(), self._deadlines.expire_at()
        await self._record(
            AuditEventType.TSQ_SNOOZED,
            {
                "operator": request.operator,
                "reason": request.reason,
                "for_s": request.for_.total_seconds(),
                "snoozed_s": self._deadlines.snoozed.total_seconds(),
                "escalate_at": escalate.isoformat() if escalate else None,
                "expire_at": expire.isoformat() if expire else None,
            },
        )

    async def _unschedule(self, request: UnscheduleRequest) -> None:
        self._check_time(request, ())
        scheduled = self._deadlines.scheduled
        assert scheduled is not None
        self._deadlines.scheduled = None
        self._state = TsqState.AWAITING_OPERATOR
        self._replan = True
        self._publish()
        await self._record(
            AuditEventType.TSQ_RETRY_UNSCHEDULED,
            {
                "operator": request.operator,
                "reason": request.reason,
                "scheduled_for": scheduled.at.isoformat(),
                "scheduled_by": scheduled.request.operator,
            },
        )

    def _check_schedule(self, request: DecisionRequest) -> None:
        """A retry for later: its time must be ahead, and no more than ten years."""
        if not isinstance(request, RetryRequest) or request.not_before is None:
            return
        now = workflow.now()
        if request.not_before <= now:
            raise ApplicationError(
                f"invalid input: not_before {request.not_before.isoformat()} is not in the "
                f"future (it is {now.isoformat()} now); retry without it to retry now",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )
        if request.not_before > now + LONGEST:
            raise ApplicationError(
                f"invalid input: not_before {request.not_before.isoformat()} is more than ten "
                "years ahead",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )

    def _check_parking(self, request: DecisionRequest) -> None:
        """A caller that names the parking it decided for is refused by a workflow finishing
        another one (it can wait for this one to end, then reach the right one)."""
        mine = self._command.parking_id
        if self._mismatch:
            raise ApplicationError(
                self._mismatch, type=InvalidOperationError.__name__, non_retryable=True
            )
        if request.parking_id is not None and mine is not None and request.parking_id != mine:
            raise ApplicationError(
                f"this workflow run decides parking {mine} of command "
                f"{self._command.command_id}, not parking {request.parking_id}: it is ending; "
                "try again in a moment",
                type=StaleParkingError.__name__,
                non_retryable=True,
            )

    def _check_undecided(self) -> None:
        if self._pending is not None or self._outcome is not None:
            kind = self._pending.kind if self._pending else "a decision"
            raise ApplicationError(
                f"command {self._command.command_id} already has a decision "
                f"({kind}); a second one is refused",
                type=AlreadyDecidedError.__name__,
                non_retryable=True,
            )

    def _check_decision(self, kind: DecisionKind, request: DecisionRequest, via: _Via) -> None:
        """An operator's decision: none other made or proposed, the command not claimed by
        someone else (unless forced), and a name to propose it under if it needs approval."""
        self._check_undecided()
        proposal = self._deadlines.proposal
        if proposal is not None:
            raise ApplicationError(
                f"command {self._command.command_id} has a decision awaiting approval "
                f"({proposal.decision.value} proposed by {proposal.proposed_by}): approve or "
                "reject it first",
                type=AlreadyDecidedError.__name__,
                non_retryable=True,
            )
        self._check_claim(request.operator, force=request.force)
        if self._needs_approval(kind, via) and not (request.operator or "").strip():
            raise ApplicationError(
                f"invalid input: a {kind.value} of this command needs another operator's "
                "approval (policy "
                f"{self._policy_name()}), so it must name its operator: add "
                '"operator": "you@example.com"',
                type=InvalidInputError.__name__,
                non_retryable=True,
            )

    def _check_claim(self, operator: str | None, *, force: bool) -> None:
        claim = self._deadlines.claim
        if claim is None or force or same_operator(claim.by, operator):
            return
        if claim.until <= workflow.now():
            return
        raise ApplicationError(
            f"command {self._command.command_id} is claimed by {claim.by} until "
            f"{claim.until.isoformat(timespec='seconds')}: ask them, wait for the claim to end, "
            'or decide with "force": true (audited)',
            type=ClaimedError.__name__,
            non_retryable=True,
        )

    def _needs_approval(self, kind: DecisionKind, via: _Via) -> bool:
        policy = self._deadlines.policy
        return (
            via in ("signal", "update") and policy is not None and kind in policy.require_approval
        )

    def _policy_name(self) -> str:
        policy = self._deadlines.policy
        return policy.name if policy is not None else "none"

    def _accept(
        self, kind: DecisionKind, request: DecisionRequest, via: _Via
    ) -> _Pending | ScheduledRetry | Proposal:
        """The decision, to carry out now, (a retry for later) scheduled, or (a policy asks for
        approval) proposed. No await between the check and the assignment: two handlers in one
        workflow task cannot both pass."""
        self._check_decision(kind, request, via)
        if self._needs_approval(kind, via):
            return self._propose(kind, request, via)
        return self._decided(kind, request, via)

    def _propose(self, kind: DecisionKind, request: DecisionRequest, via: _Via) -> Proposal:
        assert via in ("signal", "update") and request.operator is not None
        policy = self._deadlines.policy
        expires = (policy.approval_expires_after if policy else None) or APPROVAL_EXPIRES
        update = workflow.current_update_info()
        now = workflow.now()
        proposal = Proposal(
            decision=kind,
            request=request.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
            proposed_by=request.operator.strip(),
            proposed_at=now,
            expires_at=now + expires,
            request_id=update.id if update is not None else str(workflow.uuid4()),
            via=via,
        )
        self._deadlines.proposal = proposal
        self._state = TsqState.PENDING_APPROVAL
        self._replan = True
        self._publish()
        _count(Metric.DECISIONS, kind=kind.value, channel=via, result="proposed")
        return proposal

    def _decided(
        self,
        kind: DecisionKind,
        request: DecisionRequest,
        via: _Via,
        approval: ApproveRequest | None = None,
    ) -> _Pending | ScheduledRetry:
        self._superseded = self._deadlines.scheduled
        self._deadlines.scheduled = None
        if isinstance(request, RetryRequest) and request.not_before is not None:
            update = workflow.current_update_info()
            scheduled = ScheduledRetry(
                request=request,
                at=request.not_before,
                requested_at=workflow.now(),
                request_id=update.id if update is not None else str(workflow.uuid4()),
            )
            self._deadlines.scheduled = scheduled
            self._state = TsqState.RETRY_SCHEDULED
            self._replan = True
            self._publish()
            return scheduled
        self._pending = _Pending(kind, request, via, approval)
        return self._pending

    async def _record_accepted(
        self,
        kind: DecisionKind,
        request: DecisionRequest,
        accepted: _Pending | ScheduledRetry | Proposal,
    ) -> None:
        """Into the audit trail: a proposal, a retry scheduled, and a scheduled one that this
        replaced. (A decision carried out is audited in its own transaction.)"""
        if isinstance(accepted, Proposal):
            await self._record(
                AuditEventType.TSQ_PROPOSED,
                {
                    "operator": accepted.proposed_by,
                    "decision": kind.value,
                    "request": accepted.request,
                    "policy": self._policy_name(),
                    "expires_at": accepted.expires_at.isoformat(),
                    "proposal_id": accepted.request_id,
                },
            )
            return
        superseded, self._superseded = self._superseded, None
        if superseded is not None:
            await self._record(
                AuditEventType.TSQ_RETRY_UNSCHEDULED,
                {
                    "operator": request.operator,
                    "superseded_by": kind.value,
                    "scheduled_for": superseded.at.isoformat(),
                    "scheduled_by": superseded.request.operator,
                },
            )
        if isinstance(accepted, ScheduledRetry):
            await self._record(
                AuditEventType.TSQ_RETRY_SCHEDULED,
                {"operator": request.operator, "not_before": accepted.at.isoformat()},
            )

    async def _refuse(self, handler: str, received: str, problem: str) -> None:
        refusal = self._note_refusal(handler, received, problem)
        if self._v2:
            return
        self._publish()
        info = workflow.info()
        await workflow.execute_local_activity(
            Activity.RECORD_REFUSAL,
            RecordRefusal(
                effect_key=f"{info.workflow_id}/{info.run_id}/refused/{self._refused_count}",
                workflow_id=info.workflow_id,
                domain=self._command.domain,
                command_id=self._command.command_id,
                refusal=refusal,
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )

    def _note_refusal(self, handler: str, received: str, problem: str) -> RefusedRequest:
        _count(Metric.REFUSED_REQUESTS, request=_request_label(handler), channel="signal")
        refusal = RefusedRequest(handler=handler, problem=problem, received=received)
        self._refused.append(refusal)
        self._refused_count += 1
        if self._v2:
            # Written by the run loop, in batches: a flood of refusals costs one activity per
            # batch and stays cheap to handle, whatever its size.
            self._unwritten.append(refusal)
            self._publish_soon()
        return refusal

    async def _write_refusals(self) -> None:
        while self._unwritten:
            batch = self._unwritten[:REFUSALS_PER_WRITE]
            first = self._refused_count - len(self._unwritten) + 1
            try:
                await self._activity(
                    Activity.RECORD_REFUSALS,
                    RecordRefusals(
                        workflow_id=workflow.info().workflow_id,
                        domain=self._command.domain,
                        command_id=self._command.command_id,
                        parking_id=self._command.parking_id,
                        first=first,
                        refusals=batch,
                    ),
                    ACTIVITY_RETRY,
                )
            except ActivityError as err:
                workflow.logger.warning("refusals not written to the audit trail: %s", err)
            del self._unwritten[: len(batch)]

    def _steps(self) -> dict[str, str]:
        if self._pending is None:
            return {}
        if self._outcome is not None:
            progress = "done" if self._outcome.carried_out else "skipped"
        else:
            progress = "in progress"
        return dict.fromkeys(steps_of(self._pending.kind, self._command), progress)

    def _publish(self, *, search_attribute: bool = True) -> None:
        # Upsert only on change: each upsert is one more history event.
        if (
            search_attribute
            and workflow.info().typed_search_attributes.get(TSQ_STATE) != self._state.value
        ):
            workflow.upsert_search_attributes([TSQ_STATE.value_set(self._state.value)])
        self._render_details()

    def _publish_soon(self) -> None:
        """Render the details once, after every handler of this workflow task has run."""
        if not self._details_due:
            self._details_due = True
            asyncio.get_running_loop().call_soon(self._render_details)

    def _render_details(self) -> None:
        self._details_due = False
        details = render_details(
            self._command,
            self._state,
            self.state(),
            failed_attempts=list(self._failed),
            failed_count=self._failed_count,
        )
        if self._command.continued is not None:
            # A continued run has no static details of its own: the command's facts go here.
            details += "\n### Command\n" + render_static_details(self._command)
        workflow.set_current_details(details)


def _no_extra(extra: tuple[Any, ...]) -> None:
    if extra:
        raise ApplicationError(
            f"invalid input: one JSON object expected, {1 + len(extra)} arguments received",
            type=InvalidInputError.__name__,
            non_retryable=True,
        )


def _snooze_request(raw: Any) -> SnoozeRequest:
    return _parsed(SnoozeRequest, raw)


def _unschedule_request(raw: Any) -> UnscheduleRequest:
    return _parsed(UnscheduleRequest, raw if raw is not None else {})


_T = TypeVar(
    "_T",
    SnoozeRequest,
    UnscheduleRequest,
    ApproveRequest,
    RejectRequest,
    NoteRequest,
    ClaimRequest,
    ReleaseRequest,
)


def _parsed(model: type[_T], raw: Any) -> _T:
    if isinstance(raw, UndecodableInput):
        problem = json_problem(raw.value) if raw.readable else None
        raise ApplicationError(
            f"invalid input: {problem or raw.problem}",
            type=InvalidInputError.__name__,
            non_retryable=True,
        )
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ApplicationError(
            f"invalid input: {describe_validation_error(err)}",
            type=InvalidInputError.__name__,
            non_retryable=True,
        ) from None


def _validated(kind: DecisionKind, raw: Any) -> DecisionRequest:
    if isinstance(raw, UndecodableInput):
        problem = json_problem(raw.value) if raw.readable else None
        raise ApplicationError(
            f"invalid input: {problem or raw.problem}",
            type=InvalidInputError.__name__,
            non_retryable=True,
        )
    try:
        return REQUEST_MODELS[kind].model_validate(raw)
    except ValidationError as err:
        raise ApplicationError(
            f"invalid input: {describe_validation_error(err)}",
            type=InvalidInputError.__name__,
            non_retryable=True,
        ) from None


def _count(name: str, **labels: str) -> None:
    """Replay-safe: a replayed history counts nothing again."""
    workflow.metric_meter().create_counter(name).add(1, labels)


def _request_label(handler: str) -> str:
    """A bounded label for what was refused: unknown signal names are the caller's to choose."""
    if handler in {kind.value for kind in DecisionKind}:
        return handler
    return "cancellation" if handler == "Request Cancellation" else "unknown"


async def _timeouts_as_activity_errors(name: str, call: Awaitable[Any]) -> Any:
    """A local activity's last attempt timing out reaches the workflow as an `ActivityError`
    when it happens, but replayed from its marker as a bare `TimeoutError`: one error for
    both, or a replay after a worker restart takes another path (nondeterminism)."""
    try:
        return await call
    except ActivityTimeoutError as err:
        raise ActivityError(
            "activity timed out",
            scheduled_event_id=0,
            started_event_id=0,
            identity="",
            activity_type=name,
            activity_id="",
            retry_state=None,
        ) from err


def _refused(err: ActivityError | ApplicationError) -> bool:
    """A failure that retrying cannot fix; a local activity's may arrive unwrapped."""
    cause = err.cause if isinstance(err, ActivityError) else err
    return isinstance(cause, ApplicationError) and (
        cause.non_retryable or cause.type in _NON_RETRYABLE
    )


def _cancelled(err: ActivityError | ApplicationError) -> bool:
    return isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)


__all__ = ["TroubleshootingWorkflow"]
