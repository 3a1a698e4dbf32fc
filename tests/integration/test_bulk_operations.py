"""Bulk operations: one decision for many commands, in chunks, each command decided once and
each command's workflow ending with the outcome. The bus's side is plain SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from tests.helpers import (
    TSQ,
    assert_eventually,
    new_domain,
    run_tsq,
    scratch_database,
    seed_command,
    seed_many,
    tsq_env,
)
from tsq import TroubleshootingClient
from tsq.contract import bulk_workflow_id, workflow_id
from tsq.db import create_pool
from tsq.errors import AlreadyDecidedError, InvalidInputError
from tsq.models import BulkOperation, DecisionOutcome, StateView
from tsq.settings import Settings
from tsq.watch import Watcher
from tsq.worker import new_worker

pytestmark = pytest.mark.timeout(180)
HISTORIES = Path(__file__).resolve().parents[1] / "histories"


async def _keep_history(client: TroubleshootingClient, bulk_id: uuid.UUID, name: str) -> None:
    """The bulk operation's history, stored for the replay tests when asked (see
    tests/integration/test_histories.py)."""
    if os.environ.get("TSQ_CAPTURE_HISTORIES"):
        history = await client.temporal.get_workflow_handle(
            bulk_workflow_id(bulk_id)
        ).fetch_history()
        (HISTORIES / f"{name}.json").write_text(history.to_json() + "\n", encoding="utf-8")


@dataclass
class Stack:
    settings: Settings
    pool: asyncpg.Pool
    client: TroubleshootingClient

    def handle(self, domain: str, cid: uuid.UUID) -> WorkflowHandle[Any, DecisionOutcome]:
        return self.client.temporal.get_workflow_handle(
            workflow_id(domain, cid), result_type=DecisionOutcome
        )


@pytest.fixture(scope="module")
async def stack(admin_url: str, temporal: Client, settings: Settings) -> AsyncIterator[Stack]:
    """A database of its own with a worker and its watcher, as `tsq worker` runs them."""
    async with scratch_database(admin_url, migrated=True) as url:
        pool = await create_pool(url, max_size=20)
        task_queue = f"tsq-bulk-{uuid.uuid4().hex[:8]}"
        client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
        stop = asyncio.Event()
        try:
            async with new_worker(temporal, pool, task_queue):
                watching = asyncio.create_task(Watcher(client, url, sweep_every=3600).run(stop))
                yield Stack(
                    dataclasses.replace(settings, database_url=url, task_queue=task_queue),
                    pool,
                    client,
                )
                stop.set()
                await watching
        finally:
            await pool.close()


async def _waiting_workflows(stack: Stack, domain: str, count: int) -> None:
    """Until the watcher has started a workflow for each of the domain's parked commands."""
    await assert_eventually(
        lambda: stack.pool.fetchval(
            "SELECT count(*) FROM tsq.parking WHERE domain = $1 AND left_at IS NULL "
            "AND todo IS NULL",
            domain,
        ),
        lambda n: n == count,
        within=60,
    )


async def _effects(pool: asyncpg.Pool, domain: str) -> dict[str, Any]:
    """Per command: its status, its decision audit rows, its replies (the bus's view)."""
    row = await pool.fetchrow(
        """
        SELECT count(*) AS commands,
            count(*) FILTER (WHERE status = 'CANCELED') AS canceled,
            (SELECT count(*) FROM commandbus.audit a WHERE a.domain = $1
                AND a.event_type LIKE 'OPERATOR_%') AS audits,
            (SELECT count(DISTINCT a.command_id) FROM commandbus.audit a WHERE a.domain = $1
                AND a.event_type LIKE 'OPERATOR_%') AS audited
        FROM commandbus.command WHERE domain = $1
        """,
        domain,
    )
    replies = await pool.fetch(
        "SELECT message->>'command_id' AS cid FROM pgmq.read($1::text, 0, 100000)",
        f"{domain}__replies",
    )
    assert row is not None
    return {**dict(row), "replies": len(replies), "replied": len({r["cid"] for r in replies})}


