"""Operator cancel through the SDK (seed S013), against real PostgreSQL and Temporal."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.helpers import audit_rows, new_domain, replies_for, seed_command, status_of
from tsq import (
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    TroubleshootingClient,
)


async def test_cancel_sets_status(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """A canceled troubleshooting command ends CANCELED."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    outcome = await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert outcome is not None and outcome.carried_out
    assert await status_of(pool, domain, command_id) == "CANCELED"


async def test_cancel_sends_reply(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """One reply with outcome CANCELED, correlation id and command id, goes to the reply queue."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    replies = await replies_for(pool, f"{domain}__replies", command_id)
    assert len(replies) == 1
    reply = replies[0]
    assert reply["outcome"] == "CANCELED"
    assert reply["command_id"] == str(command_id)
    correlation = await pool.fetchval(
        "SELECT correlation_id FROM commandbus.command WHERE command_id = $1", command_id
    )
    assert reply["correlation_id"] == str(correlation)


async def test_cancel_includes_reason(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """The reason is in the reply's `error` (spec 7.2) and where reference consumers read it."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.operator_cancel(domain, command_id, "Invalid account")
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["error"]["message"] == "Invalid account"
    assert reply["error_message"] == "Invalid account"
    assert reply["reason"] == "Invalid account"
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["reason"] == "Invalid account"


async def test_cancel_records_operator(tsq: TroubleshootingClient, pool: asyncpg.Pool) -> None:
    """The OPERATOR_CANCEL audit row names the operator, the reason and the reply queue."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.operator_cancel(domain, command_id, "Duplicate", operator="jane@example.com")
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["operator"] == "jane@example.com"
    assert audit["details_json"]["reply_to"] == f"{domain}__replies"


async def test_cancel_pending_command_raises_invalid_operation(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A PENDING command cannot be canceled, and nothing about it changes."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="PENDING")
    with pytest.raises(InvalidOperationError, match="PENDING"):
        await tsq.operator_cancel(domain, command_id, "Invalid account")
    assert await status_of(pool, domain, command_id) == "PENDING"
    assert await audit_rows(pool, domain, command_id) == []


async def test_cancel_unknown_command_raises_not_found(tsq: TroubleshootingClient) -> None:
    """An id that names no command is CommandNotFoundError."""
    with pytest.raises(CommandNotFoundError, match="not found"):
        await tsq.operator_cancel(new_domain(), uuid.uuid4(), "Invalid account")


@pytest.mark.parametrize("reason", ["", "   ", "\t\n"])
async def test_cancel_without_reason_is_refused(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, reason: str
) -> None:
    """A blank reason is refused before anything happens."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    with pytest.raises(InvalidInputError, match="reason"):
        await tsq.operator_cancel(domain, command_id, reason)
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
    assert await audit_rows(pool, domain, command_id) == []


async def test_cancel_reply_goes_to_payments_replies(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """A command sent with reply_to=payments__replies gets its cancel reply there."""
    command_id = await seed_command(pool, "payments", reply_queue="payments__replies")
    await tsq.operator_cancel("payments", command_id, "Invalid account")
    replies = await replies_for(pool, "payments__replies", command_id)
    assert [r["outcome"] for r in replies] == ["CANCELED"]
