"""Edit and retry (a JSON merge patch of the original message), notes, and claims."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHandle

from tests.helpers import (
    assert_eventually,
    audit_rows,
    new_domain,
    run_tsq,
    seed_command,
    status_of,
)
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.errors import ClaimedError, InvalidInputError, InvalidOperationError
from tsq.models import DecisionOutcome, StateView
from tsq.settings import Settings
from tsq.workflows import TSQ_CLAIMED_BY


async def _parked(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, **seed: Any
) -> tuple[str, uuid.UUID, WorkflowHandle[Any, DecisionOutcome]]:
    domain = new_domain()
    command_id = await seed_command(pool, domain, **seed)
    wid = await tsq.start_workflow(domain, command_id)
    return domain, command_id, tsq.temporal.get_workflow_handle(wid, result_type=DecisionOutcome)


async def _messages(pool: asyncpg.Pool, queue: str, command_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT message FROM pgmq.read($1::text, 0, 1000) WHERE message->>'command_id' = $2",
        queue,
        str(command_id),
    )
    return [row["message"] for row in rows]


async def _state(handle: WorkflowHandle[Any, Any]) -> StateView:
    state: StateView = await handle.query("state", result_type=StateView)
    return state


# -- edit and retry -------------------------------------------------------------------------


async def test_edited_retry_sends_the_edited_message_once_and_never_the_original(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """One message, the patch applied (objects merged, null removes); the audit keeps the
    patch and hashes of the message before and after; the original stays archived."""
    domain, command_id, _ = await _parked(
        tsq, pool, data={"account": "ACC-1", "amount": 100, "memo": "old"}
    )
    original = await pool.fetchval(
        "SELECT tsq.archived_message($1, NULL, $2)", f"{domain}__commands", command_id
    )
    patch = {"data": {"account": "ACC-2", "memo": None}}

    outcome = await tsq.operator_retry(domain, command_id, operator="jane", patch=patch)

    assert outcome is not None and outcome.carried_out
    assert "edited message" in outcome.detail
    [sent] = await _messages(pool, f"{domain}__commands", command_id)
    assert sent["data"] == {"account": "ACC-2", "amount": 100}
    assert {k: v for k, v in sent.items() if k != "data"} == {
        k: v for k, v in original.items() if k != "data"
    }
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_RETRY")
    details = audit["details_json"]
    assert details["patch"] == patch
    assert details["message_sha256_before"] == await pool.fetchval(
        "SELECT tsq.sha256($1::jsonb)", original
    )
    assert details["message_sha256_after"] == await pool.fetchval(
        "SELECT tsq.sha256($1::jsonb)", sent
    )
    assert details["message_sha256_before"] != details["message_sha256_after"]
    still = await pool.fetchval(
        "SELECT tsq.archived_message($1, NULL, $2)", f"{domain}__commands", command_id
    )
    assert still == original


@pytest.mark.parametrize(
    "patch",
    [
        {"command_id": str(uuid.uuid4())},
        {"domain": "other"},
        {"type": "Refund"},
        {"command_type": "Refund"},
        {"correlation_id": None},
        {},
    ],
)
async def test_patch_that_changes_what_the_command_is_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, patch: dict[str, Any]
) -> None:
    """Its id, domain, type or correlation id (anything but its data): refused before anything
    is sent, by the SDK and by the workflow's signal; the command still waits."""
    domain, command_id, handle = await _parked(tsq, pool)
    with pytest.raises(InvalidInputError, match=r"edits the command's data only|is empty"):
        await tsq.operator_retry(domain, command_id, operator="jane", patch=patch)
    await handle.signal("retry", {"operator": "jane", "patch": patch})
    await assert_eventually(lambda: _state(handle), lambda s: s.refused_count == 1)
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await _messages(pool, f"{domain}__commands", command_id) == []


async def test_patch_is_checked_again_where_it_is_applied(pool: asyncpg.Pool) -> None:
    """The database compares the message before and after: a patch that replaces the whole
    message, or changes an identifying field some other way, is refused there too."""
    message = {"command_id": "a", "domain": "d", "data": {"x": 1}}
    merged = await pool.fetchval(
        "SELECT tsq.merge_patch($1::jsonb, $2::jsonb)",
        message,
        {"data": {"x": None, "y": [1, 2]}, "extra": {"k": "v"}},
    )
    assert merged == {"command_id": "a", "domain": "d", "data": {"y": [1, 2]}, "extra": {"k": "v"}}
    assert await pool.fetchval("SELECT tsq.merge_patch($1::jsonb, '[1]')", message) == [1]


