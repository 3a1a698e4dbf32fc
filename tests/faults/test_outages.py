"""PostgreSQL and Temporal go away and come back in the middle of decisions: nothing is lost."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from tests.faults.figures import Figures
from tests.faults.services import Postgres, Temporal, Workers
from tests.faults.support import (
    DECISIONS,
    Seeded,
    assert_answers,
    decide_all,
    handle_of,
    hold,
    seed,
    state_of,
    verify_exactly_once,
    wait_paused,
)
from tests.helpers import assert_eventually, new_domain
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState

# How long PostgreSQL stays down: longer than the first few retries of a decision.
OUTAGE_SECONDS = 3.0


async def all_awaiting(temporal: Client, seeded: Seeded, within: float = 20) -> None:
    """Every workflow of `seeded` answers its `state` query: waiting for an operator."""

    async def states() -> list[TsqState]:
        return [(await state_of(temporal, seeded.domain, cid)).state for cid in seeded.ids]

    await assert_eventually(
        states, lambda found: set(found) == {TsqState.AWAITING_OPERATOR}, within=within
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_stopped_during_decisions(
    mode: str,
    postgres: Postgres,
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """PostgreSQL stopped with decisions in flight and arriving: they wait, then happen once."""
    worker = await workers.start("worker")
    groups = [(decision, await seed(db, new_domain(), 12)) for decision in DECISIONS]
    for _, seeded in groups:
        # Keeps the first decisions inside their transaction until the server goes down; a
        # hold only lasts as long as the server run it was made in.
        await hold(db, seeded.domain, "audit")
        await asyncio.gather(
            *(tsq_client.start_workflow(seeded.domain, cid) for cid in seeded.ids[4:])
        )
    callers = [
        await decide_all(decision, tsq_client, temporal_client, seeded, seeded.ids[:4])
        for decision, seeded in groups
    ]
    in_flight = await wait_paused(db, 10)

    await asyncio.to_thread(postgres.stop, mode)
    # Asked for while the database is down: signals and updates still reach the workflows.
    for decision, seeded in groups:
        callers.append(
            await decide_all(
                decision,
                tsq_client,
                temporal_client,
                seeded,
                seeded.ids[4:],
                ("signal", "update"),
                started=True,
            )
        )
    await asyncio.sleep(OUTAGE_SECONDS)
    await asyncio.to_thread(postgres.start)
    await db.expire_connections()
    figures.fault(f"PostgreSQL stopped ({mode}), decisions inside their transaction", in_flight)
    figures.fault(
        f"PostgreSQL stopped ({mode}), decisions asked for during the outage",
        sum(len(seeded.ids[4:]) for _, seeded in groups),
    )

    for decision, seeded in groups:
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
    for asked in callers:
        assert_answers(await asked.answers(within=60))
    # The worker did meet the outage: its attempts failed while the server was down.
    assert "Connect call failed" in worker.output() or "ConnectionDoesNotExist" in worker.output()


async def test_temporal_restarted_with_waiting_workflows_and_decisions_in_flight(
    temporal_dev: Temporal,
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Temporal restarted on its database file: waiting workflows survive and can be decided."""
    await workers.start("worker")
    waiting = {decision: await seed(db, new_domain(), 8) for decision in DECISIONS}
    in_flight = {decision: await seed(db, new_domain(), 4) for decision in DECISIONS}
    for seeded in waiting.values():
        await asyncio.gather(*(tsq_client.start_workflow(seeded.domain, cid) for cid in seeded.ids))
    for seeded in waiting.values():
        await all_awaiting(temporal_client, seeded)
    # Signals only: a signal is durable once the call returns, an update once accepted.
    for decision, seeded in in_flight.items():
        await hold(db, seeded.domain, "audit", seconds=4)
        await decide_all(decision, tsq_client, temporal_client, seeded, entrances=("signal",))
    paused = await wait_paused(db, 10)

    await asyncio.to_thread(temporal_dev.restart)
    figures.fault(
        "Temporal restarted, workflows waiting", sum(len(s.ids) for s in waiting.values())
    )
    figures.fault("Temporal restarted, decisions inside their transaction", paused)

    for seeded in waiting.values():
        for cid in seeded.ids:
            description = await handle_of(temporal_client, seeded.domain, cid).describe()
            assert description.status is WorkflowExecutionStatus.RUNNING
        # Answered once the worker is back in touch with the restarted server.
        await all_awaiting(temporal_client, seeded, within=60)
    callers = [
        await decide_all(decision, tsq_client, temporal_client, seeded, started=True)
        for decision, seeded in waiting.items()
    ]
    for decision, seeded in in_flight.items():
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
    for decision, seeded in waiting.items():
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
    for asked in callers:
        assert_answers(await asked.answers(within=60))
