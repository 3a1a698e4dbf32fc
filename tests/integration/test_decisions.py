"""Retry, complete, one-decision-only races and the read calls, through the SDK."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    seed_batch,
    seed_command,
    status_of,
)
from tsq import (
    CommandNotFoundError,
    InvalidInputError,
    PayloadNotFoundError,
    TroubleshootingClient,
    workflow_id,
)
from tsq.models import DecisionOutcome
from tsq.workflows import TSQ_STATE


async def _archived(pool: asyncpg.Pool, domain: str, command_id: uuid.UUID) -> dict[str, Any]:
    message: dict[str, Any] = await pool.fetchval(
        "SELECT tsq.archived_message($1, NULL, $2)", f"{domain}__commands", command_id
    )
    return message


async def _queued(pool: asyncpg.Pool, queue: str, msg_id: int) -> dict[str, Any] | None:
    rows = await pool.fetch("SELECT * FROM pgmq.read($1::text, 0, 1000)", queue)
    return next((row["message"] for row in rows if row["msg_id"] == msg_id), None)


async def test_retry_resends_archived_payload_and_resets_command(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """Retry: the archived original goes back to <domain>__commands; PENDING, attempts 0."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, data={"account": "A-9", "amount": 12.5})
    original = await _archived(pool, domain, command_id)
    outcome = await tsq.operator_retry(domain, command_id, operator="jane")
    assert outcome is not None and outcome.carried_out and outcome.new_msg_id is not None
    row = await pool.fetchrow("SELECT * FROM commandbus.command WHERE command_id = $1", command_id)
    assert (row["status"], row["attempts"], row["msg_id"]) == ("PENDING", 0, outcome.new_msg_id)
    assert row["last_error_code"] is None
    assert await _queued(pool, f"{domain}__commands", outcome.new_msg_id) == original
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_RETRY")
    assert audit["details_json"]["operator"] == "jane"
    assert audit["details_json"]["new_msg_id"] == outcome.new_msg_id
    assert await replies_for(pool, f"{domain}__replies", command_id) == []
    described = await temporal.get_workflow_handle(workflow_id(domain, command_id)).describe()
    assert described.typed_search_attributes.get(TSQ_STATE) == "RETRIED"


async def test_retried_command_that_fails_again_gets_a_new_run(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """After a retry the command can be parked again: same workflow id, a new run, decidable."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    first_run = (await temporal.get_workflow_handle(wid).describe()).run_id
    await tsq.operator_retry(domain, command_id)
    await tsq.move_to_troubleshooting(domain, command_id, error_type="PERMANENT")
    second_run = (await temporal.get_workflow_handle(wid).describe()).run_id
    assert second_run != first_run
    outcome = await tsq.operator_cancel(domain, command_id, "gave up")
    assert outcome is not None and outcome.carried_out
    assert len(await audit_rows(pool, domain, command_id, "MOVED_TO_TSQ")) == 1


async def test_retry_without_payload_is_refused_and_changes_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """No archived message and no payload_archive row: a clear error, command untouched."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await pool.execute(
        "SELECT pgmq.drop_queue($1)", f"{domain}__commands"
    )  # the archive goes with it
    with pytest.raises(PayloadNotFoundError, match="original message"):
        await tsq.operator_retry(domain, command_id)
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id, "OPERATOR_RETRY") == []
    # The payload archive table is the second place a payload is looked for.
    await pool.execute(
        """
        INSERT INTO commandbus.payload_archive (domain, command_id, payload_json)
        VALUES ($1, $2, $3)
        """,
        domain,
        command_id,
        {"command_id": str(command_id), "data": {"from": "payload_archive"}},
    )
    outcome = await tsq.operator_retry(domain, command_id)
    assert outcome is not None and outcome.carried_out
    message = await _queued(pool, f"{domain}__commands", outcome.new_msg_id or -1)
    assert message is not None and message["data"] == {"from": "payload_archive"}


async def test_cancel_reply_reads_for_both_kinds_of_consumer(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Spec 7.2 fields and the reference library's fields carry the same facts."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    correlation_id = await pool.fetchval(
        "SELECT correlation_id FROM commandbus.command WHERE command_id = $1", command_id
    )
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["command_id"] == str(command_id)
    assert reply["correlation_id"] == str(correlation_id)
    assert (reply["domain"], reply["type"]) == (domain, "DebitAccountResponse")
    assert reply["outcome"] == "CANCELED"
    assert reply["error"] == {
        "code": "OPERATOR_CANCEL",
        "message": "Invalid account",
        "class": "OperatorCancel",
    }
    assert reply["error_code"] == "OPERATOR_CANCEL"
    assert reply["error_message"] == reply["reason"] == "Invalid account"
    assert reply["data"] is None and reply["result"] is None
    completed = datetime.fromisoformat(reply["completed_at"])
    assert completed.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - completed) < timedelta(minutes=1)


