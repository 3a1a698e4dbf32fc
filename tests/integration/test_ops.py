"""Operator cancel end to end: SDK, signals, updates and the `temporal` CLI on real services."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    run_temporal_cli,
    seed_batch,
    seed_command,
    status_of,
)
from tsq import InvalidInputError, InvalidOperationError, TroubleshootingClient, workflow_id
from tsq.activities import TroubleshootingActivities
from tsq.contract import DecisionKind
from tsq.devstack import TemporalDevServer
from tsq.models import CarryOut, DecisionOutcome, StateView
from tsq.workflows import COMMAND_DOMAIN, COMMAND_TYPE, LAST_ERROR_CODE, TSQ_STATE


async def _state(temporal: Client, wid: str) -> StateView:
    state: StateView = await temporal.get_workflow_handle(wid).query("state", result_type=StateView)
    return state


async def _waiting(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> tuple[str, uuid.UUID, str]:
    """A parked command in a domain of its own, its workflow started: (domain, id, workflow id)."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    return domain, command_id, await tsq.start_workflow(domain, command_id)


async def _effects(pool: asyncpg.Pool, domain: str, command_id: uuid.UUID) -> tuple[int, int]:
    """(OPERATOR_CANCEL audit rows, replies in <domain>__replies) for one command."""
    audits = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    replies = await replies_for(pool, f"{domain}__replies", command_id)
    return len(audits), len(replies)


