"""Living beside a bus that knows nothing of tsq: parked commands get workflows by themselves,
and commands decided by another hand close theirs.

The bus here is plain SQL on `commandbus.command`, as the reference command bus writes it.
Each test has a database of its own, with a watcher and a worker on a task queue of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from tests.helpers import (
    assert_eventually,
    audit_rows,
    decide_as_bus,
    new_domain,
    park_as_bus,
    replies_for,
    scratch_database,
    seed_command,
    status_of,
)
from tsq import watch
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState, workflow_id
from tsq.db import create_pool
from tsq.models import DecisionOutcome, StateView
from tsq.watch import Watcher
from tsq.worker import new_worker
from tsq.workflows import TSQ_STATE


@dataclass
class Watched:
    url: str
    pool: asyncpg.Pool
    client: TroubleshootingClient
    watcher: Watcher

    @property
    def temporal(self) -> Client:
        return self.client.temporal

    def handle(self, domain: str, cid: uuid.UUID) -> WorkflowHandle[Any, DecisionOutcome]:
        return self.temporal.get_workflow_handle(
            workflow_id(domain, cid), result_type=DecisionOutcome
        )


@pytest.fixture
async def watched(admin_url: str, temporal: Client) -> AsyncIterator[Watched]:
    async with scratch_database(admin_url, migrated=True) as url:
        pool = await create_pool(url)
        task_queue = f"tsq-watch-{uuid.uuid4().hex[:8]}"
        client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
        watcher = Watcher(client, url, sweep_every=3600)
        stop = asyncio.Event()
        try:
            async with new_worker(temporal, pool, task_queue):
                running = asyncio.create_task(watcher.run(stop))
                yield Watched(url, pool, client, watcher)
                stop.set()
                await running
        finally:
            await pool.close()


async def _running_run(handle: WorkflowHandle[Any, Any]) -> str | None:
    try:
        described = await handle.describe()
    except RPCError:
        return None
    return described.run_id if described.status == WorkflowExecutionStatus.RUNNING else None


async def test_command_parked_by_plain_update_gets_its_workflow(watched: Watched) -> None:
    """The bus parks a running command with a plain UPDATE: its workflow waits soon after."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain, status="IN_PROGRESS")
    await park_as_bus(watched.pool, domain, command_id, error_code="LEDGER_DOWN")
    handle = watched.handle(domain, command_id)
    await assert_eventually(lambda: _running_run(handle), within=10)
    state = await handle.query("state", result_type=StateView)
    assert state.state is TsqState.AWAITING_OPERATOR
    assert state.command.last_error_code == "LEDGER_DOWN"
    assert state.command.parking_id is not None
    query = f'WorkflowId = "{handle.id}" AND TsqState = "AWAITING_OPERATOR"'
    await assert_eventually(
        lambda: watched.temporal.count_workflows(query), lambda n: n.count == 1, within=10
    )


async def test_command_inserted_parked_gets_its_workflow_and_can_be_decided(
    watched: Watched,
) -> None:
    """A row inserted already parked gets a workflow; a decision on it is carried out once."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    await assert_eventually(lambda: _running_run(handle), within=10)
    await handle.signal("cancel", {"reason": "no longer needed", "operator": "jane"})
    outcome = await handle.result()
    assert outcome.carried_out and await status_of(watched.pool, domain, command_id) == "CANCELED"
    assert len(await replies_for(watched.pool, f"{domain}__replies", command_id)) == 1


@pytest.mark.parametrize("status", ["CANCELED", "COMPLETED", "PENDING"])
async def test_outside_decision_closes_the_workflow_decided_elsewhere(
    watched: Watched, status: str
) -> None:
    """Another tool moves the command out: the workflow ends DECIDED_ELSEWHERE with the new
    status and when it changed; tsq writes no audit row and sends no reply."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    await assert_eventually(lambda: _running_run(handle), within=10)
    await decide_as_bus(watched.pool, domain, command_id, status)
    outcome = await asyncio.wait_for(handle.result(), 10)
    assert not outcome.carried_out and outcome.decision is None
    assert outcome.status == status and outcome.changed_at is not None
    assert "by another hand" in outcome.detail
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_STATE) == TsqState.DECIDED_ELSEWHERE
    state = await handle.query("state", result_type=StateView)
    assert state.state is TsqState.DECIDED_ELSEWHERE and state.outcome == outcome
    assert [r["event_type"] for r in await audit_rows(watched.pool, domain, command_id)] == []
    assert await replies_for(watched.pool, f"{domain}__replies", command_id) == []
    assert await status_of(watched.pool, domain, command_id) == status


