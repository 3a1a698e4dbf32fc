"""Floods of refused signals and oversized ones: the workflow keeps taking decisions.

Each refusal costs the workflow the same small work whatever came before it; refusals reach
the audit trail in batches; the workflow continues as new before its history grows too long,
carrying its command, parking and counts; and a workflow the server terminated anyway (its
history past the limit) is started again by the sweep.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client, WorkflowHandle

from tests.faults.figures import Figures
from tests.faults.services import Workers
from tests.faults.support import handle_of, seed, what_holds
from tests.helpers import assert_eventually, audit_rows, new_domain, status_of
from tsq.client import TroubleshootingClient
from tsq.models import StateView

FLOOD = 10_000
QUEUED = 1_400
NOTES = 3_000
BIG = 27
BIG_SIZE = 1_900_000

# The flood's own deadlines add up to 4 minutes; pytest's default of 2 would cut them short.
pytestmark = pytest.mark.timeout(300)


async def refused_count(handle: WorkflowHandle[Any, Any]) -> int:
    state: StateView = await handle.query("state", result_type=StateView)
    return state.refused_count


async def send_all(
    handle: WorkflowHandle[Any, Any], count: int, payload: Any, signal: str = "cancel"
) -> None:
    gate = asyncio.Semaphore(100)

    async def one() -> None:
        async with gate:
            await handle.signal(signal, payload)

    await asyncio.gather(*(one() for _ in range(count)))


async def failed_tasks(temporal: Client, workflow_id: str) -> list[str]:
    """Workflow tasks the worker failed in any run (a deadlock, an error in workflow code).

    Not the ones the server fails itself to flush signals buffered during a task
    (FORCE_CLOSE_COMMAND): under a flood it does that, and the next task takes them all.
    """
    failed = []
    async for execution in temporal.list_workflows(f'WorkflowId = "{workflow_id}"'):
        handle = temporal.get_workflow_handle(workflow_id, run_id=execution.run_id)
        async for event in handle.fetch_history_events():
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                continue
            attributes = event.workflow_task_failed_event_attributes
            if (
                attributes.cause
                != WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND
            ):
                failed.append(f"{attributes.cause}: {attributes.failure.message}")
    return failed


async def test_ten_thousand_refused_signals_leave_the_workflow_decidable(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """10,000 refused signals: all counted and audited, the workflow continues as new, no
    workflow task fails, and a decision afterwards is carried out once."""
    await workers.start("worker")
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    await tsq_client.start_workflow(domain, cid)
    handle = handle_of(temporal_client, domain, cid)
    await send_all(handle, FLOOD, {"operator": "no reason given"})
    figures.fault("refused signals flooding one workflow", FLOOD)
    await assert_eventually(lambda: refused_count(handle), lambda n: n == FLOOD, within=180)
    await assert_eventually(
        lambda: audit_rows(db, domain, cid, "TSQ_SIGNAL_REFUSED"),
        lambda rows: len(rows) == FLOOD,
        within=60,
    )
    runs = [e async for e in temporal_client.list_workflows(f'WorkflowId = "{handle.id}"')]
    assert len(runs) >= 2, "the workflow did not continue as new"
    outcome = await tsq_client.operator_cancel(domain, cid, "after the flood")
    assert outcome is not None and outcome.carried_out
    assert await status_of(db, domain, cid) == "CANCELED"
    assert await failed_tasks(temporal_client, handle.id) == []


async def test_a_flood_of_notes_is_written_in_batches_and_the_workflow_stays_decidable(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """3,000 notes in seconds, with claims and releases among them: every one is in the audit
    trail once, no workflow task fails (the handlers never wait on the database), and a cancel
    afterwards is carried out once."""
    await workers.start("worker")
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    await tsq_client.start_workflow(domain, cid)
    handle = handle_of(temporal_client, domain, cid)
    await asyncio.gather(
        send_all(handle, NOTES, {"text": "still looking", "operator": "ann"}, signal="note"),
        send_all(handle, 50, {"operator": "ann", "for": "1h"}, signal="claim"),
        send_all(handle, 50, {"operator": "ann"}, signal="release"),
    )
    figures.fault("notes, claims and releases flooding one workflow", NOTES + 100)

    async def notes() -> int:
        state: StateView = await handle.query("state", result_type=StateView)
        return state.notes_count

    await assert_eventually(notes, lambda n: n == NOTES, within=120)
    await assert_eventually(
        lambda: audit_rows(db, domain, cid, "TSQ_NOTE"),
        lambda rows: len(rows) == NOTES,
        within=60,
    )
    outcome = await tsq_client.operator_cancel(domain, cid, "after the notes", operator="ann")
    assert outcome is not None and outcome.carried_out
    assert len(await audit_rows(db, domain, cid, "OPERATOR_CANCEL")) == 1
    assert await failed_tasks(temporal_client, handle.id) == []


async def test_refusals_queued_while_no_worker_polls_are_taken_in_one_go(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """1,400 refused signals arrive while no worker polls (a deploy): the worker that comes
    takes them without a deadlocked workflow task, and the workflow still decides."""
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    await tsq_client.start_workflow(domain, cid)
    handle = handle_of(temporal_client, domain, cid)
    await send_all(handle, QUEUED, {"reason": " "})
    figures.fault("refused signals queued while no worker polled", QUEUED)
    await workers.start("worker")
    await assert_eventually(lambda: refused_count(handle), lambda n: n == QUEUED, within=120)
    outcome = await tsq_client.operator_cancel(domain, cid, "after the deploy")
    assert outcome is not None and outcome.carried_out
    assert await failed_tasks(temporal_client, handle.id) == []


async def test_oversized_signals_leave_the_command_a_decidable_workflow(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """27 signals of 1.9 MB each (past the history's 50 MB): whether the workflow continued as
    new in time or the server terminated it, the command has a decidable workflow after."""
    await workers.start("worker", env={"TSQ_SWEEP_INTERVAL": "2"})
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    await tsq_client.start_workflow(domain, cid)
    handle = handle_of(temporal_client, domain, cid)
    blob = {"operator": "x" * BIG_SIZE}
    for _ in range(BIG):
        try:
            await handle.signal("cancel", blob)
        except Exception:  # the server refuses signals to a workflow it has just terminated
            break
    figures.fault("oversized refused signals (1.9 MB each)", BIG)

    async def state() -> str:
        try:
            view: StateView = await handle.query(
                "state", result_type=StateView, rpc_timeout=timedelta(seconds=10)
            )
        except Exception as err:  # no run answers yet: failed task, terminated, restarting
            return f"no answer ({err})"
        return view.state.value

    try:
        await assert_eventually(state, lambda s: s == "AWAITING_OPERATOR", within=90)
    except AssertionError as err:
        held = await what_holds(temporal_client, domain, cid)
        raise AssertionError(f"{err}; {held}") from None
    outcome = await tsq_client.operator_cancel(domain, cid, "after the oversized signals")
    assert outcome is not None and outcome.carried_out
    assert len(await audit_rows(db, domain, cid, "OPERATOR_CANCEL")) == 1
