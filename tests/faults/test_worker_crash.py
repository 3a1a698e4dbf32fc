"""`tsq worker` SIGKILLed at each step boundary of a decision: a new worker finishes it, once.

A decision is one PostgreSQL transaction: status change, message (the reply, or for a retry the
command re-sent), audit row, batch counters and idempotency record, in that order; then the
workflow records the outcome. The worker is killed inside the transaction just after each of
those steps (a test trigger pauses the transaction there), and after the commit but before the
workflow recorded it (a worker that kills itself right after the real activity returns).

Every kind of decision gets its own kill rounds; the rounds run back to back and one new worker
finishes them all, so the ten seconds Temporal waits for a dead worker's workflow task are
spent once per test.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from temporalio.client import Client

from tests.faults.figures import Figures
from tests.faults.services import Workers
from tests.faults.support import (
    CANCEL,
    DECISIONS,
    Callers,
    Decision,
    Seeded,
    assert_answers,
    decide_all,
    handle_of,
    hold,
    release,
    seed,
    verify_exactly_once,
    wait_paused,
)
from tests.helpers import assert_eventually, new_domain
from tsq.client import TroubleshootingClient
from tsq.workflows.shell import ACTIVITY_TIMEOUT

# Steps of the decision's transaction, in the order it reaches them.
BOUNDARIES = {
    "status": "after the status change",
    "message": "after the reply (retry: the command) was sent",
    "audit": "after the audit row",
    "effect": "after the idempotency record, before commit",
}
INTERRUPTED_PER_BOUNDARY = 20
# Two victim workers, each with a pool of ten connections: at most twenty decisions can be
# inside their transaction at once; the others wait for a connection when the kill comes.
VICTIMS = 2
DECISIONS_PER_ROUND = 30
AFTER_COMMIT = 24
# The rounds' workflows are checked after one another, each check waiting up to 90 s: a
# workflow that does not finish fails the test with what holds it, not with the timeout.
pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
async def test_worker_killed_inside_the_decision_transaction(
    boundary: str,
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Killed with decisions paused inside their transaction: each is carried out once later."""
    rounds: list[tuple[Decision, Seeded, Callers]] = []
    for decision in DECISIONS:
        interrupted = 0
        while interrupted < INTERRUPTED_PER_BOUNDARY:
            # The batch counters move last, after every step paused here: the decisions of one
            # batch are all inside their transactions at once.
            seeded = await seed(db, new_domain(), DECISIONS_PER_ROUND, batch=True)
            await hold(db, seeded.domain, boundary, queue=f"{seeded.domain}__{decision.sends_to}")
            victims = await asyncio.gather(
                *(workers.start(f"victim-{decision}-{i}") for i in range(VICTIMS))
            )
            callers = await decide_all(decision, tsq_client, temporal_client, seeded)
            paused = await wait_paused(db, VICTIMS * 10)
            for victim in victims:
                victim.kill()
            await release(db, seeded.domain)
            figures.fault(f"worker SIGKILL inside the transaction, {BOUNDARIES[boundary]}", paused)
            figures.fault(
                "worker SIGKILL before the decision's transaction began",
                DECISIONS_PER_ROUND - paused,
            )
            interrupted += paused
            rounds.append((decision, seeded, callers))

    await workers.start("finisher")
    for decision, seeded, callers in rounds:
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
        assert_answers(await callers.answers(within=60))


async def test_worker_killed_after_commit_before_the_workflow_recorded_it(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Killed after decisions committed, before workflows recorded them: nothing happens twice."""
    rounds: list[tuple[Decision, Seeded, Callers]] = []
    for decision in DECISIONS:
        seeded = await seed(db, new_domain(), AFTER_COMMIT)
        victim = await workers.start(
            f"victim-{decision}-after-commit",
            fault_script=True,
            env={"TSQ_FAULT_KILL_AFTER": str(AFTER_COMMIT), "TSQ_FAULT_KILL_WITHIN": "15"},
        )
        callers = await decide_all(decision, tsq_client, temporal_client, seeded)
        code = await asyncio.to_thread(victim.process.wait, 60)
        assert code == -9, victim.output()
        committed = sum(line.startswith("committed ") for line in victim.output().splitlines())
        assert committed == AFTER_COMMIT, victim.output()
        figures.fault("worker SIGKILL after commit, before the workflow recorded it", committed)

        # Committed in PostgreSQL, unknown to Temporal: every decision's record is there, and
        # no workflow history holds the activity's result.
        recorded = await db.fetchval(
            "SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind = $2",
            seeded.domain,
            decision.name,
        )
        assert recorded == AFTER_COMMIT
        for cid in seeded.ids:
            handle = handle_of(temporal_client, seeded.domain, cid)
            events = [event async for event in handle.fetch_history_events()]
            assert not any(e.HasField("marker_recorded_event_attributes") for e in events)
        rounds.append((decision, seeded, callers))

    await workers.start("finisher")
    for decision, seeded, callers in rounds:
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
        assert_answers(await callers.answers(within=60))


async def test_decision_whose_first_attempt_timed_out_replays_on_a_new_worker(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """A first attempt that outlived its timeout (the database stalled inside the transaction),
    then the worker killed: the new worker replays that timeout as the first one lived it,
    and the decision is carried out once."""
    seeded = await seed(db, new_domain(), 3)
    await hold(db, seeded.domain, "status", seconds=ACTIVITY_TIMEOUT.total_seconds() + 10)
    victim = await workers.start("victim-timeout")
    callers = await decide_all(CANCEL, tsq_client, temporal_client, seeded)

    async def timed_out(cid: uuid.UUID) -> bool:
        history = await handle_of(temporal_client, seeded.domain, cid).fetch_history()
        return any(
            e.marker_recorded_event_attributes.failure.HasField("timeout_failure_info")
            for e in history.events
            if e.HasField("marker_recorded_event_attributes")
        )

    await assert_eventually(
        lambda: asyncio.gather(*(timed_out(cid) for cid in seeded.ids)),
        all,
        within=ACTIVITY_TIMEOUT.total_seconds() + 30,
    )
    await release(db, seeded.domain)
    victim.kill()
    await workers.start("finisher")
    await verify_exactly_once(db, temporal_client, CANCEL, seeded, figures)
    assert_answers(await callers.answers(within=60))
    figures.fault("decision's first attempt timed out, worker killed, replayed", len(seeded.ids))
