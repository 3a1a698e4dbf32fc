"""Every statement tsq runs against `commandbus.*`, `tsq.*` and PGMQ, by name.

The activities, the SDK, the watcher, `tsq dev` and the benchmark call these; the schema itself
is in `tsq/sql/`. Parameters are always passed separately, never formatted into the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from tsq.contract import DECISIONS, AuditEventType, CommandStatus, DecisionKind, operator_key
from tsq.errors import InvalidInputError
from tsq.models import (
    APPROVAL_EXPIRES,
    AuditRecords,
    BulkOperation,
    BulkVerdict,
    CarryOut,
    Claim,
    DecisionOutcome,
    Observe,
    Observed,
    Policy,
    RecordEvent,
    check_queue_name,
)

# An asyncpg Connection or Pool (asyncpg ships no type hints).
Conn = Any

TSQ = CommandStatus.IN_TROUBLESHOOTING_QUEUE.value


# -- decisions ------------------------------------------------------------------------------

# A decision that waits longer than this on a row lock fails the attempt and is retried later,
# instead of holding a connection while another tool keeps the row locked.
LOCK_TIMEOUT = "5s"


def _what_it_does(kind: DecisionKind) -> dict[str, Any]:
    """What a kind of decision does, as `tsq.decide` reads it."""
    decision = DECISIONS[kind]
    return {
        "decision": kind.value,
        "status_after": decision.status_after.value,
        "audit_event": decision.audit_event.value,
        "reply_outcome": decision.reply_outcome,
        "batch_update": decision.batch_update,
        "past": decision.past,
        "lock_timeout": LOCK_TIMEOUT,
    }


def decision_input(req: CarryOut, **extra: Any) -> dict[str, Any]:
    """`tsq.decide`'s input: the request, what its kind of decision does, and the names as
    they are compared (the database never normalizes them itself)."""
    return {
        **req.model_dump(mode="json"),
        **_what_it_does(req.decision),
        "operator_key": operator_key(req.operator),
        "approved_by_key": operator_key(req.approved_by) if req.approved_by else None,
        **extra,
    }


def bulk_request(kind: DecisionKind, bulk_id: UUID, fields: dict[str, Any]) -> dict[str, Any]:
    """`tsq.decide`'s input for every item of a bulk operation, but the command's own keys."""
    return {
        **fields,
        **_what_it_does(kind),
        "operator_key": operator_key(fields.get("operator")),
        "via": "bulk",
        "request_id": str(bulk_id),
        "bulk_id": str(bulk_id),
        "decided_by": f"bulk:{bulk_id}",
    }


async def decide(conn: Conn, decision: dict[str, Any]) -> dict[str, Any]:
    """One decision, one transaction (see `tsq.decide` in 003_parking.sql)."""
    result: dict[str, Any] = await conn.fetchval("SELECT tsq.decide($1::jsonb)", decision)
    return result


async def preview(pool: asyncpg.Pool, decisions: Sequence[dict[str, Any]]) -> list[Any]:
    """What each decision would do (`tsq.preview`), in order, in one transaction that is
    rolled back: nothing is written, no message sent, no notification delivered, and a later
    decision sees the batch counters the earlier ones moved. A refusal comes back as
    `{"refused": {...}}`; any other error (a lock timeout, say) as its `PostgresError`, after
    which the rest go on in a new transaction (no savepoints: thousands of them would slow
    every other session of the database down)."""
    results: list[Any] = []
    async with pool.acquire() as c:
        while len(results) < len(decisions):
            transaction = c.transaction()
            await transaction.start()
            try:
                for decision in decisions[len(results) :]:
                    try:
                        result = await c.fetchval("SELECT tsq.preview($1::jsonb)", decision)
                    except asyncpg.PostgresError as err:
                        results.append(err)
                        break
                    results.append(result)
            finally:
                await transaction.rollback()
    return results


async def recorded_outcome(
    conn: Conn, domain: str, command_id: UUID, request_id: str
) -> dict[str, Any] | None:
    """The outcome recorded for the decision a request asked for, if it was carried out."""
    result: dict[str, Any] | None = await conn.fetchval(
        """
        SELECT result FROM tsq.effect
        WHERE domain = $1 AND command_id = $2 AND result->>'request_id' = $3
        """,
        domain,
        command_id,
        request_id,
    )
    return result


async def record_refusals(
    conn: Conn, domain: str, command_id: UUID, rows: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """A TSQ_SIGNAL_REFUSED audit row per (effect key, details) not recorded before."""
    await conn.execute(
        """
        WITH input AS (
            SELECT * FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS t(key, details, n)
        ), inserted AS (
            INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
            SELECT key, $1, $2, 'refusal', details FROM input
            ON CONFLICT (effect_key) DO NOTHING
            RETURNING effect_key
        )
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        SELECT $1, $2, $5, input.details FROM input JOIN inserted ON inserted.effect_key = input.key
        ORDER BY input.n
        """,
        domain,
        command_id,
        [key for key, _ in rows],
        [details for _, details in rows],
        AuditEventType.TSQ_SIGNAL_REFUSED.value,
    )


async def observe(conn: Conn, req: Observe) -> Observed:
    """The parking a workflow is bound to, as the database has it now.

    A workflow without a parking id (one of tsq 0.1) is bound to the command's first parking
    that began when its input says the command was parked, or later (a second's leeway for the
    clocks of the bus and the database): never to a parking begun after its own ended.
    """
    row = await conn.fetchrow(
        """
        WITH bound AS (
            SELECT * FROM tsq.parking WHERE parking_id = $3 AND domain = $1 AND command_id = $2
            UNION ALL
            (SELECT * FROM tsq.parking
             WHERE $3::bigint IS NULL AND domain = $1 AND command_id = $2
               AND parked_at >= $4::timestamptz - interval '1 second'
             ORDER BY parking_id LIMIT 1)
        )
        SELECT b.parking_id, b.left_at, b.left_status, e.result AS recorded,
            (SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2)
                AS status,
            tsq.command_policy($1, b.command_type, b.error_code) AS policy
        FROM (SELECT 1) one
        LEFT JOIN bound b ON true
        LEFT JOIN tsq.effect e ON e.effect_key = $5 || '/parking/' || b.parking_id || '/decision'
        """,
        req.domain,
        req.command_id,
        req.parking_id,
        req.parked_at,
        req.workflow_id,
    )
    assert row is not None
    if row["parking_id"] is None:
        return Observed(
            parking_id=None,
            open=False,
            outcome=DecisionOutcome(
                decision=None,
                carried_out=False,
                status=row["status"],
                domain=req.domain,
                command_id=req.command_id,
                detail=(
                    f"no parking of command {req.command_id} matches this workflow (started "
                    "for one that has ended); nothing was done here, and the watcher starts "
                    "a workflow for the command's current parking"
                ),
            ),
        )
    if row["left_at"] is None:
        return Observed(parking_id=row["parking_id"], open=True, policy=policy_of(row["policy"]))
    if row["recorded"] is not None:
        return Observed(
            parking_id=row["parking_id"],
            open=False,
            outcome=DecisionOutcome.model_validate(row["recorded"]),
        )
    left = row["left_status"]
    return Observed(
        parking_id=row["parking_id"],
        open=False,
        outcome=DecisionOutcome(
            decision=None,
            carried_out=False,
            status=left,
            domain=req.domain,
            command_id=req.command_id,
            parking_id=row["parking_id"],
            changed_at=row["left_at"],
            detail=(
                f"command {req.command_id} left the troubleshooting queue by another hand: "
                + (f"it is {left}" if left else "its row was deleted")
                + f" since {row['left_at']:%Y-%m-%d %H:%M:%S %Z}; nothing was done here"
            ),
        ),
    )


async def record_event(conn: Conn, event: RecordEvent) -> bool:
    """One of a workflow's own events, once (keyed): its audit row, and for escalations one
    more in the notifier's count. False when it was recorded before."""
    async with conn.acquire() as c, c.transaction():
        inserted = await c.fetchval(
            """
            INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
            VALUES ($1, $2, $3, 'event', $4) ON CONFLICT (effect_key) DO NOTHING RETURNING true
            """,
            event.effect_key,
            event.domain,
            event.command_id,
            event.details,
        )
        if not inserted:
            return False
        await c.execute(
            """
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            VALUES ($1, $2, $3, $4)
            """,
            event.domain,
            event.command_id,
            event.event.value,
            {**event.details, "workflow_id": event.workflow_id},
        )
        if event.claim is not None and event.parking_id is not None:
            await _take_claim(
                c, event.parking_id, event.domain, event.command_id, event.claim, event.seq
            )
        if event.release and event.parking_id is not None:
            await _release_claim(c, event.parking_id, event.seq)
        if event.notice:
            await _count_notice(c, event.notice, event.domain, event.error_code, 1)
    return True


