"""`TroubleshootingWorkflow`: waits, durably, for an operator's decision on one command."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from tsq.contract import WORKFLOW_TYPE, Activity, DecisionKind, TsqState
    from tsq.errors import AlreadyDecidedError, InvalidInputError
    from tsq.models import (
        REQUEST_MODELS,
        CancelRequest,
        CarryOut,
        CommandSnapshot,
        CompleteRequest,
        DecisionOutcome,
        DecisionRequest,
        RecordRefusal,
        RefusedRequest,
        StateView,
        describe_input,
        describe_validation_error,
    )
    from tsq.workflows import TSQ_STATE
    from tsq.workflows.details import render_details, steps_of

# Each attempt gets this long; attempts go on, with backoff, until the database answers.
ACTIVITY_TIMEOUT = timedelta(seconds=30)
_NON_RETRYABLE = [
    "CommandNotFoundError",
    "InvalidOperationError",
    "PayloadNotFoundError",
    "InvalidInputError",
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

_CANCEL_INPUT = 'Input: {"reason": "why", "operator": "you@example.com"}'
_RETRY_INPUT = 'Input: {"operator": "you@example.com"}'
_COMPLETE_INPUT = 'Input: {"result_data": {...} or null, "operator": "you@example.com"}'
_ANSWER = (
    " Answers once it is done; refused, with the reason, if the input is wrong or the "
    "command was already decided."
)
_CANCEL = "Cancel: status CANCELED, OPERATOR_CANCEL audit, CANCELED reply with the reason."
_RETRY = (
    "Retry: the original message is sent again to <domain>__commands, status PENDING, "
    "attempts 0, OPERATOR_RETRY audit; no reply."
)
_COMPLETE = "Complete: status COMPLETED, OPERATOR_COMPLETE audit, SUCCESS reply with result_data."

_CANCELLATION_REFUSED = (
    "cancelling the workflow does not decide the command; send the `cancel` signal "
    "(or `retry`, `complete`) instead. The workflow keeps waiting"
)

_WORKING = {
    DecisionKind.CANCEL: (TsqState.CANCELING, TsqState.CANCELED),
    DecisionKind.RETRY: (TsqState.RETRYING, TsqState.RETRIED),
    DecisionKind.COMPLETE: (TsqState.COMPLETING, TsqState.COMPLETED),
}


class _Pending:
    """The decision being carried out, and the callers waiting on it."""

    def __init__(self, kind: DecisionKind, request: DecisionRequest, via: str) -> None:
        self.kind = kind
        self.request = request
        self.via = via
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
    """One per command in the troubleshooting queue; id `tsq:<domain>:<command_id>`."""

    @workflow.init
    def __init__(self, command: CommandSnapshot) -> None:
        self._command = command
        self._state = TsqState.AWAITING_OPERATOR
        self._pending: _Pending | None = None
        self._outcome: DecisionOutcome | None = None
        self._refused: list[RefusedRequest] = []
        self._failed_attempts: list[str] = []

    @workflow.run
    async def run(self, command: CommandSnapshot) -> DecisionOutcome:
        self._publish()
        while True:
            try:
                await workflow.wait_condition(lambda: self._pending is not None)
                pending = self._pending
                assert pending is not None
                outcome = await self._carry_out(pending)
            except asyncio.CancelledError:
                # "Request Cancellation" is the Web UI's most prominent button, and it is not a
                # decision: ending here would leave the command parked with no workflow. Keep
                # waiting and say so. A decision it interrupted runs again: it is idempotent.
                await self._refuse(
                    "Request Cancellation", "a workflow cancellation request", _CANCELLATION_REFUSED
                )
                continue
            if outcome is not None:
                break
        # Signals refused while the decision ran still write their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome

    async def _carry_out(self, pending: _Pending) -> DecisionOutcome | None:
        working, done = _WORKING[pending.kind]
        self._state = working
        # The details say CANCELING (or RETRYING, COMPLETING) at once. The TsqState search
        # attribute changes once, to the outcome, when the first attempt succeeds, as nearly
        # all do: each upsert is one more history event and visibility write per decision.
        self._publish(search_attribute=False)
        info = workflow.info()
        request = pending.request
        carry_out = CarryOut(
            effect_key=f"{info.workflow_id}/{info.run_id}/decision",
            workflow_id=info.workflow_id,
            domain=self._command.domain,
            command_id=self._command.command_id,
            decision=pending.kind,
            reason=request.reason if isinstance(request, CancelRequest) else None,
            operator=request.operator,
            result_data=(request.result_data if isinstance(request, CompleteRequest) else None),
            via="update" if pending.via == "update" else "signal",
            request_id=pending.request_id,
        )
        try:
            outcome: DecisionOutcome
            try:
                outcome = await workflow.execute_local_activity(
                    Activity.CARRY_OUT,
                    carry_out,
                    start_to_close_timeout=ACTIVITY_TIMEOUT,
                    retry_policy=FIRST_ATTEMPT,
                    result_type=DecisionOutcome,
                )
            except (ActivityError, ApplicationError) as err:
                if _refused(err):
                    raise
                # Held up (database away, row locked): the workflow list shows it from now on,
                # and the attempts go on with backoff until the database takes the decision.
                self._publish()
                outcome = await workflow.execute_local_activity(
                    Activity.CARRY_OUT,
                    carry_out,
                    start_to_close_timeout=ACTIVITY_TIMEOUT,
                    retry_policy=ACTIVITY_RETRY,
                    result_type=DecisionOutcome,
                )
        except (ActivityError, ApplicationError) as err:
            # Only non-retryable errors get here: the transaction rolled back, nothing changed.
            # The command goes back to waiting, and the refusal stays visible. (A local
            # activity's non-retryable failure arrives as the ApplicationError itself.)
            cause = err.cause if isinstance(err, ActivityError) else err
            message = str(cause) if cause is not None else str(err)
            error_type = cause.type if isinstance(cause, ApplicationError) else None
            self._failed_attempts.append(f"{pending.kind.value} refused: {message}")
            pending.error = ApplicationError(message, type=error_type, non_retryable=True)
            self._pending = None
            self._state = TsqState.AWAITING_OPERATOR
            self._publish()
            return None
        self._outcome = outcome
        done = _WORKING[outcome.decision][1]
        self._state = done if outcome.carried_out else TsqState.DECIDED_ELSEWHERE
        if outcome.request_id not in (None, pending.request_id):
            # The server rejected the workflow task in which another request's decision was
            # carried out (the workflow completed while this request arrived), and dropped
            # that request's update. The recorded outcome is what happened: this request lost.
            await self._lost_to(pending, outcome)
        else:
            pending.outcome = outcome
        self._publish()
        return outcome

    async def _lost_to(self, pending: _Pending, outcome: DecisionOutcome) -> None:
        problem = (
            f"command {self._command.command_id} was already decided: {outcome.decision.value} "
            f"by {outcome.operator or 'an unnamed operator'}"
        )
        if pending.via == "update":
            pending.error = ApplicationError(
                problem, type=AlreadyDecidedError.__name__, non_retryable=True
            )
        else:
            await self._refuse(pending.kind.value, describe_input(pending.request), problem)

    # -- messages: one signal and one update per decision -----------------------------------

    @workflow.signal(name="cancel", description=f"{_CANCEL} {_CANCEL_INPUT}")
    async def cancel(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.CANCEL, raw, extra)

    @workflow.signal(name="retry", description=f"{_RETRY} {_RETRY_INPUT}")
    async def retry(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.RETRY, raw, extra)

    @workflow.signal(name="complete", description=f"{_COMPLETE} {_COMPLETE_INPUT}")
    async def complete(self, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(DecisionKind.COMPLETE, raw, extra)

    @workflow.update(name="operator_cancel", description=f"{_CANCEL}{_ANSWER} {_CANCEL_INPUT}")
    async def operator_cancel(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.CANCEL, raw)  # the validator refused `extra`

    @operator_cancel.validator
    def _validate_operator_cancel(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.CANCEL, raw, extra)

    @workflow.update(name="operator_retry", description=f"{_RETRY}{_ANSWER} {_RETRY_INPUT}")
    async def operator_retry(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.RETRY, raw)  # the validator refused `extra`

    @operator_retry.validator
    def _validate_operator_retry(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.RETRY, raw, extra)

    @workflow.update(
        name="operator_complete", description=f"{_COMPLETE}{_ANSWER} {_COMPLETE_INPUT}"
    )
    async def operator_complete(self, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(DecisionKind.COMPLETE, raw)  # the validator refused `extra`

    @operator_complete.validator
    def _validate_operator_complete(self, raw: Any = None, *extra: Any) -> None:
        self._validate(DecisionKind.COMPLETE, raw, extra)

    @workflow.signal(dynamic=True, description="Any other signal name is refused, visibly.")
    async def unknown_signal(self, name: str, args: Sequence[RawValue]) -> None:
        # Without this, a misspelt `cancle` would wait unseen in the worker's buffer forever.
        await self._refuse(
            name,
            f"{len(args)} argument(s)",
            f"unknown signal {name!r}: the decisions are cancel, retry and complete",
        )

    @workflow.query(name="state", description="Command, decision, step progress and refusals.")
    def state(self) -> StateView:
        pending = self._pending
        request = pending.request if pending else None
        outcome = self._outcome
        return StateView(
            command=self._command,
            state=self._state,
            decision=outcome.decision if outcome else pending.kind if pending else None,
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
        )

    # -- internals ------------------------------------------------------------------------

    async def _on_signal(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        # A signal handler never raises: a bad signal is recorded as refused instead.
        if extra:
            # The SDK passes every argument sent; a handler that could not take them would
            # fail the workflow task again and again, and the workflow would be stuck.
            await self._refuse(
                kind.value,
                describe_input([raw, *extra]),
                f"input: one JSON object expected, {1 + len(extra)} arguments received",
            )
            return
        try:
            request = REQUEST_MODELS[kind].model_validate(raw)
            self._accept(kind, request, via="signal")
        except (ValidationError, ApplicationError) as err:
            await self._refuse(kind.value, describe_input(raw), _problem(err))

    async def _on_update(self, kind: DecisionKind, raw: Any) -> DecisionOutcome:
        pending = self._accept(kind, _validated(kind, raw), via="update")
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
        if extra:
            raise ApplicationError(
                f"invalid input: one JSON object expected, {1 + len(extra)} arguments received",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )
        _validated(kind, raw)
        self._check_undecided()

    def _check_undecided(self) -> None:
        if self._pending is not None:
            raise ApplicationError(
                f"command {self._command.command_id} already has a decision "
                f"({self._pending.kind.value}); a second one is refused",
                type=AlreadyDecidedError.__name__,
                non_retryable=True,
            )

    def _accept(self, kind: DecisionKind, request: DecisionRequest, via: str) -> _Pending:
        # No await between the check and the assignment: two handlers in one workflow task
        # cannot both pass.
        self._check_undecided()
        self._pending = _Pending(kind, request, via)
        return self._pending

    async def _refuse(self, handler: str, received: str, problem: str) -> None:
        refusal = RefusedRequest(handler=handler, problem=problem, received=received)
        self._refused.append(refusal)
        self._publish()
        info = workflow.info()
        await workflow.execute_local_activity(
            Activity.RECORD_REFUSAL,
            RecordRefusal(
                effect_key=f"{info.workflow_id}/{info.run_id}/refused/{len(self._refused)}",
                workflow_id=info.workflow_id,
                domain=self._command.domain,
                command_id=self._command.command_id,
                refusal=refusal,
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
        )

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
        workflow.set_current_details(
            render_details(
                self._command,
                self._state,
                self.state(),
                failed_attempts=self._failed_attempts,
            )
        )


def _validated(kind: DecisionKind, raw: Any) -> DecisionRequest:
    try:
        return REQUEST_MODELS[kind].model_validate(raw)
    except ValidationError as err:
        raise ApplicationError(
            f"invalid input: {_problem(err)}", type=InvalidInputError.__name__, non_retryable=True
        ) from None


def _refused(err: ActivityError | ApplicationError) -> bool:
    """A failure that retrying cannot fix; a local activity's may arrive unwrapped."""
    cause = err.cause if isinstance(err, ActivityError) else err
    return isinstance(cause, ApplicationError) and (
        cause.non_retryable or cause.type in _NON_RETRYABLE
    )


def _problem(err: Exception) -> str:
    return describe_validation_error(err) if isinstance(err, ValidationError) else str(err)


__all__ = ["TroubleshootingWorkflow"]
