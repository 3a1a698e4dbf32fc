"""Many clients decide the same commands at the same moment: exactly one decision is carried out.

Every command gets, all at once, signals and updates of every decision kind from several client
connections, plus SDK calls, while two worker processes serve the task queue. One decision
wins; every update that lost is refused with InvalidOperationError, every signal that lost is
kept visible as refused.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from tests.faults.figures import Figures
from tests.faults.services import Temporal, Workers
from tests.faults.support import (
    DECISIONS,
    handle_of,
    seed,
    verify_exactly_once,
    winners,
)
from tests.helpers import audit_rows, new_domain
from tsq.client import TroubleshootingClient
from tsq.errors import ERROR_TYPES, InvalidOperationError
from tsq.models import DecisionOutcome, StateView
from tsq.settings import Settings
from tsq.temporal import connect

COMMANDS = 12
CLIENTS = 4
# Per command and decision kind: this many signals, this many updates, one SDK call.
PER_ENTRANCE = 2


def _lost(answer: Any) -> bool:
    """A refusal a decision that lost the race may get; the first is what callers should see."""
    if isinstance(answer, InvalidOperationError):
        return True
    if isinstance(answer, WorkflowUpdateFailedError):
        cause = answer.cause
        refusal = ERROR_TYPES.get(cause.type or "") if isinstance(cause, ApplicationError) else None
        return refusal is not None and issubclass(refusal, InvalidOperationError)
    if isinstance(answer, RPCError):
        # Sent after the workflow closed: the server refuses. Or reached the workflow task in
        # which it completed: the server drops the update, the caller is told to try again
        # (the SDK does, and then reports the decision that won).
        return answer.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION)
    return False


def _dropped(answer: Any, who: str) -> bool:
    """A raw Temporal update that won, then was dropped with the task the server rejected.

    The server rejects the workflow task that completes the workflow when other messages
    arrived meanwhile, and drops the update answered in it. tsq's SDK finds its request's
    recorded outcome and reports it; a caller of the raw API is told to try again.
    """
    return (
        "-update-" in who
        and isinstance(answer, RPCError)
        and answer.status == RPCStatusCode.FAILED_PRECONDITION
    )


async def test_concurrent_deciders_carry_out_exactly_one_decision(
    temporal_dev: Temporal,
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Signals, updates and SDK calls of every kind race per command: one wins, once."""
    seeded = await seed(db, new_domain(), COMMANDS)
    await asyncio.gather(workers.start("racer-a"), workers.start("racer-b"))
    clients = [
        await connect(Settings(temporal_address=temporal_dev.address)) for _ in range(CLIENTS)
    ]
    sdks = [TroubleshootingClient(c, db, task_queue=tsq_client.task_queue) for c in clients]
    await asyncio.gather(*(tsq_client.start_workflow(seeded.domain, cid) for cid in seeded.ids))
    # The run the race is about: a racing SDK call may start a later one after it closed.
    first_run = {
        cid: (await handle_of(temporal_client, seeded.domain, cid).describe()).run_id
        for cid in seeded.ids
    }

    def racers(index: int, cid: uuid.UUID) -> list[tuple[str, str, Any]]:
        calls: list[tuple[str, str, Any]] = []
        for decision in DECISIONS:
            for k in range(PER_ENTRANCE):
                client = clients[(index + k) % CLIENTS]
                handle = client.get_workflow_handle(handle_of(client, seeded.domain, cid).id)
                who = f"{decision}-signal-{k}"
                calls.append(("signal", who, handle.signal(decision.signal, decision.request(who))))
                who = f"{decision}-update-{k}"
                calls.append(
                    (
                        "update",
                        who,
                        handle.execute_update(
                            decision.update, decision.request(who), result_type=DecisionOutcome
                        ),
                    )
                )
            who = f"{decision}-sdk"
            sdk = sdks[index % CLIENTS]
            calls.append(("sdk", who, decision.sdk(sdk, seeded.domain, cid, decision.request(who))))
        return calls

    planned = {cid: racers(i, cid) for i, cid in enumerate(seeded.ids)}
    flat = [(cid, via, who, call) for cid, calls in planned.items() for via, who, call in calls]
    answers = await asyncio.gather(*(call for *_, call in flat), return_exceptions=True)
    figures.fault("concurrent decisions racing on one command", len(flat))

    won = await winners(db, seeded.domain)
    await verify_exactly_once(db, temporal_client, won, seeded, figures, later_runs=True)
    problems: list[str] = []
    for cid in seeded.ids:
        mine = [
            (via, who, answer)
            for (c, via, who, _), answer in zip(flat, answers, strict=True)
            if c == cid
        ]
        [audit] = await audit_rows(db, seeded.domain, cid, won[cid].audit_event)
        winner = audit["details_json"]["operator"]
        succeeded = [who for via, who, a in mine if isinstance(a, DecisionOutcome)]
        if succeeded not in ([], [winner]):
            problems.append(f"{cid}: callers told they won: {succeeded}, audit says {winner}")
        told = dict((who, a) for _, who, a in mine)
        if not succeeded and "-signal-" not in winner and not _dropped(told[winner], winner):
            problems.append(f"{cid}: {winner} won, but its caller was not told so")
        for via, who, answer in mine:
            if via != "signal" and who != winner and not _lost(answer):
                problems.append(f"{cid}: {who} lost but got {answer!r}")
            if via == "signal" and isinstance(answer, BaseException) and not _lost(answer):
                problems.append(f"{cid}: signal {who} failed: {answer!r}")
        # Every signal the workflow received and did not carry out is kept as refused.
        delivered = sum(1 for via, _, a in mine if via == "signal" and a is None)
        refused = await audit_rows(db, seeded.domain, cid, "TSQ_SIGNAL_REFUSED")
        run = temporal_client.get_workflow_handle(
            handle_of(temporal_client, seeded.domain, cid).id, run_id=first_run[cid]
        )
        state = await run.query("state", result_type=StateView)
        shown = (state.state.value, state.decided_by, state.outcome and state.outcome.operator)
        if shown != (won[cid].final_state, winner, winner):
            problems.append(
                f"{cid}: the workflow shows state, decided by, outcome operator = {shown}; "
                f"{winner} carried out {won[cid]}"
            )
        expected = delivered - (1 if "-signal-" in winner else 0)
        if not (len(refused) == state.refused_count == expected):
            problems.append(
                f"{cid}: {delivered} signals delivered, winner {winner}: {len(refused)} refusal "
                f"audit rows, {state.refused_count} refusals in the state, expected {expected}"
            )
    assert not problems, "\n".join(problems[:20])