async def record(conn: Conn, batch: AuditRecords) -> int:
    """A batch of a workflow's audit records in one transaction, each once (keyed): the audit
    rows in order, the claims and proposals the database keeps beside them (each guarded by
    the workflow's count of its events, so a late write never undoes a later one), and the
    notifier's counts. Returns how many rows were new."""
    records = batch.records
    async with conn.acquire() as c, c.transaction():
        fresh: list[str] = await c.fetchval(
            """
            WITH input AS (
                SELECT * FROM unnest($3::text[], $4::text[], $5::jsonb[])
                    WITH ORDINALITY AS t(key, event, details, n)
            ), fresh AS (
                INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
                SELECT key, $1, $2, CASE WHEN event = $7 THEN 'refusal' ELSE 'event' END,
                    details
                FROM input ON CONFLICT (effect_key) DO NOTHING
                RETURNING effect_key
            ), audited AS (
                INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
                SELECT $1, $2, input.event,
                    input.details || jsonb_build_object('workflow_id', $6::text)
                FROM input JOIN fresh ON fresh.effect_key = input.key
                ORDER BY input.n
            )
            SELECT coalesce(array_agg(effect_key), '{}') FROM fresh
            """,
            batch.domain,
            batch.command_id,
            [r.effect_key for r in records],
            [r.event.value for r in records],
            [r.details for r in records],
            batch.workflow_id,
            AuditEventType.TSQ_SIGNAL_REFUSED.value,
        )
        new = set(fresh)
        parking = batch.parking_id
        for r in records:
            if parking is not None and r.claim is not None:
                await _take_claim(c, parking, batch.domain, batch.command_id, r.claim, r.seq)
            if parking is not None and r.release:
                await _release_claim(c, parking, r.seq)
            if parking is not None and r.proposal is not None:
                await c.execute(
                    """
                    INSERT INTO tsq.proposal (parking_id, domain, command_id, decision,
                        proposed_by, expires_at, seq)
                    SELECT $1, $2, $3, $4, $5, $6, $7
                    WHERE EXISTS (SELECT 1 FROM tsq.parking
                                  WHERE parking_id = $1 AND left_at IS NULL)
                    ON CONFLICT (parking_id) DO UPDATE SET decision = excluded.decision,
                        proposed_by = excluded.proposed_by, expires_at = excluded.expires_at,
                        ended = false, seq = excluded.seq
                    WHERE tsq.proposal.seq < excluded.seq
                    """,
                    parking,
                    batch.domain,
                    batch.command_id,
                    r.proposal.decision.value,
                    r.proposal.proposed_by,
                    r.proposal.expires_at,
                    r.seq,
                )
            if parking is not None and r.withdraw:
                await c.execute(
                    "UPDATE tsq.proposal SET ended = true, seq = $2 WHERE parking_id = $1 "
                    "AND seq < $2",
                    parking,
                    r.seq,
                )
            if parking is not None and r.schedule is not None:
                await c.execute(
                    """
                    INSERT INTO tsq.scheduled_retry (parking_id, domain, command_id, at,
                        scheduled_by, seq)
                    VALUES ($1, $2, $3, $4, $5, $6)
                    ON CONFLICT (parking_id) DO UPDATE SET at = excluded.at,
                        scheduled_by = excluded.scheduled_by, ended = false, seq = excluded.seq
                    WHERE tsq.scheduled_retry.seq < excluded.seq
                    """,
                    parking,
                    batch.domain,
                    batch.command_id,
                    r.schedule.at,
                    r.schedule.request.operator,
                    r.seq,
                )
            if parking is not None and r.unschedule:
                await c.execute(
                    "UPDATE tsq.scheduled_retry SET ended = true, seq = $2 WHERE parking_id = $1 "
                    "AND seq < $2",
                    parking,
                    r.seq,
                )
            if r.notice and r.effect_key in new:
                await _count_notice(c, r.notice, batch.domain, batch.error_code, 1)
    return len(new)


async def _take_claim(
    conn: Conn, parking_id: int, domain: str, command_id: UUID, claim: Claim, seq: int
) -> None:
    await conn.execute(
        """
        INSERT INTO tsq.claim (parking_id, domain, command_id, claimed_by, claimed_by_key,
            until, seq)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (parking_id) DO UPDATE SET claimed_by = excluded.claimed_by,
            claimed_by_key = excluded.claimed_by_key, until = excluded.until, seq = excluded.seq
        WHERE tsq.claim.seq < excluded.seq
        """,
        parking_id,
        domain,
        command_id,
        claim.by,
        operator_key(claim.by),
        claim.until,
        seq,
    )


async def _release_claim(conn: Conn, parking_id: int, seq: int) -> None:
    """Kept, ended, so that a claim written late (a lower seq) cannot come back."""
    await conn.execute(
        """
        UPDATE tsq.claim SET until = least(until, clock_timestamp()), seq = $2
        WHERE parking_id = $1 AND seq < $2
        """,
        parking_id,
        seq,
    )


async def _count_notice(
    conn: Conn, kind: str, domain: str, error_code: str | None, count: int
) -> None:
    await conn.execute(
        """
        INSERT INTO tsq.notice_group (kind, domain, error_code, pending)
        VALUES ($1, $2, coalesce($3, ''), $4)
        ON CONFLICT (kind, domain, error_code)
        DO UPDATE SET pending = tsq.notice_group.pending + excluded.pending
        """,
        kind,
        domain,
        error_code,
        count,
    )


# -- policies -------------------------------------------------------------------------------


def policy_of(value: dict[str, Any] | None) -> Policy | None:
    """A policy as `tsq.command_policy` gives it, as the workflow follows it."""
    return None if value is None else Policy.model_validate(value)