async def test_bulk_cancel_decides_each_command_once_and_each_workflow_ends_canceled(
    stack: Stack,
) -> None:
    """A bulk cancel of 300 waiting commands: one status change, one audit row naming the
    bulk operation and one reply each; every command's workflow ends CANCELED with the
    operator, the reason and the bulk operation's id; the operation's own workflow ends with
    its counts."""
    domain = new_domain()
    ids = await seed_many(stack.pool, domain, 300)
    await _waiting_workflows(stack, domain, 300)

    op = await stack.client.start_bulk(
        "cancel", domain, error_code="ACCOUNT_CLOSED", operator="jane", reason="ledger outage"
    )
    assert (op.total, op.status, op.selection) == (300, "running", "error_code=ACCOUNT_CLOSED")
    done = await stack.client.wait_bulk(op.bulk_id)

    assert (done.status, done.counts, done.remaining) == ("finished", {"carried_out": 300}, 0)
    assert await _effects(stack.pool, domain) == {
        "commands": 300, "canceled": 300, "audits": 300, "audited": 300,
        "replies": 300, "replied": 300,
    }  # fmt: skip
    audit = await stack.pool.fetchval(
        "SELECT details_json FROM commandbus.audit WHERE command_id = $1", ids[0]
    )
    assert audit["bulk_id"] == str(op.bulk_id) and audit["via"] == "bulk"
    assert audit["operator"] == "jane" and audit["reason"] == "ledger outage"
    outcomes = await asyncio.gather(*(stack.handle(domain, cid).result() for cid in ids))
    assert {(o.decision, o.carried_out, o.operator, o.reason, o.bulk_id) for o in outcomes} == {
        ("cancel", True, "jane", "ledger outage", str(op.bulk_id))
    }
    state = await stack.handle(domain, ids[-1]).query("state", result_type=StateView)
    assert state.state.value == "CANCELED" and state.decided_by == "jane"
    assert state.outcome is not None and state.outcome.bulk_id == str(op.bulk_id)
    bulk_handle = stack.client.temporal.get_workflow_handle(
        bulk_workflow_id(op.bulk_id), result_type=BulkOperation
    )
    result = await bulk_handle.result()
    assert result.counts == {"carried_out": 300} and result.status == "finished"
    metadata = await bulk_handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "**300** carried out, 0 skipped, 0 failed, 0 remaining of 300" in (
        metadata.current_details
    )
    await _keep_history(stack.client, op.bulk_id, "bulk_cancel")
    items = await stack.client.bulk_items(op.bulk_id)
    # Oldest parked first, as selected: parked in one transaction, they go by id.
    assert [i.command_id for i in items] == sorted(ids)


async def test_overlapping_bulk_operations_decide_each_command_once(stack: Stack) -> None:
    """Two bulk operations at once over overlapping selections: each command is decided once;
    the one that came second reports the overlap as already decided, naming the first."""
    domain = new_domain()
    ids = await seed_many(stack.pool, domain, 240)
    first_ids, second_ids = ids[:160], ids[80:]

    first, second = await asyncio.gather(
        stack.client.start_bulk("cancel", domain, command_ids=first_ids, operator="ann",
                                reason="first"),
        stack.client.start_bulk("complete", domain, command_ids=second_ids, operator="bob"),
    )  # fmt: skip
    first, second = await asyncio.gather(
        stack.client.wait_bulk(first.bulk_id), stack.client.wait_bulk(second.bulk_id)
    )

    effects = await _effects(stack.pool, domain)
    assert (effects["audits"], effects["audited"]) == (240, 240)
    assert effects["replies"] == effects["replied"] == 240
    assert first.carried_out + second.carried_out == 240
    overlap = [*first.counts.items(), *second.counts.items()]
    assert sum(n for result, n in overlap if result == "already_decided") == 80
    items = {
        **{(first.bulk_id, i.command_id): i for i in await stack.client.bulk_items(first.bulk_id)},
        **{(second.bulk_id, i.command_id): i
           for i in await stack.client.bulk_items(second.bulk_id)},
    }  # fmt: skip
    for cid in ids[80:160]:
        mine, theirs = items[(first.bulk_id, cid)], items[(second.bulk_id, cid)]
        assert sorted([str(mine.result), str(theirs.result)]) == ["already_decided", "carried_out"]
        loser, winner = (theirs, first) if mine.result == "carried_out" else (mine, second)
        assert loser.detail is not None and f"in bulk operation {winner.bulk_id}" in loser.detail


