"""`tsq bench`: how fast tsq parks and decides commands, next to what its servers allow.

One run, on the same servers, measures tsq (moving commands into the troubleshooting queue,
then canceling them all through the SDK) and two ceilings: a bare Temporal workflow that waits
for one update and completes, and the same cancels done directly in SQL. After each phase it
counts rows to check that every decision happened exactly once. With `waiting > 0` it also
parks that many workflows and measures the worker's memory, its idle CPU and how a single
decision's latency grows with the number of waiting workflows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psutil  # type: ignore[import-untyped]
import temporalio
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from tsq.bench_workflow import BareWorkflow
from tsq.client import TroubleshootingClient, start_metadata
from tsq.contract import CommandStatus, workflow_id
from tsq.db import create_pool, ensure_queue, migrate
from tsq.devstack import embedded_postgres, start_temporal
from tsq.models import CommandSnapshot
from tsq.settings import Settings
from tsq.temporal import connect, register_search_attributes
from tsq.worker import new_worker

T = TypeVar("T")

REASON = "benchmark"
OPERATOR = "tsq-bench"
# Direct-SQL connections beyond this would crowd a default PostgreSQL (max_connections 100)
# that also serves the worker and the client.
MAX_SQL_POOL = 50
# Single decisions are probed at this many waiting workflows and at `--waiting`.
LOW_WAITING = 100
VISIBILITY_DEADLINE = 60.0
# tsq and the bare workflow take turns this many times in each step.
ROUNDS = 5


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; `waiting=0` skips the waiting-at-scale phase."""

    commands: int = 500
    concurrency: int = 50
    waiting: int = 0
    probes: int = 30
    idle_seconds: float = 10.0


@dataclass
class Rate:
    """Calls made with bounded concurrency: wall time, per-call latency, failures."""

    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    first_error: str | None = None

    @property
    def done(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def pct(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @classmethod
    def empty(cls) -> Rate:
        return cls(0.0, [])

    def __add__(self, other: Rate) -> Rate:
        """Two runs as one: their wall times add up."""
        return Rate(
            self.seconds + other.seconds,
            self.latencies_ms + other.latencies_ms,
            self.errors + other.errors,
            self.first_error or other.first_error,
        )


@dataclass
class Check:
    """Row and workflow counts after a phase, against what the phase should have left."""

    expected: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(value == self.expected for value in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "ok": self.ok, **self.counts}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _chunks(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """`items` cut into `parts` consecutive slices of near-equal size."""
    size = len(items)
    return [items[i * size // parts : (i + 1) * size // parts] for i in range(parts)]


def _say(message: str) -> None:
    # Progress goes to stderr: stdout carries the table and, last, the JSON line.
    print(f"tsq bench: {message}", file=sys.stderr, flush=True)


async def run_concurrently(
    items: Sequence[T], call: Callable[[T], Awaitable[object]], concurrency: int
) -> Rate:
    """Call `call` on each item, `concurrency` at a time; failures are counted, not raised."""
    pending = iter(items)
    latencies: list[float] = []
    errors: list[str] = []

    async def lane() -> None:
        for item in pending:
            began = time.perf_counter()
            try:
                await call(item)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(items))))))
    seconds = time.perf_counter() - began
    return Rate(seconds, latencies, len(errors), errors[0] if errors else None)


