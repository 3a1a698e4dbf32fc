"""The benchmark's ceiling: a workflow that waits for one decision and completes, nothing else.

No activities, no search attributes, no details: whatever tsq's workflow costs beyond this is
tsq's own. Kept apart from `tsq.bench`, which a workflow must not import; the benchmark's worker
passes the `tsq` package through the sandbox (see `tsq.bench`).
"""

from __future__ import annotations

from temporalio import workflow

BARE_WORKFLOW_TYPE = "TsqBenchBareWorkflow"


@workflow.defn(name=BARE_WORKFLOW_TYPE)
class BareWorkflow:
    """Waits for `decide` (update) or `cancel` (signal), then completes with the reason."""

    def __init__(self) -> None:
        self._reason: str | None = None

    @workflow.run
    async def run(self, name: str) -> str:
        await workflow.wait_condition(lambda: self._reason is not None)
        assert self._reason is not None
        return self._reason

    @workflow.signal(name="cancel")
    def cancel(self, reason: str) -> None:
        self._reason = reason

    @workflow.update(name="decide")
    def decide(self, reason: str) -> str:
        self._reason = reason
        return reason


__all__ = ["BARE_WORKFLOW_TYPE", "BareWorkflow"]