async def test_cli_patch_must_be_a_json_object(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`--patch '[1]'` exits 1 naming the option; `--patch ... --dry-run` shows the edit."""
    domain, command_id, _ = await _parked(tsq, pool)
    bad = await run_tsq(settings, "retry", domain, str(command_id), "--patch", "[1]")
    assert bad.returncode == 1 and "--patch must be a JSON object" in bad.stderr
    shown = await run_tsq(
        settings, "retry", domain, str(command_id), "--patch", '{"data": {"account": "ACC-9"}}',
        "--dry-run", "--json",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["would"]["message"]["body"]["data"]["account"] == "ACC-9"
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


# -- notes ----------------------------------------------------------------------------------


async def test_notes_are_audited_and_shown_in_show_state_and_details(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """A note from the SDK, one from the CLI and one by signal (the Web UI's way)."""
    domain, command_id, handle = await _parked(tsq, pool)
    await tsq.note(domain, command_id, "asked the ledger team", operator="jane")
    done = await run_tsq(
        settings, "note", domain, str(command_id), "ledger says wait", "--operator", "bob"
    )
    assert done.returncode == 0, done.stderr
    await handle.signal("note", {"text": "from the UI", "operator": "carol"})
    await assert_eventually(lambda: _state(handle), lambda s: s.notes_count == 3)

    state = await _state(handle)
    assert [n.text for n in state.notes] == [
        "asked the ledger team",
        "ledger says wait",
        "from the UI",
    ]
    rows = await audit_rows(pool, domain, command_id, "TSQ_NOTE")
    assert [(r["details_json"]["operator"], r["details_json"]["text"]) for r in rows] == [
        ("jane", "asked the ledger team"),
        ("bob", "ledger says wait"),
        ("carol", "from the UI"),
    ]
    shown = await run_tsq(settings, "show", domain, str(command_id))
    assert "ledger says wait" in shown.stdout
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "asked the ledger team" in metadata.current_details
    with pytest.raises(InvalidInputError, match="must not be blank"):
        await tsq.note(domain, command_id, "   ")


# -- claims ---------------------------------------------------------------------------------


async def test_claim_blocks_another_operators_decision_and_force_passes_audited(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """Claimed by alice: TsqClaimedBy says so in the list; bob's cancel is refused and changes
    nothing; with force it is carried out, TSQ_CLAIM_FORCED before OPERATOR_CANCEL."""
    domain, command_id, handle = await _parked(tsq, pool)
    state = await tsq.claim(domain, command_id, operator="alice", for_="30m")
    assert state.claimed_by == "alice"
    query = f'CommandDomain = "{domain}" AND TsqClaimedBy = "alice"'
    await assert_eventually(
        lambda: tsq.temporal.count_workflows(query), lambda n: n.count == 1, within=30
    )

    with pytest.raises(ClaimedError, match="claimed by alice"):
        await tsq.operator_cancel(domain, command_id, "duplicate", operator="bob")
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"

    outcome = await tsq.operator_cancel(domain, command_id, "duplicate", operator="bob", force=True)

    assert outcome is not None and outcome.carried_out
    rows = await audit_rows(pool, domain, command_id)
    assert [r["event_type"] for r in rows] == ["TSQ_CLAIMED", "TSQ_CLAIM_FORCED", "OPERATOR_CANCEL"]
    assert rows[1]["details_json"]["claimed_by"] == "alice"
    assert rows[1]["details_json"]["operator"] == "bob"
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_CLAIMED_BY) is None


async def test_the_claimer_decides_without_force_and_a_claim_ends_by_itself(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The claimer's own decision passes; a claim past its time no longer holds anyone back."""
    domain, command_id, handle = await _parked(tsq, pool)
    await tsq.claim(domain, command_id, operator="alice", for_="2s")
    await assert_eventually(lambda: _state(handle), lambda s: s.claimed_by is None, within=30)
    described = await handle.describe()
    assert described.typed_search_attributes.get(TSQ_CLAIMED_BY) is None
    outcome = await tsq.operator_complete(domain, command_id, operator="bob")
    assert outcome is not None and outcome.carried_out

    domain, command_id, _ = await _parked(tsq, pool)
    await tsq.claim(domain, command_id, operator="alice")
    outcome = await tsq.operator_retry(domain, command_id, operator=" Alice ")
    assert outcome is not None and outcome.carried_out


async def test_another_operators_claim_is_released_or_taken_only_with_force(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """Release and claim by bob are refused while alice holds it; with force both pass,
    audited as forced; the list then names bob."""
    domain, command_id, handle = await _parked(tsq, pool)
    cid = str(command_id)
    assert (await run_tsq(settings, "claim", domain, cid, "--operator", "alice")).returncode == 0
    refused = await run_tsq(settings, "release", domain, cid, "--operator", "bob")
    assert refused.returncode == 1 and "claimed by alice" in refused.stderr
    with pytest.raises(ClaimedError):
        await tsq.claim(domain, command_id, operator="bob")

    state = await tsq.claim(domain, command_id, operator="bob", force=True)

    assert state.claimed_by == "bob"
    [_, taken] = await audit_rows(pool, domain, command_id, "TSQ_CLAIMED")
    assert (taken["details_json"]["taken_from"], taken["details_json"]["forced"]) == ("alice", True)
    released = await run_tsq(settings, "release", domain, cid, "--operator", "carol", "--force")
    assert released.returncode == 0, released.stderr
    [row] = await audit_rows(pool, domain, command_id, "TSQ_RELEASED")
    assert row["details_json"] == {
        "operator": "carol",
        "claimed_by": "bob",
        "forced": True,
        "workflow_id": handle.id,
    }
    with pytest.raises(InvalidOperationError, match="not claimed"):
        await tsq.release(domain, command_id, operator="carol")
    assert (await _state(handle)).state is TsqState.AWAITING_OPERATOR


async def test_a_claim_holds_in_the_database_too(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The decision's transaction itself refuses another operator while the claim lasts, so
    a decision that does not pass through the workflow cannot slip by it."""
    domain, command_id, _ = await _parked(tsq, pool)
    await tsq.claim(domain, command_id, operator="alice")
    preview = await tsq.preview_cancel(domain, command_id, "x", operator="bob")
    assert preview.result == "claimed" and "alice" in preview.detail
    forced = await tsq.preview_cancel(domain, command_id, "x", operator="bob", force=True)
    assert forced.would is not None
    assert [row.event_type for row in forced.would.audit] == ["TSQ_CLAIM_FORCED", "OPERATOR_CANCEL"]
