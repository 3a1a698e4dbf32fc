"""Four eyes: under a policy, a decision is a proposal that another operator approves (carried
out once, whatever the races) or rejects, or that expires."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import WorkflowHandle

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    replies_for,
    run_tsq,
    seed_command,
    status_of,
)
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.errors import ApprovalRequiredError, InvalidInputError, InvalidOperationError
from tsq.models import DecisionOutcome, StateView
from tsq.settings import Settings
from tsq.workflows import TSQ_STATE


async def _parked_under_approval(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, *kinds: str, **policy: Any
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    await tsq.set_policy(
        domain, "four-eyes", require_approval=kinds or ("complete",), operator="lead", **policy
    )
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    return domain, command_id, tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)


async def _state(handle: WorkflowHandle[Any, Any]) -> StateView:
    state: StateView = await handle.query("state", result_type=StateView)
    return state


async def test_a_decision_under_the_policy_is_proposed_and_carried_out_once_approved(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The complete becomes a proposal (PENDING_APPROVAL, TSQ_PROPOSED, nothing else written);
    another operator's approval carries it out: one reply, TSQ_APPROVED then
    OPERATOR_COMPLETE naming both."""
    domain, command_id, handle = await _parked_under_approval(tsq, pool)

    proposed = await tsq.operator_complete(
        domain, command_id, result_data={"paid": True}, operator="alice"
    )

    assert proposed is not None and not proposed.carried_out
    assert proposed.proposal is not None and proposed.proposal.proposed_by == "alice"
    assert "four-eyes" in proposed.detail
    state = await _state(handle)
    assert state.state is TsqState.PENDING_APPROVAL
    assert state.proposal is not None and state.proposal.request["result_data"] == {"paid": True}
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_STATE) == "PENDING_APPROVAL"
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await replies_for(pool, f"{domain}__replies", command_id) == []
    [row] = await audit_rows(pool, domain, command_id)
    assert row["event_type"] == "TSQ_PROPOSED"
    assert row["details_json"]["operator"] == "alice"

    outcome = await tsq.approve(domain, command_id, operator="bob", comment="ledger checked")

    assert outcome.carried_out and outcome.approved_by == "bob"
    assert (await handle.result()).carried_out
    assert await status_of(pool, domain, command_id) == "COMPLETED"
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["data"] == {"paid": True}
    rows = await audit_rows(pool, domain, command_id)
    assert [r["event_type"] for r in rows] == ["TSQ_PROPOSED", "TSQ_APPROVED", "OPERATOR_COMPLETE"]
    assert rows[1]["details_json"]["operator"] == "bob"
    assert rows[1]["details_json"]["comment"] == "ledger checked"
    assert rows[2]["details_json"]["operator"] == "alice"
    assert rows[2]["details_json"]["approved_by"] == "bob"


