"""What each kind of decision writes into the workflow's history, and what the list shows.

Few events per decision is what lets the server decide thousands of commands: the usual one
changes `TsqState` once, to its outcome, with one local-activity marker. A decision held up by
the database shows its working state (CANCELING, ...) in the list until it goes through.

These runs are also the histories `tests/unit/test_replay.py` replays against the current
workflow code: `TSQ_CAPTURE_HISTORIES=1 pytest tests/integration/test_histories.py` stores them
in tests/histories (do it when a workflow change is meant to alter histories, before release).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError

from tests.helpers import assert_eventually, audit_rows, new_domain, seed_command, status_of
from tsq import TroubleshootingClient
from tsq.models import DecisionOutcome

HISTORIES = Path(__file__).resolve().parents[1] / "histories"
UPSERT = EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
MARKER = EventType.EVENT_TYPE_MARKER_RECORDED
CANCEL = {"reason": "Account closed by the customer", "operator": "jane@example.com"}


async def _parked(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)
    return (
        domain,
        command_id,
        tsq.temporal.get_workflow_handle(workflow_id, result_type=DecisionOutcome),
    )


async def _events(handle: WorkflowHandle[Any, DecisionOutcome], name: str) -> Counter[int]:
    """The closed workflow's events by type; stores the history under `name` when asked."""
    outcome = await handle.result()
    assert outcome is not None
    history = await handle.fetch_history()
    if os.environ.get("TSQ_CAPTURE_HISTORIES"):
        (HISTORIES / f"{name}.json").write_text(history.to_json() + "\n", encoding="utf-8")
    return Counter(event.event_type for event in history.events)


async def _listed_as(temporal: Client, workflow_id: str, state: str) -> None:
    """Until the workflow list finds the workflow in `state` (visibility lags a little)."""
    query = f'WorkflowId = "{workflow_id}" AND TsqState = "{state}"'
    await assert_eventually(
        lambda: temporal.count_workflows(query), lambda n: n.count == 1, within=60
    )


@pytest.mark.parametrize(
    ("name", "signal", "payload", "status"),
    [
        ("cancel_signal", "cancel", CANCEL, "CANCELED"),
        ("complete_signal", "complete", {"result_data": {"ok": True}}, "COMPLETED"),
    ],
)
async def test_decision_by_signal_changes_state_once_with_one_marker(
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    name: str,
    signal: str,
    payload: dict[str, Any],
    status: str,
) -> None:
    domain, command_id, handle = await _parked(tsq, pool)
    await handle.signal(signal, payload)
    events = await _events(handle, name)
    assert (events[UPSERT], events[MARKER]) == (1, 1)
    await _listed_as(tsq.temporal, handle.id, status)
    assert await status_of(pool, domain, command_id) == status


