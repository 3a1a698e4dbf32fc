"""Where features meet: time, claims, approvals and edits against each other and against hostile
values. Each test is a defect a review found by trying tsq as a hostile user would; the rules
module (`workflows/rules.py`) closes each at its cause, and `tests/unit/test_rules_model.py`
checks the whole class of them by machine."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from tests.helpers import assert_eventually, audit_rows, new_domain, seed_command, status_of
from tsq.client import TroubleshootingClient
from tsq.contract import DecisionKind, TsqState
from tsq.errors import InvalidInputError, InvalidOperationError
from tsq.models import CarryOut, DecisionOutcome, StateView
from tsq.store import decision_input
from tsq.workflows import rules


async def _parked(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, **policy: Any
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    if policy:
        await tsq.set_policy(domain, "p", operator="lead", **policy)
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    return domain, command_id, tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)


async def _state(handle: WorkflowHandle[Any, Any]) -> StateView:
    state: StateView = await handle.query("state", result_type=StateView)
    return state


async def test_a_snooze_by_negative_seconds_is_refused_and_decides_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`{"for": -604800}` under a policy that cancels after 7 days and asks approval for cancel:
    refused by signal, update and SDK; no deadline moves, nothing is decided."""
    domain, command_id, handle = await _parked(
        tsq,
        pool,
        expire_after="7d",
        expire_decision="cancel",
        reason="too old",
        require_approval=["cancel"],
    )
    before = await _state(handle)
    hostile = {"for": -604800, "reason": "x", "operator": "mallory"}
    await handle.signal("snooze", hostile)
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update("operator_snooze", hostile)
    with pytest.raises(InvalidInputError):
        await tsq.snooze(domain, command_id, timedelta(seconds=-604800), "x", operator="mallory")
    state = await assert_eventually(lambda: _state(handle), lambda s: s.refused_count >= 1)
    assert "longer than zero" in state.refused[-1].problem
    assert state.expire_at == before.expire_at and state.snoozed == timedelta(0)
    assert state.state is TsqState.AWAITING_OPERATOR
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL") == []


@pytest.mark.parametrize("seconds", [300_000_000_000, 10**30])
async def test_a_snooze_past_any_date_is_refused_and_the_command_stays_decidable(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, seconds: int
) -> None:
    """A snooze of thousands of years is refused (signal and update); the workflow keeps
    working and a cancel afterwards is carried out."""
    domain, command_id, handle = await _parked(tsq, pool, escalate_after="1h")
    hostile = {"for": seconds, "reason": "forever"}
    await handle.signal("snooze", hostile)
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update("operator_snooze", hostile)
    state = await assert_eventually(lambda: _state(handle), lambda s: s.refused_count >= 1)
    assert state.snoozed == timedelta(0)
    outcome = await tsq.operator_cancel(domain, command_id, "after the hostile snooze")
    assert outcome is not None and outcome.carried_out


