"""Activities: the only code that changes the database on behalf of a workflow.

Each activity is one PostgreSQL transaction that also writes a row to `tsq.effect` under a key
fixed by the workflow (workflow id + run id + what). A retry, a second worker picking the work
up after a crash, or a twin running at the same moment finds that row and returns the recorded
result: the status change, the audit row and the reply happen once per decision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from tsq.contract import Activity, DecisionKind
from tsq.db import TSQ_STATUS, check_queue_name
from tsq.errors import InvalidInputError, PayloadNotFoundError
from tsq.models import CarryOut, DecisionOutcome, RecordRefusal

# A decision that waits longer than this on a row lock fails the attempt and is retried later,
# instead of holding a connection while another tool keeps the row locked.
LOCK_TIMEOUT = "5s"

# An audit row to write: event type and details.
Audit = tuple[str, dict[str, Any]]

_STATUS_AFTER = {
    DecisionKind.CANCEL: "CANCELED",
    DecisionKind.COMPLETE: "COMPLETED",
    DecisionKind.RETRY: "PENDING",
}


def reply_body(
    row: asyncpg.Record | dict[str, Any],
    *,
    outcome: str,
    now: datetime,
    reason: str | None = None,
    result_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A reply readable by spec 7.2 consumers and by the reference library's.

    Spec 7.2 consumers read `data` and `error`; the reference library's read `result`,
    `error_code`, `error_message` and, for a cancel, `reason`.
    """
    body: dict[str, Any] = {
        "command_id": str(row["command_id"]),
        "correlation_id": str(row["correlation_id"]) if row["correlation_id"] else None,
        "domain": row["domain"],
        "type": f"{row['command_type']}Response",
        "command_type": row["command_type"],
        "outcome": outcome,
        "completed_at": now.isoformat(),
        "data": result_data,
        "result": result_data,
        "error": None,
        "error_code": None,
        "error_message": None,
    }
    if reason is not None:
        body.update(
            error={"code": "OPERATOR_CANCEL", "message": reason, "class": "OperatorCancel"},
            error_code="OPERATOR_CANCEL",
            error_message=reason,
            reason=reason,
        )
    return body


class TroubleshootingActivities:
    """Built once per worker around its asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn(name=Activity.CARRY_OUT)
    async def carry_out(self, req: CarryOut) -> DecisionOutcome:
        """Carry out an operator's decision: status, audit row and reply in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            done = await _recorded(conn, req.effect_key, lock_timeout=LOCK_TIMEOUT)
            if done is not None:
                return done
            # The guarded transition: only a command still waiting in the troubleshooting
            # queue is changed; the row stays locked until the transaction ends.
            row = await conn.fetchrow(
                """
                UPDATE commandbus.command
                SET status = $4, updated_at = now(),
                    attempts = CASE WHEN $5 THEN 0 ELSE attempts END,
                    last_error_type = CASE WHEN $5 THEN NULL ELSE last_error_type END,
                    last_error_code = CASE WHEN $5 THEN NULL ELSE last_error_code END,
                    last_error_msg = CASE WHEN $5 THEN NULL ELSE last_error_msg END
                WHERE domain = $1 AND command_id = $2 AND status = $3
                RETURNING *
                """,
                req.domain,
                req.command_id,
                TSQ_STATUS,
                _STATUS_AFTER[req.decision],
                req.decision is DecisionKind.RETRY,
            )
            if row is None:
                outcome = await _not_decidable(conn, req)
                if outcome is None:  # a twin of this very attempt committed first
                    done = await _recorded(conn, req.effect_key)
                    assert done is not None
                    return done
                await _record(conn, req, outcome)
                return outcome
            if req.decision is DecisionKind.RETRY:
                outcome, audit = await _retry(conn, req, row)
            else:
                outcome, audit = await _reply(conn, req, row)
            audit_id = await _record(conn, req, outcome, audit)
            # Last: the batch row stays locked until the commit, and other decisions of the
            # batch wait for it.
            await _move_batch(conn, req, row)
            return outcome.model_copy(update={"audit_id": audit_id})

    @activity.defn(name=Activity.RECORD_REFUSAL)
    async def record_refusal(self, req: RecordRefusal) -> None:
        """Write a refused signal to the audit trail, once."""
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """
                INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
                VALUES ($1, $2, $3, 'refusal', $4)
                ON CONFLICT (effect_key) DO NOTHING
                RETURNING 1
                """,
                req.effect_key,
                req.domain,
                req.command_id,
                req.refusal.model_dump(mode="json"),
            )
            if inserted:
                await _audit(
                    conn,
                    req.domain,
                    req.command_id,
                    "TSQ_SIGNAL_REFUSED",
                    {**req.refusal.model_dump(mode="json"), "workflow_id": req.workflow_id},
                )


