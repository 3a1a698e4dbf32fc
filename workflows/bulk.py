"""`TsqBulkOperation`: one decision for many commands, carried out in chunks.

The selection and the request are in PostgreSQL (`tsq.bulk`, `tsq.bulk_item`), so the input
and the history stay small whatever the number of commands. One activity decides the items
chunk after chunk, each chunk one transaction, and heartbeats its progress: the effects go at
the database's pace, not at the pace of the workflow tasks of the commands' own workflows,
which share the task queue and are told, by the watcher, as each chunk commits. Meanwhile the
workflow's details show the counts, read every few seconds.

`stop` (a signal, or `tsq bulk stop`): no chunk starts after it; what was committed stays.

Under four eyes (a policy asks approval for the decision of a command selected), the operation
is a proposal first: it waits for another operator to `approve` it (or `reject` it) until its
approval time runs out, and then runs, each item decided as approved by them.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from tsq.contract import BULK_WORKFLOW_TYPE, Activity, bulk_tally, same_operator
    from tsq.errors import InvalidInputError, InvalidOperationError
    from tsq.models import (
        BulkApproval,
        BulkFinish,
        BulkOperation,
        BulkProgress,
        BulkRun,
        BulkStart,
        BulkVerdict,
        describe_validation_error,
    )

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
    @workflow.init
    def __init__(self, start: BulkStart) -> None:
        self._start = start
        self._stop = False
        self._stopped_by: str | None = None
        self._progress: BulkProgress | None = None
        # Under four eyes: approved, rejected or expired, once decided.
        self._verdict: str | None = None

    @workflow.run
    async def run(self, start: BulkStart) -> BulkOperation:
        self._render(start)
        if start.approval_expires_at is not None and not await self._approved(start):
            return await self._finish(start)
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
        return await self._finish(start)

    async def _approved(self, start: BulkStart) -> bool:
        """Until another operator approves or rejects the operation, it is stopped, or its
        approval time runs out; whether it was approved."""
        assert start.approval_expires_at is not None
        timeout = (start.approval_expires_at - workflow.now()).total_seconds()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._verdict is not None or self._stop, timeout=timeout
                )
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._verdict is None and not self._stop:
            self._verdict = "expired"
            await self._decide_proposal(BulkVerdict(bulk_id=start.bulk_id, verdict="expired"))
        return self._verdict == "approved"

    @workflow.update(
        name="approve",
        description="Approve the operation, proposed under four eyes: it runs. By an operator "
        'other than the one who started it. Input: {"operator": "colleague@example.com", '
        '"comment": "checked"}',
    )
    async def approve(self, raw: Any = None) -> BulkOperation:
        return await self._verdict_of("approved", raw)

    @approve.validator
    def _validate_approve(self, raw: Any = None) -> None:
        self._check_verdict("approved", raw)

    @workflow.update(
        name="reject",
        description="Reject the operation, proposed under four eyes: nothing of it is decided. "
        'By an operator other than the one who started it. Input: {"operator": '
        '"colleague@example.com", "reason": "not all of them"}',
    )
    async def reject(self, raw: Any = None) -> BulkOperation:
        return await self._verdict_of("rejected", raw)

    @reject.validator
    def _validate_reject(self, raw: Any = None) -> None:
        self._check_verdict("rejected", raw)

    def _check_verdict(self, verdict: str, raw: Any) -> BulkApproval:
        start = self._start
        try:
            request = BulkApproval.model_validate(raw)
        except ValidationError as err:
            raise _refused(InvalidInputError, describe_validation_error(err)) from None
        if start.approval_expires_at is None:
            raise _refused(
                InvalidOperationError, f"bulk operation {start.bulk_id} needs no approval"
            )
        if self._verdict is not None or self._stop:
            state = self._verdict or "stopped"
            raise _refused(
                InvalidOperationError,
                f"bulk operation {start.bulk_id} is {state} already: nothing to {verdict[:-1]}",
            )
        if same_operator(request.operator, start.operator):
            raise _refused(
                InvalidOperationError,
                f"four eyes: {start.operator} started this bulk operation, so another operator "
                f"must {verdict[:-1]} it",
            )
        if verdict == "rejected" and not request.reason:
            raise _refused(InvalidInputError, "a rejection says why: give a reason")
        return request

    async def _verdict_of(self, verdict: str, raw: Any) -> BulkOperation:
        request = self._check_verdict(verdict, raw)
        self._verdict = verdict  # before any await: a second approval finds it taken
        decided = await self._decide_proposal(
            BulkVerdict(
                bulk_id=self._start.bulk_id,
                verdict="approved" if verdict == "approved" else "rejected",
                operator=request.operator,
                text=request.comment if verdict == "approved" else request.reason,
            )
        )
        if decided is None:
            raise _refused(
                InvalidOperationError,
                f"bulk operation {self._start.bulk_id} was stopped meanwhile",
            )
        return decided

    async def _decide_proposal(self, verdict: BulkVerdict) -> BulkOperation | None:
        decided: BulkOperation | None = await workflow.execute_activity(
            Activity.BULK_VERDICT,
            verdict,
            start_to_close_timeout=SHORT_TIMEOUT,
            retry_policy=RETRY,
            result_type=BulkOperation,
        )
        self._render(self._start, decided.status if decided else "stopped")
        return decided

    async def _finish(self, start: BulkStart) -> BulkOperation:
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

    def _render(self, start: BulkStart, status: str | None = None) -> None:
        counts = self._progress.counts if self._progress else {}
        done, skipped, failed = bulk_tally(counts)
        remaining = start.total - sum(counts.values())
        proposed = start.approval_expires_at is not None and self._verdict is None
        status = status or ("proposed" if proposed else "running")
        lines = [
            f"## Bulk {start.decision.value} in {start.domain}: {status}",
            f"- **{done}** carried out, {skipped} skipped, {failed} failed, "
            f"{remaining} remaining of {start.total}",
        ]
        if proposed and start.approval_expires_at is not None:
            lines.append(
                f"- **Awaits approval** by an operator other than {start.operator}, until "
                f"{start.approval_expires_at:%Y-%m-%d %H:%M:%S %Z}: update `approve` "
                '`{"operator": "you@example.com"}` (or `reject`, with a `"reason"`), or '
                f"`tsq bulk approve {start.bulk_id}`"
            )
        lines += [f"  - {result}: {n}" for result, n in sorted(counts.items())]
        if self._stop and status == "running":
            lines.append(f"- stopping (by {self._stopped_by})")
        lines.append(f"- `tsq bulk status {start.bulk_id}` lists every command")
        workflow.set_current_details("\n".join(lines))


def _refused(error: type[Exception], message: str) -> ApplicationError:
    return ApplicationError(message, type=error.__name__, non_retryable=True)
