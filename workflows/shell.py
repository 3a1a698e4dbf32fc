"""What `TroubleshootingWorkflow` does around the rules: read what callers send, turn the rules'
refusals into the errors callers get, call the activities, and build what it writes and shows.

Workflow code (deterministic); it holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import MetricCounter, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

from tsq.contract import RULES, AuditEventType, DecisionKind, TsqState, workflow_id
from tsq.converter import UndecodableInput
from tsq.errors import ClaimedError, InvalidInputError
from tsq.models import (
    AuditRecord,
    CancelRequest,
    CarryOut,
    CommandSnapshot,
    CompleteRequest,
    Continued,
    RefusedRequest,
    RetryRequest,
    StateView,
    UnscheduleRequest,
    describe_validation_error,
    json_problem,
    refusal_details,
)
from tsq.workflows import rules
from tsq.workflows.details import render_details, render_static_details, steps_of

# Each attempt gets this long; attempts go on, with backoff, until the database answers.
ACTIVITY_TIMEOUT = timedelta(seconds=30)
NON_RETRYABLE = [
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
    non_retryable_error_types=NON_RETRYABLE,
)
# A decision's first attempt, on its own: when it fails, the workflow list is told the decision
# is held up before the attempts go on.
FIRST_ATTEMPT = RetryPolicy(maximum_attempts=1, non_retryable_error_types=NON_RETRYABLE)
_R = TypeVar("_R")

# How Request Cancellation shows among the refused requests, and why it is refused.
CANCELLATION = ("Request Cancellation", "a workflow cancellation request")
CANCELLATION_REFUSED = (
    "cancelling the workflow does not decide the command; send the `cancel` signal "
    "(or `retry`, `complete`) instead. The workflow keeps waiting"
)
CANCELLATION_DURING_DECISION = (
    "cancelling the workflow does not stop a decision being carried out: it goes on, and the "
    "workflow ends with its outcome"
)


# -- what callers send --------------------------------------------------------------------------


def new_id() -> str:
    """What names a request: the update's id, or (a signal, a deadline) a fresh one."""
    update = workflow.current_update_info()
    return update.id if update is not None else str(workflow.uuid4())


def no_id() -> str:
    """A validator's stand-in: what it checks is thrown away, and it must not draw ids."""
    return ""


def ruled(rule: Callable[..., rules.Step], *args: Any) -> rules.Step:
    """A step of the rules, their refusal as the error the caller gets."""
    try:
        return rule(*args)
    except rules.Refused as refusal:
        raise error(refusal.error.__name__, refusal.message) from None


def error(error_type: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=error_type, non_retryable=True)


def as_signal(err: ApplicationError) -> str:
    """A refusal as a signal's sender reads it (in the Web UI's details): how to force, in the
    signal's own words. (Updates answer SDK and CLI callers, which say it their own way.)"""
    if err.type == ClaimedError.__name__:
        return f'{err.message}: add "force": true to the input'
    return err.message


def no_extra(extra: tuple[Any, ...]) -> None:
    if extra:
        raise error(
            InvalidInputError.__name__,
            f"invalid input: one JSON object expected, {1 + len(extra)} arguments received",
        )


def parsed(model: type[_R], raw: Any) -> _R:
    """A request as its model reads it; anything else is refused as invalid input."""
    if isinstance(raw, UndecodableInput):
        problem = json_problem(raw.value) if raw.readable else None
        raise error(InvalidInputError.__name__, f"invalid input: {problem or raw.problem}")
    if model is UnscheduleRequest and raw is None:
        raw = {}
    try:
        return model.model_validate(raw)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as err:
        raise error(
            InvalidInputError.__name__, f"invalid input: {describe_validation_error(err)}"
        ) from None


class Counters:
    """A workflow's metrics, replay-safe (a replayed history counts nothing again): each
    counter made once per run, since a flood counts thousands."""

    def __init__(self) -> None:
        self._made: dict[str, MetricCounter] = {}

    def __call__(self, name: str, **labels: str) -> None:
        counter = self._made.get(name)
        if counter is None:
            counter = self._made[name] = workflow.metric_meter().create_counter(name)
        counter.add(1, labels)


