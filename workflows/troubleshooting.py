"""`TroubleshootingWorkflow`: waits, durably, for an operator's decision on one command."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities import TroubleshootingActivities
    from tsq.errors import InvalidInputError, InvalidOperationError
    from workflows import TSQ_STATE, WORKFLOW_TYPE
    from workflows.details import render_details
    from workflows.models import (
        CancelRequest,
        CarryOut,
        CommandSnapshot,
        DecisionKind,
        DecisionOutcome,
        RecordRefusal,
        RefusedRequest,
        StateView,
        TsqState,
        describe_input,
    )

# Each attempt gets this long; attempts go on, with backoff, until the database answers.
ACTIVITY_TIMEOUT = timedelta(seconds=30)
ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[
        "CommandNotFoundError",
        "InvalidOperationError",
        "InvalidInputError",
    ],
)

CANCEL_DESCRIPTION = (
    "Cancel the command: status CANCELED, OPERATOR_CANCEL audit, CANCELED reply. "
    'Input: {"reason": "why", "operator": "you@example.com"}'
)
OPERATOR_CANCEL_DESCRIPTION = (
    "Cancel the command and answer once it is done (refused with a reason if the input is "
    'wrong or a decision was already made). Input: {"reason": "why", "operator": "you@example.com"}'
)


class _Pending:
    """The decision being carried out, and the callers waiting on it."""

    def __init__(self, kind: DecisionKind, request: CancelRequest, via: str) -> None:
        self.kind = kind
        self.request = request
        self.via = via
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
            await workflow.wait_condition(lambda: self._pending is not None)
            pending = self._pending
            assert pending is not None
            outcome = await self._carry_out(pending)
            if outcome is not None:
                break
        # Signals refused while the decision ran still write their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome

    async def _carry_out(self, pending: _Pending) -> DecisionOutcome | None:
        self._state = TsqState.CANCELING
        self._publish()
        info = workflow.info()
        try:
            outcome = await workflow.execute_local_activity_method(
                TroubleshootingActivities.carry_out,
                CarryOut(
                    effect_key=f"{info.workflow_id}/{info.run_id}/decision",
                    workflow_id=info.workflow_id,
                    domain=self._command.domain,
                    command_id=self._command.command_id,
                    decision=pending.kind,
                    reason=pending.request.reason,
                    operator=pending.request.operator,
                    via="update" if pending.via == "update" else "signal",
                ),
                start_to_close_timeout=ACTIVITY_TIMEOUT,
                retry_policy=ACTIVITY_RETRY,
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
        pending.outcome = outcome
        self._outcome = outcome
        self._state = TsqState.CANCELED if outcome.carried_out else TsqState.DECIDED_ELSEWHERE
        self._publish()
        return outcome

    # -- messages -------------------------------------------------------------------------

    @workflow.signal(name="cancel", description=CANCEL_DESCRIPTION)
    async def cancel(self, raw: Any = None) -> None:
        # A signal handler never raises: a bad signal is recorded as refused instead.
        try:
            request = CancelRequest.model_validate(raw)
            self._accept(DecisionKind.CANCEL, request, via="signal")
        except (ValidationError, ApplicationError) as err:
            await self._refuse("cancel", raw, _problem(err))

    @workflow.update(name="operator_cancel", description=OPERATOR_CANCEL_DESCRIPTION)
    async def operator_cancel(self, raw: Any = None) -> DecisionOutcome:
        request = _validated(CancelRequest, raw)
        pending = self._accept(DecisionKind.CANCEL, request, via="update")
        await workflow.wait_condition(lambda: pending.finished)
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        if not pending.outcome.carried_out:
            raise ApplicationError(
                pending.outcome.detail, type=InvalidOperationError.__name__, non_retryable=True
            )
        return pending.outcome

    @operator_cancel.validator
    def _validate_operator_cancel(self, raw: Any = None) -> None:
        _validated(CancelRequest, raw)
        self._check_undecided()

    @workflow.query(name="state", description="Command, decision, step progress and refusals.")
    def state(self) -> StateView:
        pending = self._pending
        return StateView(
            command=self._command,
            state=self._state,
            decision=pending.kind if pending else None,
            decided_by=pending.request.operator if pending else None,
            reason=pending.request.reason if pending else None,
            requested_at=pending.requested_at if pending else None,
            steps=self._steps(),
            outcome=self._outcome,
            refused=list(self._refused),
        )

    # -- internals ------------------------------------------------------------------------

    def _check_undecided(self) -> None:
        if self._pending is not None:
            raise ApplicationError(
                f"command {self._command.command_id} already has a decision "
                f"({self._pending.kind.value}); a second one is refused",
                type=InvalidOperationError.__name__,
                non_retryable=True,
            )

    def _accept(self, kind: DecisionKind, request: CancelRequest, via: str) -> _Pending:
        # No await between the check and the assignment: two handlers in one workflow task
        # cannot both pass.
        self._check_undecided()
        self._pending = _Pending(kind, request, via)
        return self._pending

    async def _refuse(self, handler: str, raw: Any, problem: str) -> None:
        refusal = RefusedRequest(handler=handler, problem=problem, received=describe_input(raw))
        self._refused.append(refusal)
        self._publish()
        info = workflow.info()
        await workflow.execute_local_activity_method(
            TroubleshootingActivities.record_refusal,
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
        reply = self._command.reply_queue or None
        steps = ["status CANCELED", "audit OPERATOR_CANCEL"]
        steps.append(f"reply CANCELED to {reply}" if reply else "no reply (no reply queue)")
        if self._outcome is not None:
            progress = "done" if self._outcome.carried_out else "skipped"
        else:
            progress = "in progress"
        return dict.fromkeys(steps, progress)

    def _publish(self) -> None:
        # Upsert only on change: each upsert is one more history event.
        if workflow.info().typed_search_attributes.get(TSQ_STATE) != self._state.value:
            workflow.upsert_search_attributes([TSQ_STATE.value_set(self._state.value)])
        workflow.set_current_details(
            render_details(
                self._command,
                self._state,
                self.state(),
                failed_attempts=self._failed_attempts,
            )
        )


def _validated(model: type[CancelRequest], raw: Any) -> CancelRequest:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ApplicationError(
            f"invalid input: {_problem(err)}", type=InvalidInputError.__name__, non_retryable=True
        ) from None


def _problem(err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for error in err.errors():
            where = ".".join(str(p) for p in error["loc"]) or "input"
            parts.append(f"{where}: {error['msg']}")
        return "; ".join(parts)
    return str(err)


__all__ = ["TroubleshootingWorkflow"]
