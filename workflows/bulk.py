"""`TsqBulkOperation`: one decision for many commands, carried out in chunks.

The selection and the request are in PostgreSQL (`tsq.bulk`, `tsq.bulk_item`), so the input
and the history stay small whatever the number of commands: a chunk is one activity, a
hundred commands or more in one transaction. Each command's own workflow is told by the
watcher once its chunk has committed, and ends with the outcome recorded for it.

`stop` (a signal, or `tsq bulk stop`): no chunk starts after it; what was committed stays.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from tsq.contract import (
        BULK_CARRIED_OUT,
        BULK_FAILED,
        BULK_SKIPPED,
        BULK_WORKFLOW_TYPE,
        Activity,
    )
    from tsq.models import BulkChunk, BulkFinish, BulkOperation, BulkProgress, BulkStart

# Items per chunk: large enough that a commit per chunk costs little, small enough that a
# chunk holds its rows locked for a fraction of a second.
CHUNK = 200
# Every item left is held by another transaction (the bus, a decision of its own workflow):
# look again after this long.
HELD_BACK = timedelta(seconds=1)
CHUNK_TIMEOUT = timedelta(minutes=2)
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
        limit = CHUNK if start.rate is None else max(1, min(CHUNK, int(start.rate)))
        self._render(start)
        while not self._stop:
            progress: BulkProgress = await workflow.execute_activity(
                Activity.BULK_CHUNK,
                BulkChunk(bulk_id=start.bulk_id, limit=limit),
                start_to_close_timeout=CHUNK_TIMEOUT,
                retry_policy=RETRY,
                result_type=BulkProgress,
            )
            self._progress = progress
            self._render(start)
            if progress.stopped or progress.remaining == 0:
                break
            pause = (
                timedelta(seconds=progress.done / start.rate)
                if start.rate is not None
                else HELD_BACK
                if progress.done == 0
                else None
            )
            if pause:
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: self._stop, timeout=pause)
            if not self._stop and workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(start)
        left = self._progress.remaining if self._progress else start.total
        result: BulkOperation = await workflow.execute_activity(
            Activity.BULK_FINISH,
            BulkFinish(bulk_id=start.bulk_id, stopped_by=self._stopped_by if left else None),
            start_to_close_timeout=CHUNK_TIMEOUT,
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
        done = sum(counts.get(r, 0) for r in BULK_CARRIED_OUT)
        skipped = sum(counts.get(r, 0) for r in BULK_SKIPPED)
        failed = sum(counts.get(r, 0) for r in BULK_FAILED)
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
