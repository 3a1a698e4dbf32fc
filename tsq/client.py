"""`TroubleshootingClient`: the SDK services and the CLI use to park and decide commands."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar
from uuid import UUID, uuid4

import asyncpg
from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from tsq import store
from tsq.contract import (
    BULK_WORKFLOW_TYPE,
    DECISIONS,
    DOMAIN_PATTERN,
    RULES,
    TERMINAL_STATUSES,
    WORKFLOW_TYPE,
    CommandStatus,
    DecisionKind,
    TsqState,
    bulk_workflow_id,
    keyword,
    workflow_id,
)
from tsq.db import check_schema, create_pool
from tsq.durations import LONGEST, parse_duration
from tsq.errors import (
    ERROR_TYPES,
    AlreadyDecidedError,
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    NotFoundError,
    StaleParkingError,
    TroubleshootingError,
    UnavailableError,
)
from tsq.models import (
    CLAIM_LASTS,
    REQUEST_MODELS,
    ApproveRequest,
    BulkApproval,
    BulkItem,
    BulkOperation,
    BulkStart,
    CarryOut,
    ClaimRequest,
    CommandSnapshot,
    DecisionOutcome,
    DecisionRequest,
    NoteRequest,
    Policy,
    RejectRequest,
    ReleaseRequest,
    SnoozeRequest,
    StateView,
    UnscheduleRequest,
    describe_validation_error,
)
from tsq.settings import Settings
from tsq.temporal import connect
from tsq.views import (
    AuditEvent,
    CommandDetails,
    DecisionPreview,
    LastError,
    PolicyView,
    TroubleshootingItem,
    WaitingGroup,
    Would,
)
from tsq.workflows import COMMAND_DOMAIN, COMMAND_TYPE, LAST_ERROR_CODE, TSQ_STATE
from tsq.workflows.details import render_static_details, render_summary

log = logging.getLogger(__name__)
_R = TypeVar("_R")

# `TroubleshootingItem.state` of a parked command no workflow runs for.
NO_WORKFLOW = "NO_WORKFLOW"

TSQ = CommandStatus.IN_TROUBLESHOOTING_QUEUE
MAX_PAGE = 1000
QUERY_TIMEOUT = timedelta(seconds=10)
UPDATE_ATTEMPTS = 3
# How long a call waits for the workflow of an earlier parking of its command to end, before
# it starts (or reaches) the workflow of the current one.
EARLIER_RUN_WAIT = 30.0
MEMO_KEY = "tsq"
# How long `stop_bulk` waits for the bulk operation's workflow to end.
STOP_WAIT = 30.0


@dataclass
class SyncReport:
    """What `sync` did: workflows started, ones already running, and commands it could not
    give a workflow, each with the reason (the others were not held up by them)."""

    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _command_uuid(value: str | UUID) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidInputError(f"command id {value!r} is not a UUID") from None


def _bulk_uuid(value: str | UUID) -> UUID:
    try:
        return value if isinstance(value, UUID) else UUID(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"{value!r} is not a bulk operation id (a UUID)") from None


def _domain(value: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(DOMAIN_PATTERN, value):
        raise InvalidInputError(
            f"domain {value!r} is not valid (letters, digits and _, at most 40 characters)"
        )
    return value


def _input_error(err: ValidationError) -> InvalidInputError:
    return InvalidInputError(f"invalid input: {describe_validation_error(err)}")


def snapshot(row: asyncpg.Record) -> CommandSnapshot:
    """The workflow input for a parked command's row (with its `parking_id`)."""
    try:
        return CommandSnapshot(
            domain=row["domain"],
            command_id=row["command_id"],
            command_type=row["command_type"],
            correlation_id=row["correlation_id"],
            reply_queue=row["reply_queue"] or "",
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            last_error_type=row["last_error_type"],
            last_error_code=row["last_error_code"],
            last_error_msg=row["last_error_msg"],
            batch_id=row["batch_id"],
            created_at=row["created_at"],
            parked_at=row["updated_at"],
            parking_id=row["parking_id"],
            policy=store.policy_of(row["policy"]),
            rules=RULES,
        )
    except ValidationError as err:
        raise InvalidInputError(
            f"command {row['command_id']} of domain {row['domain']!r} cannot have a workflow: "
            f"{describe_validation_error(err)}"
        ) from None


def start_metadata(snapshot: CommandSnapshot) -> dict[str, Any]:
    """What a command's workflow is started with besides its id: the search attributes the
    operators filter on, the summary and details the Web UI shows, and the parking it decides.
    Values are cut to what the server takes; the full ones stay in PostgreSQL."""
    error_code = snapshot.last_error_code or snapshot.last_error_type or ""
    return {
        "search_attributes": TypedSearchAttributes(
            [
                SearchAttributePair(COMMAND_DOMAIN, snapshot.domain),
                SearchAttributePair(COMMAND_TYPE, keyword(snapshot.command_type)),
                SearchAttributePair(TSQ_STATE, TsqState.AWAITING_OPERATOR.value),
                SearchAttributePair(LAST_ERROR_CODE, keyword(error_code)),
            ]
        ),
        "static_summary": render_summary(snapshot),
        "static_details": render_static_details(snapshot),
        "memo": {MEMO_KEY: {"parking_id": snapshot.parking_id}},
    }


def render_when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at else "an unknown time"


