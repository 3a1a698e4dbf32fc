"""What the fault tests share: decisions and their entrances, holds, and the exactly-once check.

Each kind of decision (cancel, retry, complete) is described once, by a `Decision`; every
fault test injects its fault into decisions of each kind in `DECISIONS`, so a new kind is
covered by adding it there.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client, WorkflowHandle

from tests.faults.figures import Figures
from tests.helpers import seed_command
from tsq.client import TroubleshootingClient
from tsq.contract import workflow_id
from tsq.models import DecisionOutcome, StateView
from tsq.store import ensure_queue

WORKER_ROLE = "tsq_worker"
# The worker role's password: the secret the suite hunts for in logs, attributes and details.
WORKER_PASSWORD = f"pw-{uuid.uuid4().hex}"
ENTRANCES = ("signal", "update", "sdk")


@dataclass(frozen=True)
class Decision:
    """One kind of operator decision: how to ask for it and what it must leave behind."""

    name: str
    audit_event: str
    final_status: str
    # The workflow's `TsqState` once the decision is carried out.
    final_state: str
    # The queue that gets exactly one message per decision: `replies` (the answer to the
    # sender) or `commands` (the original message, sent again).
    sends_to: str
    # The batch counter the decision moves; None when the batch stays open.
    batch_counter: str | None
    request: Callable[[str], dict[str, Any]]
    sdk: Callable[[TroubleshootingClient, str, uuid.UUID, dict[str, Any]], Awaitable[Any]]

    @property
    def signal(self) -> str:
        return self.name

    @property
    def update(self) -> str:
        return f"operator_{self.name}"

    def __str__(self) -> str:
        return self.name


CANCEL = Decision(
    name="cancel",
    audit_event="OPERATOR_CANCEL",
    final_status="CANCELED",
    final_state="CANCELED",
    sends_to="replies",
    batch_counter="canceled_count",
    request=lambda who: {"reason": f"fault suite: {who} cancels", "operator": who},
    sdk=lambda client, domain, cid, req: client.operator_cancel(
        domain, cid, req["reason"], operator=req["operator"]
    ),
)
RETRY = Decision(
    name="retry",
    audit_event="OPERATOR_RETRY",
    final_status="PENDING",
    final_state="RETRIED",
    sends_to="commands",
    batch_counter=None,
    request=lambda who: {"operator": who},
    sdk=lambda client, domain, cid, req: client.operator_retry(
        domain, cid, operator=req["operator"]
    ),
)
COMPLETE = Decision(
    name="complete",
    audit_event="OPERATOR_COMPLETE",
    final_status="COMPLETED",
    final_state="COMPLETED",
    sends_to="replies",
    batch_counter="completed_count",
    request=lambda who: {"result_data": {"completed_by": who, "amount": 100}, "operator": who},
    sdk=lambda client, domain, cid, req: client.operator_complete(
        domain, cid, result_data=req["result_data"], operator=req["operator"]
    ),
)

DECISIONS = [CANCEL, RETRY, COMPLETE]


def handle_of(
    temporal: Client, domain: str, command_id: uuid.UUID | str
) -> WorkflowHandle[Any, DecisionOutcome]:
    return temporal.get_workflow_handle(
        workflow_id(domain, command_id), result_type=DecisionOutcome
    )


# -- seeding and holds ----------------------------------------------------------------------


@dataclass
class Seeded:
    """Commands parked in one fresh domain, optionally in one batch."""

    domain: str
    ids: list[uuid.UUID]
    batch_id: uuid.UUID | None


async def seed(db: asyncpg.Pool, domain: str, count: int, *, batch: bool = True) -> Seeded:
    """`count` troubleshooting commands with a reply queue, in one batch unless told otherwise."""
    batch_id = uuid.uuid4() if batch else None
    if batch_id is not None:
        await db.execute(
            """
            INSERT INTO commandbus.batch (domain, batch_id, name, status, total_count,
                in_troubleshooting_count)
            VALUES ($1, $2, 'fault suite', 'IN_PROGRESS', $3, $3)
            """,
            domain,
            batch_id,
            count,
        )
    ids = [await seed_command(db, domain, batch_id=batch_id) for _ in range(count)]
    async with db.acquire() as conn:
        await ensure_queue(conn, f"{domain}__replies")
    return Seeded(domain, ids, batch_id)


async def park_burst(
    db: asyncpg.Pool, domain: str, count: int, *, replies: bool = False
) -> list[uuid.UUID]:
    """`count` commands parked by the bus in one transaction; with `replies`, each with the
    reply queue `<domain>__replies` (created here)."""
    if replies:
        async with db.acquire() as conn:
            await ensure_queue(conn, f"{domain}__replies")
    rows = await db.fetch(
        """
        INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,
            max_attempts, last_error_type, last_error_code, reply_queue)
        SELECT $1, $1 || '__commands', gen_random_uuid(), 'DebitAccount',
            'IN_TROUBLESHOOTING_QUEUE', 3, 'PERMANENT', 'BURST',
            CASE WHEN $3 THEN $1 || '__replies' ELSE '' END
        FROM generate_series(1, $2)
        RETURNING command_id
        """,
        domain,
        count,
        replies,
    )
    return [row["command_id"] for row in rows]


async def count(temporal: Client, query: str) -> int:
    return (await temporal.count_workflows(query)).count


async def hold(
    db: asyncpg.Pool, domain: str, at: str, seconds: float = 60, *, queue: str | None = None
) -> None:
    """Decisions of `domain` sleep `seconds` inside their transaction at step `at`.

    At `message`, the pause comes after the message was sent to `queue`.
    """
    if at == "message":
        assert queue is not None
        await db.execute("SELECT faults.watch_queue($1)", queue)
    await db.execute(
        "INSERT INTO faults.hold (domain, at, seconds) VALUES ($1, $2, $3)", domain, at, seconds
    )


async def release(db: asyncpg.Pool, domain: str) -> None:
    await db.execute("DELETE FROM faults.hold WHERE domain = $1", domain)


async def paused_decisions(db: asyncpg.Pool) -> int:
    """Worker backends sleeping at a hold, inside a decision's transaction."""
    count: int = await db.fetchval(
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE usename = $1 AND wait_event = 'PgSleep' AND state = 'active'
        """,
        WORKER_ROLE,
    )
    return count


async def wait_paused(
    db: asyncpg.Pool, target: int, *, within: float = 20, settle: float = 3
) -> int:
    """Until `target` decisions sleep at a hold, or their number stopped growing for `settle`s."""
    deadline = time.monotonic() + within
    last, since = -1, time.monotonic()
    while True:
        count = await paused_decisions(db)
        if count >= target:
            return count
        if count != last:
            last, since = count, time.monotonic()
        elif count > 0 and time.monotonic() - since > settle:
            return count
        if time.monotonic() > deadline:
            raise AssertionError(f"only {count} of {target} decisions reached the hold")
        await asyncio.sleep(0.05)


# -- asking for decisions ----------------------------------------------------------------------


# Caller tasks a failed test may leave behind; cancelled after each test.
PENDING_CALLS: set[asyncio.Task[Any]] = set()


def call_soon(awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    async def run() -> Any:
        return await awaitable

    task = asyncio.create_task(run())
    PENDING_CALLS.add(task)
    task.add_done_callback(PENDING_CALLS.discard)
    return task


@dataclass
class Callers:
    """Decisions asked for; update and SDK callers wait for their answer in tasks."""

    waiting: list[tuple[uuid.UUID, str, asyncio.Task[Any]]] = field(default_factory=list)

    async def answers(self, within: float) -> list[tuple[uuid.UUID, str, Any]]:
        """Every caller's answer (an outcome, or the exception it got)."""
        tasks = [task for _, _, task in self.waiting]
        done = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=within
        )
        return [
            (cid, via, answer) for (cid, via, _), answer in zip(self.waiting, done, strict=True)
        ]


