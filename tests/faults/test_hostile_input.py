"""Hostile and malformed input through every entrance: signal, update, SDK and `tsq` CLI.

Each input is refused with a message that names the problem, or accepted and stored exactly as
given. A refusal changes nothing else, never leaves a workflow retrying, and a refused signal
stays visible (the `state` query and a TSQ_SIGNAL_REFUSED audit row).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from pydantic_core import PydanticSerializationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from tests.faults.figures import Figures
from tests.faults.inputs import (
    BAD_REPLY_QUEUES,
    CLI_CASES,
    CLI_STORED,
    NO_ARGUMENT,
    REFUSED,
    SDK_CASES,
    STORED,
    Arguments,
    CliCase,
    Refused,
    SdkCase,
    Stored,
)
from tests.faults.services import Temporal, Workers, tsq_command, worker_env
from tests.faults.support import (
    CANCEL,
    WORKER_PASSWORD,
    Seeded,
    handle_of,
    message_counts,
    seed,
    verify_exactly_once,
)
from tests.helpers import assert_eventually, audit_rows, new_domain, seed_command
from tsq.client import TroubleshootingClient
from tsq.contract import TsqState
from tsq.models import DecisionOutcome, StateView


@dataclass
class Targets:
    """Commands of one domain in every state the cases need; their workflows run."""

    domain: str
    ids: dict[str, uuid.UUID]


@pytest.fixture(scope="module")
def hostile_queue() -> str:
    return f"faults-hostile-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hostile_env(worker_db_url: str, temporal_dev: Temporal, hostile_queue: str) -> dict[str, str]:
    return worker_env(worker_db_url, temporal_dev, hostile_queue)


@pytest.fixture(scope="module")
async def hostile(
    tmp_path_factory: pytest.TempPathFactory,
    hostile_env: dict[str, str],
    temporal_client: Client,
    db: asyncpg.Pool,
    hostile_queue: str,
    figures: Figures,
) -> AsyncIterator[TroubleshootingClient]:
    """The SDK client of this module, with one `tsq worker` process on its task queue."""
    workers = Workers(tmp_path_factory.mktemp("hostile"), hostile_env)
    await workers.start("hostile")
    yield TroubleshootingClient(temporal_client, db, task_queue=hostile_queue)
    leaked = workers.close(WORKER_PASSWORD)
    figures.secrets_leaked += leaked
    assert not leaked, "the database password appears in a worker's output"


@pytest.fixture(scope="module")
async def targets(db: asyncpg.Pool, hostile: TroubleshootingClient) -> Targets:
    domain = new_domain()
    ids = {
        "waiting": await seed_command(db, domain),
        "canceled": await seed_command(db, domain, status="CANCELED"),
        "completed": await seed_command(db, domain, status="COMPLETED"),
        "pending": await seed_command(db, domain, status="PENDING"),
        "missing": uuid.uuid4(),
    }
    for target, queue in BAD_REPLY_QUEUES.items():
        ids[target] = await seed_command(db, domain, reply_queue=queue)
    for target in ("waiting", *BAD_REPLY_QUEUES):
        await hostile.start_workflow(domain, ids[target])
    return Targets(domain, ids)


async def fingerprint(db: asyncpg.Pool, domain: str) -> tuple[Any, ...]:
    """Everything a refusal must leave as it was (refusal audit rows aside)."""
    commands = await db.fetch(
        """
        SELECT command_id, status, attempts, msg_id, updated_at, last_error_msg, reply_queue
        FROM commandbus.command WHERE domain = $1 ORDER BY command_id
        """,
        domain,
    )
    audits = await db.fetchval(
        """
        SELECT count(*) FROM commandbus.audit
        WHERE domain = $1 AND event_type <> 'TSQ_SIGNAL_REFUSED'
        """,
        domain,
    )
    effects = await db.fetchval(
        "SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind <> 'refusal'", domain
    )
    queues = await db.fetch("SELECT queue_name FROM pgmq.meta ORDER BY queue_name")
    tables = await db.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname IN ('commandbus', 'tsq', 'pgmq')"
    )
    replies = await message_counts(db, f"{domain}__replies")
    return (
        [tuple(row) for row in commands],
        audits,
        effects,
        [row["queue_name"] for row in queues],
        tables,
        sorted(replies.items()),
    )


async def assert_waiting_and_idle(handle: WorkflowHandle[Any, Any], figures: Figures) -> None:
    """Back to waiting for an operator, no activity or workflow task retrying, none failed."""
    try:
        await _waiting_and_idle(handle)
    except AssertionError:
        figures.workflows_stuck += 1
        raise


async def _waiting_and_idle(handle: WorkflowHandle[Any, Any]) -> None:
    state = await handle.query("state", result_type=StateView)
    assert state.state is TsqState.AWAITING_OPERATOR

    async def idle() -> bool:
        raw = (await handle.describe()).raw_description
        return not raw.pending_activities and not raw.HasField("pending_workflow_task")

    await assert_eventually(idle)
    failed = [
        event
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    ]
    assert not failed, failed


async def refusal_rows(db: asyncpg.Pool, targets: Targets) -> list[asyncpg.Record]:
    return await audit_rows(db, targets.domain, targets.ids["waiting"], "TSQ_SIGNAL_REFUSED")


# -- signal and update ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.id)
async def test_refused_signal_stays_visible_and_changes_nothing(
    case: Refused,
    db: asyncpg.Pool,
    temporal_client: Client,
    targets: Targets,
    figures: Figures,
) -> None:
    """A malformed signal is refused in the state query and the audit; nothing else changes."""
    figures.input_tried("signal", refused=True)
    handle = handle_of(temporal_client, targets.domain, targets.ids["waiting"])
    known = (await handle.query("state", result_type=StateView)).refused_count
    audited = len(await refusal_rows(db, targets))
    before = await fingerprint(db, targets.domain)

    if case.at_client:
        with pytest.raises(PydanticSerializationError, match=case.problem):
            await handle.signal(case.decision.signal, case.payload)
        assert await fingerprint(db, targets.domain) == before
        assert len(await refusal_rows(db, targets)) == audited
        return
    if case.payload is NO_ARGUMENT:
        await handle.signal(case.decision.signal)
    elif isinstance(case.payload, Arguments):
        await handle.signal(case.decision.signal, args=case.payload.values)
    else:
        await handle.signal(case.decision.signal, case.payload)

    state = await assert_eventually(
        lambda: handle.query("state", result_type=StateView),
        lambda s: s.refused_count > known,
    )
    assert state.refused_count == known + 1
    refusal = state.refused[-1]
    assert refusal.handler == case.decision.name
    assert case.problem in refusal.problem
    rows = await assert_eventually(
        lambda: refusal_rows(db, targets), lambda rows: len(rows) > audited
    )
    [row] = rows[audited:]
    assert row["details_json"]["problem"] == refusal.problem
    assert await fingerprint(db, targets.domain) == before
    await assert_waiting_and_idle(handle, figures)


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.id)
async def test_refused_update_names_the_problem_and_writes_nothing(
    case: Refused,
    db: asyncpg.Pool,
    temporal_client: Client,
    targets: Targets,
    figures: Figures,
) -> None:
    """A malformed update fails back to its caller with the problem and leaves no trace."""
    figures.input_tried("update", refused=True)
    handle = handle_of(temporal_client, targets.domain, targets.ids["waiting"])
    events = len([e async for e in handle.fetch_history_events()])
    audited = len(await refusal_rows(db, targets))
    before = await fingerprint(db, targets.domain)

    if case.at_client:
        with pytest.raises(PydanticSerializationError, match=case.problem):
            await handle.execute_update(case.decision.update, case.payload)
        assert await fingerprint(db, targets.domain) == before
        return
    with pytest.raises(WorkflowUpdateFailedError) as raised:
        if case.payload is NO_ARGUMENT:
            await handle.execute_update(case.decision.update)
        elif isinstance(case.payload, Arguments):
            await handle.execute_update(case.decision.update, args=case.payload.values)
        else:
            await handle.execute_update(case.decision.update, case.payload)

    cause = raised.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "InvalidInputError"
    assert case.problem in cause.message
    # A validator's refusal is not even in the workflow's history.
    assert len([e async for e in handle.fetch_history_events()]) == events
    assert len(await refusal_rows(db, targets)) == audited
    assert await fingerprint(db, targets.domain) == before
    await assert_waiting_and_idle(handle, figures)


@pytest.mark.parametrize("entrance", ["signal", "update"])
@pytest.mark.parametrize("case", STORED, ids=lambda case: case.id)
async def test_accepted_input_is_stored_exactly_as_given(
    case: Stored,
    entrance: str,
    db: asyncpg.Pool,
    temporal_client: Client,
    hostile: TroubleshootingClient,
    figures: Figures,
) -> None:
    """Odd but valid text (SQL, bidi, emoji, combining marks) is kept byte for byte."""
    figures.input_tried(entrance, refused=False)
    seeded = await seed(db, new_domain(), 1, batch=False)
    [cid] = seeded.ids
    await hostile.start_workflow(seeded.domain, cid)
    handle = handle_of(temporal_client, seeded.domain, cid)
    if entrance == "signal":
        await handle.signal(case.decision.signal, case.payload)
    else:
        outcome = await handle.execute_update(
            case.decision.update, case.payload, result_type=DecisionOutcome
        )
        assert outcome.operator == case.payload.get("operator")
    await verify_exactly_once(db, temporal_client, case.decision, seeded, figures)
    await assert_stored_verbatim(db, temporal_client, seeded, case.payload, case.decision.name)


async def assert_stored_verbatim(
    db: asyncpg.Pool,
    temporal: Client,
    seeded: Seeded,
    payload: dict[str, Any],
    decision: str,
) -> None:
    """The audit row, the reply and the workflow's state carry exactly what was sent."""
    [cid] = seeded.ids
    [audit] = await db.fetch(
        """
        SELECT details_json FROM commandbus.audit
        WHERE domain = $1 AND command_id = $2 AND event_type LIKE 'OPERATOR%'
        """,
        seeded.domain,
        cid,
    )
    details = audit["details_json"]
    for key, value in payload.items():
        assert details[key] == value, key
    state = await handle_of(temporal, seeded.domain, cid).query("state", result_type=StateView)
    assert state.decided_by == payload.get("operator")
    if decision == "retry":
        return
    [reply] = await db.fetch(
        "SELECT message FROM pgmq.read($1::text, 0, 10)", f"{seeded.domain}__replies"
    )
    message = reply["message"]
    if decision == "cancel":
        assert state.reason == payload["reason"]
        assert message["reason"] == message["error"]["message"] == payload["reason"]
    else:
        assert message["data"] == message["result"] == payload["result_data"]