@pytest.mark.parametrize("approver", ["alice", "  ALICE ", "Alice\t"])
async def test_the_proposer_cannot_approve_their_own_proposal(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, approver: str
) -> None:
    """Compared trimmed, case-insensitively: refused by update and by signal; still pending."""
    domain, command_id, handle = await _parked_under_approval(tsq, pool)
    await tsq.operator_complete(domain, command_id, operator="alice")

    with pytest.raises(InvalidOperationError, match="four eyes"):
        await tsq.approve(domain, command_id, operator=approver)
    await handle.signal("approve", {"operator": approver})
    await assert_eventually(lambda: _state(handle), lambda s: s.refused_count == 1)

    state = await _state(handle)
    assert state.state is TsqState.PENDING_APPROVAL
    assert "four eyes" in state.refused[0].problem
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_two_approvals_racing_carry_the_decision_out_once(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Two operators approve at the same moment: one carries it out, the other is refused."""
    domain, command_id, handle = await _parked_under_approval(tsq, pool, "cancel")
    await tsq.operator_cancel(domain, command_id, "duplicate payment", operator="alice")

    results = await asyncio.gather(
        tsq.approve(domain, command_id, operator="bob"),
        tsq.approve(domain, command_id, operator="carol"),
        handle.signal("approve", {"operator": "dave"}),
        return_exceptions=True,
    )

    [approved] = await audit_rows(pool, domain, command_id, "TSQ_APPROVED")
    winner = approved["details_json"]["operator"]
    for approver, result in zip(("bob", "carol"), results[:2], strict=True):
        if approver == winner:
            assert isinstance(result, DecisionOutcome) and result.carried_out
        else:
            assert isinstance(result, InvalidOperationError), result
    if winner != "dave":
        await assert_eventually(lambda: _state(handle), lambda s: s.refused_count == 1)
    await handle.result()
    assert await status_of(pool, domain, command_id) == "CANCELED"
    assert len(await replies_for(pool, f"{domain}__replies", command_id)) == 1
    assert len(await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")) == 1
    assert len(await audit_rows(pool, domain, command_id, "TSQ_APPROVED")) == 1


async def test_a_rejected_proposal_leaves_the_command_waiting(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Reject (by another operator, with a reason): audited, AWAITING_OPERATOR again, and a
    new decision can be proposed."""
    domain, command_id, _ = await _parked_under_approval(tsq, pool, "retry")
    await tsq.operator_retry(domain, command_id, operator="alice")
    with pytest.raises(InvalidOperationError, match="four eyes"):
        await tsq.reject(domain, command_id, "no", operator="ALICE")

    state = await tsq.reject(domain, command_id, "the ledger has it", operator="bob")

    assert state.state is TsqState.AWAITING_OPERATOR and state.proposal is None
    [rejected] = await audit_rows(pool, domain, command_id, "TSQ_REJECTED")
    assert rejected["details_json"]["reason"] == "the ledger has it"
    assert rejected["details_json"]["proposed_by"] == "alice"
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    again = await tsq.operator_retry(domain, command_id, operator="carol")
    assert again is not None and again.proposal is not None
    await tsq.reject(domain, command_id, "not yet", operator="dave")
    with pytest.raises(InvalidOperationError, match=r"no decision .* awaits approval"):
        await tsq.reject(domain, command_id, "x", operator="erin")


async def test_a_second_decision_while_one_is_proposed_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """One proposal at a time: another decision (proposed or not) waits for its outcome."""
    domain, command_id, _ = await _parked_under_approval(tsq, pool, "complete")
    await tsq.operator_complete(domain, command_id, operator="alice")
    with pytest.raises(InvalidOperationError, match="awaiting approval"):
        await tsq.operator_cancel(domain, command_id, "changed my mind", operator="bob")
    with pytest.raises(InvalidOperationError, match="awaiting approval"):
        await tsq.operator_complete(domain, command_id, operator="bob")


async def test_a_proposal_needs_its_operator_named(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Without an operator there is no second pair of eyes to tell apart: refused."""
    domain, command_id, _ = await _parked_under_approval(tsq, pool, "cancel")
    with pytest.raises(InvalidInputError, match="must name its operator"):
        await tsq.operator_cancel(domain, command_id, "x")
    assert await audit_rows(pool, domain, command_id) == []


async def test_an_unapproved_proposal_expires(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Past `approval_expires_after`: TSQ_PROPOSAL_EXPIRED, the command waits again, and a
    late approval is refused."""
    domain, command_id, handle = await _parked_under_approval(
        tsq, pool, "complete", approval_expires_after="2s"
    )
    await tsq.operator_complete(domain, command_id, operator="alice")
    await assert_eventually(
        lambda: _state(handle), lambda s: s.state is TsqState.AWAITING_OPERATOR, within=30
    )
    [expired] = await audit_rows(pool, domain, command_id, "TSQ_PROPOSAL_EXPIRED")
    assert expired["details_json"]["proposed_by"] == "alice"
    with pytest.raises(InvalidOperationError, match="awaits approval"):
        await tsq.approve(domain, command_id, operator="bob")
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_decision_meeting_a_policy_the_workflow_had_not_read_is_refused_then_proposed(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The database refuses an unapproved decision the policy asks approval for, even when the
    workflow has not heard of the policy yet; the workflow reads it, and the next try is a
    proposal."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    handle = tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)
    # A policy written behind the watcher's back: nobody tells the workflow.
    await pool.execute(
        "INSERT INTO tsq.policy (domain, name, require_approval) VALUES ($1, 'late', '{cancel}')",
        domain,
    )

    with pytest.raises(ApprovalRequiredError, match="needs another operator's approval"):
        await tsq.operator_cancel(domain, command_id, "x", operator="alice")
    await assert_eventually(lambda: _state(handle), lambda s: s.require_approval != [])
    again = await tsq.operator_cancel(domain, command_id, "x", operator="alice")

    assert again is not None and again.proposal is not None
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_cli_approve_and_reject(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq complete` proposes (exit 0, says how to approve); `tsq approve` by the proposer
    exits 1; by another operator carries it out."""
    domain, command_id, _ = await _parked_under_approval(tsq, pool, "complete")
    cid = str(command_id)
    proposed = await run_tsq(settings, "complete", domain, cid, "--operator", "alice")
    assert proposed.returncode == 0, proposed.stderr
    assert f"tsq approve {domain} {cid}" in proposed.stdout
    own = await run_tsq(settings, "approve", domain, cid, "--operator", "Alice")
    assert own.returncode == 1 and "four eyes" in own.stderr
    approved = await run_tsq(settings, "approve", domain, cid, "--operator", "bob")
    assert approved.returncode == 0, approved.stderr
    assert "completed" in approved.stdout
    assert await status_of(pool, domain, command_id) == "COMPLETED"