async def test_individual_decision_racing_a_bulk_one_ends_in_one_effect(stack: Stack) -> None:
    """Operators decide commands one by one while a bulk retry runs over them: each command
    has exactly one decision, and whoever lost is told who won."""
    domain = new_domain()
    ids = await seed_many(stack.pool, domain, 60)
    await _waiting_workflows(stack, domain, 60)

    async def alone(cid: uuid.UUID) -> str:
        try:
            await stack.client.operator_cancel(domain, cid, "by hand", operator="carol")
        except AlreadyDecidedError as err:
            assert "already decided: retry by dave" in str(err)
            return "lost"
        return "won"

    started, singles = await asyncio.gather(
        stack.client.start_bulk("retry", domain, command_ids=ids, operator="dave"),
        asyncio.gather(*(alone(cid) for cid in ids)),
    )
    op = await stack.client.wait_bulk(started.bulk_id)

    effects = await _effects(stack.pool, domain)
    assert (effects["audits"], effects["audited"]) == (60, 60)
    won = singles.count("won")
    assert op.carried_out == 60 - won
    # Each one the bulk operation lost is skipped, and says who won.
    assert op.skipped == won and set(op.counts) <= {"carried_out", "already_decided"}
    items = await stack.client.bulk_items(op.bulk_id)
    for item in items:
        if item.result == "already_decided":
            assert item.detail == "already decided: cancel by carol"
    outcomes = await asyncio.gather(*(stack.handle(domain, cid).result() for cid in ids))
    assert sorted(o.decision.value for o in outcomes if o.decision) == sorted(
        ["cancel"] * won + ["retry"] * (60 - won)
    )


async def test_stop_keeps_what_was_committed_and_leaves_the_rest_untouched(
    stack: Stack,
) -> None:
    """A bulk operation capped by a rate is stopped midway: what it committed stays, nothing
    is decided after the stop returns, the rest still waits; both are reported."""
    domain = new_domain()
    await seed_many(stack.pool, domain, 200)
    op = await stack.client.start_bulk(
        "cancel", domain, all_waiting=True, operator="erin", reason="incident", rate=40
    )
    await assert_eventually(
        lambda: stack.client.bulk(op.bulk_id), lambda o: o.carried_out >= 40, within=60
    )

    stopped = await stack.client.stop_bulk(op.bulk_id, operator="frank")

    assert stopped.status == "stopped" and stopped.stop_requested_by == "frank"
    assert 40 <= stopped.carried_out < 200
    assert stopped.carried_out + stopped.remaining == 200
    effects = await _effects(stack.pool, domain)
    assert effects["canceled"] == effects["audits"] == stopped.carried_out
    waiting = await stack.pool.fetchval(
        "SELECT count(*) FROM commandbus.command WHERE domain = $1 "
        "AND status = 'IN_TROUBLESHOOTING_QUEUE'",
        domain,
    )
    assert waiting == stopped.remaining
    untouched = [i for i in await stack.client.bulk_items(op.bulk_id) if i.result is None]
    assert len(untouched) == stopped.remaining
    await _keep_history(stack.client, op.bulk_id, "bulk_stopped")


