"""A bulk operation whose `tsq worker` is SIGKILLed in the middle of its effects: a new worker
goes on from what was committed. Nothing is lost, nothing is done twice, and every command's
workflow ends with its outcome.

The bus is plain SQL: the commands are inserted already parked, in one transaction.
"""

from __future__ import annotations

import asyncpg
import pytest
from temporalio.client import Client

from tests.faults.services import Workers
from tests.faults.support import count, park_burst
from tests.helpers import assert_eventually, new_domain
from tsq.client import TroubleshootingClient

COMMANDS = 600
# Slow enough that the kill comes while most effects are still to be carried out.
RATE = 60.0


@pytest.mark.timeout(420)
async def test_worker_killed_mid_bulk_loses_nothing_and_repeats_nothing(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
) -> None:
    domain = new_domain()
    ids = await park_burst(db, domain, COMMANDS, replies=True)
    victim = await workers.start("bulk-victim")
    running = f'CommandDomain = "{domain}" AND ExecutionStatus = "Running"'
    await assert_eventually(
        lambda: count(temporal_client, running), lambda n: n == COMMANDS, within=180
    )

    op = await tsq_client.start_bulk(
        "cancel", domain, all_waiting=True, operator="oncall", reason="outage", rate=RATE
    )
    await assert_eventually(
        lambda: tsq_client.bulk(op.bulk_id), lambda o: o.carried_out >= 100, within=60
    )
    victim.kill()
    killed_at = (await tsq_client.bulk(op.bulk_id)).carried_out
    assert killed_at < COMMANDS
    await workers.start("bulk-successor")

    done = await tsq_client.wait_bulk(op.bulk_id)

    assert (done.status, done.counts) == ("finished", {"carried_out": COMMANDS})
    effects = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status = 'CANCELED') AS canceled,
            (SELECT count(*) FROM commandbus.audit WHERE domain = $1
                AND event_type = 'OPERATOR_CANCEL') AS audits,
            (SELECT count(DISTINCT command_id) FROM commandbus.audit WHERE domain = $1
                AND event_type = 'OPERATOR_CANCEL'
                AND details_json->>'bulk_id' = $2) AS audited,
            (SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind = 'cancel') AS recorded
        FROM commandbus.command WHERE domain = $1
        """,
        domain,
        str(op.bulk_id),
    )
    assert dict(effects) == {
        "canceled": COMMANDS, "audits": COMMANDS, "audited": COMMANDS, "recorded": COMMANDS
    }  # fmt: skip
    replies = await db.fetch(
        "SELECT message->>'command_id' AS cid FROM pgmq.read($1::text, 0, 100000)",
        f"{domain}__replies",
    )
    assert len(replies) == COMMANDS and {r["cid"] for r in replies} == {str(c) for c in ids}
    canceled = f'CommandDomain = "{domain}" AND TsqState = "CANCELED"'
    await assert_eventually(
        lambda: count(temporal_client, canceled), lambda n: n == COMMANDS, within=180
    )