# -- SDK ----------------------------------------------------------------------------------------


def _address(targets: Targets, case: SdkCase | CliCase) -> tuple[str, str]:
    domain = targets.domain if case.domain is None else case.domain
    command_id = str(targets.ids[case.target]) if case.command_id is None else case.command_id
    return domain, command_id


@pytest.mark.parametrize("case", SDK_CASES, ids=lambda case: case.id)
async def test_sdk_refuses_with_a_clear_error_and_changes_nothing(
    case: SdkCase,
    db: asyncpg.Pool,
    temporal_client: Client,
    hostile: TroubleshootingClient,
    targets: Targets,
    figures: Figures,
) -> None:
    """`operator_cancel` refuses bad arguments and undecidable commands, changing nothing."""
    figures.input_tried("sdk", refused=True)
    domain, command_id = _address(targets, case)
    before = await fingerprint(db, targets.domain)
    with pytest.raises(case.error) as raised:
        await hostile.operator_cancel(domain, command_id, case.reason, operator=case.operator)
    assert case.problem in str(raised.value)
    assert await fingerprint(db, targets.domain) == before
    if case.target in ("waiting", *BAD_REPLY_QUEUES):
        target = targets.ids[case.target]
        await assert_waiting_and_idle(handle_of(temporal_client, targets.domain, target), figures)