async def test_commands_no_longer_waiting_are_skipped_and_counted(stack: Stack) -> None:
    """Ids of commands decided already (by tsq: who decided says so), unknown, or gone from
    the queue are skipped, each with the reason; the others are decided."""
    domain = new_domain()
    waiting = await seed_command(stack.pool, domain)
    done = await seed_command(stack.pool, domain, status="CANCELED")
    decided = await seed_command(stack.pool, domain)
    await stack.client.operator_cancel(domain, decided, "by hand", operator="carol")
    unknown = uuid.uuid4()

    op = await stack.client.start_bulk(
        "complete", domain, command_ids=[waiting, done, decided, unknown, waiting], operator="gus"
    )
    op = await stack.client.wait_bulk(op.bulk_id)

    assert op.total == 4
    assert op.counts == {
        "carried_out": 1, "already_decided": 1, "not_in_troubleshooting_queue": 1, "not_found": 1
    }  # fmt: skip
    assert (op.carried_out, op.skipped, op.failed) == (1, 3, 0)
    details = {i.command_id: i.detail for i in await stack.client.bulk_items(op.bulk_id)}
    assert details[decided] == "already decided: cancel by carol"
    assert (
        details[done] == f"command {done} is CANCELED, not in the troubleshooting queue; "
        "nothing was changed"
    )


async def test_a_command_awaiting_approval_is_held_back_from_a_bulk_decision(
    stack: Stack,
) -> None:
    """A proposal waits on one command of the selection: the bulk operation leaves it alone,
    reported per item (`proposal_pending`, a failure someone must look at), the proposal still
    waits, and its approval carries it out afterwards; the other commands are decided."""
    domain = new_domain()
    await stack.client.set_policy(domain, "four-eyes", require_approval=["cancel"], operator="lead")
    proposed, other = [await seed_command(stack.pool, domain) for _ in range(2)]
    proposal = await stack.client.operator_cancel(domain, proposed, "duplicate", operator="alice")
    assert proposal is not None and proposal.proposal is not None
    await assert_eventually(
        lambda: stack.pool.fetchval(
            "SELECT count(*) FROM tsq.proposal WHERE command_id = $1 AND NOT ended", proposed
        )
    )

    op = await stack.client.start_bulk(
        "complete", domain, command_ids=[proposed, other], operator="gus"
    )
    op = await stack.client.wait_bulk(op.bulk_id)

    assert op.counts == {"carried_out": 1, "proposal_pending": 1}
    assert (op.carried_out, op.skipped, op.failed) == (1, 0, 1)
    details = {i.command_id: i.detail for i in await stack.client.bulk_items(op.bulk_id)}
    assert "cancel proposed by alice awaiting another operator's approval" in str(details[proposed])
    handle = stack.client.temporal.get_workflow_handle(workflow_id(domain, proposed))
    state: StateView = await handle.query("state", result_type=StateView)
    assert state.proposal is not None and state.state.value == "PENDING_APPROVAL"
    approved = await stack.client.approve(domain, proposed, operator="bob")
    assert approved.carried_out and approved.status == "CANCELED"


@pytest.mark.parametrize(
    ("selection", "problem"),
    [
        ({"command_type": "NoSuchType"}, "no command in the troubleshooting queue"),
        ({"command_ids": []}, "no command in the troubleshooting queue"),
        ({}, "pass all_waiting=True"),
        ({"command_ids": ["not-a-uuid"]}, "not-a-uuid"),
        ({"operator": " ", "all_waiting": True}, "names its operator"),
        ({"rate": 0, "all_waiting": True}, "rate must be above 0"),
    ],
    ids=["no-match", "no-ids", "no-selection", "not-a-uuid", "blank-operator", "zero-rate"],
)
async def test_bad_selection_is_refused_and_changes_nothing(
    stack: Stack, selection: dict[str, Any], problem: str
) -> None:
    domain = new_domain()
    command_id = await seed_command(stack.pool, domain)
    before = await stack.pool.fetchval("SELECT count(*) FROM tsq.bulk")
    with pytest.raises(InvalidInputError, match=problem):
        await stack.client.start_bulk(
            "cancel", domain, **{"operator": "hal", "reason": "r", **selection}
        )
    assert await stack.pool.fetchval("SELECT count(*) FROM tsq.bulk") == before
    status = await stack.pool.fetchval(
        "SELECT status FROM commandbus.command WHERE command_id = $1", command_id
    )
    assert status == "IN_TROUBLESHOOTING_QUEUE"


