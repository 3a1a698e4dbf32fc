"""`TroubleshootingWorkflow`: waits, durably, for an operator's decision on one parking.

A shell around the rules (`rules.py`): each signal, update and deadline becomes an event the
rules take to a step, and the workflow carries the step out — search attributes, details, audit
records, the decision's activity. Handlers do a bounded amount of work and never wait on the
database: their records are queued and the run loop writes them in batches, so no burst of
signals can hold a workflow task past the deadlock detector. Workflows started before the rules
replay through `compat.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from tsq.contract import (
        WORKFLOW_TYPE,
        Activity,
        DecisionKind,
        Metric,
        keyword,
    )
    from tsq.converter import UndecodableInput
    from tsq.errors import AlreadyDecidedError, InvalidInputError
    from tsq.models import (
        REQUEST_MODELS,
        ApproveRequest,
        AuditRecord,
        AuditRecords,
        ClaimRequest,
        CommandSnapshot,
        Continued,
        DecisionOutcome,
        NoteRequest,
        Observe,
        Observed,
        Proposal,
        RefusedRequest,
        RejectRequest,
        ReleaseRequest,
        ScheduledRetry,
        SnoozeRequest,
        StateView,
        UnscheduleRequest,
        describe_input,
    )
    from tsq.workflows import TSQ_CLAIMED_BY, TSQ_ESCALATED, TSQ_STATE, compat, rules, shell
    from tsq.workflows.compat import Version
    from tsq.workflows.details import DESCRIBE

# Refused requests kept in memory (the audit trail has them all); records written per activity.
KEPT = 5
RECORDS_PER_WRITE = 200

Rule = Callable[..., rules.Step]


def _decision_messages(kind: DecisionKind) -> tuple[Any, Any]:
    """The signal `<kind>` and the update `operator_<kind>` (with its validator) of a decision:
    the update answers with its outcome once carried out (or the proposal, the retry
    scheduled)."""

    async def signal(self: Any, raw: Any = None, *extra: Any) -> None:
        await self._on_signal(kind, raw, extra)

    async def update(self: Any, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._on_update(kind, raw)  # type: ignore[no-any-return]

    def validate(self: Any, raw: Any = None, *extra: Any) -> None:
        self._validate_decision(kind, raw, extra)

    return _handlers(kind.value, signal, update, validate)


def _handlers(name: str, signal: Any, update: Any, validate: Any) -> tuple[Any, Any]:
    signal.__name__ = signal.__qualname__ = name
    update.__name__ = update.__qualname__ = f"operator_{name}"
    defined = workflow.update(name=update.__name__, description=DESCRIBE[update.__name__])(update)
    defined.validator(validate)
    return workflow.signal(name=name, description=DESCRIBE[name])(signal), defined


def _messages(name: str, model: type[Any], rule: Rule) -> tuple[Any, Any]:
    """The signal `name` and the update `operator_<name>` (with its validator) of a request
    other than a decision, both carried out by `rule`."""

    async def signal(self: Any, raw: Any = None, *extra: Any) -> None:
        await self._on_request(name, model, rule, raw, extra)

    async def update(self: Any, raw: Any = None, *extra: Any) -> StateView:
        await self._on_update_request(model, rule, raw)
        return self.state()  # type: ignore[no-any-return]

    async def approval(self: Any, raw: Any = None, *extra: Any) -> DecisionOutcome:
        return await self._answer_approval(await self._on_update_request(model, rule, raw))  # type: ignore[no-any-return]

    def validate(self: Any, raw: Any = None, *extra: Any) -> None:
        self._validate_request(model, rule, raw, extra)

    return _handlers(name, signal, approval if rule is rules.approve else update, validate)


@workflow.defn(name=WORKFLOW_TYPE)
class TroubleshootingWorkflow:
    """One per parking of a command in the troubleshooting queue; id `tsq:<domain>:<id>`."""

    @workflow.init
    def __init__(self, command: CommandSnapshot) -> None:
        self._command = command
        self._version = compat.version_of(command)
        carried = command.continued or Continued()
        self._life = shell.life_of(command, carried)
        self._refused: deque[RefusedRequest] = deque(carried.refused, maxlen=KEPT)
        self._refused_count = carried.refused_count
        self._runs = carried.runs
        self._events = carried.events
        # Records not yet in the audit trail (refused requests among them: rules' version),
        # and refusals not yet written (0.2's).
        # (A refusal is queued as it came, numbered; its record is built when written: a flood
        # of refused signals costs each handler next to nothing.)
        self._records: list[AuditRecord | tuple[RefusedRequest, int]] = []
        self._unwritten: list[RefusedRequest] = []
        # Answers of updates whose decisions are being carried out, by request id.
        self._answers: dict[str, DecisionOutcome | ApplicationError] = {}
        self._observe = False
        self._replan = False
        self._details_due = False
        self._count = shell.Counters()

    @workflow.run
    async def run(self, command: CommandSnapshot) -> DecisionOutcome:
        if self._version >= Version.V02 and self._life.mismatch:
            raise ApplicationError(
                self._life.mismatch, type=InvalidInputError.__name__, non_retryable=True
            )
        self._publish()
        while True:
            try:
                outcome = await self._next()
            except asyncio.CancelledError:
                # "Request Cancellation" is the Web UI's most prominent button, and it is not a
                # decision: ending here would leave the command parked with no workflow. Keep
                # waiting and say so.
                self._upgrade()
                await self._refuse(*shell.CANCELLATION, shell.CANCELLATION_REFUSED)
                continue
            if outcome is not None:
                break
        # Requests refused while the decision ran still write their audit rows.
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._write()
        return outcome

    async def _next(self) -> DecisionOutcome | None:
        """Wait for something to do, do it; the outcome once the workflow is done."""
        await self._wait()
        if self._observe:
            self._observe = False
            outcome = await self._follow_database()
            if outcome is not None:
                return outcome
        await self._write()
        if self._version >= Version.V02 and self._life.pending is None:
            self._upgrade()
            await self._apply(rules.tick(self._life, workflow.now(), shell.new_id))
        if self._life.pending is not None:
            return await self._carry_out()
        if self._version >= Version.V02 and workflow.info().is_continue_as_new_suggested():
            await self._continue_as_new()
        return None

    async def _wait(self) -> None:
        """Until there is work, or the next moment something may be due."""
        self._replan = False
        if self._has_work():
            return
        wake = rules.next_wake(self._life, workflow.now()) if self._version >= 2 else None
        if wake is None:
            await workflow.wait_condition(self._has_work)
            return
        timeout = (wake - workflow.now()).total_seconds()
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(self._has_work, timeout=timeout)

    def _has_work(self) -> bool:
        if self._life.pending is not None:
            return True
        if self._version is Version.V01:
            return False
        return (
            self._observe
            or self._replan
            or bool(self._unwritten or self._records)
            or workflow.info().is_continue_as_new_suggested()
        )

    # -- carrying steps out -----------------------------------------------------------------

    async def _apply(self, step: rules.Step) -> None:
        """A step of the rules: search attributes, then what the workflow shows, then its
        records (queued; written by the run loop, or at once by a workflow of 0.2)."""
        before, self._life = self._life, step.life
        if step.life.parking_id != before.parking_id:
            self._command = self._command.model_copy(update={"parking_id": step.life.parking_id})
            workflow.upsert_memo({"tsq": {"parking_id": step.life.parking_id}})
        if step.life.policy != before.policy:
            self._command = self._command.model_copy(update={"policy": step.life.policy})
        if step.claim_unset:
            workflow.upsert_search_attributes([TSQ_CLAIMED_BY.value_unset()])
        if step.claim_set is not None:
            workflow.upsert_search_attributes([TSQ_CLAIMED_BY.value_set(keyword(step.claim_set))])
        if step.escalated:
            workflow.upsert_search_attributes([TSQ_ESCALATED.value_set(True)])
        self._replan = self._replan or step.replan
        self._observe = self._observe or step.observe
        if step.publish is rules.Publish.STATE:
            self._publish()
        elif step.publish is rules.Publish.DETAILS:
            self._publish_soon()
        if isinstance(step.accepted, Proposal):
            proposal = step.accepted
            self._count(
                Metric.DECISIONS, kind=proposal.decision.value, channel=proposal.via,
                result="proposed",
            )  # fmt: skip
        for record in step.records:
            self._events += 1
            if self._version is Version.RULES:
                record_now = shell.audit_record(record, self._life.parking_id, self._events)
                self._records.append(record_now)
                continue
            await compat.write_record(self._activity, record, self._command, self._events)

    async def _write(self) -> None:
        """The records and refusals queued, in batches, each batch one transaction."""
        await compat.write_refusals(
            self._activity, self._unwritten, self._command, self._refused_count
        )
        while self._records:
            parking = self._life.parking_id
            batch = [
                shell.refusal_record(*queued, parking) if isinstance(queued, tuple) else queued
                for queued in self._records[:RECORDS_PER_WRITE]
            ]
            try:
                await self._activity(
                    Activity.RECORD,
                    AuditRecords(
                        workflow_id=workflow.info().workflow_id,
                        domain=self._command.domain,
                        command_id=self._command.command_id,
                        parking_id=self._life.parking_id,
                        error_code=self._command.last_error_code,
                        records=batch,
                    ),
                    shell.ACTIVITY_RETRY,
                )
            except ActivityError as err:
                workflow.logger.warning("records not written to the audit trail: %s", err)
            del self._records[: len(batch)]

    async def _follow_database(self) -> DecisionOutcome | None:
        """Read the parking; the outcome to end with when the command is no longer in it."""
        seen: Observed = await self._activity(
            Activity.OBSERVE,
            Observe(
                workflow_id=workflow.info().workflow_id,
                domain=self._command.domain,
                command_id=self._command.command_id,
                parking_id=self._life.parking_id,
                parked_at=self._command.parked_at,
            ),
            shell.ACTIVITY_RETRY,
            Observed,
        )
        step = rules.observed(self._life, seen)
        await self._apply(step)
        return step.finished

    async def _carry_out(self) -> DecisionOutcome | None:
        if self._version is Version.RULES:
            # What was accepted before the decision goes first (a proposal's hold, a retry it
            # replaces): the audit trail reads in order.
            await self._write()
        pending = self._life.pending
        assert pending is not None
        await self._apply(rules.carrying_out(self._life))
        carry_out = shell.carry_out_input(
            pending, self._command, self._life.parking_id, by_run=self._version is Version.V01
        )
        try:
            try:
                outcome = await self._decision(carry_out, shell.FIRST_ATTEMPT)
            except (ActivityError, ApplicationError) as err:
                if shell.refused(err):
                    raise
                # Held up (database away, row locked): the workflow list shows it from now on,
                # and the attempts go on with backoff until the database takes the decision.
                self._count(Metric.DECISIONS_HELD_UP, kind=pending.kind.value)
                self._publish()
                outcome = await self._decision(carry_out, shell.ACTIVITY_RETRY)
        except (ActivityError, ApplicationError) as err:
            if shell.cancelled(err) and (self._upgrade() or self._version >= Version.V02):
                # A workflow of tsq 0.1 took its activity's cancellation for a refusal; the
                # attempt may have committed. Carried on now, the record of it is found.
                outcome = await self._decision(carry_out, shell.ACTIVITY_RETRY)
            else:
                # Only non-retryable errors get here: the transaction rolled back, nothing
                # changed. (A local activity's non-retryable failure arrives unwrapped.)
                error_type, message = shell.refusal_of(err)
                self._count(
                    Metric.DECISIONS, kind=pending.kind.value, channel=pending.via,
                    result="refused",
                )  # fmt: skip
                self._answer_with(pending, shell.error(error_type or "", message))
                await self._apply(
                    rules.refused(self._life, error_type, message, workflow.now(), shell.new_id)
                )
                return None
        result = "carried_out" if outcome.carried_out else "decided_elsewhere"
        self._count(Metric.DECISIONS, kind=pending.kind.value, channel=pending.via, result=result)
        step = rules.carried_out(self._life, outcome)
        await self._apply(step)
        if step.lost is None:
            self._answer_with(pending, outcome)
        elif pending.via == "update":
            self._answers[pending.request_id] = shell.error(AlreadyDecidedError.__name__, step.lost)
        else:
            await self._refuse(pending.kind.value, describe_input(pending.request), step.lost)
        return outcome

    def _answer_with(
        self, pending: rules.Pending, answer: DecisionOutcome | ApplicationError
    ) -> None:
        """Kept for an update waiting on the decision (an approval may be one)."""
        if pending.via in ("update", "approval"):
            self._answers[pending.request_id] = answer

    async def _decision(self, carry_out: Any, retry: RetryPolicy) -> DecisionOutcome:
        outcome: DecisionOutcome = await self._activity(
            Activity.CARRY_OUT, carry_out, retry, DecisionOutcome
        )
        return outcome

    async def _activity(
        self, name: str, arg: Any, retry: RetryPolicy, result_type: type | None = None
    ) -> Any:
        """Run a local activity; Request Cancellation cannot interrupt it (tsq 0.1's workflows
        let it, and took a decision's cancellation for a refusal)."""
        call = shell.local_activity(name, arg, retry, result_type)
        if self._version is Version.V01:
            return await call
        task = asyncio.ensure_future(call)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                self._note_refusal(
                    *shell.CANCELLATION,
                    shell.CANCELLATION_DURING_DECISION
                    if self._life.pending
                    else shell.CANCELLATION_REFUSED,
                )

    async def _continue_as_new(self) -> None:
        """Before the history gets long: a fresh run with the same command, parking, counts
        and latest refusals. Only between decisions, once every handler has finished."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._write()
        if self._life.pending is not None or self._unwritten or self._records or self._observe:
            return  # something arrived meanwhile: do it first
        workflow.continue_as_new(
            shell.next_run(
                self._life,
                self._command,
                refused=list(self._refused),
                refused_count=self._refused_count,
                runs=self._runs + 1,
                events=self._events,
            )
        )

    # -- decisions: one signal and one update per kind --------------------------------------

    cancel, operator_cancel = _decision_messages(DecisionKind.CANCEL)
    retry, operator_retry = _decision_messages(DecisionKind.RETRY)
    complete, operator_complete = _decision_messages(DecisionKind.COMPLETE)

    async def _on_signal(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        # A signal handler never raises: a bad signal is recorded as refused instead.
        self._upgrade()
        if extra:
            # The SDK passes every argument sent; a handler that could not take them would
            # fail the workflow task again and again, and the workflow would be stuck.
            await self._refuse(
                kind.value,
                describe_input([raw, *extra]),
                f"input: one JSON object expected, {1 + len(extra)} arguments received",
            )
            return
        if isinstance(raw, UndecodableInput) and self._version is Version.V01:
            # tsq 0.1 never saw such a signal (the SDK dropped it): its histories replay so.
            workflow.logger.warning("signal %s dropped: %s", kind.value, raw.problem)
            return
        try:
            request = shell.parsed(REQUEST_MODELS[kind], raw)
            step = self._decide(kind, request, "signal", shell.new_id)
        except ApplicationError as err:
            await self._refuse(kind.value, describe_input(raw), shell.as_signal(err))
            return
        await self._apply(step)

    def _validate_decision(self, kind: DecisionKind, raw: Any, extra: tuple[Any, ...]) -> None:
        try:
            shell.no_extra(extra)
            request = shell.parsed(REQUEST_MODELS[kind], raw)
            self._decide(kind, request, "update", shell.no_id)
        except ApplicationError:
            self._count(Metric.REFUSED_REQUESTS, request=kind.value, channel="update")
            raise

    async def _on_update(self, kind: DecisionKind, raw: Any) -> DecisionOutcome:
        self._upgrade()
        request = shell.parsed(REQUEST_MODELS[kind], raw)
        step = self._decide(kind, request, "update", shell.new_id)
        await self._apply(step)
        return await self._answer(step.accepted, kind)

    def _decide(self, kind: DecisionKind, request: Any, via: str, new_id: Any) -> rules.Step:
        return shell.ruled(rules.decide, self._life, kind, request, via, workflow.now(), new_id)

    async def _answer(
        self, accepted: rules.Pending | ScheduledRetry | Proposal | None, kind: DecisionKind
    ) -> DecisionOutcome:
        """An update's answer: the proposal, the retry scheduled, or the outcome of the
        decision once it has been carried out."""
        if isinstance(accepted, Proposal):
            return rules.outcome_of_proposal(self._life, accepted, kind)
        if isinstance(accepted, ScheduledRetry):
            return rules.outcome_of_schedule(self._life, accepted)
        assert accepted is not None
        request_id = accepted.request_id
        await workflow.wait_condition(lambda: request_id in self._answers)
        answer = self._answers.pop(request_id)
        if isinstance(answer, ApplicationError):
            raise answer
        if not answer.carried_out:
            raise shell.error(AlreadyDecidedError.__name__, answer.detail)
        return answer

    # -- the other requests: four eyes, time, notes, claims. Each is a signal, refused
    # visibly when it cannot be taken, and an update `operator_<name>`, checked by a validator,
    # that answers with the state (an approval: with the outcome of the decision). ----------

    approve, operator_approve = _messages("approve", ApproveRequest, rules.approve)
    reject, operator_reject = _messages("reject", RejectRequest, rules.reject)
    snooze, operator_snooze = _messages("snooze", SnoozeRequest, rules.snooze)
    unschedule, operator_unschedule = _messages("unschedule", UnscheduleRequest, rules.unschedule)
    note, operator_note = _messages("note", NoteRequest, rules.note)
    claim, operator_claim = _messages("claim", ClaimRequest, rules.claim)
    release, operator_release = _messages("release", ReleaseRequest, rules.release)

    async def _answer_approval(self, step: rules.Step) -> DecisionOutcome:
        accepted = step.accepted
        assert accepted is not None and not isinstance(accepted, Proposal)
        kind = accepted.kind if isinstance(accepted, rules.Pending) else DecisionKind.RETRY
        return await self._answer(accepted, kind)

    async def _on_request(
        self, name: str, model: type[Any], rule: Callable[..., rules.Step], raw: Any, extra: Any
    ) -> None:
        """A request other than a decision, by signal: carried out, or refused visibly."""
        self._upgrade()
        if self._version is Version.V01 and name not in ("snooze", "unschedule"):
            # A workflow of tsq 0.1 knew no such signal: refused as unknown, as 0.1 did.
            sent = f"{len(extra) + (raw is not None)} argument(s)"
            await self._refuse(name, sent, compat.UNKNOWN_TO_01.format(name=name))
            return
        try:
            shell.no_extra(extra)
            request = shell.parsed(model, raw)
            step = shell.ruled(rule, self._life, request, workflow.now(), shell.new_id)
        except ApplicationError as err:
            await self._refuse(name, describe_input(raw), shell.as_signal(err))
            return
        await self._apply(step)

    async def _on_update_request(
        self, model: type[Any], rule: Callable[..., rules.Step], raw: Any
    ) -> rules.Step:
        self._upgrade()
        step = shell.ruled(rule, self._life, shell.parsed(model, raw), workflow.now(), shell.new_id)
        await self._apply(step)
        return step

    def _validate_request(
        self, model: type[Any], rule: Callable[..., rules.Step], raw: Any, extra: Any
    ) -> None:
        shell.no_extra(extra)
        shell.ruled(rule, self._life, shell.parsed(model, raw), workflow.now(), shell.no_id)

    # -- the database and the unknown -------------------------------------------------------

    @workflow.signal(name="tsq_refresh", description=DESCRIBE["tsq_refresh"])
    async def tsq_refresh(self, *ignored: Any) -> None:
        self._upgrade()
        if self._version >= Version.V02:
            self._observe = True

    @workflow.update(name="tsq_observe", description=DESCRIBE["tsq_observe"])
    async def tsq_observe(self, *ignored: Any) -> None:
        await self.tsq_refresh()

    @workflow.signal(dynamic=True, description="Any other signal name is refused, visibly.")
    async def unknown_signal(self, name: str, args: Sequence[RawValue]) -> None:
        # Without this, a misspelt `cancle` would wait unseen in the worker's buffer forever.
        self._upgrade()
        await self._refuse(name, f"{len(args)} argument(s)", compat.UNKNOWN_TO_01.format(name=name))

    @workflow.query(name="state", description="Command, decision, step progress and refusals.")
    def state(self) -> StateView:
        return shell.state_view(self._life, self._command, list(self._refused), self._refused_count)

    # -- internals ------------------------------------------------------------------------

    def _upgrade(self) -> bool:
        """A workflow started before the rules takes them at a new event (see `compat`); True
        when a workflow of tsq 0.1 was bound to its parking just now."""
        if self._version is Version.RULES:
            return False
        before, self._version = self._version, compat.upgraded(self._version)
        if before is Version.V01 and self._version > before:
            self._observe = True  # bind it to its parking
        if self._version is Version.RULES:
            # 0.2's refusals not yet written join the records.
            first = self._refused_count - len(self._unwritten) + 1
            for number, refusal in enumerate(self._unwritten, first):
                self._queue_refusal(refusal, number)
            self._unwritten.clear()
        return before is Version.V01 and self._version > before

    async def _refuse(self, handler: str, received: str, problem: str) -> None:
        refusal = self._note_refusal(handler, received, problem)
        if self._version is not Version.V01:
            return
        self._publish()
        await compat.write_refusal_01(refusal, self._command, self._refused_count)

    def _note_refusal(self, handler: str, received: str, problem: str) -> RefusedRequest:
        self._count(Metric.REFUSED_REQUESTS, request=shell.request_label(handler), channel="signal")
        # Built from tsq's own strings: nothing to validate, and a flood builds thousands.
        refusal = RefusedRequest.model_construct(
            handler=handler, problem=problem, received=received
        )
        self._refused.append(refusal)
        self._refused_count += 1
        if self._version is Version.RULES:
            self._queue_refusal(refusal, self._refused_count)
            self._publish_soon()
        elif self._version is Version.V02:
            # Written by the run loop, in batches: a flood of refusals costs one activity per
            # batch and stays cheap to handle, whatever its size.
            self._unwritten.append(refusal)
            self._publish_soon()
        return refusal

    def _queue_refusal(self, refusal: RefusedRequest, number: int) -> None:
        self._records.append((refusal, number))

    def _publish(self) -> None:
        # Upsert only on change: each upsert is one more history event.
        state = self._life.state.value
        if workflow.info().typed_search_attributes.get(TSQ_STATE) != state:
            workflow.upsert_search_attributes([TSQ_STATE.value_set(state)])
        self._render_details()

    def _publish_soon(self) -> None:
        """Render the details once, after every handler of this workflow task has run."""
        if not self._details_due:
            self._details_due = True
            asyncio.get_running_loop().call_soon(self._render_details)

    def _render_details(self) -> None:
        self._details_due = False
        workflow.set_current_details(shell.details(self._life, self._command, self.state()))


__all__ = ["TroubleshootingWorkflow"]
