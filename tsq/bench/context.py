"""What the phases of a benchmark run share: its configuration, services, names and results."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from tsq import store
from tsq.bench.measure import Check, Rate
from tsq.settings import Settings

REASON = "benchmark"
OPERATOR = "tsq-bench"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: `waiting=0` skips the waiting-at-scale phase, `discovery=0` the
    discovery and drift phase, `bulk=0` the bulk decision."""

    commands: int = 500
    concurrency: int = 50
    waiting: int = 0
    discovery: int = 500
    bulk: int = 0
    probes: int = 30
    idle_seconds: float = 10.0


@dataclass
class Bench:
    config: BenchConfig
    settings: Settings
    temporal: Client
    pool: asyncpg.Pool
    work_dir: Path
    temporal_pid: int | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    result: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def domain(self, what: str) -> str:
        return f"bench_{self.run_id}_{what}"

    def task_queue(self, what: str) -> str:
        return f"tsq-bench-{self.run_id}-{what}"

    def record(self, phase: str, rate: Rate) -> None:
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

    async def workflows(self, query: str) -> int:
        return (await self.temporal.count_workflows(query)).count

    async def decided_counts(self, domain: str, *, effects: bool) -> dict[str, int]:
        row = await store.decided_counts(self.pool, domain)
        counts = {
            key: row[key]
            for key in ("replies", "replied_commands", "audits", "audited_commands", "canceled")
        }
        if effects:
            counts["decisions"] = row["decisions"]
        return counts

    async def settled(self, task_queue: str, wid: str, within: float = 300.0) -> None:
        """Wait until the worker has caught up with the workflows just started.

        Starts are accepted faster than a worker runs their first tasks; deciding while it
        catches up would charge that backlog to the decisions. The queue is served about in
        order: the last workflow started having run its first task, and no task waiting,
        means the worker has seen them all.
        """
        handle = self.temporal.get_workflow_handle(wid)
        deadline = time.monotonic() + within
        while (await handle.describe()).history_length < 4 or await self.backlog(task_queue):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not catch up on {task_queue} in {within:.0f}s")
            await asyncio.sleep(0.2)

    async def backlog(self, task_queue: str) -> int:
        """Workflow tasks waiting on `task_queue` (0 where the server does not say)."""
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