async def decide_all(
    decision: Decision,
    tsq_client: TroubleshootingClient,
    temporal: Client,
    seeded: Seeded,
    ids: list[uuid.UUID] | None = None,
    entrances: tuple[str, ...] = ENTRANCES,
    *,
    started: bool = False,
) -> Callers:
    """Ask for `decision` on every command, spreading them over the entrances in turn.

    Signals and updates go to the workflow, started first unless `started`; the SDK starts it
    itself (update-with-start).
    """
    callers = Callers()
    targets = seeded.ids if ids is None else ids

    async def one(index: int, cid: uuid.UUID) -> None:
        via = entrances[index % len(entrances)]
        request = decision.request(f"{via}-{index}")
        if via == "sdk":
            task = call_soon(decision.sdk(tsq_client, seeded.domain, cid, request))
            callers.waiting.append((cid, via, task))
            return
        if not started:
            await tsq_client.start_workflow(seeded.domain, cid)
        handle = handle_of(temporal, seeded.domain, cid)
        if via == "signal":
            await handle.signal(decision.signal, request)
        else:
            task = call_soon(
                handle.execute_update(decision.update, request, result_type=DecisionOutcome)
            )
            callers.waiting.append((cid, via, task))

    await asyncio.gather(*(one(i, cid) for i, cid in enumerate(targets)))
    return callers


