"""What a careless operator or a hostile caller can send a workflow, and what it must not do.

Forged workflows, cancellation requests in the middle of a decision, names and values the
database cannot store, JSON the converter would drop, values longer than the server takes,
and reply queues that differ only in letter case.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    run_temporal_cli,
    seed_command,
    status_of,
)
from tsq import store
from tsq.client import TroubleshootingClient, snapshot
from tsq.contract import KEYWORD_LIMIT, WORKFLOW_TYPE, TsqState, workflow_id
from tsq.devstack import TemporalDevServer
from tsq.errors import InvalidOperationError
from tsq.models import DecisionOutcome, StateView
from tsq.settings import Settings
from tsq.workflows import LAST_ERROR_CODE, TSQ_STATE


async def _forge(
    temporal: Client, pool: asyncpg.Pool, settings: Settings, *, legacy: bool
) -> tuple[str, uuid.UUID, uuid.UUID, str]:
    """A workflow started by hand under command X's id with command Y's input."""
    domain = new_domain()
    x, y = await seed_command(pool, domain), await seed_command(pool, domain)
    row = await store.command(pool, domain, y)
    assert row is not None
    forged = snapshot(row)
    if legacy:  # shaped like a workflow of tsq 0.1: no parking
        forged = forged.model_copy(update={"parking_id": None})
    wid = workflow_id(domain, x)
    await temporal.start_workflow(
        WORKFLOW_TYPE,
        forged,
        id=wid,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    return domain, x, y, wid


async def test_workflow_whose_id_names_another_command_refuses_to_start(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client, settings: Settings
) -> None:
    """`tsq:<d>:X` started with Y's input fails at once; X is then decided as X, Y untouched."""
    domain, x, y, wid = await _forge(temporal, pool, settings, legacy=False)
    with pytest.raises(WorkflowFailureError) as failed:
        await temporal.get_workflow_handle(wid).result()
    assert "does not name its command" in str(failed.value.cause)
    outcome = await tsq.operator_cancel(domain, x, "the right one")
    assert outcome is not None and outcome.command_id == x
    assert await status_of(pool, domain, x) == "CANCELED"
    assert await status_of(pool, domain, y) == "IN_TROUBLESHOOTING_QUEUE"


async def test_forged_workflow_of_the_old_shape_refuses_every_decision(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client, settings: Settings
) -> None:
    """A forged workflow shaped like tsq 0.1's keeps running but refuses every decision, and
    the SDK says so instead of reporting X decided."""
    domain, x, y, wid = await _forge(temporal, pool, settings, legacy=True)
    with pytest.raises(InvalidOperationError, match="does not name its command"):
        await tsq.operator_cancel(domain, x, "would cancel Y")
    await temporal.get_workflow_handle(wid).signal("cancel", {"reason": "by signal"})
    await assert_eventually(
        lambda: temporal.get_workflow_handle(wid).query("state", result_type=StateView),
        lambda state: state.refused_count == 1,
    )
    assert await status_of(pool, domain, x) == "IN_TROUBLESHOOTING_QUEUE"
    assert await status_of(pool, domain, y) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, y, "OPERATOR_CANCEL") == []