@pytest.mark.parametrize("reason", ["x'); DROP TABLE commandbus.command; --", "\u202e\U0001f525"])
async def test_sdk_stores_odd_reasons_exactly_as_given(
    reason: str,
    db: asyncpg.Pool,
    temporal_client: Client,
    hostile: TroubleshootingClient,
    figures: Figures,
) -> None:
    """A valid reason that looks like SQL or is odd unicode is carried out and kept as given."""
    figures.input_tried("sdk", refused=False)
    seeded = await seed(db, new_domain(), 1, batch=False)
    outcome = await hostile.operator_cancel(seeded.domain, seeded.ids[0], reason, operator="o'k")
    assert outcome is not None and outcome.reason == reason
    await verify_exactly_once(db, temporal_client, CANCEL, seeded, figures)
    await assert_stored_verbatim(
        db, temporal_client, seeded, {"reason": reason, "operator": "o'k"}, "cancel"
    )


# -- tsq CLI ------------------------------------------------------------------------------------


async def run_tsq(env: dict[str, str], *args: str | bytes) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *tsq_command(),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case.id)
async def test_cli_refuses_in_one_line_and_changes_nothing(
    case: CliCase,
    db: asyncpg.Pool,
    hostile_env: dict[str, str],
    targets: Targets,
    figures: Figures,
) -> None:
    """`tsq cancel` with bad input exits non-zero with one line saying why; nothing changes."""
    figures.input_tried("cli", refused=True)
    domain, command_id = _address(targets, case)
    before = await fingerprint(db, targets.domain)
    code, out, err = await run_tsq(hostile_env, "cancel", domain, command_id, *case.args)
    assert code == case.exit_code, (out, err)
    assert "Traceback" not in err
    assert WORKER_PASSWORD not in out + err
    lines = err.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("tsq cancel: "), err
    assert case.problem in lines[-1], err
    assert await fingerprint(db, targets.domain) == before


@pytest.mark.parametrize(("name", "reason"), CLI_STORED, ids=[name for name, _ in CLI_STORED])
async def test_cli_stores_odd_reasons_exactly_as_given(
    name: str,
    reason: str,
    db: asyncpg.Pool,
    temporal_client: Client,
    hostile: TroubleshootingClient,
    hostile_env: dict[str, str],
    figures: Figures,
) -> None:
    """`tsq cancel --reason` with SQL-looking or odd unicode text keeps it byte for byte."""
    figures.input_tried("cli", refused=False)
    seeded = await seed(db, new_domain(), 1, batch=False)
    operator = "ops'; --"
    code, out, err = await run_tsq(
        hostile_env,
        "cancel",
        seeded.domain,
        str(seeded.ids[0]),
        "--reason",
        reason,
        "--operator",
        operator,
    )
    assert code == 0, (out, err)
    await verify_exactly_once(db, temporal_client, CANCEL, seeded, figures)
    await assert_stored_verbatim(
        db, temporal_client, seeded, {"reason": reason, "operator": operator}, "cancel"
    )