# -- checking -----------------------------------------------------------------------------------


async def message_counts(db: asyncpg.Pool, queue: str) -> Counter[str]:
    """How many messages about each command wait in `queue` (read without consuming)."""
    exists = await db.fetchval("SELECT 1 FROM pgmq.meta WHERE queue_name = $1", queue)
    if not exists:
        return Counter()
    rows = await db.fetch("SELECT message FROM pgmq.read($1::text, 0, 100000)", queue)
    return Counter(row["message"]["command_id"] for row in rows)


async def state_of(temporal: Client, domain: str, command_id: uuid.UUID) -> StateView:
    state: StateView = await handle_of(temporal, domain, command_id).query(
        "state", result_type=StateView
    )
    return state


async def what_holds(temporal: Client, domain: str, command_id: uuid.UUID) -> str:
    """What a workflow that did not finish waits on: its workflow task's attempts, its pending
    activities and their last failures, and the statuses of all its runs, read from the server."""
    handle = handle_of(temporal, domain, command_id)
    raw = (await handle.describe()).raw_description
    failed_tasks = [
        e.workflow_task_failed_event_attributes.failure.message
        async for e in handle.fetch_history_events()
        if e.HasField("workflow_task_failed_event_attributes")
    ]
    task = raw.pending_workflow_task
    runs = [
        e.status.name if e.status else "?"
        async for e in temporal.list_workflows(f'WorkflowId = "{handle.id}"')
    ]
    status = WorkflowExecutionStatus.Name(raw.workflow_execution_info.status)
    parts = [f"{command_id}: {status}, runs {runs}"]
    if raw.HasField("pending_workflow_task"):
        parts.append(f"workflow task {task.state} attempt {task.attempt}")
    parts += [
        f"activity {a.activity_type.name} attempt {a.attempt}: {a.last_failure.message or '-'}"
        for a in raw.pending_activities
    ]
    parts += [f"workflow task failed: {message}" for message in failed_tasks[-2:]]
    return "; ".join(parts)


async def wait_closed(
    temporal: Client, domain: str, ids: list[uuid.UUID], within: float
) -> dict[uuid.UUID, DecisionOutcome | BaseException]:
    """Each workflow's result, or what stopped it from coming within `within` seconds."""

    async def one(cid: uuid.UUID) -> DecisionOutcome | BaseException:
        try:
            outcome: DecisionOutcome = await asyncio.wait_for(
                handle_of(temporal, domain, cid).result(), within
            )
        except Exception as err:  # a timeout, or the workflow failed: either way, stuck
            return err
        return outcome

    results = await asyncio.gather(*(one(cid) for cid in ids))
    return dict(zip(ids, results, strict=True))


async def winners(db: asyncpg.Pool, domain: str) -> dict[uuid.UUID, Decision]:
    """The decision each command of `domain` got, as recorded (commands with exactly one)."""
    rows = await db.fetch(
        """
        SELECT command_id, min(kind) AS kind, count(*) AS n FROM tsq.effect
        WHERE domain = $1 AND kind <> 'refusal' AND (result->>'carried_out')::boolean
        GROUP BY command_id
        """,
        domain,
    )
    by_name = {d.name: d for d in DECISIONS}
    return {row["command_id"]: by_name[row["kind"]] for row in rows if row["n"] == 1}