async def test_cancellation_request_during_a_held_up_decision_lets_it_finish(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Request Cancellation while the decision waits on a locked row: the decision goes
    through, and the workflow and the database agree that the command is CANCELED."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    handle = tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)
    async with pool.acquire() as conn:
        locker = conn.transaction()
        await locker.start()
        try:
            await conn.execute(
                "SELECT 1 FROM commandbus.command WHERE command_id = $1 FOR UPDATE", command_id
            )
            await handle.signal("cancel", {"reason": "held up", "operator": "jane"})
            await assert_eventually(
                lambda: handle.describe(),
                lambda d: d.typed_search_attributes.get(TSQ_STATE) == TsqState.CANCELING,
                within=30,
            )
            await handle.cancel()
            await assert_eventually(
                lambda: handle.query("state", result_type=StateView),
                lambda s: s.refused_count == 1,
            )
        finally:
            await locker.rollback()
    outcome = await handle.result()
    assert outcome.carried_out and outcome.status == "CANCELED"
    assert await status_of(pool, domain, command_id) == "CANCELED"
    state = await handle.query("state", result_type=StateView)
    assert state.state is TsqState.CANCELED
    assert "does not stop a decision" in state.refused[-1].problem
    assert len(await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")) == 1
    assert len(await replies_for(pool, f"{domain}__replies", command_id)) == 1


async def test_signal_name_with_a_nul_is_refused_and_recorded(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A NUL in a signal's name cannot go into a row as it is: the refusal is recorded with
    it escaped, and the workflow takes a decision and closes afterwards."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    handle = tsq.temporal.get_workflow_handle(await tsq.start_workflow(domain, command_id))
    await handle.signal("can\x00cel", {"reason": "x"})
    [row] = await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED"), lambda r: len(r) == 1
    )
    assert row["details_json"]["handler"] == "can\\u0000cel"
    await handle.signal("cancel", {"reason": "after the NUL"})
    await handle.result()
    assert await status_of(pool, domain, command_id) == "CANCELED"


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("cancel", '{"reason": "\\ud800"}', "valid Unicode"),
        ("complete", json.dumps({"result_data": _nested(199)}), "nested deeper than"),
        ("complete", json.dumps({"result_data": _nested(400)}), "nested"),
        ("cancel", '{"reason": "ok"', "input"),
    ],
    ids=["lone-surrogate", "nested-199", "nested-400", "truncated-json"],
)
async def test_json_the_converter_cannot_take_is_refused_visibly(
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    temporal_server: TemporalDevServer,
    name: str,
    text: str,
    problem: str,
) -> None:
    """Sent with the `temporal` CLI: valid JSON pydantic will not read, or no JSON at all, is
    refused in the state and the audit trail instead of dropped unseen."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    sent = run_temporal_cli(
        temporal_server, "workflow", "signal", "--workflow-id", wid, "--name", name,
        "--input", text,
    )  # fmt: skip
    if sent.returncode != 0:
        # The CLI itself refuses what is not JSON: nothing reaches the workflow.
        assert problem == "input", sent.stderr
        return
    [row] = await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED"), lambda r: len(r) == 1
    )
    assert problem in row["details_json"]["problem"]
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_values_longer_than_the_server_takes_are_cut_not_fatal(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """A 3,000-character error code: sync starts every workflow, the move completes, the
    search attribute is cut with a mark, the database keeps the whole value."""
    domain = new_domain()
    ids = [await seed_command(pool, domain) for _ in range(31)]
    long_code = "E" * 3000
    await pool.execute(
        "UPDATE commandbus.command SET last_error_code = $2 WHERE command_id = $1",
        ids[7],
        long_code,
    )
    report = await tsq.sync(domain)
    assert (len(report.started), report.failed) == (31, [])
    attrs = (
        await temporal.get_workflow_handle(workflow_id(domain, ids[7])).describe()
    ).typed_search_attributes
    code = attrs.get(LAST_ERROR_CODE)
    assert code is not None and code.endswith("…") and len(code.encode()) <= KEYWORD_LIMIT

    moved = await seed_command(pool, domain, status="IN_PROGRESS")
    wid = await tsq.move_to_troubleshooting(
        domain, moved, error_type="PERMANENT", error_code="X" * 3000, error_message="m" * 100_000
    )
    state = await temporal.get_workflow_handle(wid).query("state", result_type=StateView)
    assert state.state is TsqState.AWAITING_OPERATOR
    stored = await pool.fetchval(
        "SELECT last_error_code FROM commandbus.command WHERE command_id = $1", moved
    )
    assert stored == "X" * 3000


async def test_reply_queue_in_another_letter_case_uses_the_existing_queue(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`Payments__Replies` beside `payments__replies`: the reply goes to the queue that exists,
    and no second pgmq.meta row aliases its tables."""
    domain = new_domain()
    lower = f"{domain}__replies"
    await pool.execute("SELECT pgmq.create($1)", lower)
    command_id = await seed_command(pool, domain, reply_queue=f"{domain.upper()}__Replies")
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert len(await replies_for(pool, lower, command_id)) == 1
    aliases = await pool.fetchval(
        "SELECT count(*) FROM pgmq.meta WHERE lower(queue_name) = $1", lower
    )
    assert aliases == 1
