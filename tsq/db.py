"""PostgreSQL access shared by the worker, the SDK and the CLI: the pool and the migrations."""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from typing import Any

import asyncpg

from tsq.errors import InvalidInputError
from tsq.models import QUEUE_NAME_RE

log = logging.getLogger(__name__)

TSQ_STATUS = "IN_TROUBLESHOOTING_QUEUE"
# Any number will do as long as it is fixed: concurrent `tsq migrate` runs queue up behind it.
_MIGRATION_LOCK = 0x7459_5100


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo on release: tsq leaves no session state behind (its settings are
    transaction-local, its locks transaction-scoped, it never LISTENs), and asyncpg still rolls
    back an unfinished transaction. asyncpg's default reset would cost a round trip per use."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections read and write json/jsonb as Python objects."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


def check_queue_name(name: str) -> str:
    """A PGMQ queue name becomes part of table names: refuse anything but a plain identifier."""
    if not QUEUE_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"{name!r} is not a valid PGMQ queue name (letters, digits and _, "
            "starting with a letter or _, at most 47 characters)"
        )
    return name


def _sql(name: str) -> str:
    return files("tsq").joinpath("sql", name).read_text(encoding="utf-8")


async def _install_pgmq(conn: asyncpg.Connection) -> str:
    if await conn.fetchval("SELECT to_regclass('pgmq.meta') IS NOT NULL"):
        return "present"
    available = await conn.fetchval(
        "SELECT count(*) > 0 FROM pg_available_extensions WHERE name = 'pgmq'"
    )
    if available:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    from pgmq.install import get_embedded_install_sql

    await conn.execute(get_embedded_install_sql())
    return "sql-only"


async def migrate(dsn: str) -> dict[str, Any]:
    """Create what is missing; safe to run any number of times, also concurrently."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            pgmq = await _install_pgmq(conn)
            await conn.execute(_sql("001_commandbus.sql"))
            await conn.execute(_sql("002_tsq.sql"))
    finally:
        await conn.close()
    log.info("database migrated (pgmq: %s)", pgmq)
    return {"pgmq": pgmq}


async def ensure_queue(conn: asyncpg.Connection, queue: str) -> None:
    """Create a PGMQ queue if it does not exist yet (a reply is never dropped for want of one)."""
    check_queue_name(queue)
    exists = await conn.fetchval("SELECT 1 FROM pgmq.meta WHERE queue_name = $1", queue)
    if not exists:
        await conn.execute("SELECT pgmq.create($1)", queue)