async def test_complete_sets_status_and_replies_success_with_data(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Complete: COMPLETED, OPERATOR_COMPLETE audit, SUCCESS reply carrying result_data."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    data = {"refund_id": "R-1", "amount": 125, "note": "done by hand ✅"}
    outcome = await tsq.operator_complete(domain, command_id, result_data=data, operator="jane")
    assert outcome is not None and outcome.status == "COMPLETED"
    assert await status_of(pool, domain, command_id) == "COMPLETED"
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["outcome"] == "SUCCESS"
    assert reply["data"] == reply["result"] == data
    assert reply["error"] is None
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_COMPLETE")
    assert audit["details_json"]["operator"] == "jane"
    assert audit["details_json"]["result_data"] == data


@pytest.mark.parametrize("result_data", [{"bad": "nul \x00"}, {"x": float("nan")}])
async def test_complete_with_unstorable_result_data_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, result_data: dict[str, Any]
) -> None:
    """result_data PostgreSQL cannot store is refused up front; nothing changes."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    with pytest.raises(InvalidInputError, match="result_data"):
        await tsq.operator_complete(domain, command_id, result_data=result_data)
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_complete_moves_batch_counters(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Completing a batch's last open command closes the batch as COMPLETED."""
    domain = new_domain()
    batch_id = await seed_batch(pool, domain, total=2, completed=1, in_troubleshooting=1)
    command_id = await seed_command(pool, domain, batch_id=batch_id)
    await tsq.operator_complete(domain, command_id)
    batch = await pool.fetchrow("SELECT * FROM commandbus.batch WHERE batch_id = $1", batch_id)
    assert (batch["completed_count"], batch["in_troubleshooting_count"]) == (2, 0)
    assert batch["status"] == "COMPLETED"