async def test_ids_of_another_domain_are_refused_before_anything_starts(stack: Stack) -> None:
    """A selection mixing domains names the ids that belong elsewhere; nothing is decided."""
    domain, other = new_domain(), new_domain()
    mine = await seed_command(stack.pool, domain)
    theirs = await seed_command(stack.pool, other)

    with pytest.raises(InvalidInputError, match=f"{theirs} \\(domain {other}\\)"):
        await stack.client.start_bulk(
            "cancel", domain, command_ids=[mine, theirs], operator="ivy", reason="r"
        )
    for domain_, cid in ((domain, mine), (other, theirs)):
        status = await stack.pool.fetchval(
            "SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2",
            domain_,
            cid,
        )
        assert status == "IN_TROUBLESHOOTING_QUEUE"


async def test_cli_bulk_decision_prints_each_command_and_bulk_commands_follow_it(
    stack: Stack,
) -> None:
    """`tsq cancel DOMAIN --all --json` runs a bulk operation to its end and prints each
    command's result; `tsq bulk list` and `tsq bulk status` show it."""
    domain = new_domain()
    ids = await seed_many(stack.pool, domain, 50)
    decided = await seed_command(stack.pool, domain, status="COMPLETED")

    done = await run_tsq(
        stack.settings,
        *("cancel", domain, "--stdin", "--reason", "incident", "--yes", "--json"),
        stdin="\n".join(str(c) for c in [*ids, decided]),
    )

    assert done.returncode == 1, done.stderr
    results = {r["command_id"]: r for r in json.loads(done.stdout)}
    assert {results[str(c)]["result"] for c in ids} == {"carried_out"}
    assert results[str(decided)]["result"] == "not_in_troubleshooting_queue"
    assert "1 of 51 commands not carried out" in done.stderr
    [op] = await stack.client.bulk_operations(domain)
    listed = await run_tsq(stack.settings, "bulk", "list", domain)
    assert str(op.bulk_id) in listed.stdout and "finished" in listed.stdout
    shown = await run_tsq(stack.settings, "bulk", "status", str(op.bulk_id))
    assert "50 carried out, 1 skipped, 0 failed, 0 remaining" in shown.stdout


async def test_cli_refuses_stdin_lines_that_are_not_ids_before_anything_starts(
    stack: Stack,
) -> None:
    domain = new_domain()
    command_id = await seed_command(stack.pool, domain)

    done = await run_tsq(
        stack.settings,
        *("cancel", domain, "--stdin", "--reason", "r", "--yes"),
        stdin=f"{command_id}\n\nnot-a-uuid\n",
    )

    assert done.returncode == 1
    assert "line 3: 'not-a-uuid' is not a UUID" in done.stderr
    assert "nothing was started" in done.stderr
    assert await stack.client.bulk_operations(domain) == []
    status = await stack.pool.fetchval(
        "SELECT status FROM commandbus.command WHERE command_id = $1", command_id
    )
    assert status == "IN_TROUBLESHOOTING_QUEUE"


