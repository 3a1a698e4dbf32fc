"""A worker killed around its timers firing: a policy's expiry is carried out once, by the
worker that comes next, with one audit row and one reply per command."""

from __future__ import annotations

import asyncio

import asyncpg
from temporalio.client import Client

from tests.faults.figures import Figures
from tests.faults.services import Workers
from tests.faults.support import CANCEL, hold, release, seed, verify_exactly_once, wait_paused
from tests.helpers import new_domain
from tsq.client import TroubleshootingClient

COMMANDS = 12


async def test_worker_killed_as_expiry_timers_fire_decides_each_once(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Expiries held inside their transaction when the worker is SIGKILLed: the successor
    carries each out once, the batch closes once."""
    seeded = await seed(db, new_domain(), COMMANDS)
    await tsq_client.set_policy(
        seeded.domain, "p", expire_after="3s", expire_decision="cancel", reason="expired"
    )
    victim = await workers.start("victim")
    await hold(db, seeded.domain, "audit")
    await asyncio.gather(*(tsq_client.start_workflow(seeded.domain, cid) for cid in seeded.ids))
    paused = await wait_paused(db, COMMANDS)
    victim.kill()
    await release(db, seeded.domain)
    figures.fault("worker SIGKILL while policy expiries were inside their transaction", paused)
    await workers.start("successor")
    await verify_exactly_once(db, temporal_client, CANCEL, seeded, figures)