async def policies(conn: Conn, domain: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM tsq.policy WHERE domain = $1 ORDER BY name", domain
    )
    return rows


async def policy(conn: Conn, domain: str, name: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM tsq.policy WHERE domain = $1 AND name = $2", domain, name
    )
    return row


async def set_policy(
    pool: asyncpg.Pool,
    domain: str,
    policy: Policy,
    *,
    command_type: str | None,
    error_code: str | None,
    operator: str | None,
) -> tuple[asyncpg.Record | None, asyncpg.Record]:
    """Create or replace a policy; audited with what it was before and after, and the waiting
    workflows of the domain to be told (by the watcher). Returns (before, after)."""
    async with pool.acquire() as c, c.transaction():
        before = await c.fetchrow(
            "SELECT * FROM tsq.policy WHERE domain = $1 AND name = $2 FOR UPDATE",
            domain,
            policy.name,
        )
        after = await c.fetchrow(
            """
            INSERT INTO tsq.policy (domain, name, command_type, error_code, escalate_after,
                expire_after, expire_decision, expire_reason, expire_result_data, updated_by,
                require_approval, approval_expires_after)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (domain, name) DO UPDATE SET
                command_type = excluded.command_type, error_code = excluded.error_code,
                escalate_after = excluded.escalate_after, expire_after = excluded.expire_after,
                expire_decision = excluded.expire_decision,
                expire_reason = excluded.expire_reason,
                expire_result_data = excluded.expire_result_data,
                require_approval = excluded.require_approval,
                approval_expires_after = excluded.approval_expires_after,
                updated_at = clock_timestamp(), updated_by = excluded.updated_by
            RETURNING *
            """,
            domain,
            policy.name,
            command_type,
            error_code,
            policy.escalate_after,
            policy.expire_after,
            policy.expire_decision.value if policy.expire_decision else None,
            policy.expire_reason,
            policy.expire_result_data,
            operator,
            [kind.value for kind in policy.require_approval],
            policy.approval_expires_after,
        )
        await _policy_changed(c, domain, after["policy_id"], operator, "set", before, after)
    return before, after


async def delete_policy(
    pool: asyncpg.Pool, domain: str, name: str, *, operator: str | None
) -> asyncpg.Record | None:
    """Delete a policy; audited; None when there was none of that name."""
    async with pool.acquire() as c, c.transaction():
        before = await c.fetchrow(
            "DELETE FROM tsq.policy WHERE domain = $1 AND name = $2 RETURNING *", domain, name
        )
        if before is not None:
            await _policy_changed(c, domain, before["policy_id"], operator, "delete", before, None)
    return before


async def _policy_changed(
    conn: Conn,
    domain: str,
    policy_id: UUID,
    operator: str | None,
    action: str,
    before: asyncpg.Record | None,
    after: asyncpg.Record | None,
) -> None:
    await conn.execute(
        """
        WITH audited AS (
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            VALUES ($1, $2, $3, jsonb_build_object('operator', $4::text, 'action', $5::text,
                'before', $6::jsonb, 'after', $7::jsonb))
        )
        INSERT INTO tsq.policy_change (domain) VALUES ($1)
        """,
        domain,
        policy_id,
        AuditEventType.TSQ_POLICY_CHANGED.value,
        operator,
        action,
        _policy_json(before),
        _policy_json(after),
    )
    await conn.execute("SELECT pg_notify('tsq_parking', '')")


def _policy_json(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        key: (str(value) if isinstance(value, (timedelta, UUID, datetime)) else value)
        for key, value in dict(row).items()
    }


async def claim_policy_changes(conn: Conn, *, lease_s: float) -> list[asyncpg.Record]:
    """Domains whose policies changed, claimed for telling their waiting workflows."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        UPDATE tsq.policy_change c
        SET claimed_until = clock_timestamp() + make_interval(secs => $1)
        FROM (
            SELECT change_id FROM tsq.policy_change
            WHERE claimed_until IS NULL OR claimed_until < clock_timestamp()
            ORDER BY change_id LIMIT 20 FOR UPDATE SKIP LOCKED
        ) due
        WHERE c.change_id = due.change_id
        RETURNING c.change_id, c.domain
        """,
        lease_s,
    )
    return rows


async def policy_changes_told(conn: Conn, change_ids: Sequence[int]) -> None:
    await conn.execute(
        "DELETE FROM tsq.policy_change WHERE change_id = ANY($1::bigint[])", list(change_ids)
    )


# -- commands -------------------------------------------------------------------------------


async def command(conn: Conn, domain: str, command_id: UUID) -> asyncpg.Record | None:
    """The command row, with its open parking (`parking_id`, NULL when not parked)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT c.*, p.parking_id,
            tsq.command_policy(c.domain, c.command_type, c.last_error_code) AS policy
        FROM commandbus.command c
        LEFT JOIN tsq.parking p
            ON p.domain = c.domain AND p.command_id = c.command_id AND p.left_at IS NULL
        WHERE c.domain = $1 AND c.command_id = $2
        """,
        domain,
        command_id,
    )
    return row


async def last_decision(conn: Conn, domain: str, command_id: UUID) -> dict[str, Any] | None:
    """The decision tsq recorded for the command's latest parking, if it was carried out."""
    result: dict[str, Any] | None = await conn.fetchval(
        "SELECT tsq.last_decision($1, $2)", domain, command_id
    )
    return result


