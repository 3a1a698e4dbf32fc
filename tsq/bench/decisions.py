"""Phases: tsq against a bare workflow, and the same cancels done directly in SQL.

tsq parks commands (`move_to_troubleshooting`) and cancels them through the SDK; the bare
workflow waits for one update and completes (no activities: the most any design can get from
this server), started once more with tsq's search attributes, summary and details to show what
those cost; the direct way is one SQL transaction per cancel, as a bus's own tool does it.
The two workflow sides take turns in rounds, so a burst of load from elsewhere on the machine
hits both.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from temporalio.client import WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from tsq import store
from tsq.bench.bare import BareWorkflow
from tsq.bench.context import OPERATOR, REASON, Bench
from tsq.bench.measure import Check, Rate, chunks, run_concurrently, say, until
from tsq.client import TroubleshootingClient, start_metadata
from tsq.contract import workflow_id
from tsq.db import create_pool
from tsq.models import CommandSnapshot
from tsq.worker import POLLERS, new_worker

# tsq and the bare workflow take turns this many times in each step.
ROUNDS = 5
# Direct-SQL connections beyond this would crowd a default PostgreSQL (max_connections 100)
# that also serves the worker and the client.
MAX_SQL_POOL = 50
VISIBILITY_S = 60.0


@dataclass
class _Sides:
    """The calls each side makes."""

    bench: Bench
    domain: str
    client: TroubleshootingClient
    bare_queue: str

    async def tsq_start(self, cid: uuid.UUID) -> None:
        await self.client.move_to_troubleshooting(
            self.domain,
            cid,
            error_type="PERMANENT",
            error_code="BENCH",
            error_message="parked by tsq bench",
        )

    async def tsq_decide(self, cid: uuid.UUID) -> None:
        await self.client.operator_cancel(self.domain, cid, REASON, operator=OPERATOR)

    def bare_starter(self, **options: Any) -> Callable[[str], Awaitable[None]]:
        async def start(wid: str) -> None:
            await self.bench.temporal.start_workflow(
                BareWorkflow.run,
                wid,
                id=wid,
                task_queue=self.bare_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                **options,
            )

        return start

    async def bare_decide(self, wid: str) -> None:
        # The call tsq's SDK makes: update-with-start, waiting for the update's result.
        operation = WithStartWorkflowOperation(
            BareWorkflow.run,
            wid,
            id=wid,
            task_queue=self.bare_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        answer = await self.bench.temporal.execute_update_with_start_workflow(
            BareWorkflow.decide, REASON, start_workflow_operation=operation
        )
        if answer != REASON:
            raise RuntimeError(f"workflow {wid} answered {answer!r}")

    async def bare_finish(self, wid: str) -> None:
        await self.bench.temporal.get_workflow_handle(wid).terminate(reason="start rate measured")


def _marks(domain: str) -> dict[str, Any]:
    """What tsq starts its workflows with besides the id: search attributes, summary, details."""
    return start_metadata(
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
            parking_id=1,
        )
    )


async def compare_with_bare(bench: Bench) -> None:
    n, k, probes = bench.config.commands, bench.config.concurrency, bench.config.probes
    total = n + probes
    domain, tsq_queue, bare_queue = (
        bench.domain("tsq"),
        bench.task_queue("tsq"),
        bench.task_queue("bare"),
    )
    tsq_ids = await store.send_commands(bench.pool, domain, total, parked=False)
    bare_ids = [f"tsq-bench-bare:{bench.run_id}:{i}" for i in range(total)]
    marked_ids = [f"tsq-bench-bare-marked:{bench.run_id}:{i}" for i in range(total)]
    sides = _Sides(
        bench,
        domain,
        TroubleshootingClient(bench.temporal, bench.pool, task_queue=tsq_queue),
        bare_queue,
    )
    bare_start, marked_start = sides.bare_starter(), sides.bare_starter(**_marks(domain))
    # The bare workflow's module is passed through the sandbox, as tsq's worker passes tsq's.
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("tsq")
    )
    worker_pool = await create_pool(bench.settings.require_database_url())
    try:
        async with (
            new_worker(bench.temporal, worker_pool, tsq_queue),
            Worker(
                bench.temporal,
                task_queue=bare_queue,
                workflows=[BareWorkflow],
                workflow_runner=runner,
                workflow_task_poller_behavior=POLLERS,
            ),
        ):
            rounds = min(ROUNDS, n)
            starts = {"tsq": Rate.empty(), "bare": Rate.empty(), "marked": Rate.empty()}
            say(
                f"starting {total} tsq and {total} bare workflows, and {total} bare ones "
                f"with tsq's search attributes, summary and details, {k} at a time"
            )
            for tsq_part, bare_part, marked_part in zip(
                chunks(tsq_ids, rounds),
                chunks(bare_ids, rounds),
                chunks(marked_ids, rounds),
                strict=True,
            ):
                starts["tsq"] += await run_concurrently(tsq_part, sides.tsq_start, k)
                await bench.settled(tsq_queue, workflow_id(domain, tsq_part[-1]))
                starts["bare"] += await run_concurrently(bare_part, bare_start, k)
                await bench.settled(bare_queue, bare_part[-1])
                starts["marked"] += await run_concurrently(marked_part, marked_start, k)
                await bench.settled(bare_queue, marked_part[-1])
            await _check_parked(bench, domain, total)
            # Not measured: the marked ones are only there for their start rate.
            await run_concurrently(marked_ids, sides.bare_finish, k)

            tsq_bulk, bare_bulk = Rate.empty(), Rate.empty()
            say(f"deciding {n} of each, {k} at a time")
            for i, (tsq_part, bare_part) in enumerate(
                zip(chunks(tsq_ids[:n], rounds), chunks(bare_ids[:n], rounds), strict=True)
            ):
                if i % 2:
                    bare_bulk += await run_concurrently(bare_part, sides.bare_decide, k)
                tsq_bulk += await run_concurrently(tsq_part, sides.tsq_decide, k)
                if not i % 2:
                    bare_bulk += await run_concurrently(bare_part, sides.bare_decide, k)

            tsq_single, bare_single = Rate.empty(), Rate.empty()
            say(f"deciding {probes} of each one at a time")
            for tsq_id, bare_id in zip(tsq_ids[n:], bare_ids[n:], strict=True):
                tsq_single += await run_concurrently([tsq_id], sides.tsq_decide, 1)
                bare_single += await run_concurrently([bare_id], sides.bare_decide, 1)
    finally:
        await worker_pool.close()

    counts = await bench.decided_counts(domain, effects=True)
    counts["completed_workflows"] = await until(
        lambda: bench.workflows(f"CommandDomain = '{domain}' AND ExecutionStatus = 'Completed'"),
        total,
        within=VISIBILITY_S,
    )
    counts["calls_returned"] = tsq_bulk.done + tsq_single.done
    bench.checks["tsq_decide"] = Check(total, counts)
    bare_completed = await until(
        lambda: bench.workflows(f"TaskQueue = '{bare_queue}' AND ExecutionStatus = 'Completed'"),
        total,
        within=VISIBILITY_S,
    )
    bench.checks["bare"] = Check(
        total,
        {
            "started": starts["bare"].done,
            "decisions": bare_bulk.done + bare_single.done,
            "completed_workflows": bare_completed,
        },
    )
    for name, rate in (
        ("tsq_start", starts["tsq"]),
        ("bare_start", starts["bare"]),
        ("bare_marked_start", starts["marked"]),
        ("tsq_decide", tsq_bulk),
        ("bare_decide", bare_bulk),
        ("tsq_single", tsq_single),
        ("bare_single", bare_single),
    ):
        bench.record(name, rate)
    bench.result.update(
        start_per_s=starts["tsq"].per_s,
        start_p50_ms=starts["tsq"].pct(50),
        start_p99_ms=starts["tsq"].pct(99),
        decisions_per_s=tsq_bulk.per_s,
        decision_p50_ms=tsq_bulk.pct(50),
        decision_p99_ms=tsq_bulk.pct(99),
        single_p50_ms=tsq_single.pct(50),
        single_p99_ms=tsq_single.pct(99),
        bare_start_per_s=starts["bare"].per_s,
        bare_marked_start_per_s=starts["marked"].per_s,
        bare_decisions_per_s=bare_bulk.per_s,
        bare_p50_ms=bare_bulk.pct(50),
        bare_p99_ms=bare_bulk.pct(99),
        bare_single_p50_ms=bare_single.pct(50),
        bare_single_p99_ms=bare_single.pct(99),
    )


async def _check_parked(bench: Bench, domain: str, total: int) -> None:
    row = await store.parked_counts(bench.pool, domain)
    running = await until(
        lambda: bench.workflows(f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"),
        total,
        within=VISIBILITY_S,
    )
    bench.checks["tsq_start"] = Check(
        total,
        {
            "moved_audits": row["moved_audits"],
            "parked": row["parked"],
            "running_workflows": running,
        },
    )


async def direct_sql(bench: Bench) -> None:
    n, k = bench.config.commands, bench.config.concurrency
    domain = bench.domain("sql")
    ids = await store.send_commands(bench.pool, domain, n, parked=True)
    size = min(k, MAX_SQL_POOL)
    sql_pool = await create_pool(
        bench.settings.require_database_url(), min_size=size, max_size=size
    )

    async def cancel(cid: uuid.UUID) -> None:
        async with sql_pool.acquire() as conn:
            await store.cancel_directly(conn, domain, cid, REASON)

    try:
        say(f"direct SQL: canceling {n} commands, {size} connections")
        decisions = await run_concurrently(ids, cancel, k)
    finally:
        await sql_pool.close()
    bench.record("direct_sql", decisions)
    counts = await bench.decided_counts(domain, effects=False)
    counts["transactions"] = decisions.done
    bench.checks["direct_sql"] = Check(n, counts)
    bench.result.update(
        direct_sql_per_s=decisions.per_s,
        direct_sql_p50_ms=decisions.pct(50),
        direct_sql_p99_ms=decisions.pct(99),
    )