async def test_deleted_command_closes_its_workflow(watched: Watched) -> None:
    """A parked command's row is deleted: its workflow ends, saying the row is gone."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    await assert_eventually(lambda: _running_run(handle), within=10)
    await watched.pool.execute(
        "DELETE FROM commandbus.command WHERE domain = $1 AND command_id = $2", domain, command_id
    )
    outcome = await asyncio.wait_for(handle.result(), 10)
    assert outcome.status is None and "deleted" in outcome.detail


async def test_command_parked_again_after_a_retry_gets_a_new_run(watched: Watched) -> None:
    """Retried, then parked again by the bus: a new run for the new parking, decidable."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    first = await assert_eventually(lambda: _running_run(handle), within=10)
    await watched.client.operator_retry(domain, command_id, operator="jane")
    await park_as_bus(watched.pool, domain, command_id)
    second = await assert_eventually(
        lambda: _running_run(handle), lambda run: run not in (None, first), within=10
    )
    state = await handle.query("state", result_type=StateView)
    assert state.state is TsqState.AWAITING_OPERATOR
    outcome = await watched.client.operator_cancel(domain, command_id, "gave up")
    assert outcome is not None and outcome.carried_out
    assert (await handle.describe()).run_id == second
    assert len(await audit_rows(watched.pool, domain, command_id, "OPERATOR_RETRY")) == 1
    assert len(await audit_rows(watched.pool, domain, command_id, "OPERATOR_CANCEL")) == 1


async def test_row_that_cannot_have_a_workflow_is_skipped_and_reported(watched: Watched) -> None:
    """A domain outside tsq's id pattern: reported and skipped; the others are not held up."""
    good = new_domain()
    bad = "bad-domain!"
    async with watched.pool.acquire() as conn, conn.transaction():
        bad_id = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,
                max_attempts)
            VALUES ($1, 'x__commands', $2, 'DebitAccount', 'IN_TROUBLESHOOTING_QUEUE', 3)
            """,
            bad,
            bad_id,
        )
    good_id = await seed_command(watched.pool, good)
    await assert_eventually(lambda: _running_run(watched.handle(good, good_id)), within=10)
    problem = await assert_eventually(
        lambda: watched.pool.fetchval(
            "SELECT problem FROM tsq.parking WHERE command_id = $1", bad_id
        ),
        lambda text: bool(text),
    )
    assert problem.startswith("skipped:") and "domain" in problem
    report = await watched.client.sync()
    assert [wid for wid, _ in report.failed] == [f"tsq:{bad}:{bad_id}"]


async def test_terminated_workflow_is_started_again_by_the_sweep(watched: Watched) -> None:
    """Someone terminates a parked command's workflow: the sweep gives the parking a new one."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    first = await assert_eventually(lambda: _running_run(handle), within=10)
    await handle.terminate(reason="careless operator")
    watched.watcher.sweep_grace = 0
    await assert_eventually(
        lambda: watched.temporal.count_workflows(
            f'WorkflowId = "{handle.id}" AND ExecutionStatus = "Terminated"'
        ),
        lambda n: n.count == 1,
    )
    report = await watched.watcher.sweep()
    assert report.rearmed == 1
    await assert_eventually(
        lambda: _running_run(handle), lambda run: run not in (None, first), within=10
    )


