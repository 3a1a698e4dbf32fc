"""Dry runs: the decision's own transaction, run and rolled back, says exactly what it would do
and leaves every table, queue and workflow history as it was."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
from temporalio.client import WorkflowHandle

from tests.helpers import (
    audit_rows,
    everything_of,
    new_domain,
    replies_for,
    run_tsq,
    seed_batch,
    seed_command,
    status_of,
)
from tsq.client import TroubleshootingClient
from tsq.contract import DecisionKind, TsqState
from tsq.models import DecisionOutcome, StateView
from tsq.settings import Settings


async def _history_length(handle: WorkflowHandle[Any, Any]) -> int:
    return len((await handle.fetch_history()).events)


async def test_dry_run_of_a_cancel_shows_every_effect_and_writes_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Status after, reply body and queue, audit row, batch change and closing: all shown;
    every row of the domain, its queues and the workflow's history are as before."""
    domain = new_domain()
    batch_id = await seed_batch(pool, domain, total=2, completed=1, in_troubleshooting=1)
    command_id = await seed_command(pool, domain, batch_id=batch_id)
    handle = tsq.temporal.get_workflow_handle(await tsq.start_workflow(domain, command_id))
    before, events = await everything_of(pool, domain), await _history_length(handle)

    preview = await tsq.preview_cancel(domain, command_id, "Account closed", operator="jane")

    assert await everything_of(pool, domain) == before
    assert await _history_length(handle) == events
    assert preview.result == "would_carry_out" and not preview.needs_approval
    would = preview.would
    assert would is not None
    assert (would.status_before, would.status_after) == ("IN_TROUBLESHOOTING_QUEUE", "CANCELED")
    assert would.reply is not None and would.reply.queue == f"{domain}__replies"
    assert would.reply.body is not None
    assert (would.reply.body["outcome"], would.reply.body["reason"]) == (
        "CANCELED",
        "Account closed",
    )
    events_written = [row.event_type for row in would.audit]
    assert events_written == ["OPERATOR_CANCEL", "BATCH_COMPLETED"]
    assert would.audit[0].details is not None
    assert would.audit[0].details["operator"] == "jane"
    assert would.batch is not None and would.batch.closes
    assert would.batch.before["in_troubleshooting_count"] == 1
    assert would.batch.after["in_troubleshooting_count"] == 0
    assert would.batch.after["status"] == "COMPLETED_WITH_FAILURES"

    # The decision itself then does exactly that.
    outcome = await tsq.operator_cancel(domain, command_id, "Account closed", operator="jane")
    assert outcome is not None and outcome.carried_out
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert {k: v for k, v in reply.items() if k != "completed_at"} == {
        k: v for k, v in would.reply.body.items() if k != "completed_at"
    }


async def test_dry_run_of_a_retry_shows_the_message_it_would_send(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The message re-sent to the command queue, edited by the patch; nothing sent."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, data={"account": "ACC-1", "amount": 100})
    await tsq.start_workflow(domain, command_id)
    before = await everything_of(pool, domain)

    preview = await tsq.preview_retry(
        domain, command_id, operator="jane", patch={"data": {"account": "ACC-2"}}
    )

    assert await everything_of(pool, domain) == before
    assert preview.would is not None and preview.would.message is not None
    assert preview.would.message.queue == f"{domain}__commands"
    assert preview.would.message.body is not None
    assert preview.would.message.body["data"] == {"account": "ACC-2", "amount": 100}
    assert preview.would.status_after == "PENDING"
    [audit] = preview.would.audit
    assert audit.details is not None and audit.details["patch"] == {"data": {"account": "ACC-2"}}


async def test_dry_run_says_why_a_decision_would_not_be_carried_out(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Decided already, original message missing, not found: each named, nothing written."""
    domain = new_domain()
    done = await seed_command(pool, domain, status="COMPLETED")
    missing = await seed_command(pool, domain)
    await pool.execute(
        "UPDATE commandbus.command SET msg_id = NULL, queue_name = $2 WHERE command_id = $1",
        missing,
        f"{domain}__other",
    )
    unknown = uuid.uuid4()
    before = await everything_of(pool, domain)

    previews = await tsq.preview_many(
        DecisionKind.RETRY, domain, [done, missing, unknown], {"operator": "jane"}
    )

    assert await everything_of(pool, domain) == before
    assert [p.result for p in previews] == ["already_decided", "payload_not_found", "not_found"]
    assert all(p.would is None for p in previews)
    assert "original message" in previews[1].detail


async def test_cli_dry_run_prints_would_as_json_and_exits_0(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq complete D ID --dry-run --json`: the preview, `would` included; nothing written;
    the command still waits."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    before = await everything_of(pool, domain)

    done = await run_tsq(
        settings,
        "complete",
        domain,
        str(command_id),
        "--result-data",
        '{"ok": true}',
        "--dry-run",
        "--json",
        "--operator",
        "jane",
    )

    assert done.returncode == 0, done.stderr
    preview = json.loads(done.stdout)
    assert preview["result"] == "would_carry_out"
    assert preview["would"]["status_after"] == "COMPLETED"
    assert preview["would"]["reply"]["body"]["data"] == {"ok": True}
    assert await everything_of(pool, domain) == before
    state = await tsq.temporal.get_workflow_handle(wid).query("state", result_type=StateView)
    assert state.state is TsqState.AWAITING_OPERATOR
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id) == []


async def test_cli_bulk_dry_run_counts_each_outcome_and_shows_the_first(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """A bulk dry run: a count per outcome and the first previews in full; nothing written."""
    domain = new_domain()
    waiting = [await seed_command(pool, domain) for _ in range(3)]
    missing = await seed_command(pool, domain)
    await pool.execute(
        "UPDATE commandbus.command SET msg_id = NULL, queue_name = $2 WHERE command_id = $1",
        missing,
        f"{domain}__other",
    )
    before = await everything_of(pool, domain)

    done = await run_tsq(settings, "retry", domain, "--all", "--dry-run", "--yes")

    assert done.returncode == 1, done.stderr
    assert await everything_of(pool, domain) == before
    assert "(dry run, nothing written): 4 commands" in done.stdout
    assert "would be carried out" in done.stdout and "     3" in done.stdout
    assert "original message not found" in done.stdout
    assert done.stdout.count("(dry run, nothing written):") == 4  # the summary and 3 in full
    assert "1 of 4 commands would not be carried out" in done.stderr
    for command_id in waiting:
        assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_decision_after_a_dry_run_is_the_first_and_only(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A dry run records no decision: the real one afterwards is carried out, once."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.preview_complete(domain, command_id, operator="jane")
    outcome: DecisionOutcome | None = await tsq.operator_complete(domain, command_id)
    assert outcome is not None and outcome.carried_out
    assert len(await replies_for(pool, f"{domain}__replies", command_id)) == 1
    assert len(await audit_rows(pool, domain, command_id, "OPERATOR_COMPLETE")) == 1