async def test_ctrl_c_leaves_the_bulk_operation_running(stack: Stack) -> None:
    """Ctrl-C detaches the command line (exit 130) and says how to follow or stop the
    operation, which goes on to the end."""
    domain = new_domain()
    await seed_many(stack.pool, domain, 120)
    process = await asyncio.create_subprocess_exec(
        TSQ, "cancel", domain, "--all", "--yes", "--rate", "30", "--reason", "incident",
        env=tsq_env(stack.settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await assert_eventually(
            lambda: stack.client.bulk_operations(domain), lambda ops: len(ops) == 1, within=30
        )
        [op] = await stack.client.bulk_operations(domain)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 130, err.decode()
    assert f"bulk operation {op.bulk_id} goes on" in err.decode()
    assert f"tsq bulk stop {op.bulk_id}" in err.decode()
    finished = await stack.client.wait_bulk(op.bulk_id)
    assert finished.carried_out == 120


async def _under_four_eyes(stack: Stack, count: int, **policy: Any) -> tuple[str, list[uuid.UUID]]:
    domain = new_domain()
    await stack.client.set_policy(
        domain, "four-eyes", require_approval=["cancel"], operator="lead", **policy
    )
    return domain, [await seed_command(stack.pool, domain) for _ in range(count)]


async def test_a_bulk_decision_under_four_eyes_is_one_proposal_approved_once(
    stack: Stack,
) -> None:
    """Under a policy asking approval for cancels, the dry run says the operation would be
    proposed; the real run proposes it as a whole (exit 0, nothing decided); its starter,
    lookalike or not, cannot approve it; another operator's approval runs it, and each command
    is decided once, as approved by them."""
    domain, ids = await _under_four_eyes(stack, 3)
    cancel = ("cancel", domain, "--all", "--reason", "incident", "--yes", "--operator", "alice")
    dry = await run_tsq(stack.settings, *cancel, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would be proposed as a whole" in dry.stdout
    proposed = await run_tsq(stack.settings, *cancel)
    assert proposed.returncode == 0, proposed.stderr
    assert "proposed: cancel of 3 commands" in proposed.stderr
    [op] = await stack.client.bulk_operations(domain)
    assert (op.status, op.needing_approval, op.carried_out) == ("proposed", 3, 0)
    for own in ("alice", " ALICE\u200b"):
        refused = await run_tsq(
            stack.settings, "bulk", "approve", str(op.bulk_id), "--operator", own
        )
        assert refused.returncode == 1 and "four eyes" in refused.stderr
    approved = await run_tsq(
        stack.settings, "bulk", "approve", str(op.bulk_id), "--operator", "bob", "--comment", "ok"
    )
    assert approved.returncode == 0, approved.stderr
    assert "approved by bob" in approved.stdout
    done = await stack.client.wait_bulk(op.bulk_id)
    assert (done.status, done.carried_out) == ("finished", 3)
    await _keep_history(stack.client, op.bulk_id, "bulk_approved")
    for cid in ids:
        rows = await stack.pool.fetch(
            "SELECT event_type, details_json FROM commandbus.audit WHERE command_id = $1 "
            "AND event_type IN ('OPERATOR_CANCEL', 'TSQ_APPROVED') ORDER BY audit_id",
            cid,
        )
        assert [r["event_type"] for r in rows] == ["TSQ_APPROVED", "OPERATOR_CANCEL"]
        assert rows[1]["details_json"]["approved_by"] == "bob"
        assert rows[1]["details_json"]["operator"] == "alice"
    again = await run_tsq(stack.settings, "bulk", "approve", str(op.bulk_id), "--operator", "carol")
    assert again.returncode == 1 and "only a proposed one" in again.stderr


@pytest.mark.parametrize("end", ["rejected", "expired", "stopped"])
async def test_a_bulk_proposal_rejected_expired_or_stopped_decides_nothing(
    stack: Stack, end: str
) -> None:
    """Rejected by another operator, not approved in time, or stopped: the operation ends so,
    audited, and every command still waits."""
    domain, ids = await _under_four_eyes(stack, 2, approval_expires_after="3s")
    op = await stack.client.start_bulk(
        "cancel", domain, command_ids=ids, reason="incident", operator="alice"
    )
    assert op.status == "proposed"
    if end == "rejected":
        await stack.client.reject_bulk(op.bulk_id, "not all of them", operator="bob")
    elif end == "stopped":
        await stack.client.stop_bulk(op.bulk_id, operator="alice")
    ended = await asyncio.wait_for(stack.client.wait_bulk(op.bulk_id), 60)
    assert (ended.status, ended.carried_out) == (end, 0)
    statuses = await stack.pool.fetch(
        "SELECT status FROM commandbus.command WHERE domain = $1", domain
    )
    assert {row["status"] for row in statuses} == {"IN_TROUBLESHOOTING_QUEUE"}
    if end != "stopped":
        event = {"rejected": "TSQ_REJECTED", "expired": "TSQ_PROPOSAL_EXPIRED"}[end]
        audited = await stack.pool.fetchval(
            "SELECT count(*) FROM commandbus.audit WHERE command_id = $1 AND event_type = $2",
            op.bulk_id,
            event,
        )
        assert audited == 1
