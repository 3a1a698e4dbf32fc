"""`TsqBulkOperation`: one decision for many commands, carried out in chunks.

The selection and the request are in PostgreSQL (`tsq.bulk`, `tsq.bulk_item`), so the input
and the history stay small whatever the number of commands. One activity decides the items
chunk after chunk, each chunk one transaction, and heartbeats its progress: the effects go at
the database's pace, not at the pace of the workflow tasks of the commands' own workflows,
which share the task queue and are told, by the watcher, as each chunk commits. Meanwhile the
workflow's details show the counts, read every few seconds.

`stop` (a signal, or `tsq bulk stop`): no chunk starts after it; what was committed stays.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from tsq.contract import BULK_WORKFLOW_TYPE, Activity, bulk_tally
    from tsq.models import BulkFinish, BulkOperation, BulkProgress, BulkRun, BulkStart

# A worker that dies mid-run is noticed this soon; the run goes on elsewhere.
HEARTBEAT_TIMEOUT = timedelta(seconds=20)
# Long enough for 100,000 commands at a rate of one a second.
RUN_TIMEOUT = timedelta(days=30)
SHORT_TIMEOUT = timedelta(seconds=30)
# The details are refreshed this often while the run goes on.
PROGRESS_EVERY = timedelta(seconds=5)
RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=["InvalidInputError"],
)


@workflow.defn(name=BULK_WORKFLOW_TYPE)
class BulkOperationWorkflow:
    def __init__(self) -> None:
        self._stop = False
        self._stopped_by: str | None = None
        self._progress: BulkProgress | None = None

    @workflow.run
    async def run(self, start: BulkStart) -> BulkOperation:
        self._render(start)
        running = asyncio.ensure_future(
            workflow.execute_activity(
                Activity.BULK_RUN,
                BulkRun(bulk_id=start.bulk_id, rate=start.rate),
                start_to_close_timeout=RUN_TIMEOUT,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=RETRY,
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                result_type=BulkProgress,
            )
        )
        while not running.done():
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: running.done() or self._stop, timeout=PROGRESS_EVERY
                )
            if running.done():
                break
            if self._stop:
                running.cancel()
                break
            self._progress = await workflow.execute_local_activity(
                Activity.BULK_PROGRESS,
                start.bulk_id,
                start_to_close_timeout=SHORT_TIMEOUT,
                retry_policy=RETRY,
                result_type=BulkProgress,
            )
            self._render(start)
        with contextlib.suppress(ActivityError, asyncio.CancelledError):
            self._progress = await running
        left = self._progress.remaining if self._progress else start.total
        result: BulkOperation = await workflow.execute_activity(
            Activity.BULK_FINISH,
            BulkFinish(bulk_id=start.bulk_id, stopped_by=self._stopped_by if left else None),
            start_to_close_timeout=SHORT_TIMEOUT,
            retry_policy=RETRY,
            result_type=BulkOperation,
        )
        self._progress = BulkProgress(
            done=0, remaining=result.remaining, stopped=result.status == "stopped",
            counts=result.counts,
        )  # fmt: skip
        self._render(start, result.status)
        return result

    @workflow.signal(name="stop")
    def stop(self, *args: Any) -> None:
        """Stop after the chunk that runs: `{"operator": "..."}` says who stopped it."""
        operator = args[0].get("operator") if args and isinstance(args[0], dict) else None
        self._stop = True
        self._stopped_by = self._stopped_by or (
            operator if isinstance(operator, str) and operator.strip() else "a stop signal"
        )

    @workflow.query(name="progress")
    def progress(self) -> BulkProgress | None:
        return self._progress

    def _render(self, start: BulkStart, status: str = "running") -> None:
        counts = self._progress.counts if self._progress else {}
        done, skipped, failed = bulk_tally(counts)
        remaining = start.total - sum(counts.values())
        lines = [
            f"## Bulk {start.decision.value} in {start.domain}: {status}",
            f"- **{done}** carried out, {skipped} skipped, {failed} failed, "
            f"{remaining} remaining of {start.total}",
        ]
        lines += [f"  - {result}: {n}" for result, n in sorted(counts.items())]
        if self._stop and status == "running":
            lines.append(f"- stopping (by {self._stopped_by})")
        lines.append(f"- `tsq bulk status {start.bulk_id}` lists every command")
        workflow.set_current_details("\n".join(lines))
