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
from tsq.errors import InvalidInputError
from workflows.models import CarryOut, DecisionKind, DecisionOutcome, RecordRefusal

# A decision that waits longer than this on a row lock fails the attempt and is retried later,
# instead of holding a connection while another tool keeps the row locked.
LOCK_TIMEOUT = "5s"


def cancel_reply(row: asyncpg.Record, reason: str, now: datetime) -> dict[str, Any]:
    """The CANCELED reply, readable by spec 7.2 consumers and by the reference library's.

    Spec 7.2 consumers read `error` and `data`; the reference library's read `result`,
    `error_code`, `error_message` and, for a cancel, `reason`.
    """
    command_id = str(row["command_id"])
    correlation_id = str(row["correlation_id"]) if row["correlation_id"] else None
    return {
        "command_id": command_id,
        "correlation_id": correlation_id,
        "domain": row["domain"],
        "type": f"{row['command_type']}Response",
        "command_type": row["command_type"],
        "outcome": "CANCELED",
        "completed_at": now.isoformat(),
        "data": None,
        "result": None,
        "error": {"code": "OPERATOR_CANCEL", "message": reason, "class": "OperatorCancel"},
        "error_code": "OPERATOR_CANCEL",
        "error_message": reason,
        "reason": reason,
    }


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
            if req.decision is not DecisionKind.CANCEL:
                raise ApplicationError(
                    f"unknown decision {req.decision!r}",
                    type=InvalidInputError.__name__,
                    non_retryable=True,
                )
            row = await conn.fetchrow(
                """
                UPDATE commandbus.command SET status = 'CANCELED', updated_at = now()
                WHERE domain = $1 AND command_id = $2 AND status = $3
                RETURNING domain, command_id, command_type, correlation_id, reply_queue, batch_id
                """,
                req.domain,
                req.command_id,
                TSQ_STATUS,
            )
            if row is None:
                outcome = await _not_decidable(conn, req)
                if outcome is None:  # a twin of this very attempt committed first
                    done = await _recorded(conn, req.effect_key)
                    assert done is not None
                    return done
            else:
                outcome = await _cancel(conn, req, row)
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
                await conn.execute(
                    """
                    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
                    VALUES ($1, $2, 'TSQ_SIGNAL_REFUSED', $3)
                    """,
                    req.domain,
                    req.command_id,
                    {**req.refusal.model_dump(mode="json"), "workflow_id": req.workflow_id},
                )


async def _recorded(conn: asyncpg.Connection, effect_key: str) -> DecisionOutcome | None:
    result = await conn.fetchval("SELECT result FROM tsq.effect WHERE effect_key = $1", effect_key)
    return None if result is None else DecisionOutcome.model_validate(result)


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
        reason=req.reason,
        detail=detail,
    )


async def _cancel(conn: asyncpg.Connection, req: CarryOut, row: asyncpg.Record) -> DecisionOutcome:
    assert req.reason is not None
    reply_queue: str | None = row["reply_queue"] or None
    reply_msg_id: int | None = None
    if reply_queue is not None:
        try:
            await ensure_queue(conn, check_queue_name(reply_queue))
        except InvalidInputError as err:
            # Raising rolls the status change back: the command stays in the queue, untouched.
            raise ApplicationError(
                f"cannot send the reply of command {req.command_id}: {err}",
                type=InvalidInputError.__name__,
                non_retryable=True,
            ) from None
        now = datetime.now(UTC)
        reply_msg_id = await conn.fetchval(
            "SELECT * FROM pgmq.send($1::text, $2::jsonb)",
            reply_queue,
            cancel_reply(row, req.reason, now),
        )
        # Consumers of the reference command bus wait on this channel for new messages.
        await conn.execute("SELECT pg_notify($1, '')", f"pgmq_notify_{reply_queue}")
    details = {
        "operator": req.operator,
        "reason": req.reason,
        "reply_to": reply_queue,
        "reply_msg_id": reply_msg_id,
        "workflow_id": req.workflow_id,
        "via": req.via,
    }
    if reply_queue is None:
        details["note"] = "the command has no reply queue: no reply was sent"
    audit_id = await conn.fetchval(
        """
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES ($1, $2, 'OPERATOR_CANCEL', $3) RETURNING audit_id
        """,
        req.domain,
        req.command_id,
        details,
    )
    if row["batch_id"] is not None:
        await conn.execute("SELECT commandbus.sp_tsq_cancel($1, $2)", req.domain, row["batch_id"])
    return DecisionOutcome(
        decision=req.decision,
        carried_out=True,
        status="CANCELED",
        operator=req.operator,
        reason=req.reason,
        reply_queue=reply_queue,
        reply_msg_id=reply_msg_id,
        audit_id=audit_id,
        detail=(
            f"canceled; reply {reply_msg_id} sent to {reply_queue}"
            if reply_queue
            else "canceled; no reply queue, no reply sent"
        ),
    )
