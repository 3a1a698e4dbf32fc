"""Time that works for the operator: policies escalate and expire parked commands, snoozes push
them later, retries wait for their time. Real services, durations of seconds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    scratch_database,
    seed_command,
    status_of,
)
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.db import create_pool
from tsq.errors import InvalidInputError, InvalidOperationError
from tsq.models import DecisionOutcome, StateView
from tsq.watch import Watcher
from tsq.worker import new_worker
from tsq.workflows import TSQ_ESCALATED, TSQ_STATE


def _handle(tsq: TroubleshootingClient, wid: str) -> WorkflowHandle[Any, DecisionOutcome]:
    return tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)


async def _state(handle: WorkflowHandle[Any, Any]) -> StateView:
    state: StateView = await handle.query("state", result_type=StateView)
    return state


async def _parked_with_policy(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, **policy: Any
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    await tsq.set_policy(domain, "p", operator="ops", **policy)
    command_id = await seed_command(pool, domain)
    return domain, command_id, _handle(tsq, await tsq.start_workflow(domain, command_id))


async def test_escalation_fires_once_and_the_list_can_filter_on_it(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Undecided past `escalate_after`: one TSQ_ESCALATED row, TsqEscalated=true in the
    list, the details say so, and the command still waits for a decision."""
    domain, command_id, handle = await _parked_with_policy(tsq, pool, escalate_after="2s")
    query = f'CommandDomain = "{domain}" AND TsqEscalated = true'
    await assert_eventually(
        lambda: tsq.temporal.count_workflows(query), lambda n: n.count == 1, within=30
    )
    [row] = await audit_rows(pool, domain, command_id, "TSQ_ESCALATED")
    assert row["details_json"]["policy"] == "p"
    state = await _state(handle)
    assert state.state is TsqState.AWAITING_OPERATOR and state.escalated
    await asyncio.sleep(1)
    assert len(await audit_rows(pool, domain, command_id, "TSQ_ESCALATED")) == 1
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_ESCALATED) is True
    outcome = await tsq.operator_cancel(domain, command_id, "after the escalation")
    assert outcome is not None and outcome.carried_out


@pytest.mark.parametrize("decision", ["cancel", "complete"])
async def test_expiry_decides_once_through_the_same_path_as_an_operator(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, decision: str
) -> None:
    """Past `expire_after`: the policy's decision is carried out once, named after the policy
    (operator `policy:<name>`), with one reply; the workflow ends as an operator's would."""
    extra = {"reason": "expired"} if decision == "cancel" else {"result_data": {"by": "policy"}}
    domain, command_id, handle = await _parked_with_policy(
        tsq, pool, expire_after="2s", expire_decision=decision, **extra
    )
    outcome = await asyncio.wait_for(handle.result(), 30)
    assert outcome.carried_out and outcome.operator == "policy:p"
    expected = "CANCELED" if decision == "cancel" else "COMPLETED"
    assert await status_of(pool, domain, command_id) == expected
    event = "OPERATOR_CANCEL" if decision == "cancel" else "OPERATOR_COMPLETE"
    [row] = await audit_rows(pool, domain, command_id, event)
    assert (row["details_json"]["operator"], row["details_json"]["via"]) == ("policy:p", "policy")
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["outcome"] == ("CANCELED" if decision == "cancel" else "SUCCESS")
    assert (await handle.describe()).typed_search_attributes.get(TSQ_STATE) == expected


