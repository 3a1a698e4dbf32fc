"""PostgreSQL access shared by the worker, the SDK and the CLI: the pool and the migrations."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from importlib.resources import files
from urllib.parse import urlsplit

import asyncpg

from tsq.errors import InvalidOperationError, UnavailableError

log = logging.getLogger(__name__)

# Any number will do as long as it is fixed: concurrent `tsq migrate` runs queue up behind it.
_MIGRATION_LOCK = 0x7459_5100


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo on release: tsq leaves no session state behind (its settings are
    transaction-local, its locks transaction-scoped, it never LISTENs), and asyncpg still rolls
    back an unfinished transaction. asyncpg's default reset would cost a round trip per use."""


SETTING = "TSQ_DATABASE_URL (or DATABASE_URL)"
CONNECT_TIMEOUT_S = 10.0


def where(dsn: str) -> str:
    """The server and database a URL names, for messages: never its user's password."""
    parts = urlsplit(dsn)
    host = parts.hostname or "the local socket"
    port = f":{parts.port}" if parts.port else ""
    database = parts.path.lstrip("/") or parts.username or "postgres"
    return f"PostgreSQL at {host}{port}, database {database}"


def explain(dsn: str, err: BaseException) -> UnavailableError:
    """What a failed connection means, for the operator: the service, the setting, the fix."""
    at = where(dsn)
    user = urlsplit(dsn).username or "the default user"
    if isinstance(
        err, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        why = (
            f"refused user {user} ({type(err).__name__}): check the user and password in {SETTING}"
        )
    elif isinstance(err, asyncpg.InvalidCatalogNameError):
        why = f"has no such database: check the database in {SETTING}, or create it"
    elif isinstance(err, socket.gaierror):
        why = f"is a host name that does not resolve: check {SETTING}"
    elif isinstance(err, ConnectionRefusedError):
        why = f"refused the connection: is PostgreSQL running there? Check {SETTING}"
    elif isinstance(err, TimeoutError):
        why = f"did not answer within {CONNECT_TIMEOUT_S:g}s: is {SETTING} right?"
    else:
        why = f"could not be reached ({type(err).__name__}: {err}); check {SETTING}"
    return UnavailableError(f"{at} {why}")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections read and write json/jsonb as Python objects. A server that
    cannot be reached raises `UnavailableError` saying which, by which setting, and why."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            timeout=CONNECT_TIMEOUT_S,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as err:
        raise explain(dsn, err) from None
    assert pool is not None
    return pool


async def check_schema(pool: asyncpg.Pool, dsn: str) -> None:
    """That the database holds the bus's tables and tsq's schema, migrated to this version:
    else `UnavailableError` saying what to do (`tsq migrate`, or another database)."""
    bus = await pool.fetchval("SELECT to_regclass('commandbus.command') IS NOT NULL")
    has_tsq = await pool.fetchval("SELECT to_regclass('tsq.migration') IS NOT NULL")
    if not bus or not has_tsq:
        missing = "command bus tables (commandbus.command)" if not bus else "tsq schema"
        raise UnavailableError(
            f"{where(dsn)} has no {missing}: run `tsq migrate` there, or point {SETTING} at "
            "the command bus's database"
        )
    applied = {r["name"] for r in await pool.fetch("SELECT name FROM tsq.migration")}
    pending = [name for name in MIGRATIONS if name not in applied]
    if pending:
        raise UnavailableError(
            f"{where(dsn)} is not migrated to this tsq ({', '.join(pending)} missing): run "
            "`tsq migrate` as the schema owner"
        )


# Applied in this order, each once, recorded in tsq.migration; never edited once released.
MIGRATIONS = (
    "001_commandbus.sql",
    "002_tsq.sql",
    "003_parking.sql",
    "004_policies.sql",
    "005_bulk.sql",
    "006_rules.sql",
    "007_holds.sql",
    "008_bulk_approval.sql",
)

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS tsq;
CREATE TABLE IF NOT EXISTS tsq.migration (
    name        TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


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


async def _pending(conn: asyncpg.Connection) -> list[str]:
    if not await conn.fetchval("SELECT to_regclass('tsq.migration') IS NOT NULL"):
        return list(MIGRATIONS)
    applied = {row["name"] for row in await conn.fetch("SELECT name FROM tsq.migration")}
    return [name for name in MIGRATIONS if name not in applied]


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` did: migrations applied (none when the database was up to date), how
    PGMQ is provided, and the role it granted the worker's rights to."""

    applied: list[str]
    pgmq: str
    worker_role: str | None = None


async def migrate(dsn: str, *, worker_role: str | None = None) -> MigrationReport:
    """Bring the database up to date; safe to run any number of times, also concurrently.

    It checks before it creates: on an up-to-date database it changes nothing, so the worker
    role may run it. Applying migrations needs the schema owner, who can also grant a worker
    role (`worker_role`) exactly what the worker, the SDK and the CLI need.
    """
    conn = await asyncpg.connect(dsn)
    try:
        pending = await _pending(conn)
        if not pending and worker_role is None:
            return MigrationReport([], "present")
        # A session lock taken before the transaction begins: the transaction then sees what
        # a migration that ran meanwhile created (a lock taken inside it would leave its
        # catalog caches as they were when it began).
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        pgmq = "present"
        try:
            async with conn.transaction():
                pending = await _pending(conn)
                if pending:
                    await conn.execute(_BOOTSTRAP)
                    pgmq = await _install_pgmq(conn)
                for name in pending:
                    await conn.execute(_sql(name))
                    await conn.execute("INSERT INTO tsq.migration (name) VALUES ($1)", name)
                if worker_role is not None:
                    await conn.execute("SELECT tsq.grant_worker($1)", worker_role)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    except asyncpg.InsufficientPrivilegeError as err:
        user = await conn.fetchval("SELECT current_user")
        raise InvalidOperationError(
            f"role {user} may not change the schema ({err}); "
            + (
                f"the database needs {', '.join(pending)}: "
                if pending
                else "granting a worker role needs the owner: "
            )
            + "run `tsq migrate` as the owner of the commandbus and tsq schemas"
        ) from None
    finally:
        await conn.close()
    log.info("database migrated: %s (pgmq: %s)", ", ".join(pending) or "up to date", pgmq)
    return MigrationReport(pending, pgmq, worker_role)