async def command_with_payload(conn: Conn, domain: str, command_id: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""
        SELECT c.*, m.message AS payload, h.* FROM commandbus.command c
        LEFT JOIN LATERAL tsq.original_message(c.domain, c.command_id) m ON true
        LEFT JOIN LATERAL ({_HOLDS}) h ON true
        WHERE c.domain = $1 AND c.command_id = $2
        """,
        domain,
        command_id,
    )
    return row


# What holds a parked command `c`, as its workflow wrote it: a claim, a proposal awaiting
# approval, a retry scheduled (rows of earlier parkings are not joined).
_HOLDS = """
    SELECT cl.claimed_by, cl.until AS claimed_until,
        pr.decision || ' by ' || pr.proposed_by AS proposal, sr.at AS retry_at
    FROM tsq.parking p
    LEFT JOIN tsq.claim cl ON cl.parking_id = p.parking_id AND cl.until > now()
    LEFT JOIN tsq.proposal pr ON pr.parking_id = p.parking_id AND NOT pr.ended
        AND pr.expires_at > now()
    LEFT JOIN tsq.scheduled_retry sr ON sr.parking_id = p.parking_id AND NOT sr.ended
    WHERE p.domain = c.domain AND p.command_id = c.command_id AND p.left_at IS NULL
"""

# The filters of `tsq list` and of a selection of many: parameters $1 to $6.
_WAITING = """
    c.domain = $1 AND c.status = $2
    AND ($3::text IS NULL OR c.command_type = $3)
    AND ($4::text IS NULL OR c.last_error_code = $4)
    AND ($5::timestamptz IS NULL OR c.updated_at >= $5)
    AND ($6::timestamptz IS NULL OR c.updated_at < $6)
"""


async def waiting(
    conn: Conn,
    domain: str,
    *,
    command_type: str | None,
    error_code: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> list[asyncpg.Record]:
    """Commands in the troubleshooting queue, newest first, with their original message."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT c.*, m.message AS payload, h.* FROM commandbus.command c
        LEFT JOIN LATERAL tsq.original_message(c.domain, c.command_id) m ON true
        LEFT JOIN LATERAL ({_HOLDS}) h ON true
        WHERE {_WAITING}
        ORDER BY c.updated_at DESC, c.command_id
        LIMIT $7 OFFSET $8
        """,
        domain,
        TSQ,
        command_type,
        error_code,
        since,
        until,
        limit,
        offset,
    )
    return rows


async def waiting_ids(
    conn: Conn,
    domain: str,
    *,
    command_type: str | None,
    error_code: str | None,
    since: datetime | None,
    until: datetime | None,
) -> list[UUID]:
    """Every matching command id in one snapshot, oldest parked first: a selection that others
    deciding meanwhile cannot shift."""
    rows = await conn.fetch(
        f"""
        SELECT c.command_id FROM commandbus.command c
        WHERE {_WAITING}
        ORDER BY c.updated_at, c.command_id
        """,
        domain,
        TSQ,
        command_type,
        error_code,
        since,
        until,
    )
    return [row["command_id"] for row in rows]


# -- bulk operations ------------------------------------------------------------------------


async def create_bulk(
    pool: asyncpg.Pool,
    *,
    bulk_id: UUID,
    domain: str,
    decision: str,
    operator: str,
    request: dict[str, Any],
    selection: str,
    rate: float | None,
    filters: dict[str, Any] | None,
    command_ids: Sequence[UUID] | None,
) -> asyncpg.Record:
    """A bulk operation and its frozen selection, in one transaction: the commands `filters`
    select (oldest parked first), or `command_ids` in their order, those not in the queue
    already counted as skipped. An empty selection, or ids that are commands of other domains,
    raise InvalidInputError, and nothing is written. When a policy asks approval for the
    decision of any command selected, the operation is a proposal (status `proposed`), until
    the shortest approval time of those policies (24 hours by default)."""
    async with pool.acquire() as c, c.transaction():
        await c.execute(
            """
            INSERT INTO tsq.bulk (bulk_id, domain, decision, operator, request, selection,
                total, rate, operator_key)
            VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8)
            """,
            bulk_id,
            domain,
            decision,
            operator,
            request,
            selection,
            rate,
            operator_key(operator),
        )
        if command_ids is None:
            assert filters is not None
            await c.execute(
                f"""
                INSERT INTO tsq.bulk_item (bulk_id, seq, command_id, parking_id)
                SELECT $7, row_number() OVER (ORDER BY updated_at, command_id), command_id,
                    parking_id
                FROM (
                    -- Each open parking by its index: thousands just parked have no statistics
                    -- yet, and a join planned for one row would scan them all for each command.
                    SELECT c.updated_at, c.command_id, (
                        SELECT p.parking_id FROM tsq.parking p
                        WHERE p.domain = c.domain AND p.command_id = c.command_id
                            AND p.left_at IS NULL) AS parking_id
                    FROM commandbus.command c
                    WHERE {_WAITING}
                    OFFSET 0
                ) waiting
                WHERE parking_id IS NOT NULL
                """,
                domain,
                TSQ,
                filters.get("command_type"),
                filters.get("error_code"),
                filters.get("since"),
                filters.get("until"),
                bulk_id,
            )
        else:
            foreign = await c.fetch(
                """
                SELECT i.command_id, min(c.domain) AS domain
                FROM unnest($1::uuid[]) AS i(command_id)
                JOIN commandbus.command c ON c.command_id = i.command_id AND c.domain <> $2
                WHERE NOT EXISTS (SELECT 1 FROM commandbus.command o
                                  WHERE o.domain = $2 AND o.command_id = i.command_id)
                GROUP BY i.command_id
                """,
                list(command_ids),
                domain,
            )
            if foreign:
                named = ", ".join(f"{r['command_id']} (domain {r['domain']})" for r in foreign[:5])
                more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                raise InvalidInputError(
                    f"{len(foreign)} of the ids are commands of another domain, not of {domain}: "
                    f"{named}{more}; a bulk operation decides in one domain; nothing was started"
                )
            await c.execute(
                """
                INSERT INTO tsq.bulk_item (bulk_id, seq, command_id, parking_id, result, detail,
                    decided_at)
                SELECT $1, i.seq, i.command_id, p.parking_id, v.result,
                    CASE v.result
                        WHEN 'not_found' THEN format('command %s not found in domain %s',
                            i.command_id, $3::text)
                        WHEN 'already_decided' THEN tsq.decided_by(d.result)
                        WHEN 'not_in_troubleshooting_queue' THEN format('command %s is %s, not '
                            'in the troubleshooting queue; nothing was changed', i.command_id,
                            c.status) END,
                    CASE WHEN v.result IS NOT NULL THEN clock_timestamp() END
                FROM unnest($2::uuid[]) WITH ORDINALITY AS i(command_id, seq)
                LEFT JOIN commandbus.command c ON c.domain = $3 AND c.command_id = i.command_id
                LEFT JOIN tsq.parking p
                    ON p.domain = $3 AND p.command_id = i.command_id AND p.left_at IS NULL
                -- Out of the queue by a decision of tsq's (one made just before the selection,
                -- say): the item says whose, as one that lost in its chunk would.
                CROSS JOIN LATERAL (SELECT CASE WHEN c.status <> $4
                    THEN tsq.last_decision($3, i.command_id) END AS result) d
                CROSS JOIN LATERAL (SELECT CASE
                    WHEN c.command_id IS NULL THEN 'not_found'
                    WHEN d.result IS NOT NULL THEN 'already_decided'
                    WHEN c.status <> $4 OR p.parking_id IS NULL
                        THEN 'not_in_troubleshooting_queue' END AS result) v
                """,
                bulk_id,
                list(command_ids),
                domain,
                TSQ,
            )
        row = await c.fetchrow(
            """
            WITH needing AS (
                -- Only where a policy of the domain asks approval for the decision at all.
                SELECT count(*) AS n, min((p->>'approval_expires_after')::float8) AS expires
                FROM tsq.bulk b
                JOIN tsq.bulk_item i ON i.bulk_id = b.bulk_id AND i.result IS NULL
                JOIN commandbus.command c ON c.domain = b.domain AND c.command_id = i.command_id
                CROSS JOIN LATERAL tsq.command_policy(c.domain, c.command_type,
                    c.last_error_code) p
                WHERE b.bulk_id = $1 AND p->'require_approval' ? b.decision
                    AND EXISTS (SELECT 1 FROM tsq.policy
                                WHERE domain = b.domain AND b.decision = ANY(require_approval))
            )
            UPDATE tsq.bulk SET
                total = (SELECT count(*) FROM tsq.bulk_item WHERE bulk_id = $1),
                counts = (SELECT coalesce(jsonb_object_agg(result, n), '{}') FROM (
                    SELECT result, count(*) AS n FROM tsq.bulk_item
                    WHERE bulk_id = $1 AND result IS NOT NULL GROUP BY result) r),
                needing_approval = needing.n,
                status = CASE WHEN needing.n > 0 THEN 'proposed' ELSE status END,
                approval_expires_at = CASE WHEN needing.n > 0 THEN clock_timestamp()
                    + make_interval(secs => coalesce(needing.expires, $2)) END
            FROM needing
            WHERE bulk_id = $1
            RETURNING tsq.bulk.*
            """,
            bulk_id,
            APPROVAL_EXPIRES.total_seconds(),
        )
        assert row is not None
        if row["total"] == 0:
            raise InvalidInputError(
                f"no command in the troubleshooting queue of {domain} matches "
                f"({selection}); nothing was started"
            )
    return row


def bulk_operation(row: asyncpg.Record) -> BulkOperation:
    """The operation a `tsq.bulk` row holds (its request stays in the database)."""
    return BulkOperation.model_validate(
        {k: v for k, v in row.items() if k not in ("request", "stopping")}
    )


async def bulk_chunk(conn: Conn, bulk_id: UUID, limit: int) -> dict[str, Any]:
    """Decide the next `limit` items, in one transaction (see `tsq.bulk_chunk`)."""
    result: dict[str, Any] = await conn.fetchval("SELECT tsq.bulk_chunk($1, $2)", bulk_id, limit)
    return result


async def bulk_fail_next(conn: Conn, bulk_id: UUID, problem: str) -> dict[str, Any]:
    """The next item fails with `problem` (see `tsq.bulk_fail_next`)."""
    result: dict[str, Any] = await conn.fetchval(
        "SELECT tsq.bulk_fail_next($1, $2)", bulk_id, problem
    )
    return result


async def bulk_stop(conn: Conn, bulk_id: UUID, operator: str) -> asyncpg.Record | None:
    """No chunk decides anything once this returns; None if there is no such operation. An
    operation that has ended already is left as it is (`stopping` false)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        WITH running AS (
            SELECT bulk_id FROM tsq.bulk WHERE bulk_id = $1 AND status IN ('running', 'proposed')
        ), stopped AS (
            SELECT s.*, true AS stopping FROM running, tsq.bulk_stop(running.bulk_id, $2) s
        )
        SELECT * FROM stopped
        UNION ALL
        SELECT b.*, false FROM tsq.bulk b WHERE b.bulk_id = $1 AND NOT EXISTS (SELECT FROM running)
        """,
        bulk_id,
        operator,
    )
    return row


async def bulk_verdict(
    conn: Conn, verdict: BulkVerdict, *, operator_key: str | None
) -> asyncpg.Record | None:
    """A proposed bulk operation approved (it runs), rejected or expired, audited under the
    operation's id; None when it is no longer proposed (stopped, or decided already)."""
    event = {
        "approved": AuditEventType.TSQ_APPROVED,
        "rejected": AuditEventType.TSQ_REJECTED,
        "expired": AuditEventType.TSQ_PROPOSAL_EXPIRED,
    }[verdict.verdict]
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        WITH decided AS (
            UPDATE tsq.bulk SET
                status = CASE $2 WHEN 'approved' THEN 'running' ELSE $2 END,
                approved_by = CASE WHEN $2 = 'approved' THEN $3 END,
                approved_by_key = CASE WHEN $2 = 'approved' THEN $4 END,
                approved_at = CASE WHEN $2 = 'approved' THEN clock_timestamp() END,
                approval_comment = CASE WHEN $2 = 'approved' THEN $5 END,
                rejected_by = CASE WHEN $2 = 'rejected' THEN $3 END,
                rejection_reason = CASE WHEN $2 = 'rejected' THEN $5 END,
                finished_at = CASE WHEN $2 <> 'approved' THEN clock_timestamp() END
            WHERE bulk_id = $1 AND status = 'proposed'
            RETURNING *
        ), audited AS (
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            SELECT domain, bulk_id, $6, jsonb_strip_nulls(jsonb_build_object(
                'bulk_id', bulk_id, 'operator', $3::text, 'proposed_by', operator,
                'decision', decision, 'commands', total, 'needing_approval', needing_approval,
                CASE WHEN $2 = 'rejected' THEN 'reason' ELSE 'comment' END, $5::text))
            FROM decided
        )
        SELECT * FROM decided
        """,
        verdict.bulk_id,
        verdict.verdict,
        verdict.operator,
        operator_key,
        verdict.text,
        event.value,
    )
    return row


async def bulk_finish(conn: Conn, bulk_id: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM tsq.bulk_finish($1) WHERE bulk_id IS NOT NULL", bulk_id
    )
    return row


async def bulk(conn: Conn, bulk_id: UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM tsq.bulk WHERE bulk_id = $1", bulk_id
    )
    return row


async def bulks(conn: Conn, domain: str | None, limit: int) -> list[asyncpg.Record]:
    """The latest bulk operations, newest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT * FROM tsq.bulk WHERE $1::text IS NULL OR domain = $1
        ORDER BY created_at DESC LIMIT $2
        """,
        domain,
        limit,
    )
    return rows


async def bulk_items(conn: Conn, bulk_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT seq, command_id, parking_id, result, detail, decided_at FROM tsq.bulk_item
        WHERE bulk_id = $1 ORDER BY seq
        """,
        bulk_id,
    )
    return rows