def request_label(handler: str) -> str:
    """A bounded label for what was refused: unknown signal names are the caller's to choose."""
    if handler in {kind.value for kind in DecisionKind}:
        return handler
    return "cancellation" if handler == "Request Cancellation" else "unknown"


# -- the activities -----------------------------------------------------------------------------


def local_activity(
    name: str, arg: Any, retry: RetryPolicy, result_type: type | None = None
) -> Awaitable[Any]:
    return _timeouts_as_activity_errors(
        name,
        workflow.execute_local_activity(
            name,
            arg,
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=retry,
            result_type=result_type,
        ),
    )


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


def refused(err: ActivityError | ApplicationError) -> bool:
    """A failure that retrying cannot fix; a local activity's may arrive unwrapped."""
    cause = err.cause if isinstance(err, ActivityError) else err
    return isinstance(cause, ApplicationError) and (
        cause.non_retryable or cause.type in NON_RETRYABLE
    )


def cancelled(err: ActivityError | ApplicationError) -> bool:
    return isinstance(err, ActivityError) and isinstance(err.cause, CancelledError)


def refusal_of(err: ActivityError | ApplicationError) -> tuple[str | None, str]:
    """The error type and message of a decision the database refused for good."""
    cause = err.cause if isinstance(err, ActivityError) else err
    message = str(cause) if cause is not None else str(err)
    return (cause.type if isinstance(cause, ApplicationError) else None), message


def carry_out_input(
    pending: rules.Pending, command: CommandSnapshot, parking_id: int | None, *, by_run: bool
) -> CarryOut:
    """The decision activity's input. Its key binds it to its parking, whatever the run: a
    reset run finds the record of the run it was reset from. (Workflows of tsq 0.1, `by_run`,
    keyed it by their run.)"""
    info = workflow.info()
    request = pending.request
    return CarryOut(
        effect_key=(
            f"{info.workflow_id}/{info.run_id}/decision"
            if by_run
            else f"{info.workflow_id}/parking/{parking_id}/decision"
        ),
        workflow_id=info.workflow_id,
        domain=command.domain,
        command_id=command.command_id,
        decision=pending.kind,
        parking_id=None if by_run else parking_id,
        reason=request.reason if isinstance(request, CancelRequest) else None,
        operator=request.operator,
        result_data=request.result_data if isinstance(request, CompleteRequest) else None,
        via=pending.via,
        request_id=pending.request_id,
        patch=request.patch if isinstance(request, RetryRequest) else None,
        force=request.force,
        approved_by=pending.approval.operator if pending.approval else None,
        approval_comment=pending.approval.comment if pending.approval else None,
        approval_audited=pending.approval_audited,
    )


def audit_record(record: rules.Record, parking_id: int | None, seq: int) -> AuditRecord:
    """One of the workflow's events as the audit trail keeps it: keyed by its number."""
    return AuditRecord(
        effect_key=f"{workflow.info().workflow_id}/parking/{parking_id}/event/{seq}",
        event=record.event,
        details=record.details,
        seq=seq,
        notice=record.notice,
        claim=record.claim,
        release=record.release,
        proposal=record.proposal,
        withdraw=record.withdraw,
        schedule=record.schedule,
        unschedule=record.unschedule,
    )


def refusal_record(refusal: RefusedRequest, number: int, parking_id: int | None) -> AuditRecord:
    """A refused request as the audit trail keeps it: keyed by its number."""
    wid = workflow.info().workflow_id
    return AuditRecord(
        effect_key=f"{wid}/parking/{parking_id}/refused/{number}",
        event=AuditEventType.TSQ_SIGNAL_REFUSED,
        details=refusal_details(refusal, wid),
    )


# -- a run's life --------------------------------------------------------------------------------