async def _until(
    probe: Callable[[], Awaitable[int]], expected: int, *, within: float = VISIBILITY_DEADLINE
) -> int:
    """Poll a count until it reaches `expected` (visibility lags a little); return the last."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


class _Bench:
    def __init__(
        self,
        config: BenchConfig,
        settings: Settings,
        temporal: Client,
        pool: asyncpg.Pool,
        temporal_pid: int | None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.temporal = temporal
        self.pool = pool
        self.temporal_pid = temporal_pid
        self.run_id = uuid.uuid4().hex[:8]
        self.domains: list[str] = []
        self.leftover_workflows: list[str] = []
        self.result: dict[str, Any] = {}
        self.checks: dict[str, Check] = {}
        self.errors: dict[str, str] = {}

    # -- seeding ------------------------------------------------------------------------------

    def _domain(self, what: str) -> str:
        domain = f"bench_{self.run_id}_{what}"
        self.domains.append(domain)
        return domain

    async def _seed(self, domain: str, count: int, *, parked: bool) -> list[uuid.UUID]:
        """Insert `count` commands as a bus would: IN_PROGRESS with a message, or already parked.

        Parked commands get no message: nothing in the benchmark reads an archived one.
        """
        commands, replies = f"{domain}__commands", f"{domain}__replies"
        async with self.pool.acquire() as conn, conn.transaction():
            await ensure_queue(conn, commands)
            await ensure_queue(conn, replies)
            rows = await conn.fetch(
                """
                WITH fresh AS (
                    SELECT gen_random_uuid() AS command_id, gen_random_uuid() AS correlation_id
                    FROM generate_series(1, $4)
                ), sent AS (
                    SELECT fresh.*,
                        CASE WHEN $5 THEN NULL ELSE (SELECT * FROM pgmq.send($2::text,
                            jsonb_build_object(
                                'domain', $1::text, 'command_type', 'DebitAccount',
                                'command_id', command_id, 'correlation_id', correlation_id,
                                'data', jsonb_build_object('account', 'ACC-1', 'amount', 100),
                                'reply_to', $3::text))) END AS msg_id
                    FROM fresh
                )
                INSERT INTO commandbus.command (domain, queue_name, msg_id, command_id,
                    command_type, status, attempts, max_attempts, last_error_type,
                    last_error_code, last_error_msg, reply_queue, correlation_id)
                SELECT $1, $2, msg_id, command_id, 'DebitAccount',
                    CASE WHEN $5 THEN $6 ELSE 'IN_PROGRESS' END, 3, 3,
                    CASE WHEN $5 THEN 'PERMANENT' END, CASE WHEN $5 THEN 'BENCH' END,
                    CASE WHEN $5 THEN 'parked by tsq bench' END, $3, correlation_id
                FROM sent
                RETURNING command_id
                """,
                domain,
                commands,
                replies,
                count,
                parked,
                CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
            )
        return [row["command_id"] for row in rows]

    # -- counting -----------------------------------------------------------------------------

    async def _workflows(self, query: str) -> int:
        return (await self.temporal.count_workflows(query)).count

    async def _replies(self, domain: str) -> tuple[int, int]:
        # vt 0: reading for the count leaves every message visible.
        row = await self.pool.fetchrow(
            """
            SELECT count(*) FILTER (WHERE message->>'outcome' = 'CANCELED') AS replies,
                count(DISTINCT message->>'command_id') AS commands
            FROM pgmq.read($1::text, 0, $2)
            """,
            f"{domain}__replies",
            2**31 - 1,
        )
        assert row is not None
        return row["replies"], row["commands"]

    async def _decided_counts(self, domain: str, *, effects: bool) -> dict[str, int]:
        row = await self.pool.fetchrow(
            """
            SELECT
                (SELECT count(*) FROM commandbus.command
                 WHERE domain = $1 AND status = 'CANCELED') AS canceled,
                (SELECT count(*) FROM commandbus.audit
                 WHERE domain = $1 AND event_type = 'OPERATOR_CANCEL') AS audits,
                (SELECT count(DISTINCT command_id) FROM commandbus.audit
                 WHERE domain = $1 AND event_type = 'OPERATOR_CANCEL') AS audited_commands,
                (SELECT count(*) FROM tsq.effect WHERE domain = $1 AND kind = 'cancel') AS effects
            """,
            domain,
        )
        assert row is not None
        replies, replied_commands = await self._replies(domain)
        counts = {
            "replies": replies,
            "replied_commands": replied_commands,
            "audits": row["audits"],
            "audited_commands": row["audited_commands"],
            "canceled": row["canceled"],
        }
        if effects:
            counts["decisions"] = row["effects"]
        return counts

    # -- phases -------------------------------------------------------------------------------

    async def workflow_phases(self) -> None:
        """tsq and the bare workflow, step by step side by side, so both see the same load."""
        n, k, probes = self.config.commands, self.config.concurrency, self.config.probes
        total = n + probes
        domain = self._domain("tsq")
        tsq_queue = f"tsq-bench-{self.run_id}-tsq"
        bare_queue = f"tsq-bench-{self.run_id}-bare"
        tsq_ids = await self._seed(domain, total, parked=False)
        bare_ids = [f"tsq-bench-bare:{self.run_id}:{i}" for i in range(total)]
        marked_ids = [f"tsq-bench-bare-marked:{self.run_id}:{i}" for i in range(total)]
        client = TroubleshootingClient(self.temporal, self.pool, task_queue=tsq_queue)
        # What tsq starts its workflows with besides the id: search attributes, summary, details.
        marks = start_metadata(
            CommandSnapshot(
                domain=f"{domain}_marked",
                command_id=uuid.uuid4(),
                command_type="DebitAccount",
                correlation_id=uuid.uuid4(),
                reply_queue=f"{domain}__replies",
                attempts=3,
                max_attempts=3,
                last_error_type="PERMANENT",
                last_error_code="BENCH",
                last_error_msg="parked by tsq bench",
            )
        )

        async def tsq_start(cid: uuid.UUID) -> None:
            await client.move_to_troubleshooting(
                domain,
                cid,
                error_type="PERMANENT",
                error_code="BENCH",
                error_message="parked by tsq bench",
            )

        async def tsq_decide(cid: uuid.UUID) -> None:
            await client.operator_cancel(domain, cid, REASON, operator=OPERATOR)

        def bare_operation(wid: str) -> WithStartWorkflowOperation[BareWorkflow, str]:
            return WithStartWorkflowOperation(
                BareWorkflow.run,
                wid,
                id=wid,
                task_queue=bare_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )

        def bare_starter(**options: Any) -> Callable[[str], Awaitable[None]]:
            async def start(wid: str) -> None:
                await self.temporal.start_workflow(
                    BareWorkflow.run,
                    wid,
                    id=wid,
                    task_queue=bare_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    **options,
                )

            return start

        bare_start, marked_start = bare_starter(), bare_starter(**marks)

        async def marked_finish(wid: str) -> None:
            await self.temporal.get_workflow_handle(wid).terminate(reason="start rate measured")

        async def bare_decide(wid: str) -> None:
            # The call tsq's SDK makes: update-with-start, waiting for the update's result.
            answer = await self.temporal.execute_update_with_start_workflow(
                BareWorkflow.decide, REASON, start_workflow_operation=bare_operation(wid)
            )
            if answer != REASON:
                raise RuntimeError(f"workflow {wid} answered {answer!r}")

        # The sandbox re-imports a workflow's module, parents included, for every workflow it
        # instantiates; `tsq/__init__` pulls in asyncpg, whose re-import crashes the process.
        runner = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("tsq")
        )
        worker_pool = await create_pool(self.settings.require_database_url())
        try:
            async with (
                new_worker(self.temporal, worker_pool, tsq_queue),
                Worker(
                    self.temporal,
                    task_queue=bare_queue,
                    workflows=[BareWorkflow],
                    workflow_runner=runner,
                ),
            ):
                # Alternating rounds: a burst of load from elsewhere on the machine hits
                # both sides instead of whichever happened to run then.
                rounds = min(ROUNDS, n)
                tsq_starts, bare_starts, marked_starts = Rate.empty(), Rate.empty(), Rate.empty()
                _say(
                    f"starting {total} tsq and {total} bare workflows, and {total} bare ones "
                    f"with tsq's search attributes, summary and details, {k} at a time"
                )
                for tsq_part, bare_part, marked_part in zip(
                    _chunks(tsq_ids, rounds),
                    _chunks(bare_ids, rounds),
                    _chunks(marked_ids, rounds),
                    strict=True,
                ):
                    tsq_starts += await run_concurrently(tsq_part, tsq_start, k)
                    await self._settled(tsq_queue, workflow_id(domain, tsq_part[-1]))
                    bare_starts += await run_concurrently(bare_part, bare_start, k)
                    await self._settled(bare_queue, bare_part[-1])
                    marked_starts += await run_concurrently(marked_part, marked_start, k)
                    await self._settled(bare_queue, marked_part[-1])
                await self._check_parked(domain, total)
                # Not measured: the marked ones are only there for their start rate.
                await run_concurrently(marked_ids, marked_finish, k)

                tsq_bulk, bare_bulk = Rate.empty(), Rate.empty()
                _say(f"deciding {n} of each, {k} at a time")
                for i, (tsq_part, bare_part) in enumerate(
                    zip(_chunks(tsq_ids[:n], rounds), _chunks(bare_ids[:n], rounds), strict=True)
                ):
                    if i % 2:
                        bare_bulk += await run_concurrently(bare_part, bare_decide, k)
                    tsq_bulk += await run_concurrently(tsq_part, tsq_decide, k)
                    if not i % 2:
                        bare_bulk += await run_concurrently(bare_part, bare_decide, k)

                tsq_single, bare_single = Rate.empty(), Rate.empty()
                _say(f"deciding {probes} of each one at a time")
                for tsq_id, bare_id in zip(tsq_ids[n:], bare_ids[n:], strict=True):
                    tsq_single += await run_concurrently([tsq_id], tsq_decide, 1)
                    bare_single += await run_concurrently([bare_id], bare_decide, 1)
        finally:
            await worker_pool.close()

        counts = await self._decided_counts(domain, effects=True)
        counts["completed_workflows"] = await _until(
            lambda: self._workflows(
                f"CommandDomain = '{domain}' AND ExecutionStatus = 'Completed'"
            ),
            total,
        )
        counts["calls_returned"] = tsq_bulk.done + tsq_single.done
        self.checks["tsq_decide"] = Check(total, counts)
        bare_completed = await _until(
            lambda: self._workflows(
                f"TaskQueue = '{bare_queue}' AND ExecutionStatus = 'Completed'"
            ),
            total,
        )
        self.checks["bare"] = Check(
            total,
            {
                "started": bare_starts.done,
                "decisions": bare_bulk.done + bare_single.done,
                "completed_workflows": bare_completed,
            },
        )
        for name, rate in (
            ("tsq_start", tsq_starts),
            ("bare_start", bare_starts),
            ("bare_marked_start", marked_starts),
            ("tsq_decide", tsq_bulk),
            ("bare_decide", bare_bulk),
            ("tsq_single", tsq_single),
            ("bare_single", bare_single),
        ):
            self._record(name, rate)
        self.result.update(
            start_per_s=tsq_starts.per_s,
            start_p50_ms=tsq_starts.pct(50),
            start_p99_ms=tsq_starts.pct(99),
            decisions_per_s=tsq_bulk.per_s,
            decision_p50_ms=tsq_bulk.pct(50),
            decision_p99_ms=tsq_bulk.pct(99),
            single_p50_ms=tsq_single.pct(50),
            single_p99_ms=tsq_single.pct(99),
            bare_start_per_s=bare_starts.per_s,
            bare_marked_start_per_s=marked_starts.per_s,
            bare_decisions_per_s=bare_bulk.per_s,
            bare_p50_ms=bare_bulk.pct(50),
            bare_p99_ms=bare_bulk.pct(99),
            bare_single_p50_ms=bare_single.pct(50),
            bare_single_p99_ms=bare_single.pct(99),
        )

    async def _check_parked(self, domain: str, total: int) -> None:
        moved = await self.pool.fetchval(
            """
            SELECT count(*) FROM commandbus.audit
            WHERE domain = $1 AND event_type = 'MOVED_TO_TSQ'
            """,
            domain,
        )
        parked = await self.pool.fetchval(
            "SELECT count(*) FROM commandbus.command WHERE domain = $1 AND status = $2",
            domain,
            CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
        )
        running = await _until(
            lambda: self._workflows(f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"),
            total,
        )
        self.checks["tsq_start"] = Check(
            total, {"moved_audits": moved, "parked": parked, "running_workflows": running}
        )

    async def direct_sql_phase(self) -> None:
        n, k = self.config.commands, self.config.concurrency
        domain = self._domain("sql")
        ids = await self._seed(domain, n, parked=True)
        size = min(k, MAX_SQL_POOL)
        sql_pool = await create_pool(
            self.settings.require_database_url(), min_size=size, max_size=size
        )

        async def cancel(cid: uuid.UUID) -> None:
            # What the reference command bus does: one transaction, guarded update, reply, audit.
            async with sql_pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """
                    WITH canceled AS (
                        UPDATE commandbus.command SET status = 'CANCELED', updated_at = now()
                        WHERE domain = $1 AND command_id = $2 AND status = $3
                        RETURNING *
                    )
                    SELECT reply_queue, (SELECT * FROM pgmq.send(reply_queue,
                        tsq.reply_body(canceled::commandbus.command, 'CANCELED', $4, NULL)))
                        AS msg_id
                    FROM canceled
                    """,
                    domain,
                    cid,
                    CommandStatus.IN_TROUBLESHOOTING_QUEUE.value,
                    REASON,
                )
                if row is None:
                    raise RuntimeError(f"command {cid} was not in the troubleshooting queue")
                reply_queue, msg_id = row["reply_queue"], row["msg_id"]
                await conn.execute("SELECT pg_notify($1, '')", f"pgmq_notify_{reply_queue}")
                await conn.execute(
                    """
                    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
                    VALUES ($1, $2, 'OPERATOR_CANCEL', $3)
                    """,
                    domain,
                    cid,
                    {
                        "operator": OPERATOR,
                        "reason": REASON,
                        "reply_to": reply_queue,
                        "reply_msg_id": msg_id,
                    },
                )

        try:
            _say(f"direct SQL: canceling {n} commands, {size} connections")
            decisions = await run_concurrently(ids, cancel, k)
        finally:
            await sql_pool.close()
        self._record("direct_sql", decisions)
        counts = await self._decided_counts(domain, effects=False)
        counts["transactions"] = decisions.done
        self.checks["direct_sql"] = Check(n, counts)
        self.result.update(
            direct_sql_per_s=decisions.per_s,
            direct_sql_p50_ms=decisions.pct(50),
            direct_sql_p99_ms=decisions.pct(99),
        )

    async def waiting_phase(self, work_dir: Path) -> None:
        m, k, probes = self.config.waiting, self.config.concurrency, self.config.probes
        low = min(LOW_WAITING, m)
        domain = self._domain("wait")
        task_queue = f"tsq-bench-{self.run_id}-wait"
        ids = await self._seed(domain, m + 2 * probes, parked=True)
        client = TroubleshootingClient(self.temporal, self.pool, task_queue=task_queue)
        first, rest = ids[: low + probes], ids[low + probes :]
        self.leftover_workflows = [workflow_id(domain, cid) for cid in ids]

        worker = _WorkerProcess(self.settings, task_queue, work_dir / "worker.log")
        with worker:
            worker.wait_polling()
            self.result["worker_rss_start_mb"] = worker.rss_mb()

            _say(f"waiting: starting {len(first)} workflows")
            started = await run_concurrently(
                first, lambda cid: client.start_workflow(domain, cid), k
            )
            await self._settled(task_queue, workflow_id(domain, first[-1]))
            low_probe = await self._probe(client, domain, first, probes)

            _say(f"waiting: starting {len(rest)} more workflows (to {m + probes} waiting)")
            more = await run_concurrently(rest, lambda cid: client.start_workflow(domain, cid), k)
            if rest:
                await self._settled(task_queue, workflow_id(domain, rest[-1]))
            _say(f"waiting: worker idle for {self.config.idle_seconds:.0f}s")
            rss, cpu = await worker.idle(self.config.idle_seconds)
            server_rss = _rss_mb(self.temporal_pid) if self.temporal_pid else None
            decided_low = set(low_probe.decided)
            undecided = [cid for cid in ids if cid not in decided_low]
            high_probe = await self._probe(client, domain, undecided, probes)

        decided = probes * 2
        counts = await self._decided_counts(domain, effects=True)
        counts["calls_returned"] = low_probe.rate.done + high_probe.rate.done
        self.checks["waiting_decide"] = Check(decided, counts)
        running = await _until(
            lambda: self._workflows(f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"),
            m,
        )
        self.checks["waiting_running"] = Check(m, {"running_workflows": running})
        decided_all = decided_low | set(high_probe.decided)
        self.leftover_workflows = [
            workflow_id(domain, cid) for cid in ids if cid not in decided_all
        ]
        for name, rate in (
            ("waiting_start", started),
            ("waiting_start_more", more),
            ("probe_low", low_probe.rate),
            ("probe_high", high_probe.rate),
        ):
            self._record(name, rate)
        low_p50, high_p50 = low_probe.rate.pct(50), high_probe.rate.pct(50)
        self.result.update(
            worker_rss_mb=rss,
            worker_idle_cpu_pct=cpu,
            temporal_server_rss_mb=server_rss,
            waiting_start_per_s=(started.done + more.done)
            / max(started.seconds + more.seconds, 1e-9),
            low_waiting=low,
            single_decision_p50_ms_low=low_p50,
            single_decision_p50_ms_high=high_p50,
            single_decision_growth=high_p50 / low_p50 if low_p50 else None,
        )

    async def _settled(self, task_queue: str, wid: str, within: float = 300.0) -> None:
        """Wait until the worker has caught up with the workflows just started.

        Starts are accepted faster than a worker runs their first tasks; deciding while it
        catches up would charge that backlog to the decisions. The queue is served about in
        order: the last workflow started having run its first task, and no task waiting,
        means the worker has seen them all.
        """
        handle = self.temporal.get_workflow_handle(wid)
        deadline = time.monotonic() + within
        while (await handle.describe()).history_length < 4 or await self._backlog(task_queue):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not catch up on {task_queue} in {within:.0f}s")
            await asyncio.sleep(0.2)

    async def _backlog(self, task_queue: str) -> int:
        try:
            described = await self.temporal.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self.temporal.namespace,
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    report_stats=True,
                )
            )
        except RPCError:
            return 0  # a server without task queue statistics: the first check has to do
        return int(described.stats.approximate_backlog_count)

    async def _probe(
        self,
        client: TroubleshootingClient,
        domain: str,
        candidates: Sequence[uuid.UUID],
        probes: int,
    ) -> _Probe:
        """Decide `probes` random waiting commands one at a time: latency without contention."""
        chosen = random.sample(list(candidates), min(probes, len(candidates)))
        rate = await run_concurrently(
            chosen, lambda cid: client.operator_cancel(domain, cid, REASON, operator=OPERATOR), 1
        )
        return _Probe(rate, chosen)

    # -- bookkeeping --------------------------------------------------------------------------

    def _record(self, phase: str, rate: Rate) -> None:
        self.result.setdefault("phases", {})[phase] = {
            "done": rate.done,
            "seconds": round(rate.seconds, 3),
            "per_s": round(rate.per_s, 2),
            "p50_ms": round(rate.pct(50), 2),
            "p99_ms": round(rate.pct(99), 2),
            "errors": rate.errors,
        }
        if rate.first_error:
            self.errors[phase] = rate.first_error

    async def cleanup(self) -> None:
        """On configured services: stop waiting workflows, drop the bench's commands and queues.

        Its audit rows stay, in domains named `bench_<run>_*`: the audit table is append-only.
        """
        if self.leftover_workflows:
            _say(f"cleanup: terminating {len(self.leftover_workflows)} waiting workflows")

            async def terminate(wid: str) -> None:
                try:
                    await self.temporal.get_workflow_handle(wid).terminate(reason="bench done")
                except RPCError as err:
                    if err.status != RPCStatusCode.NOT_FOUND:
                        raise

            await run_concurrently(self.leftover_workflows, terminate, self.config.concurrency)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM tsq.effect WHERE domain = ANY($1)", self.domains)
            await conn.execute(
                "DELETE FROM commandbus.command WHERE domain = ANY($1)", self.domains
            )
            for domain in self.domains:
                for queue in (f"{domain}__commands", f"{domain}__replies"):
                    if await conn.fetchval("SELECT 1 FROM pgmq.meta WHERE queue_name = $1", queue):
                        await conn.execute("SELECT pgmq.drop_queue($1)", queue)


@dataclass
class _Probe:
    rate: Rate
    decided: list[uuid.UUID]


def _rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None


class _WorkerProcess:
    """`tsq worker` in its own process, so its memory and CPU are its own."""

    def __init__(self, settings: Settings, task_queue: str, log_file: Path) -> None:
        self.settings = settings
        self.task_queue = task_queue
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _WorkerProcess:
        script = Path(sys.executable).parent / "tsq"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "tsq.cli"]
        env = {
            **os.environ,
            "TSQ_DATABASE_URL": self.settings.require_database_url(),
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "TEMPORAL_NAMESPACE": self.settings.temporal_namespace,
            "TSQ_TASK_QUEUE": self.task_queue,
        }
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                [*command, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(self, *exc: object) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_polling(self, within: float = 60.0) -> None:
        """Block until the worker logs that it polls its task queue."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while b"polling task queue" not in self.log_file.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"`tsq worker` exited with code {self.process.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"`tsq worker` did not start within {within:.0f}s")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / 2**20

    async def idle(self, seconds: float) -> tuple[float, float]:
        """RSS (MB) at the end of a quiet window and CPU over it (percent of one core)."""
        proc = psutil.Process(self.pid)
        before = proc.cpu_times()
        began = time.monotonic()
        await asyncio.sleep(seconds)
        after = proc.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        return proc.memory_info().rss / 2**20, 100 * used / (time.monotonic() - began)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summarise(bench: _Bench, config: BenchConfig, stack: str) -> dict[str, Any]:
    r = bench.result
    decisions, bare_decisions = r["decisions_per_s"], r["bare_decisions_per_s"]
    ratios = {
        "start_vs_bare": _ratio(r["start_per_s"], r["bare_start_per_s"]),
        # What the search attributes, summary and details cost the server by themselves.
        "bare_marked_start_vs_bare": _ratio(r["bare_marked_start_per_s"], r["bare_start_per_s"]),
        "start_vs_bare_marked": _ratio(r["start_per_s"], r["bare_marked_start_per_s"]),
        "decisions_vs_bare": _ratio(decisions, bare_decisions),
        "decision_p50_over_bare_ms": r["decision_p50_ms"] - r["bare_p50_ms"],
        "single_p50_over_bare_ms": r["single_p50_ms"] - r["bare_single_p50_ms"],
        "decisions_vs_direct_sql": _ratio(decisions, r["direct_sql_per_s"]),
        "bare_decisions_vs_direct_sql": _ratio(bare_decisions, r["direct_sql_per_s"]),
    }
    targets = {
        "decisions_ge_0.8_bare": (ratios["decisions_vs_bare"] or 0) >= 0.8,
        "starts_ge_0.9_bare": (ratios["start_vs_bare"] or 0) >= 0.9,
        "p50_le_bare_plus_15ms": ratios["decision_p50_over_bare_ms"] <= 15,
        "p99_le_150ms": r["decision_p99_ms"] <= 150,
        # Under load, latency is mostly queueing (concurrency / throughput): also judge it
        # where it measures the work, one decision at a time.
        "single_p50_le_bare_plus_15ms": ratios["single_p50_over_bare_ms"] <= 15,
        "single_p99_le_150ms": r["single_p99_ms"] <= 150,
    }
    if config.waiting:
        targets["rss_le_250mb"] = (r.get("worker_rss_mb") or math.inf) <= 250
        growth = r.get("single_decision_growth")
        targets["single_decision_growth_le_1.5"] = growth is not None and growth <= 1.5
    summary: dict[str, Any] = _rounded(
        {
            "config": {
                "commands": config.commands,
                "concurrency": config.concurrency,
                "waiting": config.waiting,
                "probes": config.probes,
            },
            "stack": stack,
            **{key: value for key, value in r.items() if key != "phases"},
            "worker_rss_mb": r.get("worker_rss_mb"),
            "ratios": ratios,
            "targets": targets,
            "exactly_once": all(check.ok for check in bench.checks.values()) and not bench.errors,
            "checks": {name: check.as_dict() for name, check in bench.checks.items()},
            "errors": bench.errors,
            "phases": r.get("phases", {}),
            "machine": {
                "cores": os.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "python": platform.python_version(),
                "temporalio": temporalio.__version__,
            },
        }
    )
    return summary