async def verify_exactly_once(
    db: asyncpg.Pool,
    temporal: Client,
    expected: Decision | Mapping[uuid.UUID, Decision],
    seeded: Seeded,
    figures: Figures,
    *,
    within: float = 90,
    later_runs: bool = False,
) -> None:
    """Every command of `seeded` decided once: one status change, one audit row, one message.

    `expected` is the decision every command got, or each command's. With `later_runs`, a
    workflow's latest run may be one a racing caller started after the decision, which found
    the command decided and changed nothing.
    """
    per_command = (
        dict.fromkeys(seeded.ids, expected) if isinstance(expected, Decision) else expected
    )
    results = await wait_closed(temporal, seeded.domain, seeded.ids, within)
    stuck = {cid: res for cid, res in results.items() if not isinstance(res, DecisionOutcome)}
    figures.workflows_stuck += len(stuck)
    domain = seeded.domain
    status = {
        r["command_id"]: r["status"]
        for r in await db.fetch(
            "SELECT command_id, status FROM commandbus.command WHERE domain = $1", domain
        )
    }
    audits: dict[uuid.UUID, Counter[str]] = {cid: Counter() for cid in seeded.ids}
    for r in await db.fetch(
        """
        SELECT command_id, event_type FROM commandbus.audit
        WHERE domain = $1 AND event_type = ANY($2::text[])
        """,
        domain,
        [d.audit_event for d in DECISIONS],
    ):
        audits[r["command_id"]][r["event_type"]] += 1
    effects: dict[uuid.UUID, Counter[str]] = {cid: Counter() for cid in seeded.ids}
    # Decisions a workflow found already taken are recorded too, as not carried out.
    for r in await db.fetch(
        """
        SELECT command_id, kind FROM tsq.effect
        WHERE domain = $1 AND kind <> 'refusal' AND (result->>'carried_out')::boolean
        """,
        domain,
    ):
        effects[r["command_id"]][r["kind"]] += 1
    changes = Counter(
        r["command_id"]
        for r in await db.fetch(
            "SELECT command_id FROM faults.status_change WHERE domain = $1", domain
        )
    )
    sent = {to: await message_counts(db, f"{domain}__{to}") for to in ("replies", "commands")}
    wrong: list[str] = []
    for cid in seeded.ids:
        decision = per_command.get(cid)
        if decision is None:
            wrong.append(f"{cid}: no single decision recorded: {dict(effects[cid])}")
            continue
        messages = sent[decision.sends_to].get(str(cid), 0)
        stray = sum(count.get(str(cid), 0) for to, count in sent.items() if to != decision.sends_to)
        audited = audits[cid][decision.audit_event]
        other_audits = sum(audits[cid].values()) - audited
        figures.replies_lost += max(0, 1 - messages)
        figures.replies_duplicated += max(0, messages - 1) + stray
        figures.audits_lost += max(0, 1 - audited)
        figures.audits_duplicated += max(0, audited - 1) + other_audits
        figures.status_changes_duplicated += max(0, changes[cid] - 1)
        found = (
            status[cid],
            audited,
            other_audits,
            changes[cid],
            dict(effects[cid]),
            messages,
            stray,
        )
        want = (decision.final_status, 1, 0, 1, {decision.name: 1}, 1, 0)
        if found != want:
            wrong.append(
                f"{cid} ({decision}): status, audit rows, other decisions' audit rows, status "
                f"changes, effects, messages, stray messages = {found}, not {want}"
            )
        elif cid not in stuck:
            figures.decisions_completed += 1
        res = results[cid]
        if isinstance(res, DecisionOutcome) and not later_runs:
            if not res.carried_out or res.decision is None or res.decision.value != decision.name:
                wrong.append(f"{cid}: the workflow says {res.decision}: {res.detail}")
    if seeded.batch_id is not None:
        wrong += await _batch_problems(db, seeded, per_command)
    if stuck:
        held = [await what_holds(temporal, domain, cid) for cid in list(stuck)[:3]]
        raise AssertionError(f"{len(stuck)} workflow(s) did not finish:\n" + "\n".join(held))
    assert not wrong, "not exactly once:\n" + "\n".join(wrong[:20])


async def _batch_problems(
    db: asyncpg.Pool, seeded: Seeded, per_command: Mapping[uuid.UUID, Decision]
) -> list[str]:
    """The batch's counters moved once per decision, and it closed once if it could."""
    batch = await db.fetchrow(
        "SELECT * FROM commandbus.batch WHERE domain = $1 AND batch_id = $2",
        seeded.domain,
        seeded.batch_id,
    )
    closed = await db.fetchval(
        """
        SELECT count(*) FROM commandbus.audit
        WHERE domain = $1 AND command_id = $2 AND event_type = 'BATCH_COMPLETED'
        """,
        seeded.domain,
        seeded.batch_id,
    )
    counted = Counter(d.batch_counter for d in per_command.values() if d.batch_counter)
    found = (
        batch["canceled_count"],
        batch["completed_count"],
        batch["in_troubleshooting_count"],
        closed,
    )
    want = (
        counted["canceled_count"],
        counted["completed_count"],
        0,
        1 if sum(counted.values()) == len(seeded.ids) else 0,
    )
    if found == want:
        return []
    return [f"batch canceled, completed, in troubleshooting, closed = {found}, not {want}"]


def assert_answers(answers: list[tuple[uuid.UUID, str, Any]]) -> None:
    """Every update or SDK caller got the outcome of its own decision, carried out."""
    bad = [
        (cid, via, answer)
        for cid, via, answer in answers
        if not (isinstance(answer, DecisionOutcome) and answer.carried_out)
    ]
    assert not bad, f"callers without their outcome: {bad[:5]}"