async def test_sweep_tells_a_workflow_whose_command_left_unseen(watched: Watched) -> None:
    """A command moved out while its trigger was switched off: the sweep closes its workflow."""
    domain = new_domain()
    command_id = await seed_command(watched.pool, domain)
    handle = watched.handle(domain, command_id)
    await assert_eventually(lambda: _running_run(handle), within=10)
    async with watched.pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE commandbus.command DISABLE TRIGGER tsq_parking_update")
        await decide_as_bus(conn, domain, command_id, "CANCELED")
        await conn.execute("ALTER TABLE commandbus.command ENABLE TRIGGER tsq_parking_update")
        # What the trigger would have recorded, had it been on.
        await conn.execute(
            "UPDATE tsq.parking SET left_at = now(), left_status = 'CANCELED' "
            "WHERE command_id = $1",
            command_id,
        )
    await assert_eventually(
        lambda: watched.temporal.count_workflows(f'WorkflowId = "{handle.id}"'),
        lambda n: n.count == 1,
    )
    watched.watcher.sweep_grace = 0
    report = await watched.watcher.sweep()
    assert report.told == [handle.id]
    outcome = await asyncio.wait_for(handle.result(), 10)
    assert outcome.status == "CANCELED" and not outcome.carried_out


async def test_burst_parked_in_one_transaction_all_get_workflows(watched: Watched) -> None:
    """300 commands parked in one transaction (more than a claim takes at once): every one
    gets exactly one workflow run."""
    domain = new_domain()
    await watched.pool.execute(
        """
        INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,
            max_attempts, last_error_code)
        SELECT $1, $1 || '__commands', gen_random_uuid(), 'DebitAccount',
            'IN_TROUBLESHOOTING_QUEUE', 3, 'BURST'
        FROM generate_series(1, 300)
        """,
        domain,
    )
    query = f'CommandDomain = "{domain}" AND ExecutionStatus = "Running"'
    await assert_eventually(
        lambda: watched.temporal.count_workflows(query), lambda n: n.count == 300, within=60
    )
    left = await watched.pool.fetchval(
        "SELECT count(*) FROM tsq.parking WHERE domain = $1 AND todo IS NOT NULL", domain
    )
    assert left == 0
    runs = await watched.temporal.count_workflows(f'CommandDomain = "{domain}"')
    assert runs.count == 300


async def test_tell_no_worker_takes_in_time_is_kept_as_a_signal(
    admin_url: str, temporal: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher tells by update, which the server keeps only once a worker takes it. With
    no worker polling, the tell is sent as the signal instead: the workflow closes once a
    worker is back, DECIDED_ELSEWHERE."""
    monkeypatch.setattr(watch, "TELL_UPDATE_S", 1.0)
    async with scratch_database(admin_url, migrated=True) as url:
        pool = await create_pool(url)
        try:
            task_queue = f"tsq-watch-{uuid.uuid4().hex[:8]}"
            client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
            domain = new_domain()
            command_id = await seed_command(pool, domain)
            await client.start_workflow(domain, command_id)  # no worker: its first task waits
            await decide_as_bus(pool, domain, command_id, "CANCELED")
            watcher = Watcher(client, url, sweep_every=3600)
            while await watcher.drain():  # the start's row, then the tell's
                pass
            handle = temporal.get_workflow_handle(
                workflow_id(domain, command_id), result_type=DecisionOutcome
            )
            async with new_worker(temporal, pool, task_queue):
                outcome = await asyncio.wait_for(handle.result(), 60)
            assert not outcome.carried_out and outcome.status == "CANCELED"
            history = await handle.fetch_history()
            signals = [
                e.workflow_execution_signaled_event_attributes.signal_name
                for e in history.events
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            ]
            assert signals == ["tsq_refresh"]
        finally:
            await pool.close()
