"""Services the fault suite owns, so it can break them: PostgreSQL, Temporal, `tsq worker`s.

Nothing here touches the session services of `tests/conftest.py`: the suite runs its own embedded
PostgreSQL (stopped and restarted by tests), its own Temporal dev server with a database file
(restarted by tests) and real `tsq worker` processes (killed by tests). Workers connect as a role
with a password, which the suite then looks for wherever a secret must not appear.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from tests.faults.figures import FIGURES, Figures
from tests.faults.services import Postgres, Temporal, Workers, worker_env
from tests.faults.support import PENDING_CALLS, WORKER_PASSWORD, WORKER_ROLE
from tsq.client import TroubleshootingClient
from tsq.db import create_pool, migrate
from tsq.settings import Settings
from tsq.temporal import connect

DATABASE = "tsq_faults"

# Test-only hooks in their own schema. `faults.pause(at)` makes a decision of a held domain sleep
# inside its transaction at one step; a hold only applies to the server run it was made in, so
# a restart of PostgreSQL releases it. `faults.status_change` counts every status transition,
# committed ones only, since it is written in the same transaction.
FAULT_HOOKS = """
CREATE SCHEMA faults;

CREATE TABLE faults.hold (
    domain          text NOT NULL,
    at              text NOT NULL,
    seconds         float8 NOT NULL,
    server_started  timestamptz NOT NULL DEFAULT pg_postmaster_start_time(),
    PRIMARY KEY (domain, at)
);

CREATE FUNCTION faults.pause() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    held_domain text;
    pause float8;
BEGIN
    IF TG_TABLE_SCHEMA = 'pgmq' THEN
        held_domain := NEW.message->>'domain';
    ELSE
        held_domain := NEW.domain;
    END IF;
    SELECT seconds INTO pause FROM faults.hold
    WHERE domain = held_domain AND at = TG_ARGV[0]
      AND server_started = pg_postmaster_start_time();
    IF pause IS NOT NULL THEN
        PERFORM pg_sleep(pause);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER faults_pause_status AFTER UPDATE OF status ON commandbus.command
    FOR EACH ROW EXECUTE FUNCTION faults.pause('status');
CREATE TRIGGER faults_pause_audit AFTER INSERT ON commandbus.audit
    FOR EACH ROW EXECUTE FUNCTION faults.pause('audit');
CREATE TRIGGER faults_pause_effect AFTER INSERT ON tsq.effect
    FOR EACH ROW EXECUTE FUNCTION faults.pause('effect');

-- Each PGMQ queue is a table of its own: the message step is watched queue by queue.
CREATE FUNCTION faults.watch_queue(queue text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER faults_pause_message AFTER INSERT ON pgmq.%I '
        'FOR EACH ROW EXECUTE FUNCTION faults.pause(%L)',
        'q_' || queue, 'message');
END $$;

CREATE TABLE faults.status_change (
    domain      text NOT NULL,
    command_id  uuid NOT NULL,
    old_status  text,
    new_status  text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION faults.log_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO faults.status_change (domain, command_id, old_status, new_status)
    VALUES (NEW.domain, NEW.command_id, OLD.status, NEW.status);
    RETURN NULL;
END $$;

CREATE TRIGGER faults_log_status AFTER UPDATE OF status ON commandbus.command
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION faults.log_status();
"""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES.empty():
        return
    terminalreporter.write_sep("=", "tsq fault-injection figures")
    for line in FIGURES.lines():
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
async def _cancel_leftover_calls() -> AsyncIterator[None]:
    """A failed test must not leave callers waiting into the next one."""
    yield
    leftovers = list(PENDING_CALLS)
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


@pytest.fixture(scope="module", autouse=True)
async def _no_parkings_for_the_next_module(db: asyncpg.Pool) -> AsyncIterator[None]:
    """Close what a module's tests leave parked once they are done (their workers are gone).

    The suite shares one database, and a worker adopts every open parking in it, as the one
    deployment of a database does. Without this, the next module's workers would start and
    tell the workflows of hundreds of earlier commands on their own task queue before its own.
    Within a module, tests may share commands (module fixtures) and keep them parked.
    """
    yield
    await db.execute(
        """
        UPDATE tsq.parking SET left_at = coalesce(left_at, clock_timestamp()), todo = NULL
        WHERE left_at IS NULL OR todo IS NOT NULL
        """
    )


@pytest.fixture(scope="session")
def figures() -> Figures:
    return FIGURES


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # Not under pytest's temporary folder: when the suite runs as root, the server runs as an
    # unprivileged user, and every pytest run makes that folder private to root again.
    parent = Path(tempfile.mkdtemp(prefix="tsq-faults-pg-"))
    parent.chmod(0o755)
    server = Postgres(parent / "data")
    try:
        yield server
    finally:
        if server.running():
            server.stop("fast")
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def temporal_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Temporal]:
    server = Temporal(tmp_path_factory.mktemp("temporal"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def admin_db_url(postgres: Postgres) -> str:
    """The suite's database, migrated, with the fault hooks; superuser URL, no password."""
    admin = await asyncpg.connect(postgres.url("postgres"))
    try:
        for statement in (
            # The worker role owns nothing and is no superuser: what `tsq migrate
            # --worker-role` grants it is all the workers have.
            await admin.fetchval(
                "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                WORKER_ROLE,
                WORKER_PASSWORD,
            ),
            await admin.fetchval("SELECT format('CREATE DATABASE %I', $1::text)", DATABASE),
        ):
            await admin.execute(statement)
    finally:
        await admin.close()
    url = postgres.url(DATABASE)
    await migrate(url, worker_role=WORKER_ROLE)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FAULT_HOOKS)
        await conn.execute(
            await conn.fetchval(
                """
                SELECT format('GRANT USAGE ON SCHEMA faults TO %1$I; '
                    'GRANT SELECT ON faults.hold TO %1$I; '
                    'GRANT INSERT ON faults.status_change TO %1$I', $1::text)
                """,
                WORKER_ROLE,
            )
        )
    finally:
        await conn.close()
    return url


@pytest.fixture(scope="session")
def worker_db_url(postgres: Postgres, admin_db_url: str) -> str:
    """What workers get as TSQ_DATABASE_URL: a role with a password."""
    return postgres.url(DATABASE, WORKER_ROLE, WORKER_PASSWORD)


@pytest.fixture(scope="session")
async def db(admin_db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(admin_db_url, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def temporal_client(temporal_dev: Temporal) -> Client:
    return await connect(Settings(temporal_address=temporal_dev.address))


@pytest.fixture
def task_queue() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tsq_client(temporal_client: Client, db: asyncpg.Pool, task_queue: str) -> TroubleshootingClient:
    """The SDK client on the test's task queue; the work is done by worker processes only."""
    return TroubleshootingClient(temporal_client, db, task_queue=task_queue)


@pytest.fixture
def workers(
    tmp_path: Path,
    worker_db_url: str,
    temporal_dev: Temporal,
    task_queue: str,
    figures: Figures,
) -> Iterator[Workers]:
    """Start `tsq worker` processes on the test's task queue: `await workers.start("name")`."""
    started = Workers(tmp_path, worker_env(worker_db_url, temporal_dev, task_queue))
    yield started
    leaked = started.close(WORKER_PASSWORD)
    figures.secrets_leaked += leaked
    assert not leaked, "the database password appears in a worker's output"