async def test_operator_cancel_flow(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Park a command, find its workflow waiting, cancel it: status, audit, reply, result."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="IN_PROGRESS")
    wid = await tsq.move_to_troubleshooting(
        domain,
        command_id,
        error_type="PERMANENT",
        error_code="ACCOUNT_CLOSED",
        error_message="account is closed",
    )
    assert wid == workflow_id(domain, command_id) == f"tsq:{domain}:{command_id}"
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    [moved] = await audit_rows(pool, domain, command_id, "MOVED_TO_TSQ")
    assert moved["details_json"]["error_code"] == "ACCOUNT_CLOSED"

    handle = temporal.get_workflow_handle(wid, result_type=DecisionOutcome)
    described = await handle.describe()
    attrs = described.typed_search_attributes
    assert attrs.get(COMMAND_DOMAIN) == domain
    assert attrs.get(COMMAND_TYPE) == "DebitAccount"
    assert attrs.get(TSQ_STATE) == "AWAITING_OPERATOR"
    assert attrs.get(LAST_ERROR_CODE) == "ACCOUNT_CLOSED"
    waiting = await _state(temporal, wid)
    assert waiting.state == "AWAITING_OPERATOR" and waiting.decision is None

    outcome = await tsq.operator_cancel(
        domain, command_id, "Invalid account", operator="jane@example.com"
    )
    assert outcome is not None and outcome.carried_out and outcome.status == "CANCELED"
    assert await status_of(pool, domain, command_id) == "CANCELED"
    assert await _effects(pool, domain, command_id) == (1, 1)
    result = await handle.result()
    assert result.reply_msg_id == outcome.reply_msg_id
    done = await handle.describe()
    assert done.status == WorkflowExecutionStatus.COMPLETED
    assert done.typed_search_attributes.get(TSQ_STATE) == "CANCELED"


async def test_cancel_through_temporal_cli_signal(
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    temporal: Client,
    temporal_server: TemporalDevServer,
) -> None:
    """`temporal workflow signal --workflow-id tsq:payments:<id> --name cancel` cancels it."""
    command_id = await seed_command(pool, "payments", reply_queue="payments__replies")
    wid = await tsq.start_workflow("payments", command_id)
    assert wid == f"tsq:payments:{command_id}"
    body = json.dumps({"reason": "Superseded", "operator": "ops@example.com"})
    cli = run_temporal_cli(
        temporal_server,
        "workflow",
        "signal",
        "--workflow-id",
        wid,
        "--name",
        "cancel",
        "--input",
        body,
    )
    assert cli.returncode == 0, cli.stderr
    await temporal.get_workflow_handle(wid).result()
    assert await status_of(pool, "payments", command_id) == "CANCELED"
    [audit] = await audit_rows(pool, "payments", command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["operator"] == "ops@example.com"
    assert audit["details_json"]["via"] == "signal"
    replies = await replies_for(pool, "payments__replies", command_id)
    assert [r["reason"] for r in replies] == ["Superseded"]


@pytest.mark.parametrize(
    "raw",
    [
        {"reason": "  "},
        {"operator": "jane"},
        {"reason": "ok", "reasn": "typo"},
        {"reason": 42},
        "cancel it",
        None,
    ],
)
async def test_malformed_cancel_signal_is_refused_visibly(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client, raw: Any
) -> None:
    """A bad `cancel` signal changes nothing, shows in `state` and in the audit trail."""
    domain, command_id, wid = await _waiting(tsq, pool)
    await temporal.get_workflow_handle(wid).signal("cancel", raw)
    await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED"),
        lambda rows: len(rows) == 1,
    )
    state = await _state(temporal, wid)
    assert state.state == "AWAITING_OPERATOR"
    assert [r.handler for r in state.refused] == ["cancel"]
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await _effects(pool, domain, command_id) == (0, 0)
    # The workflow still takes a good decision afterwards.
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert await _effects(pool, domain, command_id) == (1, 1)


async def test_second_decision_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Once decided, a second cancel is refused (update) or recorded as refused (signal)."""
    domain, command_id, wid = await _waiting(tsq, pool)
    handle = temporal.get_workflow_handle(wid)
    await handle.signal("cancel", {"reason": "first", "operator": "a"})
    await handle.signal("cancel", {"reason": "second", "operator": "b"})
    await handle.result()
    assert await _effects(pool, domain, command_id) == (1, 1)
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["reason"] == "first"
    refused = await audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED")
    assert len(refused) == 1 and "already has a decision" in refused[0]["details_json"]["problem"]
    with pytest.raises(InvalidOperationError, match="CANCELED"):
        await tsq.operator_cancel(domain, command_id, "third")


async def test_concurrent_updates_carry_out_one_decision(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Ten updates at once: one carries out, nine are refused, one audit row and one reply."""
    domain, command_id, wid = await _waiting(tsq, pool)
    handle = temporal.get_workflow_handle(wid)
    results = await asyncio.gather(
        *(
            handle.execute_update(
                "operator_cancel",
                {"reason": f"r{i}", "operator": f"op{i}"},
                result_type=DecisionOutcome,
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    # Losers are refused by the validator, or dropped by the server when the workflow task
    # they reached was rejected because the workflow was completing.
    assert sum(isinstance(r, DecisionOutcome) for r in results) == 1
    assert all(
        isinstance(r, (DecisionOutcome, WorkflowUpdateFailedError, RPCError)) for r in results
    )
    assert await _effects(pool, domain, command_id) == (1, 1)


async def test_update_with_blank_reason_is_rejected_and_writes_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """The `operator_cancel` validator refuses a blank reason; no history, no audit."""
    domain, command_id, wid = await _waiting(tsq, pool)
    handle = temporal.get_workflow_handle(wid)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update("operator_cancel", {"reason": " "})
    assert "reason" in str(refused.value.cause)
    assert await audit_rows(pool, domain, command_id) == []
    assert (await _state(temporal, wid)).state == "AWAITING_OPERATOR"


async def test_cancel_without_reply_queue_sends_nothing_and_audit_says_so(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """No reply queue: CANCELED, no reply anywhere, and the audit row explains why."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, reply_queue=None)
    outcome = await tsq.operator_cancel(domain, command_id, "Not needed")
    assert outcome is not None and outcome.reply_queue is None and outcome.reply_msg_id is None
    assert await status_of(pool, domain, command_id) == "CANCELED"
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["reply_to"] is None
    assert "no reply" in audit["details_json"]["note"]
    assert await replies_for(pool, f"{domain}__replies", command_id) == []


async def test_invalid_reply_queue_refuses_cancel_and_changes_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """A reply queue that is no PGMQ name: refused, command untouched, workflow still waiting."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, reply_queue="bad-name; drop table x")
    with pytest.raises(InvalidInputError, match="not a valid PGMQ queue name"):
        await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL") == []
    state = await _state(temporal, workflow_id(domain, command_id))
    assert state.state == "AWAITING_OPERATOR"
    description = await temporal.get_workflow_handle(workflow_id(domain, command_id)).describe()
    assert description.raw_description.pending_activities == []


async def test_command_decided_outside_tsq_is_not_overwritten(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Another tool completed the command while its workflow waited: nothing is overwritten."""
    domain, command_id, wid = await _waiting(tsq, pool)
    await pool.execute(
        "UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = $1", command_id
    )
    handle = temporal.get_workflow_handle(wid, result_type=DecisionOutcome)
    await handle.signal("cancel", {"reason": "too late"})
    result = await handle.result()
    assert not result.carried_out and result.status == "COMPLETED"
    assert "outside tsq" in result.detail
    assert await status_of(pool, domain, command_id) == "COMPLETED"
    assert await _effects(pool, domain, command_id) == (0, 0)
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_STATE) == "DECIDED_ELSEWHERE"


async def test_move_archives_message_audits_and_counts_batch_in_one_go(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Parking a running command of a batch: its message goes to the PGMQ archive (for a later
    retry), the MOVED_TO_TSQ row carries the error, the batch counts one more in TSQ."""
    domain = new_domain()
    batch_id = await seed_batch(pool, domain, total=3, completed=1, in_troubleshooting=0)
    command_id = await seed_command(pool, domain, status="IN_PROGRESS", batch_id=batch_id)
    msg_id = await pool.fetchval(
        "SELECT msg_id FROM commandbus.command WHERE command_id = $1", command_id
    )
    await tsq.move_to_troubleshooting(
        domain,
        command_id,
        error_type="TRANSIENT",
        error_code="TIMEOUT",
        error_message="ledger did not answer",
        details={"worker": "w-1"},
    )
    queue = f"{domain}__commands"
    assert await pool.fetchval(f'SELECT count(*) FROM pgmq."q_{queue}"') == 0
    assert await pool.fetchval(f'SELECT msg_id FROM pgmq."a_{queue}"') == msg_id
    [moved] = await audit_rows(pool, domain, command_id, "MOVED_TO_TSQ")
    assert moved["details_json"] == {
        "msg_id": msg_id,
        "attempt": 3,
        "max_attempts": 3,
        "error_type": "TRANSIENT",
        "error_code": "TIMEOUT",
        "error_msg": "ledger did not answer",
        "worker": "w-1",
    }
    batch = await pool.fetchrow("SELECT * FROM commandbus.batch WHERE batch_id = $1", batch_id)
    assert batch["in_troubleshooting_count"] == 1


async def test_cancel_moves_batch_counters_and_closes_batch(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Cancel of a batch's last open command: in_troubleshooting -1, canceled +1, batch closed."""
    domain = new_domain()
    batch_id = await seed_batch(pool, domain, total=2, completed=1, in_troubleshooting=1)
    command_id = await seed_command(pool, domain, batch_id=batch_id)
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    batch = await pool.fetchrow(
        "SELECT * FROM commandbus.batch WHERE domain = $1 AND batch_id = $2", domain, batch_id
    )
    assert (batch["in_troubleshooting_count"], batch["canceled_count"]) == (0, 1)
    assert batch["status"] == "COMPLETED_WITH_FAILURES" and batch["completed_at"] is not None
    closed = await audit_rows(pool, domain, batch_id, "BATCH_COMPLETED")
    assert len(closed) == 1


async def test_move_to_troubleshooting_twice_is_one_move(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Moving the same command twice writes one MOVED_TO_TSQ row and keeps one workflow run."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="IN_PROGRESS")
    first = await tsq.move_to_troubleshooting(domain, command_id, error_type="PERMANENT")
    run_id = (await temporal.get_workflow_handle(first).describe()).run_id
    second = await tsq.move_to_troubleshooting(domain, command_id, error_type="PERMANENT")
    assert first == second
    assert (await temporal.get_workflow_handle(second).describe()).run_id == run_id
    assert len(await audit_rows(pool, domain, command_id, "MOVED_TO_TSQ")) == 1


async def test_move_of_finished_command_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A COMPLETED command cannot be parked; nothing changes."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="COMPLETED")
    with pytest.raises(InvalidOperationError, match="COMPLETED"):
        await tsq.move_to_troubleshooting(domain, command_id, error_type="PERMANENT")
    assert await status_of(pool, domain, command_id) == "COMPLETED"
    assert await audit_rows(pool, domain, command_id) == []


async def test_sync_starts_workflows_only_where_missing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`sync` starts a workflow for each parked command without one, and only those."""
    domain = new_domain()
    with_workflow = await seed_command(pool, domain)
    await tsq.start_workflow(domain, with_workflow)
    without = [await seed_command(pool, domain) for _ in range(3)]
    await seed_command(pool, domain, status="PENDING")
    report = await tsq.sync(domain)
    assert sorted(report.started) == sorted(workflow_id(domain, c) for c in without)
    assert report.already_running == [workflow_id(domain, with_workflow)]
    again = await tsq.sync(domain)
    assert again.started == [] and len(again.already_running) == 4


async def test_carry_out_run_twice_has_one_effect(pool: asyncpg.Pool) -> None:
    """The activity run again after its transaction committed returns the first outcome."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    request = CarryOut(
        effect_key=f"test/{uuid.uuid4()}/decision",
        workflow_id=workflow_id(domain, command_id),
        domain=domain,
        command_id=command_id,
        decision=DecisionKind.CANCEL,
        reason="Invalid account",
        operator="jane",
        via="signal",
    )
    activities = TroubleshootingActivities(pool)
    first, second, third = await asyncio.gather(*(activities.carry_out(request) for _ in range(3)))
    assert first == second == third and first.carried_out
    assert await _effects(pool, domain, command_id) == (1, 1)


class _FailsAfterCommit(TroubleshootingActivities):
    """Commits the decision, then fails the attempt once, as a worker crash after commit would."""

    failed: set[str]

    @activity.defn(name="tsq.carry_out")
    async def carry_out(self, req: CarryOut) -> DecisionOutcome:
        outcome = await super().carry_out(req)
        if req.effect_key not in self.failed:
            self.failed.add(req.effect_key)
            raise RuntimeError("connection lost after commit")
        return outcome


async def test_activity_retried_after_commit_has_one_effect(
    pool: asyncpg.Pool, temporal: Client
) -> None:
    """A decision whose first attempt committed then failed: one status change, audit, reply."""
    from temporalio.worker import Worker

    from tsq.workflows.troubleshooting import TroubleshootingWorkflow

    task_queue = f"tsq-flaky-{uuid.uuid4().hex[:8]}"
    acts = _FailsAfterCommit(pool)
    acts.failed = set()
    client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
    domain = new_domain()
    command_ids = [await seed_command(pool, domain) for _ in range(5)]
    async with Worker(
        temporal,
        task_queue=task_queue,
        workflows=[TroubleshootingWorkflow],
        activities=[acts.carry_out, acts.record_refusal],
    ):
        outcomes = await asyncio.gather(
            *(client.operator_cancel(domain, c, "Invalid account") for c in command_ids)
        )
    assert len(acts.failed) == 5
    assert all(o is not None and o.carried_out for o in outcomes)
    for command_id in command_ids:
        assert await status_of(pool, domain, command_id) == "CANCELED"
        assert await _effects(pool, domain, command_id) == (1, 1)
    changes = await pool.fetchval(
        "SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind = 'cancel'", domain
    )
    assert changes == 5


async def test_request_cancellation_from_the_ui_keeps_the_workflow_waiting(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Cancelling the workflow is not a decision: it keeps waiting and says why; cancel works."""
    domain, command_id, wid = await _waiting(tsq, pool)
    await temporal.get_workflow_handle(wid).cancel()
    refused = await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED"), lambda r: len(r) == 1
    )
    assert refused[0]["details_json"]["handler"] == "Request Cancellation"
    state = await _state(temporal, wid)
    assert state.state == "AWAITING_OPERATOR" and "does not decide" in state.refused[0].problem
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    outcome = await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert outcome is not None and outcome.carried_out


async def test_refusal_reaches_caller_without_stack_trace(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """A refused update carries the message an operator needs, and no Python stack trace."""
    *_, wid = await _waiting(tsq, pool)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await temporal.get_workflow_handle(wid).execute_update("operator_cancel", {"reason": ""})
    cause = refused.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.message == "invalid input: reason: must not be blank"
    assert cause.failure is not None and cause.failure.stack_trace == ""


async def test_temporal_cli_batch_signal_cancels_every_match(
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    temporal: Client,
    temporal_server: TemporalDevServer,
) -> None:
    """`temporal workflow signal --query ... --name cancel --yes` cancels every listed command."""
    domain = new_domain()
    command_ids = [await seed_command(pool, domain) for _ in range(3)]
    other = await seed_command(pool, domain, command_type="Refund")
    for command_id in [*command_ids, other]:
        await tsq.start_workflow(domain, command_id)
    query = (
        f'CommandDomain="{domain}" AND CommandType="DebitAccount" AND TsqState="AWAITING_OPERATOR"'
    )

    async def listed() -> int:
        return (await temporal.count_workflows(query)).count

    await assert_eventually(listed, lambda n: n == 3)
    body = json.dumps({"reason": "ledger migration", "operator": "jane"})
    cli = run_temporal_cli(
        temporal_server,
        "workflow",
        "signal",
        "--query",
        query,
        "--name",
        "cancel",
        "--input",
        body,
        "--yes",
    )
    assert cli.returncode == 0, cli.stderr

    async def statuses() -> list[str | None]:
        return [await status_of(pool, domain, c) for c in command_ids]

    await assert_eventually(statuses, lambda s: s == ["CANCELED"] * 3, within=60)
    for command_id in command_ids:
        assert await _effects(pool, domain, command_id) == (1, 1)
    assert await status_of(pool, domain, other) == "IN_TROUBLESHOOTING_QUEUE"


async def test_misspelt_signal_is_refused_visibly(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """A signal named `cancle` does not wait unseen: it is refused, in state and audit."""
    domain, command_id, wid = await _waiting(tsq, pool)
    await temporal.get_workflow_handle(wid).signal("cancle", {"reason": "typo"})
    refused = await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_SIGNAL_REFUSED"), lambda r: len(r) == 1
    )
    assert "unknown signal 'cancle'" in refused[0]["details_json"]["problem"]
    assert (await _state(temporal, wid)).state == "AWAITING_OPERATOR"
