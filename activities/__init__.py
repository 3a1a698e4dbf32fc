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

from tsq.db import TSQ_STATUS, check_queue_name, ensure_queue
from tsq.errors import InvalidInputError, PayloadNotFoundError
from workflows.models import CarryOut, DecisionKind, DecisionOutcome, RecordRefusal

# A decision that waits longer than this on a row lock fails the attempt and is retried later,
# instead of holding a connection while another tool keeps the row locked.
LOCK_TIMEOUT = "5s"

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

    @activity.defn(name="tsq.carry_out")
    async def carry_out(self, req: CarryOut) -> DecisionOutcome:
        """Carry out an operator's decision: status, audit row and reply in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", LOCK_TIMEOUT)
            done = await _recorded(conn, req.effect_key)
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
            elif req.decision is DecisionKind.RETRY:
                outcome = await _retry(conn, req, row)
            else:
                outcome = await _reply_and_audit(conn, req, row)
            await conn.execute(
                """
                INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
                VALUES ($1, $2, $3, $4, $5)
                """,
                req.effect_key,
                req.domain,
                req.command_id,
                req.decision.value,
                outcome.model_dump(mode="json"),
            )
            return outcome

    @activity.defn(name="tsq.record_refusal")
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


async def _recorded(conn: asyncpg.Connection, effect_key: str) -> DecisionOutcome | None:
    result = await conn.fetchval("SELECT result FROM tsq.effect WHERE effect_key = $1", effect_key)
    return None if result is None else DecisionOutcome.model_validate(result)


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
    msg_id: int = await conn.fetchval(
        "SELECT * FROM pgmq.send($1::text, $2::jsonb)", queue, message
    )
    # Consumers of the reference command bus wait on this channel for new messages.
    await conn.execute("SELECT pg_notify($1, '')", f"pgmq_notify_{queue}")
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


async def _reply_and_audit(
    conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record
) -> DecisionOutcome:
    """Cancel or complete: the reply (if the command has a reply queue) and the audit row."""
    cancel = req.decision is DecisionKind.CANCEL
    reply_queue: str | None = row["reply_queue"] or None
    reply_msg_id: int | None = None
    if reply_queue is not None:
        try:
            await ensure_queue(conn, check_queue_name(reply_queue))
        except InvalidInputError as err:
            raise _refusal(
                f"cannot send the reply of command {req.command_id}: {err}", InvalidInputError
            ) from None
        body = reply_body(
            row,
            outcome="CANCELED" if cancel else "SUCCESS",
            now=datetime.now(UTC),
            reason=req.reason if cancel else None,
            result_data=None if cancel else req.result_data,
        )
        reply_msg_id = await _send(conn, reply_queue, body)
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
    event = "OPERATOR_CANCEL" if cancel else "OPERATOR_COMPLETE"
    audit_id = await _audit(conn, req.domain, req.command_id, event, details)
    await _move_batch(conn, req, row)
    verb = "canceled" if cancel else "completed"
    return DecisionOutcome(
        decision=req.decision,
        carried_out=True,
        status=_STATUS_AFTER[req.decision],
        operator=req.operator,
        request_id=req.request_id,
        reason=req.reason,
        result_data=None if cancel else req.result_data,
        reply_queue=reply_queue,
        reply_msg_id=reply_msg_id,
        audit_id=audit_id,
        detail=(
            f"{verb}; reply {reply_msg_id} sent to {reply_queue}"
            if reply_queue
            else f"{verb}; no reply queue, no reply sent"
        ),
    )


async def _retry(conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record) -> DecisionOutcome:
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
    try:
        await ensure_queue(conn, check_queue_name(queue))
    except InvalidInputError as err:
        raise _refusal(f"cannot retry command {req.command_id}: {err}", InvalidInputError) from None
    new_msg_id = await _send(conn, queue, payload)
    await conn.execute(
        "UPDATE commandbus.command SET msg_id = $3 WHERE domain = $1 AND command_id = $2",
        req.domain,
        req.command_id,
        new_msg_id,
    )
    audit_id = await _audit(
        conn,
        req.domain,
        req.command_id,
        "OPERATOR_RETRY",
        {
            "operator": req.operator,
            "new_msg_id": new_msg_id,
            "old_msg_id": row["msg_id"],
            "payload_from": source,
            "workflow_id": req.workflow_id,
            "via": req.via,
        },
    )
    await _move_batch(conn, req, row)
    return DecisionOutcome(
        decision=req.decision,
        carried_out=True,
        status="PENDING",
        operator=req.operator,
        request_id=req.request_id,
        new_msg_id=new_msg_id,
        audit_id=audit_id,
        detail=f"retried; message {new_msg_id} sent to {queue}",
    )
