"""Shared test helpers: isolated domains, seeded commands, deadline polls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from tsq.db import migrate
from tsq.devstack import TemporalDevServer, temporal_cli
from tsq.settings import Settings, with_database
from tsq.store import ensure_queue

T = TypeVar("T")


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, *, migrated: bool = False) -> AsyncIterator[str]:
    """A new database on the admin URL's server (migrated if asked), dropped afterwards."""
    name = f"tsq_scratch_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = with_database(admin_url, name)
        if migrated:
            await migrate(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def new_domain() -> str:
    """A domain no other test uses; every queue and workflow id of the test derives from it."""
    return f"t{uuid.uuid4().hex[:16]}"


async def seed_command(
    pool: asyncpg.Pool,
    domain: str,
    *,
    status: str = "IN_TROUBLESHOOTING_QUEUE",
    reply_queue: str | None = "default",
    command_type: str = "DebitAccount",
    batch_id: uuid.UUID | None = None,
    data: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Insert a command as the reference command bus would have left it, with its message archived.

    `reply_queue="default"` means `<domain>__replies`; None means no reply queue.
    """
    command_id = uuid.uuid4()
    correlation_id = uuid.uuid4()
    replies = f"{domain}__replies" if reply_queue == "default" else (reply_queue or "")
    queue = f"{domain}__commands"
    async with pool.acquire() as conn, conn.transaction():
        await ensure_queue(conn, queue)
        message = {
            "domain": domain,
            "command_type": command_type,
            "command_id": str(command_id),
            "correlation_id": str(correlation_id),
            "data": data or {"account": "ACC-1", "amount": 100},
            **({"reply_to": replies} if replies else {}),
        }
        msg_id = await conn.fetchval("SELECT * FROM pgmq.send($1::text, $2::jsonb)", queue, message)
        if status == "IN_TROUBLESHOOTING_QUEUE":
            await conn.execute("SELECT pgmq.archive($1::text, $2::bigint)", queue, msg_id)
        await conn.execute(
            """
            INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type,
                status, attempts, max_attempts, last_error_type, last_error_code, last_error_msg,
                reply_queue, correlation_id, batch_id)
            VALUES ($1, $2, $3, $4, $5, $6, 3, 3, 'PERMANENT', 'ACCOUNT_CLOSED',
                'account ACC-1 is closed', $7, $8, $9)
            """,
            domain,
            queue,
            msg_id,
            command_id,
            command_type,
            status,
            replies,
            correlation_id,
            batch_id,
        )
    return command_id


async def seed_many(pool: asyncpg.Pool, domain: str, count: int) -> list[uuid.UUID]:
    """`count` troubleshooting commands in one transaction, each as `seed_command` leaves one."""
    queue, replies = f"{domain}__commands", f"{domain}__replies"
    commands = [(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        await ensure_queue(conn, queue)
        msg_ids = [
            await conn.fetchval(
                "SELECT * FROM pgmq.send($1::text, $2::jsonb)",
                queue,
                {
                    "domain": domain,
                    "command_type": "DebitAccount",
                    "command_id": str(command_id),
                    "correlation_id": str(correlation_id),
                    "data": {"account": "ACC-1", "amount": 100},
                    "reply_to": replies,
                },
            )
            for command_id, correlation_id in commands
        ]
        await conn.execute("SELECT pgmq.archive($1::text, $2::bigint[])", queue, msg_ids)
        await conn.executemany(
            """
            INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id, command_type,
                status, attempts, max_attempts, last_error_type, last_error_code, last_error_msg,
                reply_queue, correlation_id)
            VALUES ($1, $2, $3, $4, 'DebitAccount', 'IN_TROUBLESHOOTING_QUEUE', 3, 3,
                'PERMANENT', 'ACCOUNT_CLOSED', 'account ACC-1 is closed', $5, $6)
            """,
            [
                (domain, queue, msg_id, command_id, replies, correlation_id)
                for msg_id, (command_id, correlation_id) in zip(msg_ids, commands, strict=True)
            ],
        )
    return [command_id for command_id, _ in commands]


async def seed_batch(
    pool: asyncpg.Pool, domain: str, *, total: int, completed: int = 0, in_troubleshooting: int
) -> uuid.UUID:
    """A batch the command bus is running, with some commands done and some parked."""
    batch_id = uuid.uuid4()
    await pool.execute(
        """
        INSERT INTO commandbus.batch (domain, batch_id, status, total_count, completed_count,
            in_troubleshooting_count)
        VALUES ($1, $2, 'IN_PROGRESS', $3, $4, $5)
        """,
        domain,
        batch_id,
        total,
        completed,
        in_troubleshooting,
    )
    return batch_id


async def replies_for(
    pool: asyncpg.Pool, queue: str, command_id: uuid.UUID
) -> list[dict[str, Any]]:
    """Every message in `queue` about `command_id` (read without consuming)."""
    exists = await pool.fetchval("SELECT 1 FROM pgmq.meta WHERE queue_name = $1", queue)
    if not exists:
        return []
    rows = await pool.fetch(
        "SELECT * FROM pgmq.read($1::text, 0, 1000) WHERE message->>'command_id' = $2",
        queue,
        str(command_id),
    )
    return [row["message"] for row in rows]


async def audit_rows(
    pool: asyncpg.Pool, domain: str, command_id: uuid.UUID, event_type: str | None = None
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        """
        SELECT * FROM commandbus.audit
        WHERE domain = $1 AND command_id = $2 AND ($3::text IS NULL OR event_type = $3)
        ORDER BY audit_id
        """,
        domain,
        command_id,
        event_type,
    )
    return rows


async def status_of(pool: asyncpg.Pool, domain: str, command_id: uuid.UUID) -> str | None:
    status: str | None = await pool.fetchval(
        "SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2",
        domain,
        command_id,
    )
    return status


async def assert_eventually(
    probe: Callable[[], Awaitable[T]],
    predicate: Callable[[T], bool] = bool,
    *,
    within: float = 20.0,
    interval: float = 0.05,
) -> T:
    """Poll `probe` until `predicate` holds on its value; fail with the last value at the end."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(interval)