async def note_after(
    conn: Conn, domain: str, command_id: UUID, text: str, operator: str | None, *, status: str
) -> None:
    """A note on a command no workflow waits for (decided, or not parked): an audit row."""
    await conn.execute(
        """
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES ($1, $2, $3, jsonb_build_object('operator', $4::text, 'text', $5::text,
            'status', $6::text))
        """,
        domain,
        command_id,
        AuditEventType.TSQ_NOTE.value,
        operator,
        text,
        status,
    )


async def audit_trail(conn: Conn, domain: str, command_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT audit_id, event_type, ts, details_json FROM commandbus.audit
        WHERE domain = $1 AND command_id = $2
        ORDER BY ts, audit_id
        """,
        domain,
        command_id,
    )
    return rows


async def move_to_troubleshooting(
    conn: Conn,
    domain: str,
    command_id: UUID,
    *,
    error_type: str,
    error_code: str | None,
    error_message: str | None,
    details: dict[str, Any],
    unmovable: Sequence[str],
) -> asyncpg.Record | None:
    """Park a command as the bus's worker does, in one statement (so atomic by itself): the
    guarded status change, the message archived, the audit row and the batch counter. None
    when the command is already parked, finished, or missing."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        WITH moved AS (
            UPDATE commandbus.command
            SET status = $3, last_error_type = $4, last_error_code = $5,
                last_error_msg = $6, updated_at = now()
            WHERE domain = $1 AND command_id = $2 AND status <> ALL($7::text[])
            RETURNING *
        ), archived AS (
            SELECT tsq.archive(queue_name, msg_id) FROM moved
            WHERE msg_id IS NOT NULL AND queue_name <> ''
        ), audited AS (
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            SELECT domain, command_id, $9,
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
        command_id,
        TSQ,
        error_type,
        error_code,
        error_message,
        [TSQ, *unmovable],
        details,
        AuditEventType.MOVED_TO_TSQ.value,
    )
    return row


async def open_parkings(conn: Conn, domain: str | None) -> list[asyncpg.Record]:
    """Every parked command (of `domain`, or all), with its open parking, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT c.*, p.parking_id, p.problem,
            tsq.command_policy(c.domain, c.command_type, c.last_error_code) AS policy
        FROM commandbus.command c
        LEFT JOIN tsq.parking p
            ON p.domain = c.domain AND p.command_id = c.command_id AND p.left_at IS NULL
        WHERE c.status = $1 AND ($2::text IS NULL OR c.domain = $2)
        ORDER BY c.updated_at, c.command_id
        """,
        TSQ,
        domain,
    )
    return rows