async def test_retry_moves_batch_counter(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """Retrying a batch's command takes it out of the troubleshooting count; batch stays open."""
    domain = new_domain()
    batch_id = await seed_batch(pool, domain, total=1, in_troubleshooting=1)
    command_id = await seed_command(pool, domain, batch_id=batch_id)
    await tsq.operator_retry(domain, command_id)
    batch = await pool.fetchrow("SELECT * FROM commandbus.batch WHERE batch_id = $1", batch_id)
    assert batch["in_troubleshooting_count"] == 0 and batch["status"] == "IN_PROGRESS"


async def test_three_conflicting_decisions_on_fifty_commands_carry_out_one_each(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, temporal: Client
) -> None:
    """cancel + complete + retry at once, by signal and update, on 50 commands: one each."""
    domain = new_domain()
    command_ids = [await seed_command(pool, domain) for _ in range(50)]
    await asyncio.gather(*(tsq.start_workflow(domain, c) for c in command_ids))

    async def race(command_id: uuid.UUID, n: int) -> list[Any]:
        handle = temporal.get_workflow_handle(workflow_id(domain, command_id))
        moves = [
            handle.signal("cancel", {"reason": "by signal", "operator": "a"}),
            handle.execute_update(
                "operator_complete", {"operator": "b"}, result_type=DecisionOutcome
            ),
            handle.execute_update("operator_retry", {"operator": "c"}, result_type=DecisionOutcome),
        ]
        # Vary who goes first between commands.
        moves = moves[n % 3 :] + moves[: n % 3]
        return await asyncio.gather(*moves, return_exceptions=True)

    results = await asyncio.gather(*(race(c, n) for n, c in enumerate(command_ids)))
    for command_id, outcome in zip(command_ids, results, strict=True):
        for result in outcome:
            # Losers are refused: by the validator, or, when their update reached a workflow
            # task that the server then rejected (the workflow completed while new messages
            # were arriving), by the server itself. Either way nothing was carried out for them.
            assert result is None or isinstance(
                result, (DecisionOutcome, WorkflowUpdateFailedError, RPCError)
            )
        await temporal.get_workflow_handle(workflow_id(domain, command_id)).result()
        events = await pool.fetch(
            """
            SELECT event_type FROM commandbus.audit
            WHERE domain = $1 AND command_id = $2 AND event_type LIKE 'OPERATOR_%'
            """,
            domain,
            command_id,
        )
        assert len(events) == 1, events
        replies = await replies_for(pool, f"{domain}__replies", command_id)
        expected_replies = 0 if events[0]["event_type"] == "OPERATOR_RETRY" else 1
        assert len(replies) == expected_replies
        status = await status_of(pool, domain, command_id)
        assert (
            status
            == {
                "OPERATOR_CANCEL": "CANCELED",
                "OPERATOR_COMPLETE": "COMPLETED",
                "OPERATOR_RETRY": "PENDING",
            }[events[0]["event_type"]]
        )
    kinds = await pool.fetch(
        "SELECT kind, count(*) AS n FROM tsq.effect WHERE domain = $1 AND kind <> 'refusal' "
        "GROUP BY kind",
        domain,
    )
    assert sum(row["n"] for row in kinds) == 50


async def test_list_troubleshooting_filters_pages_and_orders_newest_first(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Filters by type, error code and time; pages with limit/offset; newest first."""
    domain = new_domain()
    ids = [await seed_command(pool, domain, command_type="DebitAccount") for _ in range(3)]
    ids.append(await seed_command(pool, domain, command_type="Refund"))
    await seed_command(pool, domain, status="PENDING")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for n, command_id in enumerate(ids):
        await pool.execute(
            "UPDATE commandbus.command SET updated_at = $2, last_error_code = $3 "
            "WHERE command_id = $1",
            command_id,
            base + timedelta(hours=n),
            "TIMEOUT" if n == 1 else "ACCOUNT_CLOSED",
        )
    everything = await tsq.list_troubleshooting(domain)
    assert [i.command_id for i in everything] == ids[::-1]
    item = everything[-1]
    assert item.command_type == "DebitAccount" and item.attempts == 3 and item.max_attempts == 3
    assert item.last_error.code == "ACCOUNT_CLOSED" and item.last_error.type == "PERMANENT"
    assert item.reply_to == f"{domain}__replies" and item.correlation_id is not None
    assert item.payload is not None and item.payload["command_id"] == str(ids[0])

    refunds = await tsq.list_troubleshooting(domain, command_type="Refund")
    assert [i.command_id for i in refunds] == [ids[3]]
    timeouts = await tsq.list_troubleshooting(domain, error_code="TIMEOUT")
    assert [i.command_id for i in timeouts] == [ids[1]]
    window = await tsq.list_troubleshooting(
        domain, since=base + timedelta(hours=1), until=base + timedelta(hours=3)
    )
    assert [i.command_id for i in window] == [ids[2], ids[1]]
    pages = [await tsq.list_troubleshooting(domain, limit=3, offset=o) for o in (0, 3)]
    assert [i.command_id for page in pages for i in page] == ids[::-1]
    with pytest.raises(InvalidInputError, match="limit"):
        await tsq.list_troubleshooting(domain, limit=0)


async def test_audit_trail_is_chronological_with_parsed_details(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The audit trail lists the move and the decision in order, details as objects."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="IN_PROGRESS")
    await tsq.move_to_troubleshooting(domain, command_id, error_type="PERMANENT", error_code="E1")
    await tsq.operator_cancel(domain, command_id, "Invalid account", operator="jane")
    trail = await tsq.get_audit_trail(domain, command_id)
    assert [e.event_type for e in trail] == ["MOVED_TO_TSQ", "OPERATOR_CANCEL"]
    assert trail[1].details is not None and trail[1].details["operator"] == "jane"
    with pytest.raises(CommandNotFoundError):
        await tsq.get_audit_trail(domain, uuid.uuid4())


async def test_show_combines_command_payload_workflow_and_audit(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`show` gives the row, the original message, the workflow's state and the audit trail."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    before = await tsq.show(domain, command_id)
    assert before.workflow is None and before.workflow_note is not None
    assert "tsq sync" in before.workflow_note
    await tsq.start_workflow(domain, command_id)
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    after = await assert_eventually(
        lambda: tsq.show(domain, command_id), lambda d: d.workflow is not None
    )
    assert after.workflow is not None and after.workflow.state == "CANCELED"
    assert after.command.status == "CANCELED"
    assert after.command.payload is not None
    assert [e.event_type for e in after.audit] == ["OPERATOR_CANCEL"]