def life_of(command: CommandSnapshot, carried: Continued) -> rules.Life:
    """The life a run starts with: its command's parking, and what an earlier run carried."""
    info = workflow.info()
    wid, named = info.workflow_id, workflow_id(command.domain, command.command_id)
    state = TsqState.AWAITING_OPERATOR
    if carried.scheduled is not None:
        state = TsqState.RETRY_SCHEDULED
    if carried.proposal is not None:
        state = TsqState.PENDING_APPROVAL
    return rules.Life(
        domain=command.domain,
        command_id=command.command_id,
        parking_id=command.parking_id,
        parked_at=command.parked_at or info.start_time,
        policy=command.policy,
        state=state,
        snoozed=carried.snoozed,
        escalated=carried.escalated,
        scheduled=carried.scheduled,
        proposal=carried.proposal,
        claim=carried.claim,
        expiry_given_up=carried.expiry_given_up,
        deferred=dict(carried.deferred),
        notes=tuple(carried.notes),
        notes_count=carried.notes_count,
        failed=tuple(carried.failed),
        failed_count=carried.failed_count,
        mismatch=None
        if wid == named
        else (
            f"workflow {wid} does not name its command: its input is command "
            f"{command.command_id} of domain {command.domain}, whose workflow is {named}; it "
            "decides nothing"
        ),
    )


def next_run(
    life: rules.Life,
    command: CommandSnapshot,
    *,
    refused: list[RefusedRequest],
    refused_count: int,
    runs: int,
    events: int,
) -> CommandSnapshot:
    """The input of the run a workflow continues as: the same command, parking and policy,
    its counts, its latest refusals and notes, and what is under way."""
    return command.model_copy(
        update={
            "continued": Continued(
                refused_count=refused_count,
                refused=refused,
                failed_count=life.failed_count,
                failed=list(life.failed),
                runs=runs,
                events=events,
                escalated=life.escalated,
                snoozed=life.snoozed,
                scheduled=life.scheduled,
                proposal=life.proposal,
                claim=life.claim,
                notes=list(life.notes),
                notes_count=life.notes_count,
                deferred=life.deferred,
                expiry_given_up=life.expiry_given_up,
            ),
            "policy": life.policy,
            # A fresh run has no history to replay: it follows the current rules.
            "rules": RULES,
        }
    )


# -- what the workflow shows --------------------------------------------------------------------


def state_view(
    life: rules.Life, command: CommandSnapshot, refused: list[RefusedRequest], refused_count: int
) -> StateView:
    """The `state` query's answer."""
    policy, scheduled, claim = life.policy, life.scheduled, life.claim
    pending, outcome = life.pending, life.outcome
    request = pending.request if pending else None
    steps: dict[str, str] = {}
    if pending is not None:
        progress = "in progress"
        if outcome is not None:
            progress = "done" if outcome.carried_out else "skipped"
        steps = dict.fromkeys(steps_of(pending.kind, command), progress)
    return StateView(
        command=command,
        state=life.state,
        decision=outcome.decision if outcome else pending.kind if pending else None,
        decided_by=outcome.operator if outcome else request.operator if request else None,
        reason=outcome.reason
        if outcome
        else (request.reason if isinstance(request, CancelRequest) else None),
        result_data=outcome.result_data
        if outcome
        else (request.result_data if isinstance(request, CompleteRequest) else None),
        requested_at=pending.requested_at if pending else None,
        steps=steps,
        outcome=outcome,
        refused=refused,
        refused_count=refused_count,
        policy=policy.name if policy else None,
        escalate_at=rules.escalate_at(life),
        escalated=life.escalated,
        expire_at=rules.expire_at(life),
        expire_decision=policy.expire_decision if policy else None,
        snoozed=life.snoozed,
        retry_scheduled_for=scheduled.at if scheduled else None,
        retry_scheduled_by=scheduled.request.operator if scheduled else None,
        require_approval=policy.require_approval if policy else [],
        proposal=life.proposal,
        claimed_by=claim.by if claim else None,
        claimed_until=claim.until if claim else None,
        notes=list(life.notes),
        notes_count=life.notes_count,
        deferred=life.deferred,
        expiry_given_up=life.expiry_given_up,
    )


def details(life: rules.Life, command: CommandSnapshot, view: StateView) -> str:
    """The current details the Web UI shows."""
    text = render_details(
        command,
        life.state,
        view,
        failed_attempts=list(life.failed),
        failed_count=life.failed_count,
    )
    if command.continued is not None:
        # A continued run has no static details of its own: the command's facts go here.
        text += "\n### Command\n" + render_static_details(command)
    return text