# -- the watcher ----------------------------------------------------------------------------


async def claim_parkings(conn: Conn, *, lease_s: float, limit: int) -> list[asyncpg.Record]:
    """Parkings with work for the watcher, claimed for `lease_s` seconds. Several workers may
    drain at once: each skips what another holds; a claim that outlives its worker expires."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        UPDATE tsq.parking p
        SET claimed_until = clock_timestamp() + make_interval(secs => $1),
            attempts = p.attempts + 1
        FROM (
            SELECT parking_id FROM tsq.parking
            WHERE todo IS NOT NULL
              AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
            ORDER BY parking_id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ) claimed
        WHERE p.parking_id = claimed.parking_id
        RETURNING p.parking_id, p.domain, p.command_id, p.todo, p.todo_seq, p.attempts,
            p.parked_at, p.left_at
        """,
        lease_s,
        limit,
    )
    return rows


async def finish_todos(conn: Conn, done: Sequence[tuple[int, int, str | None]]) -> None:
    """The claimed work of these (parking id, todo_seq, problem) is done, or can never be
    (`problem` says why); unless a parking changed meanwhile, which left new work.

    A parking whose row a decision holds is passed over, not waited for: that decision moves
    it on (new work, a new todo_seq) or rolls back, and then the claim runs out and the work,
    which is idempotent, is done again. Waiting would stall the watcher on one slow decision,
    and, holding the rows it updated, every caller starting those workflows too."""
    if not done:
        return
    await conn.execute(
        """
        UPDATE tsq.parking p SET todo = NULL, claimed_until = NULL, problem = d.problem
        FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS d(parking_id, todo_seq, problem)
        WHERE p.parking_id = d.parking_id AND p.todo_seq = d.todo_seq
          AND p.parking_id IN (SELECT parking_id FROM tsq.parking
                               WHERE parking_id = ANY($1::bigint[]) FOR UPDATE SKIP LOCKED)
        """,
        [pid for pid, _, _ in done],
        [seq for _, seq, _ in done],
        [problem for _, _, problem in done],
    )


async def commands_of(
    conn: Conn, keys: Sequence[tuple[str, UUID]]
) -> dict[tuple[str, UUID], asyncpg.Record]:
    """The command rows (with their open `parking_id`) of these (domain, command id)."""
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        SELECT c.*, p.parking_id,
            tsq.command_policy(c.domain, c.command_type, c.last_error_code) AS policy
        FROM unnest($1::text[], $2::uuid[]) AS k(domain, command_id)
        JOIN commandbus.command c ON c.domain = k.domain AND c.command_id = k.command_id
        LEFT JOIN tsq.parking p
            ON p.domain = c.domain AND p.command_id = c.command_id AND p.left_at IS NULL
        """,
        [domain for domain, _ in keys],
        [cid for _, cid in keys],
    )
    return {(row["domain"], row["command_id"]): row for row in rows}


async def left_among(conn: Conn, parking_ids: Sequence[int]) -> list[asyncpg.Record]:
    """Which of these parkings have ended."""
    if not parking_ids:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT parking_id, domain, command_id FROM tsq.parking
        WHERE parking_id = ANY($1::bigint[]) AND left_at IS NOT NULL
        """,
        list(parking_ids),
    )
    return rows


async def retry_todo(
    conn: Conn, parking_id: int, todo_seq: int, *, after_s: float, problem: str
) -> None:
    """The claimed work failed for now: try again in `after_s` seconds."""
    await conn.execute(
        """
        UPDATE tsq.parking
        SET claimed_until = clock_timestamp() + make_interval(secs => $3), problem = $4
        WHERE parking_id = $1 AND todo_seq = $2
        """,
        parking_id,
        todo_seq,
        after_s,
        problem,
    )


async def started(conn: Conn, parking_id: int) -> None:
    """A caller started (or found) this parking's workflow: the watcher need not. A row
    another transaction holds is left as it is (the watcher's start, if it comes, finds the
    workflow running): a caller never waits here."""
    await conn.execute(
        """
        UPDATE tsq.parking SET todo = NULL
        WHERE parking_id = (SELECT parking_id FROM tsq.parking
                            WHERE parking_id = $1 AND todo = 'start' FOR UPDATE SKIP LOCKED)
        """,
        parking_id,
    )


async def take_lease(conn: Conn, name: str, holder: str, *, every_s: float) -> bool:
    """True when `holder` should do the work `name` now: nobody took it in the last
    `every_s` seconds (each worker judges by its own interval)."""
    taken = await conn.fetchval(
        """
        INSERT INTO tsq.lease (name, holder, taken_at) VALUES ($1, $2, clock_timestamp())
        ON CONFLICT (name) DO UPDATE
        SET holder = excluded.holder, taken_at = excluded.taken_at
        WHERE tsq.lease.taken_at < clock_timestamp() - make_interval(secs => $3)
        RETURNING true
        """,
        name,
        holder,
        every_s,
    )
    return bool(taken)


async def open_parking_ids(conn: Conn, *, older_than_s: float) -> list[asyncpg.Record]:
    """Open parkings without pending work, parked at least `older_than_s` seconds ago."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT parking_id, domain, command_id FROM tsq.parking
        WHERE left_at IS NULL AND todo IS NULL
          AND parked_at < clock_timestamp() - make_interval(secs => $1)
        """,
        older_than_s,
    )
    return rows


async def rearm(conn: Conn, parking_ids: Sequence[int]) -> None:
    """Ask the watcher to make sure these parkings' workflows run."""
    await conn.execute(
        """
        UPDATE tsq.parking SET todo = 'start', todo_seq = todo_seq + 1, claimed_until = NULL,
            attempts = 0
        WHERE parking_id = ANY($1::bigint[]) AND left_at IS NULL AND todo IS NULL
        """,
        list(parking_ids),
    )


async def open_commands(
    conn: Conn, keys: Sequence[tuple[str, UUID]], *, grace_s: float
) -> set[tuple[str, UUID]]:
    """Which of these (domain, command id) have an open parking, or one that left less than
    `grace_s` ago or whose workflow is still to be told (the watcher's rows have that work)."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT p.domain, p.command_id FROM tsq.parking p
        JOIN unnest($1::text[], $2::uuid[]) AS k(domain, command_id)
            ON p.domain = k.domain AND p.command_id = k.command_id
        WHERE p.left_at IS NULL OR p.todo IS NOT NULL
            OR p.left_at > clock_timestamp() - make_interval(secs => $3)
        """,
        [domain for domain, _ in keys],
        [cid for _, cid in keys],
        grace_s,
    )
    return {(row["domain"], row["command_id"]) for row in rows}


# -- the notifier ---------------------------------------------------------------------------

# Fixed, like the migration's: one worker at a time counts arrivals.
_NOTIFY_LOCK = 0x7459_5101


