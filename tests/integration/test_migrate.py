"""`tsq migrate` on an empty database and on one the reference command bus already uses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.helpers import scratch_database
from tsq.db import MIGRATIONS, migrate

# The reference command bus's own layout, as it creates it (no tsq objects), with its data.
REFERENCE_SCHEMA = """
CREATE SCHEMA commandbus;
CREATE TABLE commandbus.batch (
    domain TEXT NOT NULL, batch_id UUID NOT NULL, name TEXT NULL, custom_data JSONB NULL,
    status TEXT NOT NULL DEFAULT 'PENDING', total_count INT NOT NULL DEFAULT 0,
    completed_count INT NOT NULL DEFAULT 0, canceled_count INT NOT NULL DEFAULT 0,
    in_troubleshooting_count INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    started_at TIMESTAMPTZ NULL, completed_at TIMESTAMPTZ NULL,
    batch_type TEXT NOT NULL DEFAULT 'COMMAND', PRIMARY KEY (domain, batch_id));
CREATE TABLE commandbus.command (
    domain TEXT NOT NULL, queue_name TEXT NOT NULL, msg_id BIGINT NULL, command_id UUID NOT NULL,
    command_type TEXT NOT NULL, status TEXT NOT NULL, attempts INT NOT NULL DEFAULT 0,
    max_attempts INT NOT NULL, lease_expires_at TIMESTAMPTZ NULL, last_error_type TEXT NULL,
    last_error_code TEXT NULL, last_error_msg TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    reply_queue TEXT NOT NULL DEFAULT '', correlation_id UUID NULL, batch_id UUID NULL);
CREATE UNIQUE INDEX uq_command_domain_cmdid ON commandbus.command(domain, command_id);
CREATE TABLE commandbus.audit (
    audit_id BIGSERIAL PRIMARY KEY, domain TEXT NOT NULL, command_id UUID NOT NULL,
    event_type TEXT NOT NULL, ts TIMESTAMPTZ NOT NULL DEFAULT NOW(), details_json JSONB NULL);
CREATE TABLE commandbus.payload_archive (
    domain TEXT NOT NULL, command_id UUID NOT NULL, payload_json JSONB NOT NULL,
    archived_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), PRIMARY KEY(domain, command_id));
CREATE FUNCTION commandbus.sp_tsq_cancel(p_domain TEXT, p_batch_id UUID) RETURNS BOOLEAN
    LANGUAGE sql AS $$ SELECT p_batch_id IS NOT NULL $$;
"""


@pytest.fixture
async def scratch_url(admin_url: str) -> AsyncIterator[str]:
    """A new, empty database, dropped afterwards."""
    async with scratch_database(admin_url) as url:
        yield url


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS t FROM pg_tables "
        "WHERE schemaname IN ('commandbus', 'tsq', 'pgmq')"
    )
    return {row["t"] for row in rows}


async def test_migrate_empty_database_creates_everything(scratch_url: str) -> None:
    """On an empty database: the reference tables, PGMQ and tsq's own table appear."""
    result = await migrate(scratch_url)
    assert result.pgmq in ("extension", "sql-only")
    conn = await asyncpg.connect(scratch_url)
    try:
        tables = await _tables(conn)
        assert {
            "commandbus.command",
            "commandbus.audit",
            "commandbus.batch",
            "commandbus.payload_archive",
            "tsq.effect",
            "pgmq.meta",
        } <= tables
        await conn.execute("SELECT pgmq.create('x__replies')")
        assert await conn.fetchval("SELECT count(*) FROM pgmq.meta") == 1
    finally:
        await conn.close()


async def test_concurrent_and_repeated_migrations_succeed(scratch_url: str) -> None:
    """Three runs at once on an empty database, then one more: all succeed, one installs."""
    results = await asyncio.gather(*(migrate(scratch_url) for _ in range(3)))
    results.append(await migrate(scratch_url))
    assert sorted(r.pgmq for r in results).count("present") == 3
    assert [name for r in results for name in r.applied] == list(MIGRATIONS)


async def test_migrate_keeps_reference_database_and_its_rows(scratch_url: str) -> None:
    """On a database the command bus uses: rows, columns and its own functions stay as they were."""
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute(REFERENCE_SCHEMA)
        command_id, batch_id = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO commandbus.batch (domain, batch_id, total_count) "
            "VALUES ('payments', $1, 3)",
            batch_id,
        )
        await conn.execute(
            """
            INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,
                max_attempts, reply_queue, batch_id)
            VALUES ('payments', 'payments__commands', $1, 'DebitAccount',
                'IN_TROUBLESHOOTING_QUEUE', 3, 'payments__replies', $2)
            """,
            command_id,
            batch_id,
        )
        await conn.execute(
            "INSERT INTO commandbus.audit (domain, command_id, event_type) "
            "VALUES ('payments', $1, 'MOVED_TO_TSQ')",
            command_id,
        )
        before = await conn.fetch("SELECT * FROM commandbus.command")
        own_function = await conn.fetchval(
            "SELECT prosrc FROM pg_proc WHERE proname = 'sp_tsq_cancel'"
        )

        await migrate(scratch_url)
        await migrate(scratch_url)

        assert await conn.fetch("SELECT * FROM commandbus.command") == before
        assert await conn.fetchval("SELECT count(*) FROM commandbus.audit") == 1
        assert await conn.fetchval("SELECT batch_type FROM commandbus.batch") == "COMMAND"
        assert (
            await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'sp_tsq_cancel'")
            == own_function
        )
        assert "tsq.effect" in await _tables(conn)
    finally:
        await conn.close()
