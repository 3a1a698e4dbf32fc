"""A decision belongs to the parking it was made for: resets of old runs, and commands parked
again while the run of their earlier parking is still finishing, change nothing twice.

The bus parks commands again with plain SQL; operators reset with the `temporal` CLI.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from tests.faults.figures import Figures
from tests.faults.services import Temporal, Workers
from tests.faults.support import handle_of, message_counts, seed
from tests.helpers import assert_eventually, audit_rows, new_domain, park_as_bus, status_of
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.devstack import temporal_cli
from tsq.models import DecisionOutcome, StateView

# Sweeps often enough for a test to see one.
SWEEP = {"TSQ_SWEEP_INTERVAL": "2"}


async def running_run(temporal: Client, domain: str, cid: uuid.UUID) -> str | None:
    try:
        described = await handle_of(temporal, domain, cid).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return described.run_id if described.status is WorkflowExecutionStatus.RUNNING else None


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


async def resent(db: asyncpg.Pool, domain: str, cid: uuid.UUID) -> int:
    """Messages of the command waiting in its queue: each retry sends the original again."""
    return (await message_counts(db, f"{domain}__commands")).get(str(cid), 0)


async def test_reset_of_an_old_run_does_not_decide_the_new_parking(
    db: asyncpg.Pool,
    temporal_dev: Temporal,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Retried (run 1), parked again (run 2), then run 1 reset to its first workflow task: its
    retry signal replays against its own parking, finds it decided, and changes nothing."""
    await workers.start("worker", env=SWEEP)
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    handle = handle_of(temporal_client, domain, cid)
    first = await assert_eventually(lambda: running_run(temporal_client, domain, cid))
    assert first is not None
    await handle.signal("retry", {"operator": "jane"})
    await assert_eventually(lambda: status_of(db, domain, cid), lambda s: s == "PENDING")
    await park_as_bus(db, domain, cid)
    second = await assert_eventually(
        lambda: running_run(temporal_client, domain, cid), lambda run: run not in (None, first)
    )

    reset = await asyncio.to_thread(
        _run,
        [
            *(temporal_cli(), "workflow", "reset", "--workflow-id", handle.id),
            *("--run-id", first, "--type", "FirstWorkflowTask", "--reason", "careless"),
            *("--address", temporal_dev.address, "--yes"),
        ],
    )
    assert reset.returncode == 0, reset.stderr
    figures.fault("reset of a decided run after its command was parked again")

    # The reset ended run 2; the reset run finds its parking decided and ends with that.
    reset_run = await assert_eventually(
        lambda: running_run(temporal_client, domain, cid),
        lambda run: run not in (None, first, second),
    )
    result = await temporal_client.get_workflow_handle(
        handle.id, run_id=reset_run, result_type=DecisionOutcome
    ).result()
    assert result.decision is not None and result.decision.value == "retry"
    assert len(await audit_rows(db, domain, cid, "OPERATOR_RETRY")) == 1
    assert await resent(db, domain, cid) == 1
    assert await status_of(db, domain, cid) == "IN_TROUBLESHOOTING_QUEUE"

    # The second parking lost its workflow to the reset; the sweep gives it a new one.
    third = await assert_eventually(
        lambda: running_run(temporal_client, domain, cid),
        lambda run: run not in (None, first, second, reset_run),
        within=30,
    )
    state = await temporal_client.get_workflow_handle(handle.id, run_id=third).query(
        "state", result_type=StateView
    )
    assert state.state is TsqState.AWAITING_OPERATOR
    outcome = await tsq_client.operator_cancel(domain, cid, "after the reset")
    assert outcome is not None and outcome.carried_out
    assert len(await audit_rows(db, domain, cid, "OPERATOR_CANCEL")) == 1
    assert len(await audit_rows(db, domain, cid, "OPERATOR_RETRY")) == 1


async def test_parked_again_while_the_earlier_run_is_still_open(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """A worker dies between a retry's commit and the workflow recording it; the bus parks the
    command again. Once the earlier run has ended, the new parking gets its own workflow, and
    a decision reaches it, without `tsq sync`."""
    seeded = await seed(db, new_domain(), 1, batch=False)
    domain, [cid] = seeded.domain, seeded.ids
    victim = await workers.start(
        "victim", fault_script=True, env={"TSQ_FAULT_KILL_AFTER": "1", **SWEEP}
    )
    first = await assert_eventually(lambda: running_run(temporal_client, domain, cid))
    await handle_of(temporal_client, domain, cid).signal("retry", {"operator": "jane"})
    assert await asyncio.to_thread(victim.process.wait, 60) == -9
    assert await status_of(db, domain, cid) == "PENDING"
    await park_as_bus(db, domain, cid)
    # Run 1 is still open: its decision committed, its history does not know it yet.
    assert await running_run(temporal_client, domain, cid) == first
    figures.fault("command parked again while the run of its earlier parking was open")

    await workers.start("successor", env=SWEEP)
    second = await assert_eventually(
        lambda: running_run(temporal_client, domain, cid),
        lambda run: run not in (None, first),
        within=60,
    )
    earlier = await temporal_client.get_workflow_handle(
        handle_of(temporal_client, domain, cid).id, run_id=first, result_type=DecisionOutcome
    ).result()
    assert earlier.carried_out and earlier.decision is not None
    outcome = await tsq_client.operator_complete(domain, cid, result_data={"by": "hand"})
    assert outcome is not None and outcome.carried_out
    assert (await handle_of(temporal_client, domain, cid).describe()).run_id == second
    assert len(await audit_rows(db, domain, cid, "OPERATOR_RETRY")) == 1
    assert len(await audit_rows(db, domain, cid, "OPERATOR_COMPLETE")) == 1
    assert await resent(db, domain, cid) == 1
