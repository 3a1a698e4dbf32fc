"""SIGTERM to `tsq worker` in the middle of decisions: it exits 0, and no decision is lost."""

from __future__ import annotations

import asyncio

import asyncpg
from temporalio.client import Client

from tests.faults.figures import Figures
from tests.faults.services import Workers
from tests.faults.support import (
    DECISIONS,
    assert_answers,
    decide_all,
    hold,
    release,
    seed,
    verify_exactly_once,
    wait_paused,
)
from tests.helpers import new_domain
from tsq.client import TroubleshootingClient


async def test_sigterm_during_decisions_exits_zero_and_loses_nothing(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """SIGTERM with decisions inside their transaction: exit 0; each decision is done once."""
    draining = await workers.start("draining")
    groups = []
    for decision in DECISIONS:
        seeded = await seed(db, new_domain(), 10)
        # Each decision spends a second and a half inside its transaction: ten are in flight
        # and the others wait for a connection when the signal comes.
        await hold(db, seeded.domain, "audit", seconds=1.5)
        callers = await decide_all(decision, tsq_client, temporal_client, seeded)
        groups.append((decision, seeded, callers))
    in_flight = await wait_paused(db, 10)
    code = await asyncio.to_thread(draining.terminate, 60)
    assert code == 0, draining.output()
    figures.fault("worker SIGTERM, decisions inside their transaction", in_flight)
    for _, seeded, _ in groups:
        await release(db, seeded.domain)

    await workers.start("successor")
    for decision, seeded, callers in groups:
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
        assert_answers(await callers.answers(within=60))