async def test_retry_by_update_changes_state_once_with_one_marker(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    _, _, handle = await _parked(tsq, pool)
    await handle.execute_update("operator_retry", {"operator": "jane@example.com"})
    events = await _events(handle, "retry_update")
    assert (events[UPSERT], events[MARKER]) == (1, 1)
    await _listed_as(tsq.temporal, handle.id, "RETRIED")


async def test_update_after_refused_signal_writes_one_marker_for_each(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    domain, command_id, handle = await _parked(tsq, pool)
    await handle.signal("cancel", {"reason": "  "})
    await handle.execute_update("operator_cancel", CANCEL)
    events = await _events(handle, "cancel_update_after_refused_signal")
    assert (events[UPSERT], events[MARKER]) == (1, 2)
    assert await status_of(pool, domain, command_id) == "CANCELED"


async def test_refusals_then_update_leave_the_list_untouched_until_decided(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A misspelt signal, a bad one and a cancellation request: refused, recorded, no upsert."""
    _, _, handle = await _parked(tsq, pool)
    await handle.signal("cancle", CANCEL)
    await handle.signal("cancel", {"operator": "jane@example.com"})
    await handle.cancel()
    await assert_eventually(lambda: handle.query("state"), lambda state: len(state["refused"]) == 3)
    await _listed_as(tsq.temporal, handle.id, "AWAITING_OPERATOR")
    await handle.execute_update("operator_complete", {"result_data": None})
    events = await _events(handle, "refusals_then_complete_update")
    # The decision's marker, and one per batch of refusals written to the audit trail.
    assert events[UPSERT] == 1 and 2 <= events[MARKER] <= 4


async def test_decided_elsewhere_changes_state_once(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    domain, command_id, handle = await _parked(tsq, pool)
    await pool.execute(
        "UPDATE commandbus.command SET status = 'COMPLETED' WHERE command_id = $1", command_id
    )
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "cancel_decided_elsewhere")
    assert (events[UPSERT], events[MARKER]) == (1, 1)
    await _listed_as(tsq.temporal, handle.id, "DECIDED_ELSEWHERE")
    assert await status_of(pool, domain, command_id) == "COMPLETED"


async def test_refused_decision_leaves_the_list_awaiting(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A retry with no original message to send is refused at once: no upsert, still waiting."""
    domain, command_id, handle = await _parked(tsq, pool)
    await pool.execute("DELETE FROM pgmq.a_" + f"{domain}__commands")
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update("operator_retry", {"operator": "jane@example.com"})
    await _listed_as(tsq.temporal, handle.id, "AWAITING_OPERATOR")
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "retry_refused_then_cancel")
    assert (events[UPSERT], events[MARKER]) == (1, 2)
    assert await status_of(pool, domain, command_id) == "CANCELED"


async def test_held_up_decision_shows_its_working_state_in_the_list(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The command row locked by another tool: the first attempt fails on its lock timeout, the
    list says CANCELING while the attempts go on, and the decision goes through once the lock
    is gone."""
    domain, command_id, handle = await _parked(tsq, pool)
    async with pool.acquire() as conn:
        locker = conn.transaction()
        await locker.start()
        try:
            await conn.execute(
                "SELECT 1 FROM commandbus.command WHERE command_id = $1 FOR UPDATE", command_id
            )
            await handle.signal("cancel", CANCEL)
            await _listed_as(tsq.temporal, handle.id, "CANCELING")
            assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
        finally:
            await locker.rollback()
    events = await _events(handle, "cancel_held_up")
    assert events[UPSERT] == 2 and events[MARKER] >= 2
    await _listed_as(tsq.temporal, handle.id, "CANCELED")
    assert await status_of(pool, domain, command_id) == "CANCELED"


TIMER_STARTED = EventType.EVENT_TYPE_TIMER_STARTED


async def _with_policy(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, **policy: Any
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    await tsq.set_policy(domain, "p", **policy)
    command_id = await seed_command(pool, domain)
    workflow_id = await tsq.start_workflow(domain, command_id)
    return (
        domain,
        command_id,
        tsq.temporal.get_workflow_handle(workflow_id, result_type=DecisionOutcome),
    )


async def test_escalation_then_cancel_upserts_escalated_once(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The escalation timer fires: one upsert (TsqEscalated), one audit event; then a cancel."""
    _, _, handle = await _with_policy(tsq, pool, escalate_after="1s")
    await _listed_as_escalated(tsq.temporal, handle.id)
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "escalated_then_cancel")
    assert events[TIMER_STARTED] == 1 and events[UPSERT] == 2 and events[MARKER] == 2


async def _listed_as_escalated(temporal: Client, workflow_id: str) -> None:
    query = f'WorkflowId = "{workflow_id}" AND TsqEscalated = true'
    await assert_eventually(
        lambda: temporal.count_workflows(query), lambda n: n.count == 1, within=60
    )


async def test_expiry_writes_the_decision_of_the_policy(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The expiry timer fires and the policy's cancel is carried out like an operator's."""
    _, _, handle = await _with_policy(
        tsq, pool, expire_after="1s", expire_decision="cancel", reason="expired"
    )
    events = await _events(handle, "expired_cancel")
    assert events[TIMER_STARTED] == 1 and events[UPSERT] == 1 and events[MARKER] == 1


async def test_snooze_then_complete(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """A snooze restarts the timer later and writes its audit event; then a complete."""
    domain, command_id, handle = await _with_policy(tsq, pool, escalate_after="1h")
    await tsq.snooze(domain, command_id, "30m", "not now")
    await handle.execute_update("operator_complete", {"result_data": None})
    events = await _events(handle, "snoozed_then_complete")
    assert events[TIMER_STARTED] == 2 and events[MARKER] == 2


async def test_scheduled_retry_fires(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """RETRY_SCHEDULED until its time, then the retry."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.start_workflow(domain, command_id)
    at = datetime.now(UTC) + timedelta(seconds=1)
    await tsq.operator_retry(domain, command_id, not_before=at)
    handle = tsq.temporal.get_workflow_handle(
        f"tsq:{domain}:{command_id}", result_type=DecisionOutcome
    )
    events = await _events(handle, "retry_scheduled_fired")
    assert events[TIMER_STARTED] == 1 and events[UPSERT] == 2 and events[MARKER] == 2


async def test_scheduled_retry_superseded_by_cancel(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A scheduled retry replaced by a cancel: two audit events, one decision."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.start_workflow(domain, command_id)
    await tsq.operator_retry(domain, command_id, not_before=datetime.now(UTC) + timedelta(hours=1))
    handle = tsq.temporal.get_workflow_handle(
        f"tsq:{domain}:{command_id}", result_type=DecisionOutcome
    )
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "retry_scheduled_superseded")
    assert events[MARKER] == 3


async def test_refresh_after_another_tool_decided(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The watcher's refresh after an outside cancel: one read, DECIDED_ELSEWHERE."""
    _, command_id, handle = await _parked(tsq, pool)
    await pool.execute(
        "UPDATE commandbus.command SET status = 'CANCELED' WHERE command_id = $1", command_id
    )
    await handle.signal("tsq_refresh")
    events = await _events(handle, "refresh_decided_elsewhere")
    assert (events[UPSERT], events[MARKER]) == (1, 1)


async def test_observe_update_after_another_tool_decided(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The watcher's tell as it sends it, by update, after an outside cancel: the update in
    the workflow task that reads the parking once and ends DECIDED_ELSEWHERE; no signal."""
    _, command_id, handle = await _parked(tsq, pool)
    await pool.execute(
        "UPDATE commandbus.command SET status = 'CANCELED' WHERE command_id = $1", command_id
    )
    await handle.execute_update("tsq_observe")
    events = await _events(handle, "observe_update_decided_elsewhere")
    assert (events[UPSERT], events[MARKER]) == (1, 1)
    assert events[EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED] == 1
    assert events[EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED] == 0


async def test_proposal_approved(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """A complete proposed by update, approved by signal: PENDING_APPROVAL then COMPLETED,
    the proposal's audit row, and the decision with its approval in one transaction."""
    domain, command_id, handle = await _with_policy(tsq, pool, require_approval=["complete"])
    await tsq.operator_complete(domain, command_id, operator="alice")
    await handle.signal("approve", {"operator": "bob", "comment": "ok"})
    events = await _events(handle, "proposal_approved")
    assert (events[UPSERT], events[MARKER]) == (2, 2)


async def test_proposal_rejected_then_cancel(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A retry proposed by signal, rejected by update, then a cancel (no approval needed)."""
    _, _, handle = await _with_policy(tsq, pool, require_approval=["retry"])
    await handle.signal("retry", {"operator": "alice"})
    await assert_eventually(lambda: handle.query("state"), lambda s: s["proposal"] is not None)
    await handle.execute_update("operator_reject", {"operator": "bob", "reason": "no"})
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "proposal_rejected_then_cancel")
    assert (events[UPSERT], events[MARKER]) == (3, 3)


async def test_proposal_expired_then_complete(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A proposal nobody approves expires on its timer; the command waits, then a complete
    (proposed, approved)."""
    domain, command_id, handle = await _with_policy(
        tsq, pool, require_approval=["complete"], approval_expires_after="1s"
    )
    await tsq.operator_complete(domain, command_id, operator="alice")
    await assert_eventually(
        lambda: handle.query("state"), lambda s: s["state"] == "AWAITING_OPERATOR", within=30
    )
    await tsq.operator_complete(domain, command_id, operator="alice")
    await tsq.approve(domain, command_id, operator="bob")
    events = await _events(handle, "proposal_expired_then_complete")
    assert events[TIMER_STARTED] == 2


async def test_claim_forced_by_another_operator(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A claim (TsqClaimedBy set), a note, another operator's forced cancel (cleared)."""
    domain, command_id, handle = await _parked(tsq, pool)
    await tsq.claim(domain, command_id, operator="alice", for_="1h")
    await handle.signal("note", {"text": "on it", "operator": "alice"})
    await handle.signal("cancel", {**CANCEL, "force": True})
    events = await _events(handle, "claim_forced_cancel")
    assert events[UPSERT] == 3


async def test_claim_expired_then_edited_retry(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A claim that ends on its timer, then a retry with a patch by another operator."""
    _, _, handle = await _parked(tsq, pool)
    await handle.signal("claim", {"operator": "alice", "for": "1s"})
    await assert_eventually(
        lambda: handle.query("state"), lambda s: s["claimed_by"] == "alice", within=30
    )
    await assert_eventually(
        lambda: handle.query("state"), lambda s: s["claimed_by"] is None, within=30
    )
    await handle.signal("retry", {"operator": "bob", "patch": {"data": {"amount": 1}}})
    events = await _events(handle, "claim_expired_then_edited_retry")
    assert events[TIMER_STARTED] == 1


async def test_notes_and_claims_are_written_in_batches_then_cancel(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Notes, a claim and a release sent in a burst: the handlers write nothing themselves;
    the run loop writes their records in one activity (one marker), then the cancel."""
    domain, command_id, handle = await _parked(tsq, pool)
    for n in range(5):
        await handle.signal("note", {"text": f"look {n}", "operator": "ann"})
    await handle.signal("claim", {"operator": "ann", "for": "1h"})
    await handle.signal("release", {"operator": "ann"})
    await assert_eventually(lambda: audit_rows(pool, domain, command_id, "TSQ_RELEASED"), within=30)
    await handle.signal("cancel", CANCEL)
    events = await _events(handle, "notes_batched_then_cancel")
    assert events[MARKER] <= 4
    assert len(await audit_rows(pool, domain, command_id, "TSQ_NOTE")) == 5


async def test_expiry_deferred_by_a_claim_then_carried_out(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The policy's cancel comes due during a claim: deferred (audited), then carried out when
    the claim runs out."""
    domain, command_id, handle = await _with_policy(
        tsq, pool, expire_after="1s", expire_decision="cancel", reason="expired"
    )
    await tsq.claim(domain, command_id, operator="jane", for_="3s")
    events = await _events(handle, "expiry_deferred_by_claim")
    assert events[TIMER_STARTED] >= 2
    assert len(await audit_rows(pool, domain, command_id, "TSQ_DEADLINE_DEFERRED")) == 1
    assert await status_of(pool, domain, command_id) == "CANCELED"


async def test_retry_deferred_by_a_claim_then_released(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Alice's scheduled retry comes due while bob holds a claim; bob releases it; it goes."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.start_workflow(domain, command_id)
    at = datetime.now(UTC) + timedelta(seconds=1)
    await tsq.operator_retry(domain, command_id, operator="alice", not_before=at)
    await tsq.claim(domain, command_id, operator="bob", for_="1h")
    await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_DEADLINE_DEFERRED"), within=30
    )
    await tsq.release(domain, command_id, operator="bob")
    handle = tsq.temporal.get_workflow_handle(
        f"tsq:{domain}:{command_id}", result_type=DecisionOutcome
    )
    await _events(handle, "retry_deferred_then_released")
    assert await status_of(pool, domain, command_id) == "PENDING"


async def test_expiry_under_four_eyes_is_proposed_then_approved(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A policy that cancels when due and asks approval for cancels: its cancel is a proposal
    by the policy, carried out once an operator approves it."""
    domain, command_id, handle = await _with_policy(
        tsq,
        pool,
        expire_after="1s",
        expire_decision="cancel",
        reason="expired",
        require_approval=["cancel"],
    )
    await assert_eventually(lambda: handle.query("state"), lambda s: s["proposal"] is not None)
    approved = await tsq.approve(domain, command_id, operator="bob")
    assert approved.carried_out and approved.operator == "policy:p"
    await _events(handle, "expiry_proposed_then_approved")


async def test_scheduled_retry_that_cannot_go_is_given_up(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The retry's original message is gone when its time comes: given up, audited, and the
    command waits; then a cancel."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.start_workflow(domain, command_id)
    await pool.execute("DELETE FROM pgmq.a_" + f"{domain}__commands")
    at = datetime.now(UTC) + timedelta(seconds=1)
    await tsq.operator_retry(domain, command_id, operator="alice", not_before=at)
    await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_DEADLINE_GIVEN_UP"), within=30
    )
    handle = tsq.temporal.get_workflow_handle(
        f"tsq:{domain}:{command_id}", result_type=DecisionOutcome
    )
    await handle.signal("cancel", CANCEL)
    await _events(handle, "scheduled_retry_given_up")
    assert await status_of(pool, domain, command_id) == "CANCELED"


async def test_proposal_voided_when_another_tool_decides(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A proposal waits; another tool cancels the command; the workflow is told: the proposal
    is voided (audited) and the workflow ends DECIDED_ELSEWHERE."""
    domain, command_id, handle = await _with_policy(tsq, pool, require_approval=["complete"])
    await tsq.operator_complete(domain, command_id, operator="alice")
    await pool.execute(
        "UPDATE commandbus.command SET status = 'CANCELED' WHERE command_id = $1", command_id
    )
    await handle.execute_update("tsq_observe")
    await _events(handle, "proposal_voided_by_another_tool")
    assert len(await audit_rows(pool, domain, command_id, "TSQ_PROPOSAL_VOIDED")) == 1