def _refusal(message: str, error: type[Exception]) -> ApplicationError:
    """A non-retryable error: raising it rolls the whole transaction back."""
    return ApplicationError(message, type=error.__name__, non_retryable=True)


async def _recorded(
    conn: asyncpg.Connection, effect_key: str, *, lock_timeout: str | None = None
) -> DecisionOutcome | None:
    """The outcome an earlier attempt recorded under `effect_key`, if any; with `lock_timeout`,
    also sets the transaction's lock timeout in the same round trip."""
    result = await conn.fetchval(
        """
        SELECT (SELECT result FROM tsq.effect WHERE effect_key = $1),
               CASE WHEN $2::text IS NOT NULL THEN set_config('lock_timeout', $2, true) END
        """,
        effect_key,
        lock_timeout,
    )
    return None if result is None else DecisionOutcome.model_validate(result)


async def _record(
    conn: asyncpg.Connection,
    req: CarryOut,
    outcome: DecisionOutcome,
    audit: Audit | None = None,
) -> int | None:
    """The idempotency record of the decision and, when it changed the command, its audit row:
    one statement. Returns the audit row's id, which the recorded outcome carries too."""
    result = outcome.model_dump(mode="json")
    if audit is None:
        await conn.execute(
            """
            INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
            VALUES ($1, $2, $3, $4, $5)
            """,
            req.effect_key,
            req.domain,
            req.command_id,
            req.decision.value,
            result,
        )
        return None
    event, details = audit
    audit_id: int = await conn.fetchval(
        """
        WITH audit AS (
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            VALUES ($2, $3, $5, $6)
            RETURNING audit_id
        )
        INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
        SELECT $1, $2, $3, $4, $7::jsonb || jsonb_build_object('audit_id', audit.audit_id)
        FROM audit
        RETURNING (result ->> 'audit_id')::bigint
        """,
        req.effect_key,
        req.domain,
        req.command_id,
        req.decision.value,
        event,
        details,
        result,
    )
    return audit_id


async def _audit(
    conn: asyncpg.Connection, domain: str, command_id: Any, event: str, details: dict[str, Any]
) -> int:
    audit_id: int = await conn.fetchval(
        """
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES ($1, $2, $3, $4) RETURNING audit_id
        """,
        domain,
        command_id,
        event,
        details,
    )
    return audit_id


async def _send(conn: asyncpg.Connection, queue: str, message: dict[str, Any]) -> int:
    """Send to a PGMQ queue, created if missing, and notify its consumers (`tsq.send`)."""
    msg_id: int = await conn.fetchval("SELECT tsq.send($1::text, $2::jsonb)", queue, message)
    return msg_id


async def _move_batch(conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record) -> None:
    if row["batch_id"] is None:
        return
    # The command bus's own counter functions (or tsq's equivalents where it had none).
    function = {
        DecisionKind.CANCEL: "SELECT commandbus.sp_tsq_cancel($1, $2)",
        DecisionKind.COMPLETE: "SELECT commandbus.sp_tsq_complete($1, $2)",
        DecisionKind.RETRY: "SELECT commandbus.sp_tsq_retry($1, $2)",
    }[req.decision]
    await conn.execute(function, req.domain, row["batch_id"])


async def _not_decidable(conn: asyncpg.Connection, req: CarryOut) -> DecisionOutcome | None:
    """Why the guarded update matched nothing; None when this decision itself already ran."""
    if await _recorded(conn, req.effect_key) is not None:
        return None
    status = await conn.fetchval(
        "SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2",
        req.domain,
        req.command_id,
    )
    if status is None:
        detail = f"command {req.command_id} no longer exists in domain {req.domain}; nothing done"
    else:
        detail = (
            f"command {req.command_id} is {status}, no longer {TSQ_STATUS}: it was decided "
            "outside tsq; nothing was changed"
        )
    return DecisionOutcome(
        decision=req.decision,
        carried_out=False,
        status=status,
        operator=req.operator,
        request_id=req.request_id,
        reason=req.reason,
        detail=detail,
    )