async def run_bench(
    config: BenchConfig,
    settings: Settings,
    *,
    cleanup: bool = True,
    temporal_pid: int | None = None,
    stack: str = "configured services",
) -> dict[str, Any]:
    """Run every phase against the services in `settings`; return the figures as a dict.

    `cleanup` terminates the workflows left waiting and deletes the benchmark's rows, for
    services that outlive the run.
    """
    database_url = settings.require_database_url()
    await migrate(database_url)
    temporal = await connect(settings)
    await register_search_attributes(temporal)
    pool = await create_pool(database_url, max_size=20)
    bench = _Bench(config, settings, temporal, pool, temporal_pid)
    try:
        with tempfile.TemporaryDirectory(prefix="tsq-bench-") as work_dir:
            await bench.workflow_phases()
            await bench.direct_sql_phase()
            if config.waiting:
                await bench.waiting_phase(Path(work_dir))
        return _summarise(bench, config, stack)
    finally:
        try:
            if cleanup:
                await bench.cleanup()
        finally:
            await pool.close()


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The figures for a person: one row per measurement, then ratios, targets and checks."""
    c, m, ph = result["config"], result["machine"], result["phases"]
    lines = [
        f"tsq bench: {c['commands']} commands at concurrency {c['concurrency']} "
        f"(+{c['probes']} one at a time), "
        f"waiting {c['waiting']}; {result['stack']}; "
        f"{m['cores']} cores, {m['memory_gb']} GB",
        "",
        f"{'measurement':<44}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    rows = [
        ("tsq: move into TSQ + start workflow", "tsq_start"),
        ("bare workflow: start (ceiling)", "bare_start"),
        ("bare workflow + tsq's search attributes: start", "bare_marked_start"),
        ("tsq: operator_cancel, reply committed", "tsq_decide"),
        ("bare workflow: update-with-start (ceiling)", "bare_decide"),
        ("tsq: operator_cancel, one at a time", "tsq_single"),
        ("bare workflow: one at a time (ceiling)", "bare_single"),
        ("direct SQL cancel, 1 transaction (ceiling)", "direct_sql"),
        ("waiting: start workflows", "waiting_start"),
        ("waiting: start more workflows", "waiting_start_more"),
        (f"single decision at {result.get('low_waiting', 0)} waiting", "probe_low"),
        (f"single decision at {c['waiting']} waiting", "probe_high"),
    ]
    for label, key in rows:
        if key in ph:
            p = ph[key]
            lines.append(
                f"{label:<44}{_num(p['per_s']):>10}{_num(p['p50_ms']):>10}{_num(p['p99_ms']):>10}"
            )
    r = result["ratios"]
    lines += [
        "",
        "tsq latency is the operator_cancel call: it returns after the transaction that wrote "
        "the reply committed.",
        f"decisions/s vs bare: {_num(r['decisions_vs_bare'], 2)}   "
        f"starts/s vs bare: {_num(r['start_vs_bare'], 2)} "
        f"(bare with tsq's search attributes vs bare: {_num(r['bare_marked_start_vs_bare'], 2)})   "
        f"p50 over bare: {_num(r['decision_p50_over_bare_ms'])} ms "
        f"(one at a time: {_num(r['single_p50_over_bare_ms'])} ms)   "
        f"decisions/s vs direct SQL: {_num(r['decisions_vs_direct_sql'], 3)}",
    ]
    if c["waiting"]:
        lines.append(
            f"worker at {c['waiting']} waiting: RSS {_num(result.get('worker_rss_mb'))} MB "
            f"(at start {_num(result.get('worker_rss_start_mb'))} MB), idle CPU "
            f"{_num(result.get('worker_idle_cpu_pct'), 2)}% of a core; Temporal server RSS "
            f"{_num(result.get('temporal_server_rss_mb'))} MB; single-decision p50 growth "
            f"x{_num(result.get('single_decision_growth'), 2)}"
        )
    targets = "  ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["targets"].items())
    checks = "  ".join(
        f"{k} {'ok' if v['ok'] else 'MISMATCH'}" for k, v in result["checks"].items()
    )
    lines += [f"targets: {targets}", f"exactly-once: {checks}"]
    for phase, error in result["errors"].items():
        lines.append(f"errors in {phase}: {error}")
    return "\n".join(lines)


async def main(args: argparse.Namespace, settings: Settings) -> None:
    """`tsq bench`: embedded services unless TSQ_DATABASE_URL / TEMPORAL_ADDRESS are set."""
    config = BenchConfig(commands=args.commands, concurrency=args.concurrency, waiting=args.waiting)
    if config.commands < 1 or config.concurrency < 1 or config.waiting < 0:
        from tsq.errors import InvalidInputError

        raise InvalidInputError("--commands and --concurrency must be >= 1, --waiting >= 0")
    embedded_db = settings.database_url is None
    embedded_temporal = not os.environ.get("TEMPORAL_ADDRESS")
    temporal_pid = None
    with (
        tempfile.TemporaryDirectory(prefix="tsq-bench-") as tmp,
        contextlib.ExitStack() as services,
    ):
        parts = []
        if embedded_db:
            _say("starting embedded PostgreSQL")
            url = services.enter_context(embedded_postgres(Path(tmp) / "pgdata"))
            settings = replace(settings, database_url=url)
            parts.append("embedded PostgreSQL")
        else:
            parts.append("configured PostgreSQL")
        if embedded_temporal:
            _say("starting the Temporal dev server (database file)")
            server = start_temporal(
                ui=False, db_file=Path(tmp) / "temporal.db", log_file=Path(tmp) / "temporal.log"
            )
            services.callback(server.stop)
            settings = replace(settings, temporal_address=server.address)
            temporal_pid = server.process.pid
            parts.append("Temporal dev server with a database file")
        else:
            parts.append(f"Temporal at {settings.temporal_address}")
        result = await run_bench(
            config,
            settings,
            cleanup=not (embedded_db and embedded_temporal),
            temporal_pid=temporal_pid,
            stack=" + ".join(parts),
        )
    print(format_table(result))
    if args.json:
        print(json.dumps(result, default=str))