async def park_as_bus(
    pool: asyncpg.Pool, domain: str, command_id: uuid.UUID, *, error_code: str = "ACCOUNT_CLOSED"
) -> None:
    """Park a command the way the reference command bus's worker does: plain SQL, no tsq."""
    await pool.execute(
        """
        UPDATE commandbus.command
        SET status = 'IN_TROUBLESHOOTING_QUEUE', last_error_type = 'PERMANENT',
            last_error_code = $3, last_error_msg = 'failed for good', updated_at = now()
        WHERE domain = $1 AND command_id = $2
        """,
        domain,
        command_id,
        error_code,
    )


async def decide_as_bus(
    pool: asyncpg.Pool | asyncpg.Connection, domain: str, command_id: uuid.UUID, status: str
) -> None:
    """Change a command's status the way another tool does (the reference library's own
    operator_cancel, its admin UI): plain SQL, no tsq."""
    await pool.execute(
        """
        UPDATE commandbus.command SET status = $3, updated_at = now()
        WHERE domain = $1 AND command_id = $2
        """,
        domain,
        command_id,
        status,
    )


def run_temporal_cli(server: TemporalDevServer, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `temporal` CLI, as an operator would, against the session's server."""
    return subprocess.run(
        [temporal_cli(), *args, "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def everything_of(pool: asyncpg.Pool, domain: str) -> dict[str, list[str]]:
    """Every row that concerns `domain`, table by table: commandbus's and tsq's rows of the
    domain, and its PGMQ queues (their meta rows, messages and archives). Equal before and
    after means nothing about the domain was written."""
    tables = await pool.fetch(
        """
        SELECT format('%I.%I', c.table_schema, c.table_name) AS name
        FROM information_schema.columns c
        JOIN information_schema.tables t USING (table_schema, table_name)
        WHERE c.table_schema IN ('commandbus', 'tsq') AND c.column_name = 'domain'
          AND t.table_type = 'BASE TABLE'
        ORDER BY 1
        """
    )
    queues = await pool.fetch(
        "SELECT queue_name FROM pgmq.meta WHERE queue_name LIKE $1 ORDER BY 1", f"{domain}%"
    )
    found: dict[str, list[str]] = {}
    for table in tables:
        rows = await pool.fetch(
            f"SELECT to_jsonb(t)::text AS row FROM {table['name']} t WHERE domain = $1 ORDER BY 1",
            domain,
        )
        found[table["name"]] = [row["row"] for row in rows]
    found["pgmq.meta"] = [row["queue_name"] for row in queues]
    for queue in queues:
        for kind in ("q", "a"):
            name = await pool.fetchval("SELECT pgmq.format_table_name($1, $2)", queue[0], kind)
            rows = await pool.fetch(
                f'SELECT to_jsonb(t)::text AS row FROM pgmq."{name}" t ORDER BY 1'
            )
            found[f"pgmq.{name}"] = [row["row"] for row in rows]
    return found


TSQ = str(Path(sys.executable).parent / "tsq")


def tsq_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `tsq` command run against the test session's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TSQ_", "TEMPORAL_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        TSQ_DATABASE_URL=settings.database_url or "",
        TEMPORAL_ADDRESS=settings.temporal_address,
        TSQ_TASK_QUEUE=settings.task_queue,
    )
    env.update(extra)
    return env


async def run_tsq(
    settings: Settings, *args: str, stdin: str = "", deadline: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run `tsq` as an operator would. stdin is always a pipe, never the terminal pytest may
    run in: no prompt can wait forever."""
    return await asyncio.to_thread(
        subprocess.run,
        [TSQ, *args],
        env=tsq_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=deadline,
    )