async def test_snooze_moves_both_deadlines_and_is_audited(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Snoozed for an hour: escalation and expiry move an hour later; nothing fires when
    they would have; TSQ_SNOOZED says who, why and the new deadlines."""
    domain, command_id, handle = await _parked_with_policy(
        tsq, pool, escalate_after="3s", expire_after="4s", expire_decision="cancel", reason="old"
    )
    before = await _state(handle)
    assert before.escalate_at is not None and before.expire_at is not None
    state = await tsq.snooze(domain, command_id, "1h", "waiting for the ledger", operator="jane")
    assert state.escalate_at == before.escalate_at + timedelta(hours=1)
    assert state.expire_at == before.expire_at + timedelta(hours=1)
    [row] = await audit_rows(pool, domain, command_id, "TSQ_SNOOZED")
    assert row["details_json"]["reason"] == "waiting for the ledger"
    assert row["details_json"]["expire_at"] == state.expire_at.isoformat()
    await asyncio.sleep(5)
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id, "TSQ_ESCALATED") == []


async def test_scheduled_retry_waits_then_retries_once(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A retry for two seconds from now: RETRY_SCHEDULED in the list until then, then the
    normal retry, once."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    at = datetime.now(UTC) + timedelta(seconds=2)
    outcome = await tsq.operator_retry(domain, command_id, operator="jane", not_before=at)
    assert outcome is not None and not outcome.carried_out and outcome.scheduled_for == at
    handle = _handle(tsq, f"tsq:{domain}:{command_id}")
    assert (await _state(handle)).state is TsqState.RETRY_SCHEDULED
    [row] = await audit_rows(pool, domain, command_id, "TSQ_RETRY_SCHEDULED")
    assert row["details_json"]["not_before"] == at.isoformat()
    result = await asyncio.wait_for(handle.result(), 30)
    assert result.carried_out and result.operator == "jane"
    assert await status_of(pool, domain, command_id) == "PENDING"
    assert len(await audit_rows(pool, domain, command_id, "OPERATOR_RETRY")) == 1


async def test_a_decision_before_the_scheduled_retry_replaces_it(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A retry scheduled for an hour from now, then a cancel: the cancel is carried out, the
    retry is dropped (audited: superseded, by whom), and never runs."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    at = datetime.now(UTC) + timedelta(hours=1)
    await tsq.operator_retry(domain, command_id, operator="jane", not_before=at)
    outcome = await tsq.operator_cancel(domain, command_id, "changed my mind", operator="joe")
    assert outcome is not None and outcome.carried_out
    [row] = await audit_rows(pool, domain, command_id, "TSQ_RETRY_UNSCHEDULED")
    details = row["details_json"]
    assert (details["superseded_by"], details["operator"], details["scheduled_by"]) == (
        "cancel",
        "joe",
        "jane",
    )
    assert await audit_rows(pool, domain, command_id, "OPERATOR_RETRY") == []


async def test_unschedule_returns_the_command_to_waiting(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`unschedule` drops the scheduled retry; the command waits for a decision again."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.operator_retry(
        domain, command_id, not_before=datetime.now(UTC) + timedelta(minutes=5)
    )
    state = await tsq.unschedule(domain, command_id, operator="jane", reason="fixed by hand")
    assert state.state is TsqState.AWAITING_OPERATOR and state.retry_scheduled_for is None
    assert len(await audit_rows(pool, domain, command_id, "TSQ_RETRY_UNSCHEDULED")) == 1
    with pytest.raises(InvalidOperationError, match="no retry"):
        await tsq.unschedule(domain, command_id)


async def test_expiry_racing_an_operator_ends_in_one_effect(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The policy's expiry and an operator's cancel at the same moment: one is carried out,
    one audit row, one reply; the other is told."""
    domain, command_id, handle = await _parked_with_policy(
        tsq, pool, expire_after="2s", expire_decision="cancel", reason="expired"
    )
    expire_at = (await _state(handle)).expire_at
    assert expire_at is not None
    await asyncio.sleep(max(0.0, (expire_at - datetime.now(UTC)).total_seconds()))
    with_operator = await asyncio.gather(
        tsq.operator_cancel(domain, command_id, "by hand", operator="jane"),
        return_exceptions=True,
    )
    await asyncio.wait_for(handle.result(), 30)
    audits = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert len(audits) == 1
    assert len(await replies_for(pool, f"{domain}__replies", command_id)) == 1
    winner = audits[0]["details_json"]["operator"]
    [answer] = with_operator
    if winner == "jane":
        assert isinstance(answer, DecisionOutcome) and answer.carried_out
    else:
        assert winner == "policy:p" and isinstance(answer, InvalidOperationError)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"escalate_after": "0s"}, "longer than zero"),
        ({"escalate_after": "-5m"}, "not a duration"),
        ({"escalate_after": "3660d"}, "ten years"),
        ({"escalate_after": "soon"}, "not a duration"),
        ({"expire_after": "1h"}, "go together"),
        ({"expire_after": "1h", "expire_decision": "cancel"}, "--reason"),
        ({"expire_after": "1h", "expire_decision": "explode"}, "neither cancel nor complete"),
        (
            {"expire_after": "1h", "expire_decision": "complete", "result_data": {"x": "\x00"}},
            "NUL",
        ),
        ({}, "escalate-after, expire-after or require-approval"),
        ({"require_approval": ["cancel", "explode"]}, "the decisions are"),
        ({"approval_expires_after": "1h"}, "goes with"),
    ],
)
async def test_bad_policy_is_refused_naming_the_field_and_changes_nothing(
    tsq: TroubleshootingClient, fields: dict[str, Any], problem: str
) -> None:
    """Durations out of range, decisions without what they need, data the database cannot
    store: refused, nothing stored."""
    domain = new_domain()
    with pytest.raises(InvalidInputError, match=problem):
        await tsq.set_policy(domain, "p", **fields)
    assert await tsq.policies(domain) == []


