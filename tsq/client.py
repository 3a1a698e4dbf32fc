"""`TroubleshootingClient`: the SDK services and the CLI use to park and decide commands."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from uuid import UUID, uuid4

import asyncpg
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
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

from tsq.contract import DOMAIN_PATTERN, WORKFLOW_TYPE, DecisionKind, TsqState, workflow_id
from tsq.db import TSQ_STATUS, create_pool
from tsq.errors import (
    ERROR_TYPES,
    AlreadyDecidedError,
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    TroubleshootingError,
)
from tsq.models import (
    REQUEST_MODELS,
    CommandSnapshot,
    DecisionOutcome,
    DecisionRequest,
    StateView,
    describe_validation_error,
)
from tsq.settings import Settings
from tsq.temporal import connect
from tsq.views import AuditEvent, CommandDetails, LastError, TroubleshootingItem
from tsq.workflows import COMMAND_DOMAIN, COMMAND_TYPE, LAST_ERROR_CODE, TSQ_STATE
from tsq.workflows.details import render_static_details, render_summary

_TERMINAL = ("COMPLETED", "CANCELED")
MAX_PAGE = 1000
QUERY_TIMEOUT = timedelta(seconds=10)
UPDATE_ATTEMPTS = 3


@dataclass
class SyncReport:
    """What `sync` did: workflows it started and ones that were already running."""

    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)


def _command_uuid(value: str | UUID) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidInputError(f"command id {value!r} is not a UUID") from None


def _domain(value: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(DOMAIN_PATTERN, value):
        raise InvalidInputError(
            f"domain {value!r} is not valid (letters, digits and _, at most 40 characters)"
        )
    return value


def _input_error(err: ValidationError) -> InvalidInputError:
    return InvalidInputError(f"invalid input: {describe_validation_error(err)}")


def _snapshot(row: asyncpg.Record) -> CommandSnapshot:
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
    )


def start_metadata(snapshot: CommandSnapshot) -> dict[str, Any]:
    """What a command's workflow is started with besides its id: the search attributes the
    operators filter on, and the summary and details the Web UI shows."""
    return {
        "search_attributes": TypedSearchAttributes(
            [
                SearchAttributePair(COMMAND_DOMAIN, snapshot.domain),
                SearchAttributePair(COMMAND_TYPE, snapshot.command_type),
                SearchAttributePair(TSQ_STATE, TsqState.AWAITING_OPERATOR.value),
                SearchAttributePair(
                    LAST_ERROR_CODE, snapshot.last_error_code or snapshot.last_error_type or ""
                ),
            ]
        ),
        "static_summary": render_summary(snapshot),
        "static_details": render_static_details(snapshot),
    }


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
    )


def _from_update_failure(err: WorkflowUpdateFailedError) -> TroubleshootingError:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return ERROR_TYPES.get(cause.type or "", InvalidOperationError)(cause.message)
    return InvalidOperationError(str(err.cause or err))


class TroubleshootingClient:
    """Async client for services and operators. Build it with `connect()`; close it when done."""

    def __init__(
        self,
        temporal: Client,
        pool: asyncpg.Pool,
        *,
        task_queue: str,
        owns_pool: bool = False,
    ) -> None:
        self.temporal = temporal
        self.pool = pool
        self.task_queue = task_queue
        self._owns_pool = owns_pool

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> Self:
        """Connect to the database and Temporal named by `settings` (default: the environment)."""
        settings = settings or Settings.from_env()
        pool = await create_pool(settings.require_database_url())
        try:
            temporal = await connect(settings)
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
        wait: bool = True,
    ) -> DecisionOutcome | None:
        """Cancel: status CANCELED, OPERATOR_CANCEL audit, CANCELED reply with the reason.

        Returns the outcome once status, audit and reply are done; with `wait=False`, returns
        None as soon as the workflow has accepted the decision. Raises `CommandNotFoundError`,
        `InvalidOperationError` (not in the troubleshooting queue, already decided) or
        `InvalidInputError` (blank reason, bad id); in every such case nothing changed.
        """
        return await self._decide(
            DecisionKind.CANCEL,
            domain,
            command_id,
            {"reason": reason, "operator": operator},
            wait=wait,
        )

    async def operator_retry(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        operator: str | None = None,
        wait: bool = True,
    ) -> DecisionOutcome | None:
        """Retry: the original message is sent again to its queue; status PENDING, attempts 0.

        Raises like `operator_cancel`, and `InvalidOperationError` when the original message
        can be found neither in the queue's PGMQ archive nor in `commandbus.payload_archive`.
        """
        return await self._decide(
            DecisionKind.RETRY, domain, command_id, {"operator": operator}, wait=wait
        )

    async def operator_complete(
        self,
        domain: str,
        command_id: str | UUID,
        *,
        result_data: dict[str, Any] | None = None,
        operator: str | None = None,
        wait: bool = True,
    ) -> DecisionOutcome | None:
        """Complete: status COMPLETED, OPERATOR_COMPLETE audit, SUCCESS reply with result_data."""
        return await self._decide(
            DecisionKind.COMPLETE,
            domain,
            command_id,
            {"result_data": result_data, "operator": operator},
            wait=wait,
        )

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
            request = REQUEST_MODELS[kind].model_validate(fields)
        except ValidationError as err:
            raise _input_error(err) from None
        domain, cid = _domain(domain), _command_uuid(command_id)
        # The update's id names this request in the outcome the worker records.
        request_id = str(uuid4())
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            row = await self._decidable(domain, cid)
            try:
                return await self._send_update(
                    kind, request, _snapshot(row), request_id=request_id, wait=wait
                )
            except RPCError as err:
                # The server drops an update when it rejects the workflow task the update was
                # in (the workflow completed while other messages arrived), even though the
                # decision in it may have been carried out: look for this request's recorded
                # outcome, and resend only if there is none.
                if err.status != RPCStatusCode.FAILED_PRECONDITION or attempt == UPDATE_ATTEMPTS:
                    raise
                recorded = await self._recorded_outcome(domain, cid, request_id)
                if recorded is not None:
                    return recorded
        raise AssertionError("unreachable")

    async def _recorded_outcome(
        self, domain: str, cid: UUID, request_id: str
    ) -> DecisionOutcome | None:
        result = await self.pool.fetchval(
            """
            SELECT result FROM tsq.effect
            WHERE domain = $1 AND command_id = $2 AND result->>'request_id' = $3
            """,
            domain,
            cid,
            request_id,
        )
        return None if result is None else DecisionOutcome.model_validate(result)

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
        update = f"operator_{kind.value}"
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
        """Commands waiting in the troubleshooting queue, newest first, with their payload.

        `since`/`until` bound the time the command last changed (when it was parked).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if offset < 0:
            raise InvalidInputError(f"offset must not be negative, not {offset}")
        rows = await self.pool.fetch(
            """
            SELECT c.*, COALESCE(
                tsq.archived_message(c.queue_name, c.msg_id, c.command_id), p.payload_json
            ) AS payload
            FROM commandbus.command c
            LEFT JOIN commandbus.payload_archive p USING (domain, command_id)
            WHERE c.domain = $1 AND c.status = $2
              AND ($3::text IS NULL OR c.command_type = $3)
              AND ($4::text IS NULL OR c.last_error_code = $4)
              AND ($5::timestamptz IS NULL OR c.updated_at >= $5)
              AND ($6::timestamptz IS NULL OR c.updated_at < $6)
            ORDER BY c.updated_at DESC, c.command_id
            LIMIT $7 OFFSET $8
            """,
            _domain(domain),
            TSQ_STATUS,
            command_type,
            error_code,
            since,
            until,
            limit,
            offset,
        )
        return [_item(row) for row in rows]

    async def get_audit_trail(self, domain: str, command_id: str | UUID) -> list[AuditEvent]:
        """Every audit event of a command, oldest first."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        await self._command(self.pool, domain, cid)
        rows = await self.pool.fetch(
            """
            SELECT audit_id, event_type, ts, details_json FROM commandbus.audit
            WHERE domain = $1 AND command_id = $2
            ORDER BY ts, audit_id
            """,
            domain,
            cid,
        )
        return [
            AuditEvent(
                audit_id=row["audit_id"],
                event_type=row["event_type"],
                ts=row["ts"],
                details=row["details_json"],
            )
            for row in rows
        ]

    async def show(self, domain: str, command_id: str | UUID) -> CommandDetails:
        """The command, its original message, its workflow's state and its audit trail."""
        domain, cid = _domain(domain), _command_uuid(command_id)
        row = await self.pool.fetchrow(
            """
            SELECT c.*, COALESCE(
                tsq.archived_message(c.queue_name, c.msg_id, c.command_id), p.payload_json
            ) AS payload
            FROM commandbus.command c
            LEFT JOIN commandbus.payload_archive p USING (domain, command_id)
            WHERE c.domain = $1 AND c.command_id = $2
            """,
            domain,
            cid,
        )
        if row is None:
            raise CommandNotFoundError(f"command {cid} not found in domain {domain}")
        wid = workflow_id(domain, cid)
        state: StateView | None = None
        note: str | None = None
        try:
            state = await self.temporal.get_workflow_handle(wid).query(
                "state", result_type=StateView, rpc_timeout=QUERY_TIMEOUT
            )
        except RPCError as err:
            note = (
                "no workflow (run `tsq sync` to start one)"
                if err.status == RPCStatusCode.NOT_FOUND
                else f"workflow state unavailable: {err.message}"
            )
        return CommandDetails(
            command=_item(row),
            workflow_id=wid,
            workflow=state,
            workflow_note=note,
            audit=await self.get_audit_trail(domain, cid),
        )

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
        changes nothing and only makes sure the workflow runs.
        """
        domain, cid = _domain(domain), _command_uuid(command_id)
        # One statement, so one round trip and atomic by itself: the guarded status change,
        # the message archived, the audit row and the batch counter, all or nothing.
        row = await self.pool.fetchrow(
            """
            WITH moved AS (
                UPDATE commandbus.command
                SET status = $3, last_error_type = $4, last_error_code = $5,
                    last_error_msg = $6, updated_at = now()
                WHERE domain = $1 AND command_id = $2 AND status <> ALL($7::text[])
                RETURNING *
            ), archived AS (
                SELECT pgmq.archive(queue_name, msg_id) FROM moved
                WHERE msg_id IS NOT NULL AND queue_name <> ''
            ), audited AS (
                INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
                SELECT domain, command_id, 'MOVED_TO_TSQ',
                    jsonb_build_object('msg_id', msg_id, 'attempt', attempts,
                        'max_attempts', max_attempts, 'error_type', $4::text,
                        'error_code', $5::text, 'error_msg', $6::text) || $8::jsonb
                FROM moved
            ), counted AS (
                SELECT commandbus.sp_update_batch_counters(domain, batch_id, 'tsq_move')
                FROM moved WHERE batch_id IS NOT NULL
            )
            -- A SELECT in WITH runs only where it is read: these two are read here.
            SELECT moved.*, (SELECT count(*) FROM archived) AS archived_messages,
                (SELECT count(*) FROM counted) AS batch_updates
            FROM moved
            """,
            domain,
            cid,
            TSQ_STATUS,
            error_type,
            error_code,
            error_message,
            [TSQ_STATUS, *_TERMINAL],
            details or {},
        )
        if row is None:
            row = await self._command(self.pool, domain, cid)
            if row["status"] != TSQ_STATUS:
                raise InvalidOperationError(
                    f"command {cid} in {domain} is {row['status']}: a finished command "
                    "cannot be moved to the troubleshooting queue"
                )
        return await self._ensure_workflow(_snapshot(row))

    async def start_workflow(self, domain: str, command_id: str | UUID) -> str:
        """Start the workflow of a command already in the troubleshooting queue (idempotent)."""
        row = await self._decidable(_domain(domain), _command_uuid(command_id))
        return await self._ensure_workflow(_snapshot(row))

    async def sync(self, domain: str | None = None, *, concurrency: int = 20) -> SyncReport:
        """Start a workflow for every troubleshooting command that has no running one."""
        if domain is not None:
            _domain(domain)
        rows = await self.pool.fetch(
            """
            SELECT * FROM commandbus.command
            WHERE status = $1 AND ($2::text IS NULL OR domain = $2)
            ORDER BY updated_at
            """,
            TSQ_STATUS,
            domain,
        )
        report = SyncReport()
        gate = asyncio.Semaphore(concurrency)

        async def one(row: asyncpg.Record) -> None:
            snapshot = _snapshot(row)
            async with gate:
                try:
                    await self._start(snapshot, WorkflowIDConflictPolicy.FAIL)
                except WorkflowAlreadyStartedError:
                    report.already_running.append(workflow_id(snapshot.domain, snapshot.command_id))
                else:
                    report.started.append(workflow_id(snapshot.domain, snapshot.command_id))

        await asyncio.gather(*(one(row) for row in rows))
        return report

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    async def _command(conn: asyncpg.Connection | asyncpg.Pool, domain: str, cid: UUID) -> Any:
        row = await conn.fetchrow(
            "SELECT * FROM commandbus.command WHERE domain = $1 AND command_id = $2",
            domain,
            cid,
        )
        if row is None:
            raise CommandNotFoundError(f"command {cid} not found in domain {domain}")
        return row

    async def _decidable(self, domain: str, cid: UUID) -> asyncpg.Record:
        row = await self._command(self.pool, domain, cid)
        if row["status"] in _TERMINAL:
            raise AlreadyDecidedError(
                f"command {cid} in {domain} is {row['status']}: it was already decided"
            )
        if row["status"] != TSQ_STATUS:
            raise InvalidOperationError(
                f"command {cid} in {domain} is {row['status']}, not {TSQ_STATUS}: "
                "only a command in the troubleshooting queue can be decided"
            )
        return row

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
        handle = await self._start(snapshot, WorkflowIDConflictPolicy.USE_EXISTING)
        return handle.id