async def notify_lock(conn: Conn) -> bool:
    """Within a transaction: whether this one may count arrivals now."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _NOTIFY_LOCK))


async def count_arrivals(conn: Conn) -> None:
    """Parkings not yet counted add to their group's pending count."""
    await conn.execute(
        """
        WITH counted AS (
            UPDATE tsq.parking SET notified = true
            WHERE parking_id IN (
                SELECT parking_id FROM tsq.parking WHERE NOT notified
                ORDER BY parking_id LIMIT 10000 FOR UPDATE SKIP LOCKED
            )
            RETURNING domain, coalesce(error_code, '') AS error_code
        )
        INSERT INTO tsq.notice_group (kind, domain, error_code, pending)
        SELECT 'arrivals', domain, error_code, count(*) FROM counted GROUP BY domain, error_code
        ON CONFLICT (kind, domain, error_code)
        DO UPDATE SET pending = tsq.notice_group.pending + excluded.pending
        """
    )


async def due_notices(conn: Conn, window: timedelta) -> list[asyncpg.Record]:
    """Groups (arrivals, escalations) with news whose last message is a window old (or that
    never had one): marked sent now, with what the message needs."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        WITH due AS (
            UPDATE tsq.notice_group g
            SET pending = 0, last_sent_at = clock_timestamp()
            FROM tsq.notice_group old
            WHERE g.pending > 0
              AND old.kind = g.kind AND old.domain = g.domain AND old.error_code = g.error_code
              AND (g.last_sent_at IS NULL OR g.last_sent_at <= clock_timestamp() - $1::interval)
            RETURNING g.kind, g.domain, g.error_code, old.pending AS arrived,
                g.last_sent_at AS sent_at, old.last_sent_at IS NOT NULL AS repeat
        )
        SELECT due.*, w.waiting, w.oldest FROM due
        CROSS JOIN LATERAL (
            SELECT count(*) AS waiting, min(parked_at) AS oldest FROM tsq.parking p
            WHERE p.domain = due.domain AND coalesce(p.error_code, '') = due.error_code
              AND p.left_at IS NULL
        ) w
        """,
        window,
    )
    return rows


async def add_notice(conn: Conn, key: str, body: dict[str, Any]) -> None:
    await conn.execute(
        """
        INSERT INTO tsq.notice (idempotency_key, body) VALUES ($1, $2)
        ON CONFLICT (idempotency_key) DO NOTHING
        """,
        key,
        body,
    )


async def claim_notices(conn: Conn, *, lease_s: float, limit: int = 20) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        UPDATE tsq.notice n
        SET next_attempt_at = clock_timestamp() + make_interval(secs => $1),
            attempts = n.attempts + 1
        FROM (
            SELECT notice_id FROM tsq.notice
            WHERE sent_at IS NULL AND next_attempt_at <= clock_timestamp()
            ORDER BY notice_id LIMIT $2 FOR UPDATE SKIP LOCKED
        ) due
        WHERE n.notice_id = due.notice_id
        RETURNING n.notice_id, n.idempotency_key, n.body, n.attempts
        """,
        lease_s,
        limit,
    )
    return rows


async def notice_sent(conn: Conn, notice_id: int) -> None:
    await conn.execute(
        "UPDATE tsq.notice SET sent_at = clock_timestamp(), last_error = NULL WHERE notice_id = $1",
        notice_id,
    )


async def notice_failed(
    conn: Conn, notice_id: int, problem: str, *, retry_in_s: float | None
) -> None:
    """Try again in `retry_in_s` seconds; None: given up (kept, with its last error)."""
    await conn.execute(
        """
        UPDATE tsq.notice SET last_error = $2,
            next_attempt_at = CASE WHEN $3::float8 IS NULL THEN 'infinity'::timestamptz
                ELSE clock_timestamp() + make_interval(secs => $3) END
        WHERE notice_id = $1
        """,
        notice_id,
        problem,
        retry_in_s,
    )


# -- reading what waits ---------------------------------------------------------------------


async def waiting_groups(conn: Conn, domain: str | None) -> list[asyncpg.Record]:
    """Waiting commands by domain, error code and command type: count, oldest and newest
    parking; newest groups first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT domain, coalesce(error_code, '') AS error_code, command_type, count(*) AS count,
            min(parked_at) AS oldest, max(parked_at) AS newest
        FROM tsq.parking
        WHERE left_at IS NULL AND ($1::text IS NULL OR domain = $1)
        GROUP BY domain, coalesce(error_code, ''), command_type
        ORDER BY newest DESC, domain, error_code, command_type
        """,
        domain,
    )
    return rows


# -- the benchmark and the demo, acting as a command bus -------------------------------------


async def ensure_queue(conn: Conn, queue: str) -> None:
    """Create a PGMQ queue unless one of that name (in any letter case) exists."""
    await conn.execute(
        "SELECT pgmq.create($1) WHERE tsq.queue_named($1) IS NULL", check_queue_name(queue)
    )


async def domains(conn: Conn, limit: int = 1000) -> list[str]:
    """The bus's domains, in order: a skip scan of the (domain, command_id) index, one probe
    per domain, however many commands each has."""
    rows = await conn.fetch(
        """
        WITH RECURSIVE d AS (
            (SELECT domain FROM commandbus.command ORDER BY domain LIMIT 1)
            UNION ALL
            SELECT (SELECT c.domain FROM commandbus.command c WHERE c.domain > d.domain
                    ORDER BY c.domain LIMIT 1)
            FROM d WHERE d.domain IS NOT NULL
        )
        SELECT domain FROM d WHERE domain IS NOT NULL LIMIT $1
        """,
        limit,
    )
    return [row["domain"] for row in rows]


async def has_commands(conn: Conn, domain: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT FROM commandbus.command WHERE domain = $1)", domain
        )
    )


async def send_command(
    pool: asyncpg.Pool,
    domain: str,
    command_id: UUID,
    *,
    command_type: str,
    correlation_id: UUID,
    body: dict[str, Any],
    reply_queue: str,
) -> None:
    """One command as a bus sends it: its message in `<domain>__commands`, its row
    IN_PROGRESS, a SENT audit row; in one transaction."""
    queue = f"{domain}__commands"
    async with pool.acquire() as c, c.transaction():
        await ensure_queue(c, queue)
        if reply_queue:
            await ensure_queue(c, reply_queue)
        await c.execute(
            """
            WITH sent AS (SELECT * FROM pgmq.send($2::text, $8::jsonb) AS msg_id),
            command AS (
                INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id,
                    command_type, status, attempts, max_attempts, reply_queue, correlation_id)
                SELECT $1, $2, msg_id, $3, $4, 'IN_PROGRESS', 3, 3, $5, $6 FROM sent
            )
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            SELECT $1, $3, $7, jsonb_build_object('command_type', $4::text, 'msg_id', msg_id)
            FROM sent
            """,
            domain,
            queue,
            command_id,
            command_type,
            reply_queue,
            correlation_id,
            "SENT",
            body,
        )


async def send_commands(
    conn: Conn, domain: str, count: int, *, parked: bool, error_code: str = "BENCH"
) -> list[UUID]:
    """`count` commands as a bus sends them: IN_PROGRESS with a message in `<domain>__commands`
    (to be parked by `move_to_troubleshooting`), or already parked without one. One statement."""
    await conn.execute(
        """
        SELECT pgmq.create(queue) FROM unnest($1::text[]) AS queue
        WHERE tsq.queue_named(queue) IS NULL
        """,
        [f"{domain}__commands", f"{domain}__replies"],
    )
    rows = await conn.fetch(
        """
        WITH fresh AS (
            SELECT gen_random_uuid() AS command_id, gen_random_uuid() AS correlation_id
            FROM generate_series(1, $4)
        ), sent AS (
            SELECT fresh.*,
                CASE WHEN $5 THEN NULL ELSE (SELECT * FROM pgmq.send($2::text,
                    jsonb_build_object(
                        'domain', $1::text, 'command_type', 'DebitAccount',
                        'command_id', command_id, 'correlation_id', correlation_id,
                        'data', jsonb_build_object('account', 'ACC-1', 'amount', 100),
                        'reply_to', $3::text))) END AS msg_id
            FROM fresh
        )
        INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id,
            command_type, status, attempts, max_attempts, last_error_type,
            last_error_code, last_error_msg, reply_queue, correlation_id)
        SELECT $1, $2, msg_id, command_id, 'DebitAccount',
            CASE WHEN $5 THEN $6 ELSE 'IN_PROGRESS' END, 3, 3,
            CASE WHEN $5 THEN 'PERMANENT' END, CASE WHEN $5 THEN $7 END,
            CASE WHEN $5 THEN 'parked by tsq bench' END, $3, correlation_id
        FROM sent
        RETURNING command_id
        """,
        domain,
        f"{domain}__commands",
        f"{domain}__replies",
        count,
        parked,
        TSQ,
        error_code,
    )
    return [row["command_id"] for row in rows]


async def park_as_bus(conn: Conn, domain: str, ids: Sequence[UUID]) -> None:
    """Park running commands the way the reference command bus's worker does: plain SQL."""
    await conn.execute(
        """
        UPDATE commandbus.command
        SET status = $3, last_error_type = 'PERMANENT', last_error_code = 'BENCH',
            last_error_msg = 'parked by tsq bench', updated_at = now()
        WHERE domain = $1 AND command_id = ANY($2::uuid[])
        """,
        domain,
        list(ids),
        TSQ,
    )