async def test_repeated_long_snoozes_stop_at_ten_years_ahead(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Snoozes add up, but a deadline never moves more than ten years past now: the one that
    would is refused, and the deadlines stay where the last accepted snooze put them."""
    domain, command_id, handle = await _parked(tsq, pool, escalate_after="1h")
    await tsq.snooze(domain, command_id, "3000d", "later", operator="ann")
    with pytest.raises(InvalidOperationError, match="ten years"):
        await tsq.snooze(domain, command_id, "3000d", "much later", operator="ann")
    state = await _state(handle)
    assert state.snoozed == timedelta(days=3000)
    outcome = await tsq.operator_cancel(domain, command_id, "after the snoozes")
    assert outcome is not None and outcome.carried_out


async def test_an_expiry_due_during_a_claim_happens_once_the_claim_ends(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The policy's cancel comes due while jane holds a claim: it waits (audited, naming the
    claim), and is carried out once the claim has run out, by the policy."""
    domain, command_id, handle = await _parked(
        tsq, pool, expire_after="2s", expire_decision="cancel", reason="expired"
    )
    claimed = await tsq.claim(domain, command_id, operator="jane", for_="5s")
    assert claimed.claimed_until is not None
    await assert_eventually(
        lambda: status_of(pool, domain, command_id), lambda s: s == "CANCELED", within=30
    )
    [deferred] = await audit_rows(pool, domain, command_id, "TSQ_DEADLINE_DEFERRED")
    assert deferred["details_json"]["deadline"] == "expiry"
    assert deferred["details_json"]["blocked_by"] == "claim by jane"
    [cancel] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert cancel["details_json"]["operator"] == "policy:p"
    assert cancel["ts"] >= claimed.claimed_until
    assert (await _state(handle)).state is TsqState.CANCELED


async def test_a_scheduled_retry_due_during_another_claim_happens_once_it_ends(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Alice's retry comes due while bob holds a claim: it waits (audited), then goes out once
    bob releases the command: one retry, by alice, after the release."""
    domain, command_id, _ = await _parked(tsq, pool)
    at = datetime.now(UTC) + timedelta(seconds=2)
    scheduled = await tsq.operator_retry(domain, command_id, operator="alice", not_before=at)
    assert scheduled is not None and scheduled.scheduled_for == at
    await tsq.claim(domain, command_id, operator="bob", for_="1h")
    await assert_eventually(
        lambda: audit_rows(pool, domain, command_id, "TSQ_DEADLINE_DEFERRED"), within=30
    )
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    released = datetime.now(UTC)
    await tsq.release(domain, command_id, operator="bob")
    await assert_eventually(
        lambda: status_of(pool, domain, command_id), lambda s: s == "PENDING", within=30
    )
    [retry] = await audit_rows(pool, domain, command_id, "OPERATOR_RETRY")
    assert retry["details_json"]["operator"] == "alice" and retry["ts"] >= released
    [deferred] = await audit_rows(pool, domain, command_id, "TSQ_DEADLINE_DEFERRED")
    assert deferred["details_json"]["blocked_by"] == "claim by bob"


@pytest.mark.parametrize(
    "lookalike",
    ["alice\u200b", " ALICE ", "\uff41\uff4c\uff49\uff43\uff45", "al\u00adice", "alice\u2003"],
    ids=["zero-width-space", "case-and-spaces", "fullwidth", "soft-hyphen", "em-space"],
)
async def test_a_lookalike_name_cannot_approve_its_own_proposal(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, lookalike: str
) -> None:
    """Names are compared after NFKC, with format characters removed, case folded and
    whitespace trimmed: alice's lookalike is alice, and four eyes refuse her."""
    domain, command_id, handle = await _parked(tsq, pool, require_approval=["cancel"])
    proposed = await tsq.operator_cancel(domain, command_id, "duplicate", operator="alice")
    assert proposed is not None and proposed.proposal is not None
    with pytest.raises(InvalidOperationError, match="four eyes"):
        await tsq.approve(domain, command_id, operator=lookalike)
    await handle.signal("approve", {"operator": lookalike})
    state = await assert_eventually(lambda: _state(handle), lambda s: s.refused_count == 1)
    assert state.state is TsqState.PENDING_APPROVAL
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    approved = await tsq.approve(domain, command_id, operator="bob")
    assert approved.carried_out


@pytest.mark.parametrize(
    "patch",
    [
        {"reply_to": "eve_inbox"},
        {"data": {"amount": 1}, "reply_to": "eve_inbox"},
        {"created_at": "1970-01-01T00:00:00Z"},
        {"data": None},
        {"data": []},
    ],
    ids=["reply-to", "data-and-reply-to", "created-at", "data-removed", "data-not-object"],
)
async def test_an_edit_may_change_the_command_data_only(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, patch: dict[str, Any]
) -> None:
    """Edit and retry is for the command's data: a patch that touches anything else (the
    reply queue, the envelope) is refused by the SDK, the workflow and the database alike."""
    domain, command_id, handle = await _parked(tsq, pool)
    with pytest.raises(InvalidInputError, match="data"):
        await tsq.operator_retry(domain, command_id, operator="eve", patch=patch)
    await handle.signal("retry", {"operator": "eve", "patch": patch})
    await assert_eventually(lambda: _state(handle), lambda s: s.refused_count == 1)
    refused = await pool.fetchval(
        """
        SELECT tsq.decide(jsonb_build_object('effect_key', 'forged/' || gen_random_uuid(),
            'domain', $1::text, 'command_id', $2::uuid, 'decision', 'retry',
            'status_after', 'PENDING', 'audit_event', 'OPERATOR_RETRY', 'batch_update',
            'tsq_retry', 'via', 'update', 'patch', $3::jsonb, 'soft', true))
        """,
        domain,
        command_id,
        patch,
    )
    assert refused["refused"]["sqlstate"] == "TQ001"
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    outcome = await tsq.operator_retry(
        domain, command_id, operator="eve", patch={"data": {"amount": 7}}
    )
    assert outcome is not None and outcome.carried_out and outcome.new_msg_id is not None
    sent = await pool.fetchval(
        f'SELECT message FROM pgmq."q_{domain}__commands" WHERE msg_id = $1', outcome.new_msg_id
    )
    assert sent["data"]["amount"] == 7 and sent["reply_to"] == f"{domain}__replies"


VIAS = ("signal", "update", "bulk", "approval", "policy", "schedule")


@pytest.mark.parametrize("hold", sorted(rules.HELD_BACK_BY))
async def test_the_database_holds_back_what_the_rules_hold_back(
    pool: asyncpg.Pool, hold: str
) -> None:
    """For each hold (another operator's claim, a proposal waiting, a policy asking approval)
    and each way a decision comes, `tsq.decide` refuses exactly what the rules' table says,
    and lets the rest through (each tried in a transaction rolled back)."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    parking = await pool.fetchval(
        "SELECT parking_id FROM tsq.parking WHERE command_id = $1 AND left_at IS NULL", command_id
    )
    if hold == "claim":
        await pool.execute(
            """
            INSERT INTO tsq.claim (parking_id, domain, command_id, claimed_by, claimed_by_key,
                until, seq)
            VALUES ($1, $2, $3, 'Jane', 'jane', now() + interval '1 hour', 1)
            """,
            parking,
            domain,
            command_id,
        )
    elif hold == "proposal":
        await pool.execute(
            """
            INSERT INTO tsq.proposal (parking_id, domain, command_id, decision, proposed_by,
                expires_at, seq)
            VALUES ($1, $2, $3, 'cancel', 'alice', now() + interval '1 hour', 1)
            """,
            parking,
            domain,
            command_id,
        )
    else:
        await pool.execute(
            "INSERT INTO tsq.policy (domain, name, require_approval) VALUES ($1, 'p', '{cancel}')",
            domain,
        )
    refused = {"claim": "TQ003", "proposal": "TQ005", "approval": "TQ004"}[hold]
    found = {}
    for via in VIAS:
        decision = decision_input(
            CarryOut(
                effect_key=f"matrix/{uuid.uuid4()}",
                workflow_id=f"tsq:{domain}:{command_id}",
                domain=domain,
                command_id=command_id,
                decision=DecisionKind.CANCEL,
                parking_id=parking,
                reason="matrix",
                operator="bob",
                via="update",
                approved_by="carol" if via == "approval" else None,
            ),
            via=via,  # as each way of deciding says it, a bulk operation's included
            soft=True,
        )
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                result = await conn.fetchval("SELECT tsq.decide($1::jsonb)", decision)
            finally:
                await transaction.rollback()
        found[via] = result.get("refused", {}).get("sqlstate") or (
            "carried out" if result["carried_out"] else result["detail"]
        )
    expected = {via: refused if via in rules.HELD_BACK_BY[hold] else "carried out" for via in VIAS}
    assert found == expected