def _item(row: asyncpg.Record) -> TroubleshootingItem:
    return TroubleshootingItem(
        domain=row["domain"],
        command_id=row["command_id"],
        command_type=row["command_type"],
        status=row["status"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        last_error=LastError(
            type=row["last_error_type"], code=row["last_error_code"], message=row["last_error_msg"]
        ),
        correlation_id=row["correlation_id"],
        reply_to=row["reply_queue"] or None,
        batch_id=row["batch_id"],
        msg_id=row["msg_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        payload=row["payload"],
        claimed_by=row.get("claimed_by"),
        claimed_until=row.get("claimed_until"),
        proposal=row.get("proposal"),
        retry_at=row.get("retry_at"),
    )


def _from_update_failure(err: WorkflowUpdateFailedError) -> TroubleshootingError:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return ERROR_TYPES.get(cause.type or "", InvalidOperationError)(cause.message)
    return InvalidOperationError(str(err.cause or err))


def _aware(value: datetime, what: str) -> str:
    if value.tzinfo is None:
        raise InvalidInputError(f"{what} {value.isoformat()} has no time zone")
    return value.isoformat()


def policy_input(
    name: str,
    *,
    escalate_after: timedelta | str | None,
    expire_after: timedelta | str | None,
    expire_decision: str | None,
    reason: str | None,
    result_data: dict[str, Any] | None,
    require_approval: Sequence[str] = (),
    approval_expires_after: timedelta | str | None = None,
) -> Policy:
    """A policy as given by a person: each problem named after the option it came from."""
    durations = {}
    for option, value in (
        ("escalate_after", escalate_after),
        ("expire_after", expire_after),
        ("approval_expires_after", approval_expires_after),
    ):
        if isinstance(value, str):
            durations[option] = parse_duration(value, option.replace("_", "-"))
        elif isinstance(value, timedelta):
            if not timedelta(0) < value <= LONGEST:
                raise InvalidInputError(
                    f"{option} {value} must be above zero and at most ten years"
                )
            durations[option] = value
    if (expire_decision is None) != ("expire_after" not in durations):
        raise InvalidInputError("expire-after and expire-decision go together")
    if expire_decision not in (None, "cancel", "complete"):
        raise InvalidInputError(
            f"expire-decision {expire_decision!r} is neither cancel nor complete"
        )
    if expire_decision == "cancel" and not (reason and reason.strip()):
        raise InvalidInputError("a policy that cancels needs --reason (sent in the reply)")
    if expire_decision != "cancel" and reason is not None:
        raise InvalidInputError("--reason goes with --expire-decision cancel")
    if expire_decision != "complete" and result_data is not None:
        raise InvalidInputError("--result-data goes with --expire-decision complete")
    kinds = [kind.strip() for kind in require_approval if kind.strip()]
    unknown = [kind for kind in kinds if kind not in {k.value for k in DecisionKind}]
    if unknown:
        raise InvalidInputError(
            f"require-approval {', '.join(map(repr, unknown))}: the decisions are cancel, retry "
            "and complete"
        )
    if "approval_expires_after" in durations and not kinds:
        raise InvalidInputError("--approval-expires goes with --require-approval")
    if not (kinds or "escalate_after" in durations or "expire_after" in durations):
        raise InvalidInputError(
            "a policy needs escalate-after, expire-after or require-approval (or several)"
        )
    try:
        return Policy.model_validate(
            {
                "name": name,
                **durations,
                "expire_decision": expire_decision,
                "expire_reason": reason,
                "expire_result_data": result_data,
                "require_approval": sorted(set(kinds)),
            }
        )
    except ValidationError as err:
        raise _input_error(err) from None


def _fields(**values: Any) -> dict[str, Any]:
    """A request's fields as given: `force` only when set, so the request stays as short as
    an operator would type it."""
    if not values.get("force"):
        values.pop("force", None)
    return values


def _retry_fields(
    operator: str | None,
    not_before: datetime | None,
    patch: dict[str, Any] | None,
    force: bool,
) -> dict[str, Any]:
    fields = _fields(operator=operator, force=force)
    if not_before is not None:
        fields["not_before"] = _aware(not_before, "not_before")
    if patch is not None:
        fields["patch"] = patch
    return fields


_REFUSED_PREVIEW = {
    "TQ001": "invalid",
    "TQ002": "payload_not_found",
    "TQ003": "claimed",
    "TQ005": "proposal_pending",
}


def preview_of(
    kind: DecisionKind, domain: str, command_id: UUID, needs_approval: bool, result: Any
) -> DecisionPreview:
    """A decision's preview from what `tsq.preview` read back (or the refusal it raised)."""
    preview: dict[str, Any] = {
        "domain": domain,
        "command_id": command_id,
        "decision": kind,
        "needs_approval": needs_approval,
    }
    if isinstance(result, asyncpg.PostgresError):
        preview["result"] = "error"
        preview["detail"] = str(result)
        return DecisionPreview.model_validate(preview)
    if "refused" in result:
        refused = result["refused"]
        preview["result"] = _REFUSED_PREVIEW.get(refused["sqlstate"], "error")
        preview["detail"] = refused["message"]
        return DecisionPreview.model_validate(preview)
    outcome = DecisionOutcome.model_validate(result["outcome"])
    if not outcome.carried_out:
        terminal = result.get("status_before") in {s.value for s in TERMINAL_STATUSES}
        preview["result"] = "already_decided" if terminal else "not_in_troubleshooting_queue"
        preview["detail"] = outcome.detail
        return DecisionPreview.model_validate(preview)
    preview["result"] = "would_propose" if needs_approval else "would_carry_out"
    preview["detail"] = (
        f"would be proposed, and once another operator approves it: {outcome.detail}"
        if needs_approval
        else f"would be {outcome.detail}"
    )
    preview["would"] = {key: result.get(key) for key in Would.model_fields}
    return DecisionPreview.model_validate(preview)


def _decision_doc(kind: DecisionKind, returns: str) -> str:
    """The docstring of a decision call, from the table of what each decision does."""
    decision = DECISIONS[kind]
    return (
        f"{kind.value.capitalize()}: {decision.effect}.\n\n{returns} Raises "
        "`CommandNotFoundError`, `InvalidOperationError` (not in the troubleshooting queue, "
        "already decided; `PayloadNotFoundError` when a retry has no original message; "
        "`ClaimedError` when another operator claimed the command and `force` is not set) or "
        "`InvalidInputError` (blank reason, bad id, result data PostgreSQL cannot store); in "
        "every such case nothing changed."
    )


_RETURNS = (
    "Returns the outcome once status, audit and reply are done; with `wait=False`, returns "
    "None as soon as the workflow has accepted the decision. Where a policy asks for approval "
    "the decision becomes a proposal: the outcome is not carried out and names the `proposal` "
    "(another operator calls `approve`)."
)


class TroubleshootingClient:
    """Async client for services and operators. Build it with `connect()`; close it when done."""

    def __init__(
        self,
        temporal: Client | None,
        pool: asyncpg.Pool,
        *,
        task_queue: str,
        owns_pool: bool = False,
        temporal_problem: str | None = None,
    ) -> None:
        self._temporal = temporal
        self.pool = pool
        self.task_queue = task_queue
        self._owns_pool = owns_pool
        # Why there is no Temporal client (connected with `reading`, Temporal away).
        self.temporal_problem = temporal_problem

    @property
    def temporal(self) -> Client:
        """The Temporal client; `UnavailableError`, saying why, when Temporal could not be
        reached (a client connected with `reading` still reads what PostgreSQL holds)."""
        if self._temporal is None:
            raise UnavailableError(self.temporal_problem or "Temporal is not connected")
        return self._temporal

    @classmethod
    async def connect(cls, settings: Settings | None = None, *, reading: bool = False) -> Self:
        """Connect to the database and Temporal named by `settings` (default: the environment).

        Each service that cannot be reached raises `UnavailableError` naming it, the setting and
        the likely fix. With `reading`, Temporal away is not an error: what PostgreSQL holds
        (the queue, groups, audit trails, claims, proposals, retries scheduled) is still read,
        and what only the workflows know is given as unknown, with `temporal_problem` saying
        why; deciding then raises `UnavailableError`.
        """
        settings = settings or Settings.from_env()
        dsn = settings.require_database_url()
        pool = await create_pool(dsn)
        try:
            await check_schema(pool, dsn)
            try:
                temporal = await connect(settings)
            except UnavailableError as err:
                if not reading:
                    raise
                log.info("reading without Temporal: %s", err)
                return cls(
                    None,
                    pool,
                    task_queue=settings.task_queue,
                    owns_pool=True,
                    temporal_problem=str(err),
                )
        except BaseException:
            await pool.close()
            raise
        return cls(temporal, pool, task_queue=settings.task_queue, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- deciding ---------------------------------------------------------------------------

    async def operator_cancel(
        self,
        domain: str,
        command_id: str | UUID,
        reason: str,
        *,
        operator: str | None = None,
        force: bool = False,
        wait: bool = True,
    ) -> DecisionOutcome | None:
        return await self._decide(
            DecisionKind.CANCEL,
            domain,
            command_id,
            _fields(reason=reason, operator=operator, force=force),
            wait=wait,
        )

    operator_cancel.__doc__ = _decision_doc(DecisionKind.CANCEL, _RETURNS)

    async def operator_retry(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str | None = None,
        not_before: datetime | None = None,
        patch: dict[str, Any] | None = None,
        force: bool = False,
        wait: bool = True,
    ) -> DecisionOutcome | None:
        fields = _retry_fields(operator, not_before, patch, force)
        return await self._decide(DecisionKind.RETRY, domain, command_id, fields, wait=wait)

    operator_retry.__doc__ = _decision_doc(
        DecisionKind.RETRY,
        _RETURNS
        + " With `not_before` (a time with its zone, in the future) the retry waits until then:"
        " the outcome says when (`scheduled_for`); any other decision before it replaces it."
        " With `patch` (a JSON merge patch, RFC 7396) the original message is edited before it"
        " is sent; the edited one alone is sent, and the audit keeps the patch and hashes of"
        " both.",
    )

    async def operator_complete(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        result_data: dict[str, Any] | None = None,
        operator: str | None = None,
        force: bool = False,
        wait: bool = True,
    ) -> DecisionOutcome | None:
        return await self._decide(
            DecisionKind.COMPLETE,
            domain,
            command_id,
            _fields(result_data=result_data, operator=operator, force=force),
            wait=wait,
        )

    operator_complete.__doc__ = _decision_doc(DecisionKind.COMPLETE, _RETURNS)

    async def _decide(
        self,
        kind: DecisionKind,
        domain: str,
        command_id: str | UUID,
        fields: dict[str, Any],
        *,
        wait: bool,
    ) -> DecisionOutcome | None:
        try:
            REQUEST_MODELS[kind].model_validate(fields)
        except ValidationError as err:
            raise _input_error(err) from None
        domain, cid = _domain(domain), _command_uuid(command_id)
        # The update's id names this request in the outcome the worker records.
        request_id = str(uuid4())
        deadline = time.monotonic() + EARLIER_RUN_WAIT
        attempt = 0
        while True:
            attempt += 1
            row = await self._decidable(domain, cid)
            request = REQUEST_MODELS[kind].model_validate(
                {**fields, "parking_id": row["parking_id"]}
            )
            try:
                outcome = await self._send_update(
                    kind, request, snapshot(row), request_id=request_id, wait=wait
                )
            except RPCError as err:
                # The server drops an update when it rejects the workflow task the update was
                # in (the workflow completed while other messages arrived), even though the
                # decision in it may have been carried out: look for this request's recorded
                # outcome, and resend only if there is none.
                if err.status != RPCStatusCode.FAILED_PRECONDITION or attempt >= UPDATE_ATTEMPTS:
                    raise
                recorded = await store.recorded_outcome(self.pool, domain, cid, request_id)
                if recorded is not None:
                    return DecisionOutcome.model_validate(recorded)
                continue
            except StaleParkingError:
                # The workflow reached is finishing an earlier parking of this command.
                if time.monotonic() > deadline:
                    raise
                await self._until_closed(workflow_id(domain, cid), deadline)
                continue
            if outcome is not None and outcome.command_id not in (None, cid):
                raise InvalidOperationError(
                    f"workflow {workflow_id(domain, cid)} answered for command "
                    f"{outcome.command_id}, not {cid}: it does not name its command"
                )
            if outcome is not None and outcome.proposal is not None:
                await self._still_parked(domain, cid, row["parking_id"])
            return outcome

    async def _still_parked(self, domain: str, cid: UUID, parking_id: int) -> None:
        """A proposal is only worth its approval while its parking is open: one made in the
        moment the command was decided elsewhere (the update then started a run for a parking
        that had ended) is ended at once, and the caller told."""
        current = await store.command(self.pool, domain, cid)
        if current is not None and current["parking_id"] == parking_id:
            return
        await self._refresh(workflow_id(domain, cid))
        raise AlreadyDecidedError(
            f"command {cid} in {domain} was decided meanwhile ("
            f"{current['status'] if current else 'deleted'}): nothing to propose"
        )

    async def _send_update(
        self,
        kind: DecisionKind,
        request: DecisionRequest,
        snapshot: CommandSnapshot,
        *,
        request_id: str,
        wait: bool,
    ) -> DecisionOutcome | None:
        start = self._start_operation(snapshot)
        update = DECISIONS[kind].update
        try:
            if not wait:
                await self.temporal.start_update_with_start_workflow(
                    update,
                    request.model_dump(mode="json"),
                    id=request_id,
                    start_workflow_operation=start,
                    wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                )
                return None
            outcome: DecisionOutcome = await self.temporal.execute_update_with_start_workflow(
                update,
                request.model_dump(mode="json"),
                id=request_id,
                start_workflow_operation=start,
                result_type=DecisionOutcome,
            )
        except WorkflowUpdateFailedError as err:
            raise _from_update_failure(err) from None
        return outcome

    async def snooze(
        self,
        domain: str,
        command_id: str | UUID,
        for_: timedelta | str,
        reason: str,
        *,
        operator: str | None = None,
    ) -> StateView:
        """Move the command's escalation and expiry not yet passed later by `for_` (`2h`, or a
        timedelta), audited as TSQ_SNOOZED; returns the workflow's state with the new
        deadlines. Refused for a decided command, or one with nothing to snooze."""
        seconds = (
            for_.total_seconds() if isinstance(for_, timedelta) else parse_duration(for_, "for")
        )
        request = {"for": seconds, "reason": reason, "operator": operator}
        return await self._message(
            "operator_snooze", SnoozeRequest, domain, command_id, request, StateView
        )

    async def unschedule(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str | None = None,
        reason: str | None = None,
    ) -> StateView:
        """Drop a retry scheduled for later: the command waits again (TSQ_RETRY_UNSCHEDULED)."""
        request = {"operator": operator, "reason": reason}
        return await self._message(
            "operator_unschedule", UnscheduleRequest, domain, command_id, request, StateView
        )

    # -- four eyes --------------------------------------------------------------------------

    async def approve(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str,
        comment: str | None = None,
    ) -> DecisionOutcome:
        """Approve the decision proposed for the command (PENDING_APPROVAL): it is carried out
        and its outcome returned (a retry proposed for later is scheduled). `operator` must not
        be the proposer (compared trimmed, case-insensitively). Of two approvals racing, one
        carries the decision out; the other is refused. Audited as TSQ_APPROVED."""
        request = _fields(operator=operator, comment=comment)
        return await self._message(
            "operator_approve", ApproveRequest, domain, command_id, request, DecisionOutcome
        )

    async def reject(
        self, domain: str, command_id: str | UUID, reason: str, *, operator: str
    ) -> StateView:
        """Reject the decision proposed for the command: it is dropped and the command waits
        again. `operator` must not be the proposer. Audited as TSQ_REJECTED."""
        request = {"operator": operator, "reason": reason}
        return await self._message(
            "operator_reject", RejectRequest, domain, command_id, request, StateView
        )

    # -- notes and claims -------------------------------------------------------------------

    async def note(
        self, domain: str, command_id: str | UUID, text: str, *, operator: str | None = None
    ) -> StateView | None:
        """Leave a note on a command, audited as TSQ_NOTE. On a waiting command it goes to its
        workflow (shown in `show`, the details and the state, which is returned); on one that
        is decided (a post-mortem: what was found, what was done), straight to the audit
        trail, and None is returned."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        request = {"text": text, "operator": operator}
        try:
            NoteRequest.model_validate(request)
        except ValidationError as err:
            raise _input_error(err) from None
        row = await self._command(domain, cid)
        if row["status"] == TSQ:
            try:
                return await self._message(
                    "operator_note", NoteRequest, domain, cid, request, StateView
                )
            except AlreadyDecidedError:
                row = await self._command(domain, cid)  # decided meanwhile
        await store.note_after(self.pool, domain, cid, text, operator, status=row["status"])
        return None

    async def claim(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str,
        for_: timedelta | str = CLAIM_LASTS,
        force: bool = False,
    ) -> StateView:
        """Claim a waiting command for `for_` (default 1h): `TsqClaimedBy` names `operator`,
        and other operators' decisions are refused unless they pass `force` (audited as
        TSQ_CLAIM_FORCED). Claiming it again extends the claim; `force` takes over another
        operator's claim. Audited as TSQ_CLAIMED."""
        seconds = (
            for_.total_seconds() if isinstance(for_, timedelta) else parse_duration(for_, "for")
        )
        request = _fields(operator=operator, force=force) | {"for": seconds}
        return await self._message(
            "operator_claim", ClaimRequest, domain, command_id, request, StateView
        )

    async def release(
        self, domain: str, command_id: str | UUID, *, operator: str, force: bool = False
    ) -> StateView:
        """Give up a claim; another operator's only with `force`. Audited as TSQ_RELEASED."""
        request = _fields(operator=operator, force=force)
        return await self._message(
            "operator_release", ReleaseRequest, domain, command_id, request, StateView
        )

    async def _message(
        self,
        update: str,
        model: type[BaseModel],
        domain: str,
        command_id: str | UUID,
        request: dict[str, Any],
        result_type: type[_R],
    ) -> _R:
        """Send one of the workflow's updates other than a decision, checked here first."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        try:
            model.model_validate(request)
        except ValidationError as err:
            raise _input_error(err) from None
        handle = await self._run_of(await self._decidable(domain, cid))
        try:
            answer: _R = await handle.execute_update(update, request, result_type=result_type)
        except WorkflowUpdateFailedError as err:
            raise _from_update_failure(err) from None
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            raise AlreadyDecidedError(
                f"command {cid} in {domain} was decided meanwhile: its workflow has ended"
            ) from None
        return answer

    # -- previews ---------------------------------------------------------------------------

    async def preview_cancel(
        self,
        domain: str,
        command_id: str | UUID,
        reason: str,
        *,
        operator: str | None = None,
        force: bool = False,
    ) -> DecisionPreview:
        [preview] = await self.preview_many(
            DecisionKind.CANCEL,
            domain,
            [command_id],
            _fields(reason=reason, operator=operator, force=force),
        )
        return preview

    async def preview_retry(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str | None = None,
        patch: dict[str, Any] | None = None,
        force: bool = False,
    ) -> DecisionPreview:
        [preview] = await self.preview_many(
            DecisionKind.RETRY, domain, [command_id], _retry_fields(operator, None, patch, force)
        )
        return preview

    async def preview_complete(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        result_data: dict[str, Any] | None = None,
        operator: str | None = None,
        force: bool = False,
    ) -> DecisionPreview:
        [preview] = await self.preview_many(
            DecisionKind.COMPLETE,
            domain,
            [command_id],
            _fields(result_data=result_data, operator=operator, force=force),
        )
        return preview

    preview_cancel.__doc__ = preview_retry.__doc__ = preview_complete.__doc__ = (
        "What the decision would do, exactly: the decision's own transaction is run and rolled "
        "back, and what it wrote is read back before the rollback — the status after, the "
        "reply and its queue (a retry: the message it would send, edited by `patch`), the "
        "audit rows, the batch counters before and after and whether the batch would close. "
        "Nothing is written, sent or notified, and the workflow is not told. `needs_approval` "
        "says the decision would first be a proposal."
    )

    async def preview_many(
        self,
        kind: DecisionKind,
        domain: str,
        command_ids: Sequence[str | UUID],
        fields: dict[str, Any],
    ) -> list[DecisionPreview]:
        """`preview_*` for many commands, in one transaction rolled back at the end: each
        decision sees what the earlier ones would have done (a batch closing on the last)."""
        try:
            REQUEST_MODELS[kind].model_validate(fields)
        except ValidationError as err:
            raise _input_error(err) from None
        domain = _domain(domain)
        ids = [_command_uuid(cid) for cid in command_ids]
        rows = await store.commands_of(self.pool, [(domain, cid) for cid in ids])
        inputs = []
        for cid in ids:
            row = rows.get((domain, cid))
            if row is None:
                continue
            request = REQUEST_MODELS[kind].model_validate(
                {**fields, "parking_id": row["parking_id"]}
            )
            needs_approval = kind.value in ((row["policy"] or {}).get("require_approval") or [])
            carry_out = CarryOut(
                effect_key=f"preview/{uuid4()}",
                workflow_id=workflow_id(domain, cid),
                domain=domain,
                command_id=cid,
                decision=kind,
                parking_id=row["parking_id"],
                reason=getattr(request, "reason", None),
                operator=request.operator,
                result_data=getattr(request, "result_data", None),
                # Once approved, the decision is carried out as an approval.
                via="approval" if needs_approval else "update",
                request_id=str(uuid4()),
                patch=getattr(request, "patch", None),
                force=request.force,
            )
            inputs.append((cid, needs_approval, store.decision_input(carry_out)))
        results = await store.preview(self.pool, [decision for _, _, decision in inputs])
        previews = {
            cid: preview_of(kind, domain, cid, needs, result)
            for (cid, needs, _), result in zip(inputs, results, strict=True)
        }
        return [
            previews.get(cid)
            or DecisionPreview(
                domain=domain,
                command_id=cid,
                decision=kind,
                result="not_found",
                detail=f"command {cid} not found in domain {domain}",
            )
            for cid in ids
        ]

    # -- bulk operations --------------------------------------------------------------------

    async def start_bulk(
        self,
        kind: DecisionKind | str,
        domain: str,
        *,
        operator: str,
        command_ids: Sequence[str | UUID] | None = None,
        command_type: str | None = None,
        error_code: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        all_waiting: bool = False,
        reason: str | None = None,
        result_data: dict[str, Any] | None = None,
        patch: dict[str, Any] | None = None,
        force: bool = False,
        rate: float | None = None,
    ) -> BulkOperation:
        """Start one decision for many commands: `command_ids`, the waiting commands the
        filters select, or all of the domain's (`all_waiting`). The selection is frozen now,
        in the database; the operation's workflow (`tsq-bulk:<id>`) decides it in chunks, each
        one transaction, at most `rate` decisions per second if given, and each command's
        workflow ends with its outcome. Returns the operation as started: `bulk()` follows
        it, `wait_bulk()` waits for its end, `stop_bulk()` stops it.

        Where a policy asks approval for the decision of any command selected, the operation
        as a whole is a proposal (status `proposed`, `needing_approval` counts those commands)
        until another operator calls `approve_bulk` (then it runs, each command decided as
        approved by them), `reject_bulk`, or its approval time runs out."""
        kind = DecisionKind(kind)
        domain = _domain(domain)
        if not operator or not operator.strip():
            raise InvalidInputError("a bulk decision names its operator: operator is blank")
        fields: dict[str, Any] = {"operator": operator}
        if kind is DecisionKind.CANCEL:
            fields["reason"] = reason
        elif kind is DecisionKind.COMPLETE:
            fields["result_data"] = result_data
        elif patch is not None:
            fields["patch"] = patch
        if force:
            fields["force"] = True
        try:
            request = REQUEST_MODELS[kind].model_validate(fields)
        except ValidationError as err:
            raise _input_error(err) from None
        if rate is not None and not rate > 0:
            raise InvalidInputError(f"rate must be above 0 decisions per second, not {rate}")
        filters = {
            "command_type": command_type,
            "error_code": error_code,
            "since": since,
            "until": until,
        }
        chosen = [name for name, value in filters.items() if value is not None]
        if command_ids is not None and (chosen or all_waiting):
            raise InvalidInputError("a bulk decision takes command ids or filters, not both")
        if command_ids is None and not chosen and not all_waiting:
            raise InvalidInputError(
                "no command ids and no filter: pass all_waiting=True to decide every command in "
                f"the troubleshooting queue of {domain}"
            )
        ids = None if command_ids is None else list(dict.fromkeys(map(_command_uuid, command_ids)))
        selection = (
            f"{len(ids)} command ids"
            if ids is not None
            else " ".join(f"{name}={filters[name]}" for name in chosen) or "all"
        )
        bulk_id = uuid4()
        row = await store.create_bulk(
            self.pool,
            bulk_id=bulk_id,
            domain=domain,
            decision=kind.value,
            operator=operator,
            request=store.bulk_request(kind, bulk_id, request.model_dump(mode="json")),
            selection=selection,
            rate=rate,
            filters=filters if ids is None else None,
            command_ids=ids,
        )
        started = store.bulk_operation(row)
        try:
            await self.temporal.start_workflow(
                BULK_WORKFLOW_TYPE,
                BulkStart(
                    bulk_id=bulk_id,
                    domain=domain,
                    decision=kind,
                    total=started.total,
                    rate=rate,
                    operator=operator,
                    approval_expires_at=started.approval_expires_at,
                ),
                id=bulk_workflow_id(bulk_id),
                task_queue=self.task_queue,
                search_attributes=TypedSearchAttributes(
                    [SearchAttributePair(COMMAND_DOMAIN, domain)]
                ),
                static_summary=f"bulk {kind.value} of {started.total} commands in {domain} "
                f"by {operator} ({selection})",
            )
        except BaseException:
            # Nothing was decided: the operation ends as stopped, for all to see.
            await store.bulk_stop(self.pool, bulk_id, "tsq: its workflow could not be started")
            await store.bulk_finish(self.pool, bulk_id)
            raise
        return started

    async def approve_bulk(
        self, bulk_id: str | UUID, *, operator: str, comment: str | None = None
    ) -> BulkOperation:
        """Approve a bulk operation proposed under four eyes (by an operator other than the
        one who started it): it runs. Returns the operation as approved. Audited as
        TSQ_APPROVED under the operation's id, and on each command it decides."""
        return await self._bulk_verdict("approve", bulk_id, operator, comment=comment)

    async def reject_bulk(
        self, bulk_id: str | UUID, reason: str, *, operator: str
    ) -> BulkOperation:
        """Reject a bulk operation proposed under four eyes: nothing of it is decided.
        Audited as TSQ_REJECTED under the operation's id."""
        return await self._bulk_verdict("reject", bulk_id, operator, reason=reason)

    async def _bulk_verdict(
        self, update: str, bulk_id: str | UUID, operator: str, **text: str | None
    ) -> BulkOperation:
        bid = _bulk_uuid(bulk_id)
        request = {"operator": operator, **{k: v for k, v in text.items() if v is not None}}
        try:
            BulkApproval.model_validate(request)
        except ValidationError as err:
            raise _input_error(err) from None
        op = await self.bulk(bid)
        if op.status != "proposed":
            raise InvalidOperationError(
                f"bulk operation {bid} is {op.status}: only a proposed one is approved or rejected"
            )
        handle = self.temporal.get_workflow_handle(bulk_workflow_id(bid))
        try:
            decided: BulkOperation = await handle.execute_update(
                update, request, result_type=BulkOperation
            )
        except WorkflowUpdateFailedError as err:
            raise _from_update_failure(err) from None
        return decided

    async def bulk(self, bulk_id: str | UUID) -> BulkOperation:
        """A bulk operation as it stands: its counts per result, what remains, its status."""
        row = await store.bulk(self.pool, _bulk_uuid(bulk_id))
        if row is None:
            raise NotFoundError(f"no bulk operation {bulk_id}")
        return store.bulk_operation(row)

    async def bulk_operations(
        self, domain: str | None = None, *, limit: int = 20
    ) -> list[BulkOperation]:
        """The latest bulk operations (of `domain`), newest first."""
        rows = await store.bulks(self.pool, None if domain is None else _domain(domain), limit)
        return [store.bulk_operation(row) for row in rows]

    async def bulk_items(self, bulk_id: str | UUID) -> list[BulkItem]:
        """Every command of a bulk operation, in the order they are decided, with its result."""
        bid = _bulk_uuid(bulk_id)
        await self.bulk(bid)
        rows = await store.bulk_items(self.pool, bid)
        return [BulkItem.model_validate(dict(row)) for row in rows]

    async def wait_bulk(self, bulk_id: str | UUID) -> BulkOperation:
        """Until the bulk operation has ended (finished, stopped; a proposal rejected or
        expired); then as it ended."""
        bid = _bulk_uuid(bulk_id)
        await self.temporal.get_workflow_handle(bulk_workflow_id(bid)).result()
        return await self.bulk(bid)

    async def stop_bulk(self, bulk_id: str | UUID, *, operator: str) -> BulkOperation:
        """Stop a bulk operation: once this returns no more of it is decided; what was
        committed stays. Returns the operation once its workflow has ended (or after
        `STOP_WAIT` seconds, with no worker running: the operation says it was stopped)."""
        bid = _bulk_uuid(bulk_id)
        if not operator or not operator.strip():
            raise InvalidInputError("stopping a bulk operation names its operator")
        stopped = await store.bulk_stop(self.pool, bid, operator)
        if stopped is None:
            raise NotFoundError(f"no bulk operation {bulk_id}")
        if not stopped["stopping"]:
            ended = stopped["finished_at"]
            raise InvalidOperationError(
                f"bulk operation {bid} had already {stopped['status']}"
                + (f" at {render_when(ended)}" if ended else "")
                + ": nothing to stop, nothing recorded"
            )
        if self._temporal is None:
            # Committed: no chunk decides anything more; its workflow ends once a worker runs.
            return await self.bulk(bid)
        handle = self.temporal.get_workflow_handle(bulk_workflow_id(bid))
        try:
            await handle.signal("stop", {"operator": operator})
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        else:
            # The stop is committed already; without a worker the workflow ends later.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.result(), STOP_WAIT)
        return await self.bulk(bid)

    # -- policies ---------------------------------------------------------------------------

    async def set_policy(
        self,
        domain: str,
        name: str,
        *,
        command_type: str | None = None,
        error_code: str | None = None,
        escalate_after: timedelta | str | None = None,
        expire_after: timedelta | str | None = None,
        expire_decision: str | None = None,
        reason: str | None = None,
        result_data: dict[str, Any] | None = None,
        require_approval: Sequence[str] = (),
        approval_expires_after: timedelta | str | None = None,
        operator: str | None = None,
    ) -> PolicyView:
        """Create or replace the policy `name` of `domain` (see `tsq policy set`): the waiting
        workflows of the domain follow it within moments; audited as TSQ_POLICY_CHANGED.

        `require_approval` (cancel, retry, complete) makes those decisions proposals that
        another operator approves within `approval_expires_after` (default 24h)."""
        policy = policy_input(
            name,
            escalate_after=escalate_after,
            expire_after=expire_after,
            expire_decision=expire_decision,
            reason=reason,
            result_data=result_data,
            require_approval=require_approval,
            approval_expires_after=approval_expires_after,
        )
        _, after = await store.set_policy(
            self.pool,
            _domain(domain),
            policy,
            command_type=command_type,
            error_code=error_code,
            operator=operator,
        )
        return PolicyView.model_validate(dict(after))

    async def policies(self, domain: str) -> list[PolicyView]:
        return [
            PolicyView.model_validate(dict(row))
            for row in await store.policies(self.pool, _domain(domain))
        ]

    async def policy(self, domain: str, name: str) -> PolicyView:
        row = await store.policy(self.pool, _domain(domain), name)
        if row is None:
            raise NotFoundError(f"no policy named {name!r} in domain {domain}")
        return PolicyView.model_validate(dict(row))

    async def delete_policy(
        self, domain: str, name: str, *, operator: str | None = None
    ) -> PolicyView:
        """Delete a policy; its commands wait without it from then on (audited)."""
        row = await store.delete_policy(self.pool, _domain(domain), name, operator=operator)
        if row is None:
            raise NotFoundError(f"no policy named {name!r} in domain {domain}")
        return PolicyView.model_validate(dict(row))

    # -- reading ----------------------------------------------------------------------------

    async def list_troubleshooting(
        self,
        domain: str,
        *,
        command_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        error_code: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[TroubleshootingItem]:
        """Commands waiting in the troubleshooting queue, newest first, with their payload,
        who claimed them, a decision awaiting approval, a retry scheduled (from PostgreSQL),
        and their workflow's `TsqState` (from Temporal's list; None when Temporal is away,
        see `temporal_problem`, or `NO_WORKFLOW` when none runs for the command).

        `since`/`until` bound the time the command last changed (when it was parked).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if offset < 0:
            raise InvalidInputError(f"offset must not be negative, not {offset}")
        rows = await store.waiting(
            self.pool,
            _domain(domain),
            command_type=command_type,
            error_code=error_code,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        items = [_item(row) for row in rows]
        states = await self._workflow_states(domain, [item.command_id for item in items])
        if states is None:
            return items
        return [
            item.model_copy(update={"state": states.get(item.command_id, NO_WORKFLOW)})
            for item in items
        ]

    async def _workflow_states(self, domain: str, ids: Sequence[UUID]) -> dict[UUID, str] | None:
        """The `TsqState` of each command's running workflow, from one list query; None when
        Temporal cannot be asked."""
        if self._temporal is None or not ids:
            return None if self._temporal is None else {}
        by_id = {workflow_id(domain, cid): cid for cid in ids}
        query = " OR ".join(f'WorkflowId = "{wid}"' for wid in by_id)
        states: dict[UUID, str] = {}
        try:
            async for run in self._temporal.list_workflows(
                f"({query}) AND ExecutionStatus = 'Running'"
            ):
                state = run.typed_search_attributes.get(TSQ_STATE)
                if run.id in by_id and state is not None:
                    states[by_id[run.id]] = state
        except RPCError as err:
            self.temporal_problem = f"Temporal's list could not be read: {err.message}"
            return None
        return states

    async def waiting_ids(
        self,
        domain: str,
        *,
        command_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        error_code: str | None = None,
    ) -> list[UUID]:
        """Every waiting command's id that the filters select, read in one snapshot."""
        return await store.waiting_ids(
            self.pool,
            _domain(domain),
            command_type=command_type,
            error_code=error_code,
            since=since,
            until=until,
        )

    async def groups(self, domain: str) -> list[WaitingGroup]:
        """What waits in `domain`'s troubleshooting queue, by error code and command type: the
        count, the oldest and newest parking, newest groups first, and the options that
        decide a whole group (`--error-code C --type T`)."""
        rows = await store.waiting_groups(self.pool, _domain(domain))
        return [
            WaitingGroup(
                domain=row["domain"],
                error_code=row["error_code"] or None,
                command_type=row["command_type"],
                count=row["count"],
                oldest_parked_at=row["oldest"],
                newest_parked_at=row["newest"],
                select=" ".join(
                    f"{option} {shlex.quote(value)}"
                    for option, value in (
                        ("--error-code", row["error_code"]),
                        ("--type", row["command_type"]),
                    )
                    if value
                ),
            )
            for row in rows
        ]

    async def unknown_domain(self, domain: str) -> str | None:
        """None if the bus has (had) commands of `domain`; else a message naming it unknown, and
        the known domains it is closest to (a typo, most likely)."""
        domain = _domain(domain)
        if await store.has_commands(self.pool, domain):
            return None
        known = await store.domains(self.pool)
        close = difflib.get_close_matches(domain, known, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {' or '.join(close)}?"
            if close
            else (f"; known domains: {', '.join(known[:10])}" if known else "")
        )
        return f"domain {domain} is unknown: the bus has no command of it{hint}"

    async def get_audit_trail(self, domain: str, command_id: str | UUID) -> list[AuditEvent]:
        """Every audit event of a command, oldest first."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        await self._command(domain, cid)
        return [
            AuditEvent(
                audit_id=row["audit_id"],
                event_type=row["event_type"],
                ts=row["ts"],
                details=row["details_json"],
            )
            for row in await store.audit_trail(self.pool, domain, cid)
        ]

    async def show(self, domain: str, command_id: str | UUID) -> CommandDetails:
        """The command, its original message, its workflow's state and its audit trail."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        row = await store.command_with_payload(self.pool, domain, cid)
        if row is None:
            raise CommandNotFoundError(f"command {cid} not found in domain {domain}")
        wid = workflow_id(domain, cid)
        state, note, run_id = await self._workflow_view(wid, parked=row["status"] == TSQ)
        return CommandDetails(
            command=_item(row),
            workflow_id=wid,
            run_id=run_id,
            workflow=state,
            workflow_note=note,
            audit=await self.get_audit_trail(domain, cid),
        )

    async def _workflow_view(
        self, wid: str, *, parked: bool
    ) -> tuple[StateView | None, str | None, str | None]:
        """A workflow's `state` and latest run, or why there is none to show: Temporal away,
        no workflow, or (for a command still parked) a last run that ended undecided."""
        if self._temporal is None:
            return None, f"workflow state unknown: {self.temporal_problem}", None
        handle = self._temporal.get_workflow_handle(wid)
        run_id: str | None = None
        try:
            described = await handle.describe(rpc_timeout=QUERY_TIMEOUT)
            run_id = described.run_id
            if parked and described.status != WorkflowExecutionStatus.RUNNING:
                status = described.status.name if described.status else "closed"
                return (
                    None,
                    (
                        f"no workflow runs for this command: its last run is {status} since "
                        f"{render_when(described.close_time)} without having decided it. The "
                        "watcher's sweep starts a new one (every TSQ_SWEEP_INTERVAL, 5 min by "
                        "default), or now: `tsq sync <domain>`"
                    ),
                    run_id,
                )
            state = await handle.query("state", result_type=StateView, rpc_timeout=QUERY_TIMEOUT)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return (
                    None,
                    "no workflow yet (the watcher starts one; now: `tsq sync <domain>`)",
                    None,
                )
            return None, f"workflow state unavailable: {err.message}", run_id
        return state, None, run_id

    # -- entering the troubleshooting queue ------------------------------------------------------

    async def move_to_troubleshooting(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        error_type: str,
        error_code: str | None = None,
        error_message: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> str:
        """Park a command in the troubleshooting queue and start its workflow; returns its id.

        For a command-bus worker whose command failed permanently or ran out of retries: sets
        `IN_TROUBLESHOOTING_QUEUE` and the last error, archives the command's PGMQ message (kept
        for a later retry), writes the `MOVED_TO_TSQ` audit row and moves the batch counter, in
        one transaction; then starts the workflow. Calling it again for a command already parked
        changes nothing and only makes sure the workflow runs. Once the transaction committed,
        the command is parked whatever happens next: a `tsq worker` starts its workflow if
        this call cannot (Temporal away).
        """
        domain, cid = _domain(domain), _command_uuid(command_id)
        moved = await store.move_to_troubleshooting(
            self.pool,
            domain,
            cid,
            error_type=error_type,
            error_code=error_code,
            error_message=error_message,
            details=details or {},
            unmovable=[status.value for status in TERMINAL_STATUSES],
        )
        row = await self._command(domain, cid)
        if moved is None and row["status"] != TSQ:
            raise InvalidOperationError(
                f"command {cid} in {domain} is {row['status']}: a finished command "
                "cannot be moved to the troubleshooting queue"
            )
        try:
            return await self._ensure_workflow(snapshot(row))
        except RPCError as err:
            log.warning(
                "command %s of %s is parked; its workflow is left to the watcher: %s",
                cid,
                domain,
                err.message,
            )
            return workflow_id(domain, cid)

    async def start_workflow(self, domain: str, command_id: str | UUID) -> str:
        """Start the workflow of a command already in the troubleshooting queue (idempotent)."""
        row = await self._decidable(_domain(domain), _command_uuid(command_id))
        return await self._ensure_workflow(snapshot(row))

    async def sync(self, domain: str | None = None, *, concurrency: int = 20) -> SyncReport:
        """Make sure every parked command (of `domain`, or all) has its workflow running.

        Each command is started on its own: one that cannot have a workflow (a bad row, a
        refused start) is reported in `failed` and holds up none of the others.
        """
        if domain is not None:
            _domain(domain)
        rows = await store.open_parkings(self.pool, domain)
        report = SyncReport()
        gate = asyncio.Semaphore(concurrency)

        async def one(row: asyncpg.Record) -> None:
            wid = f"tsq:{row['domain']}:{row['command_id']}"
            async with gate:
                try:
                    started = await self.ensure_started(snapshot(row))
                except (TroubleshootingError, RPCError) as err:
                    report.failed.append((wid, str(err)))
                    return
            (report.started if started else report.already_running).append(wid)

        await asyncio.gather(*(one(row) for row in rows))
        return report

    async def ensure_started(
        self, snapshot: CommandSnapshot, *, wait: float = 0.0, record: bool = True
    ) -> bool:
        """Make sure the workflow of `snapshot`'s parking runs; True if this call started it.

        A run bound to an earlier parking of the command (still finishing its decision), or
        one of tsq 0.1, is asked to look at the database; it either binds itself to this
        parking or ends, and then this parking's workflow is started. Raises
        `StaleParkingError` if that has not happened within `wait` seconds. With `record`,
        the parking notes that its workflow runs (the watcher then has nothing to do for it).
        """
        if snapshot.parking_id is None:
            raise InvalidOperationError(
                f"command {snapshot.command_id} has no parking: the database needs `tsq migrate`"
            )
        deadline = time.monotonic() + wait
        wid = workflow_id(snapshot.domain, snapshot.command_id)
        while True:
            try:
                await self._start(snapshot, WorkflowIDConflictPolicy.FAIL)
                if record:
                    await store.started(self.pool, snapshot.parking_id)
                return True
            except WorkflowAlreadyStartedError:
                pass
            bound, running = await self._bound_parking(wid)
            if running and bound == snapshot.parking_id:
                if record:
                    await store.started(self.pool, snapshot.parking_id)
                return False
            if running:
                await self._refresh(wid)
            if time.monotonic() >= deadline:
                raise StaleParkingError(
                    f"the workflow {wid} running now is not the one of parking "
                    f"{snapshot.parking_id}; it has been asked to end, and the watcher starts "
                    "the right one then"
                )
            await asyncio.sleep(0.2)

    # -- internals ---------------------------------------------------------------------------

    async def _command(self, domain: str, cid: UUID) -> asyncpg.Record:
        row = await store.command(self.pool, domain, cid)
        if row is None:
            raise CommandNotFoundError(f"command {cid} not found in domain {domain}")
        return row

    async def _decidable(self, domain: str, cid: UUID) -> asyncpg.Record:
        row = await self._command(domain, cid)
        if row["status"] != TSQ and (last := await store.last_decision(self.pool, domain, cid)):
            # Decided by tsq (its workflow, a bulk operation): say who won.
            bulk = f" in bulk operation {last['bulk_id']}" if last.get("bulk_id") else ""
            raise AlreadyDecidedError(
                f"command {cid} was already decided: {last['decision']} by "
                f"{last.get('operator') or 'an unnamed operator'}{bulk}; it is {row['status']}"
            )
        if row["status"] in TERMINAL_STATUSES:
            raise AlreadyDecidedError(
                f"command {cid} in {domain} is {row['status']}: it was already decided"
            )
        if row["status"] != TSQ:
            raise InvalidOperationError(
                f"command {cid} in {domain} is {row['status']}, not {TSQ.value}: "
                "only a command in the troubleshooting queue can be decided"
            )
        return row

    async def _bound_parking(self, wid: str) -> tuple[int | None, bool]:
        """The parking the latest run of `wid` is bound to (None: not known yet) and whether
        it is running."""
        bound, running, _ = await self._latest_run(wid)
        return bound, running

    async def _latest_run(self, wid: str) -> tuple[int | None, bool, str | None]:
        """The latest run of `wid`: its parking, whether it is running, its run id."""
        try:
            described = await self.temporal.get_workflow_handle(wid).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None, False, None
            raise
        running = described.status == WorkflowExecutionStatus.RUNNING
        memo = await described.memo()
        tsq = memo.get(MEMO_KEY)
        bound = tsq.get("parking_id") if isinstance(tsq, dict) else None
        return (bound if isinstance(bound, int) else None), running, described.run_id

    async def _run_of(self, row: asyncpg.Record) -> WorkflowHandle[Any, Any]:
        """The running workflow of the command's parking (started if it has none yet), by its
        run: a message that arrives after the run has ended fails instead of starting another
        run for a command decided meanwhile."""
        parked = snapshot(row)
        wid = workflow_id(parked.domain, parked.command_id)
        bound, running, run_id = await self._latest_run(wid)
        if not (running and bound == parked.parking_id):
            await self.ensure_started(parked, wait=EARLIER_RUN_WAIT)
            bound, running, run_id = await self._latest_run(wid)
        return self.temporal.get_workflow_handle(wid, run_id=run_id)

    async def _refresh(self, wid: str) -> None:
        try:
            await self.temporal.get_workflow_handle(wid).signal("tsq_refresh")
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise

    async def _until_closed(self, wid: str, deadline: float) -> None:
        """Until the latest run of `wid` is no longer running, or the deadline."""
        while time.monotonic() < deadline:
            _, running = await self._bound_parking(wid)
            if not running:
                return
            await asyncio.sleep(0.2)

    def _start_kwargs(self, snapshot: CommandSnapshot) -> dict[str, Any]:
        return {
            "id": workflow_id(snapshot.domain, snapshot.command_id),
            "task_queue": self.task_queue,
            **start_metadata(snapshot),
        }

    def _start_operation(self, snapshot: CommandSnapshot) -> WithStartWorkflowOperation[Any, Any]:
        return WithStartWorkflowOperation(
            WORKFLOW_TYPE,
            snapshot,
            result_type=DecisionOutcome,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            **self._start_kwargs(snapshot),
        )

    async def _start(
        self, snapshot: CommandSnapshot, policy: WorkflowIDConflictPolicy
    ) -> WorkflowHandle[Any, Any]:
        return await self.temporal.start_workflow(
            WORKFLOW_TYPE,
            snapshot,
            result_type=DecisionOutcome,
            id_conflict_policy=policy,
            **self._start_kwargs(snapshot),
        )

    async def _ensure_workflow(self, snapshot: CommandSnapshot) -> str:
        wid = workflow_id(snapshot.domain, snapshot.command_id)
        try:
            await self.ensure_started(snapshot, wait=EARLIER_RUN_WAIT)
        except StaleParkingError as err:
            # The command is parked; the watcher gives it its workflow once the earlier one
            # has ended. Nothing the caller could do would be quicker.
            log.warning("%s", err)
        return wid