async def set_status_as_bus(conn: Conn, domain: str, ids: Sequence[UUID], status: str) -> None:
    """Change commands' status the way another tool does: plain SQL, one statement."""
    await conn.execute(
        """
        UPDATE commandbus.command SET status = $3, updated_at = now()
        WHERE domain = $1 AND command_id = ANY($2::uuid[])
        """,
        domain,
        list(ids),
        status,
    )


async def cancel_directly(conn: Conn, domain: str, command_id: UUID, reason: str) -> None:
    """A cancel as a bus's own tool does it, without tsq: one transaction, the guarded update,
    the reply and the audit row."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """
            WITH canceled AS (
                UPDATE commandbus.command SET status = 'CANCELED', updated_at = now()
                WHERE domain = $1 AND command_id = $2 AND status = $3
                RETURNING *
            )
            SELECT reply_queue, (SELECT * FROM pgmq.send(reply_queue,
                tsq.reply_body(canceled::commandbus.command, 'CANCELED', $4, NULL))) AS msg_id
            FROM canceled
            """,
            domain,
            command_id,
            TSQ,
            reason,
        )
        if row is None:
            raise RuntimeError(f"command {command_id} was not in the troubleshooting queue")
        await conn.execute("SELECT pg_notify($1, '')", f"pgmq_notify_{row['reply_queue']}")
        await conn.execute(
            """
            INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
            VALUES ($1, $2, 'OPERATOR_CANCEL', $3)
            """,
            domain,
            command_id,
            {
                "operator": "tsq-bench",
                "reason": reason,
                "reply_to": row["reply_queue"],
                "reply_msg_id": row["msg_id"],
            },
        )


async def decided_counts(conn: Conn, domain: str) -> asyncpg.Record:
    """What a domain's cancels left: commands canceled, audit rows (and commands with one),
    decisions recorded, replies (and commands with one)."""
    row: asyncpg.Record = await conn.fetchrow(
        """
        SELECT
            (SELECT count(*) FROM commandbus.command
             WHERE domain = $1 AND status = 'CANCELED') AS canceled,
            (SELECT count(*) FROM commandbus.audit
             WHERE domain = $1 AND event_type = 'OPERATOR_CANCEL') AS audits,
            (SELECT count(DISTINCT command_id) FROM commandbus.audit
             WHERE domain = $1 AND event_type = 'OPERATOR_CANCEL') AS audited_commands,
            (SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind = 'cancel') AS decisions,
            r.replies, r.replied_commands
        FROM (
            SELECT count(*) FILTER (WHERE message->>'outcome' = 'CANCELED') AS replies,
                count(DISTINCT message->>'command_id') AS replied_commands
            FROM pgmq.read($1 || '__replies', 0, 2147483647)
        ) r
        """,
        domain,
    )
    return row


async def parked_counts(conn: Conn, domain: str) -> asyncpg.Record:
    """Commands of a domain in the troubleshooting queue, and MOVED_TO_TSQ audit rows."""
    row: asyncpg.Record = await conn.fetchrow(
        """
        SELECT
            (SELECT count(*) FROM commandbus.command WHERE domain = $1 AND status = $2) AS parked,
            (SELECT count(*) FROM commandbus.audit
             WHERE domain = $1 AND event_type = 'MOVED_TO_TSQ') AS moved_audits
        """,
        domain,
        TSQ,
    )
    return row


# Both copies are ordinary tables in the bench's own database: a temporary one would skip the
# write-ahead log and flatter the bare side.
_COPIES = """
CREATE TABLE public.bench_bare (LIKE commandbus.command INCLUDING ALL);
CREATE TABLE public.bench_watched (LIKE commandbus.command INCLUDING ALL);
CREATE TRIGGER tsq_parking_update AFTER UPDATE OF status ON public.bench_watched
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
        AND 'IN_TROUBLESHOOTING_QUEUE' IN (OLD.status, NEW.status))
    EXECUTE FUNCTION tsq.track_parking();
"""
_FILL = {
    table: f"""
        INSERT INTO public.{table} (domain, queue_name, command_id, command_type, status,
            max_attempts)
        SELECT $1, 'q', id, 'DebitAccount', 'IN_PROGRESS', 3 FROM unnest($2::uuid[]) id
    """
    for table in ("bench_bare", "bench_watched")
}
_BUS_UPDATE = {
    table: f"""
        UPDATE public.{table} SET status = $3, last_error_code = 'BENCH', updated_at = now()
        WHERE domain = $1 AND command_id = $2
    """
    for table in ("bench_bare", "bench_watched")
}


async def copies_of_the_command_table(conn: Conn, domain: str, ids: Sequence[UUID]) -> None:
    """Two copies of commandbus.command with the same rows: `bench_bare` without triggers,
    `bench_watched` with tsq's parking trigger (in the bench's own database)."""
    await conn.execute(_COPIES)
    for statement in _FILL.values():
        await conn.execute(statement, domain, list(ids))


async def bus_update(
    conn: Conn, *, watched: bool, domain: str, command_id: UUID, status: str
) -> None:
    """The bus's UPDATE of one command's status, on one of the copies, its own transaction."""
    await conn.execute(
        _BUS_UPDATE["bench_watched" if watched else "bench_bare"], domain, command_id, status
    )
