"""The watcher under faults: several workers draining at once, a worker killed mid-drain,
PostgreSQL restarted under it, Temporal down while the bus parks commands. Every parked command
ends up with exactly one workflow run; none is missed.

The bus is plain SQL: commands are inserted already parked, many in one transaction.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from temporalio.client import Client

from tests.faults.figures import Figures
from tests.faults.services import Postgres, Temporal, Workers
from tests.faults.support import WORKER_ROLE, count, park_burst
from tests.helpers import assert_eventually, new_domain


async def assert_one_run_each(
    temporal: Client, db: asyncpg.Pool, domain: str, ids: list[uuid.UUID], within: float
) -> None:
    """Every command of `domain` has one running workflow, no other run was ever made, and the
    watcher's rows are done (rows a killed worker held wait for its claims to run out)."""
    running = f'CommandDomain = "{domain}" AND ExecutionStatus = "Running"'
    await assert_eventually(
        lambda: count(temporal, running), lambda n: n == len(ids), within=within
    )
    assert await count(temporal, f'CommandDomain = "{domain}"') == len(ids)
    await assert_eventually(
        lambda: db.fetchval(
            "SELECT count(*) FROM tsq.parking WHERE domain = $1 AND todo IS NOT NULL", domain
        ),
        lambda pending: pending == 0,
        within=within,
    )
    assert await count(temporal, f'CommandDomain = "{domain}"') == len(ids)


async def test_several_workers_start_each_parked_command_once(
    db: asyncpg.Pool, temporal_client: Client, workers: Workers, figures: Figures
) -> None:
    """Three workers drain one burst at once: every command gets one run, none is missed."""
    await asyncio.gather(*(workers.start(f"drainer-{i}") for i in range(3)))
    domain = new_domain()
    ids = await park_burst(db, domain, 240)
    await assert_one_run_each(temporal_client, db, domain, ids, within=90)
    figures.fault("watcher: commands parked by plain SQL, three workers draining at once", 240)


async def test_worker_killed_mid_drain_leaves_no_command_behind(
    db: asyncpg.Pool, temporal_client: Client, workers: Workers, figures: Figures
) -> None:
    """SIGKILL while a burst is half started: another worker takes the claims over."""
    victim = await workers.start("victim")
    domain = new_domain()
    ids = await park_burst(db, domain, 300)
    running = f'CommandDomain = "{domain}" AND ExecutionStatus = "Running"'
    started = await assert_eventually(
        lambda: count(temporal_client, running), lambda n: n >= 20, within=60
    )
    victim.kill()
    claimed = await db.fetchval(
        """
        SELECT count(*) FROM tsq.parking
        WHERE domain = $1 AND todo IS NOT NULL AND claimed_until > now()
        """,
        domain,
    )
    assert started < len(ids), "the worker finished before it was killed"
    await workers.start("successor")
    await assert_one_run_each(temporal_client, db, domain, ids, within=120)
    figures.fault("watcher: worker SIGKILLed mid-drain, claims it held", claimed)


async def test_postgres_restarted_under_the_watcher(
    postgres: Postgres,
    db: asyncpg.Pool,
    temporal_client: Client,
    workers: Workers,
    figures: Figures,
) -> None:
    """PostgreSQL restarts: the watcher listens again, and parks after it get workflows."""
    await workers.start("worker")
    before = new_domain()
    before_ids = await park_burst(db, before, 20)
    await assert_one_run_each(temporal_client, db, before, before_ids, within=60)
    await asyncio.to_thread(postgres.stop, "fast")
    await asyncio.to_thread(postgres.start)
    await db.expire_connections()
    # The watcher listens again, on a connection of its own made after the restart.
    await assert_eventually(
        lambda: db.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE usename = $1 AND backend_start > pg_postmaster_start_time()
              AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')
            """,
            WORKER_ROLE,
        ),
        lambda n: n >= 1,
        within=30,
    )
    after = new_domain()
    after_ids = await park_burst(db, after, 20)
    await assert_one_run_each(temporal_client, db, after, after_ids, within=60)
    figures.fault("watcher: PostgreSQL restarted, commands parked after it", 20)


async def test_temporal_down_while_commands_are_parked(
    temporal_dev: Temporal,
    db: asyncpg.Pool,
    temporal_client: Client,
    workers: Workers,
    figures: Figures,
) -> None:
    """Temporal away while the bus parks: the rows keep the work; it is done once it is back."""
    await workers.start("worker")
    await asyncio.to_thread(temporal_dev.stop)
    try:
        domain = new_domain()
        ids = await park_burst(db, domain, 30)
        # The watcher tries, fails and keeps the work for later.
        await assert_eventually(
            lambda: db.fetchval(
                "SELECT count(*) FROM tsq.parking WHERE domain = $1 AND problem IS NOT NULL",
                domain,
            ),
            lambda n: n > 0,
            within=30,
        )
    finally:
        await asyncio.to_thread(temporal_dev.start)
    await assert_one_run_each(temporal_client, db, domain, ids, within=120)
    figures.fault("watcher: Temporal down, commands parked meanwhile", len(ids))