async def test_snoozing_a_decided_command_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Nothing left to snooze once decided; and a command without a policy has nothing to
    snooze either."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.start_workflow(domain, command_id)
    with pytest.raises(InvalidOperationError, match="nothing to snooze"):
        await tsq.snooze(domain, command_id, "1h", "why")
    await tsq.operator_cancel(domain, command_id, "done")
    with pytest.raises(InvalidOperationError, match="CANCELED"):
        await tsq.snooze(domain, command_id, "1h", "why")


async def test_policy_changes_are_audited_with_before_and_after(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """set, set again, delete: three TSQ_POLICY_CHANGED rows saying who and what changed."""
    domain = new_domain()
    first = await tsq.set_policy(domain, "p", escalate_after="1h", operator="jane")
    await tsq.set_policy(domain, "p", escalate_after="2h", operator="joe")
    await tsq.delete_policy(domain, "p", operator="ann")
    rows = await pool.fetch(
        "SELECT details_json FROM commandbus.audit WHERE domain = $1 AND event_type = $2 "
        "ORDER BY audit_id",
        domain,
        "TSQ_POLICY_CHANGED",
    )
    details = [row["details_json"] for row in rows]
    assert [(d["action"], d["operator"]) for d in details] == [
        ("set", "jane"),
        ("set", "joe"),
        ("delete", "ann"),
    ]
    assert details[0]["before"] is None and details[1]["before"]["escalate_after"] == "1:00:00"
    assert details[1]["after"]["escalate_after"] == "2:00:00" and details[2]["after"] is None
    assert first.escalate_after == timedelta(hours=1)
    json.dumps(details)


@pytest.fixture
async def watched(admin_url: str, temporal: Client) -> AsyncIterator[TroubleshootingClient]:
    """A database of its own with a worker and a watcher (which tells workflows of changes)."""
    async with scratch_database(admin_url, migrated=True) as url:
        pool = await create_pool(url)
        client = TroubleshootingClient(
            temporal, pool, task_queue=f"tsq-time-{uuid.uuid4().hex[:8]}"
        )
        stop = asyncio.Event()
        try:
            async with new_worker(temporal, pool, client.task_queue):
                running = asyncio.create_task(Watcher(client, url).run(stop))
                yield client
                stop.set()
                await running
        finally:
            await pool.close()


async def test_policy_change_reaches_workflows_already_waiting(
    watched: TroubleshootingClient,
) -> None:
    """Commands waiting with no policy; a policy set afterwards reaches them within moments,
    and they expire by it."""
    domain = new_domain()
    ids = [await seed_command(watched.pool, domain) for _ in range(3)]
    handles = [_handle(watched, f"tsq:{domain}:{cid}") for cid in ids]

    async def started(handle: WorkflowHandle[Any, Any]) -> bool:
        try:
            await handle.describe()
        except RPCError:
            return False
        return True

    for handle in handles:
        await assert_eventually(functools.partial(started, handle), within=20)
    await watched.set_policy(
        domain, "late", expire_after="1s", expire_decision="complete", result_data={"late": 1}
    )
    outcomes = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
    assert all(o.carried_out and o.operator == "policy:late" for o in outcomes)
    for cid in ids:
        assert await status_of(watched.pool, domain, cid) == "COMPLETED"