def _queue_or_refuse(queue: str, req: CarryOut, doing: str) -> str:
    try:
        return check_queue_name(queue)
    except InvalidInputError as err:
        raise _refusal(
            f"cannot {doing} command {req.command_id}: {err}", InvalidInputError
        ) from None


async def _reply(
    conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record
) -> tuple[DecisionOutcome, Audit]:
    """Cancel or complete: the reply, if the command has a reply queue; the audit row to write."""
    cancel = req.decision is DecisionKind.CANCEL
    reply_queue: str | None = row["reply_queue"] or None
    reply_msg_id: int | None = None
    if reply_queue is not None:
        queue = _queue_or_refuse(reply_queue, req, "send the reply of")
        body = reply_body(
            row,
            outcome="CANCELED" if cancel else "SUCCESS",
            now=datetime.now(UTC),
            reason=req.reason if cancel else None,
            result_data=None if cancel else req.result_data,
        )
        reply_msg_id = await _send(conn, queue, body)
    details: dict[str, Any] = {"operator": req.operator}
    if cancel:
        details["reason"] = req.reason
    else:
        details.update(has_result_data=req.result_data is not None, result_data=req.result_data)
    details.update(
        reply_to=reply_queue,
        reply_msg_id=reply_msg_id,
        workflow_id=req.workflow_id,
        via=req.via,
    )
    if reply_queue is None:
        details["note"] = "the command has no reply queue: no reply was sent"
    verb = "canceled" if cancel else "completed"
    outcome = DecisionOutcome(
        decision=req.decision,
        carried_out=True,
        status=_STATUS_AFTER[req.decision],
        operator=req.operator,
        request_id=req.request_id,
        reason=req.reason,
        result_data=None if cancel else req.result_data,
        reply_queue=reply_queue,
        reply_msg_id=reply_msg_id,
        detail=(
            f"{verb}; reply {reply_msg_id} sent to {reply_queue}"
            if reply_queue
            else f"{verb}; no reply queue, no reply sent"
        ),
    )
    return outcome, ("OPERATOR_CANCEL" if cancel else "OPERATOR_COMPLETE", details)


async def _retry(
    conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record
) -> tuple[DecisionOutcome, Audit]:
    """Send the command's original message again to its queue; the command runs anew."""
    queue = row["queue_name"] or f"{req.domain}__commands"
    payload = await conn.fetchval(
        "SELECT tsq.archived_message($1, $2, $3)", queue, row["msg_id"], req.command_id
    )
    source = f"pgmq.a_{queue}"
    if payload is None:
        payload = await conn.fetchval(
            """
            SELECT payload_json FROM commandbus.payload_archive
            WHERE domain = $1 AND command_id = $2
            """,
            req.domain,
            req.command_id,
        )
        source = "commandbus.payload_archive"
    if payload is None:
        raise _refusal(
            f"cannot retry command {req.command_id}: its original message is neither in "
            f"pgmq.a_{queue} (msg_id {row['msg_id']}) nor in commandbus.payload_archive; "
            "nothing was changed",
            PayloadNotFoundError,
        )
    # The message is sent and its id stored on the command in one statement.
    new_msg_id: int = await conn.fetchval(
        """
        UPDATE commandbus.command SET msg_id = tsq.send($3::text, $4::jsonb)
        WHERE domain = $1 AND command_id = $2
        RETURNING msg_id
        """,
        req.domain,
        req.command_id,
        _queue_or_refuse(queue, req, "retry"),
        payload,
    )
    outcome = DecisionOutcome(
        decision=req.decision,
        carried_out=True,
        status="PENDING",
        operator=req.operator,
        request_id=req.request_id,
        new_msg_id=new_msg_id,
        detail=f"retried; message {new_msg_id} sent to {queue}",
    )
    details = {
        "operator": req.operator,
        "new_msg_id": new_msg_id,
        "old_msg_id": row["msg_id"],
        "payload_from": source,
        "workflow_id": req.workflow_id,
        "via": req.via,
    }
    return outcome, ("OPERATOR_RETRY", details)
