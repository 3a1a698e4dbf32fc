"""Activities: the only code that changes the database on behalf of a workflow.

A decision is one PostgreSQL transaction (`tsq.decide`) that also writes a row to `tsq.effect`
under a key fixed by the workflow (its id and the parking it decides). A retry, a second worker
picking the work up after a crash, a twin running at the same moment, or a reset run of the
workflow finds that row and returns the recorded outcome: the status change, the audit row and
the reply happen once per parking.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from tsq import store
from tsq.contract import Activity, operator_key
from tsq.errors import (
    ApprovalRequiredError,
    ClaimedError,
    InvalidInputError,
    InvalidOperationError,
    PayloadNotFoundError,
)
from tsq.models import (
    AuditRecords,
    BulkFinish,
    BulkOperation,
    BulkProgress,
    BulkRun,
    BulkVerdict,
    CarryOut,
    DecisionOutcome,
    Observe,
    Observed,
    RecordEvent,
    RecordRefusal,
    RecordRefusals,
    refusal_details,
)
from tsq.render import one_line

log = logging.getLogger(__name__)

# SQLSTATEs tsq.decide raises for refusals, and classes of errors that retrying cannot fix:
# data the database will not take (22) and limits it will not pass (54).
_REFUSALS: dict[str, type[Exception]] = {
    "TQ001": InvalidInputError,
    "TQ002": PayloadNotFoundError,
    "TQ003": ClaimedError,
    "TQ004": ApprovalRequiredError,
    "TQ005": InvalidOperationError,
}
_PERMANENT_CLASSES = ("22", "54")

# Items per chunk of a bulk operation: large enough that a commit per chunk costs little, small
# enough that a chunk holds its rows locked for a fraction of a second.
BULK_CHUNK = 200
BULK_HELD_BACK_S = 1.0


def permanent(err: asyncpg.PostgresError) -> ApplicationError | None:
    """The non-retryable error for a database error retrying cannot fix; None for the others
    (connection lost, lock timeout, serialization failure, server shutting down, ...)."""
    state = err.sqlstate or ""
    kind = _REFUSALS.get(state)
    if kind is None and state[:2] in _PERMANENT_CLASSES:
        kind = InvalidInputError
    if kind is None:
        return None
    # Expected: an operator asked for something the rules refuse. Benign, so the SDK logs it
    # at debug level and counts no failure; the decision's refusal is logged in one line.
    return ApplicationError(
        str(err),
        type=kind.__name__,
        non_retryable=True,
        category=ApplicationErrorCategory.BENIGN,
    )


class TroubleshootingActivities:
    """Built once per worker around its asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn(name=Activity.CARRY_OUT)
    async def carry_out(self, req: CarryOut) -> DecisionOutcome:
        """Carry out an operator's decision: status, audit row and reply in one transaction."""
        try:
            result = await store.decide(self._pool, store.decision_input(req))
        except asyncpg.PostgresError as err:
            refusal = permanent(err)
            if refusal is None:
                raise
            log.info(
                "%s of command %s refused: %s", req.decision.value, req.command_id, one_line(err)
            )
            raise refusal from None
        return DecisionOutcome.model_validate(result)

    @activity.defn(name=Activity.RECORD_REFUSALS)
    async def record_refusals(self, req: RecordRefusals) -> None:
        """Write refused signals to the audit trail, each once, in one statement."""
        rows = [
            (
                f"{req.workflow_id}/parking/{req.parking_id}/refused/{req.first + i}",
                refusal_details(refusal, req.workflow_id),
            )
            for i, refusal in enumerate(req.refusals)
        ]
        await self._record(req.domain, req.command_id, rows)

    @activity.defn(name=Activity.RECORD_REFUSAL)
    async def record_refusal(self, req: RecordRefusal) -> None:
        """Write one refused signal to the audit trail, once (workflows of tsq 0.1)."""
        details = refusal_details(req.refusal, req.workflow_id)
        await self._record(req.domain, req.command_id, [(req.effect_key, details)])

    async def _record(
        self, domain: str, command_id: Any, rows: list[tuple[str, dict[str, Any]]]
    ) -> None:
        try:
            await store.record_refusals(self._pool, domain, command_id, rows)
        except asyncpg.PostgresError as err:
            if permanent(err) is None:
                raise
            # The refusal stays in the workflow's state and details; a refusal that cannot be
            # recorded must not keep the workflow busy, nor fail it.
            log.warning("refusals of command %s not recorded: %s", command_id, err)

    @activity.defn(name=Activity.RECORD)
    async def record(self, req: AuditRecords) -> None:
        """A batch of the workflow's audit records (its own events, refused requests), each
        once, in one transaction. A batch the database refuses for good is written record by
        record, so that one it cannot store holds up none of the others."""
        try:
            await store.record(self._pool, req)
            return
        except asyncpg.PostgresError as err:
            if permanent(err) is None or len(req.records) == 1:
                raise
            log.warning("records of command %s refused as a batch: %s", req.command_id, err)
        for one in req.records:
            try:
                await store.record(self._pool, req.model_copy(update={"records": [one]}))
            except asyncpg.PostgresError as err:
                if permanent(err) is None:
                    raise
                # Kept in the workflow's state and details; a record the database cannot take
                # must not keep the workflow busy, nor fail it.
                log.warning("record %s not written: %s", one.effect_key, one_line(err))

    @activity.defn(name=Activity.RECORD_EVENT)
    async def record_event(self, req: RecordEvent) -> None:
        """One of the workflow's own events, once (workflows of 0.2 before the rules)."""
        try:
            await store.record_event(self._pool, req)
        except asyncpg.PostgresError as err:
            refusal = permanent(err)
            if refusal is None:
                raise
            raise refusal from None

    @activity.defn(name=Activity.OBSERVE)
    async def observe(self, req: Observe) -> Observed:
        """The workflow's parking as the database has it now (see `Observed`)."""
        return await store.observe(self._pool, req)

    @activity.defn(name=Activity.BULK_RUN)
    async def bulk_run(self, req: BulkRun) -> BulkProgress:
        """Decide a bulk operation's items chunk after chunk, each chunk one transaction, at
        most `rate` a second, until none is left or a stop is asked for. It heartbeats its
        progress after each chunk; run again (after a crash), it goes on from what was
        committed: the database holds it all."""
        limit = BULK_CHUNK if req.rate is None else max(1, min(BULK_CHUNK, int(req.rate)))
        while True:
            progress = await self._bulk_chunk(req.bulk_id, limit)
            activity.heartbeat(progress.model_dump(mode="json"))
            if progress.stopped or progress.remaining == 0:
                return progress
            if req.rate is not None:
                await asyncio.sleep(progress.done / req.rate)
            elif progress.done == 0:
                # Every item left is held by another transaction (the bus, a decision of
                # the command's own workflow): look again in a moment.
                await asyncio.sleep(BULK_HELD_BACK_S)

    async def _bulk_chunk(self, bulk_id: UUID, limit: int) -> BulkProgress:
        try:
            return BulkProgress.model_validate(await store.bulk_chunk(self._pool, bulk_id, limit))
        except asyncpg.PostgresError as err:
            if permanent(err) is None:
                raise
            log.warning("bulk operation %s: a chunk was refused (%s)", bulk_id, err)
        # One command the database refuses must not hold up the others: alone, it fails.
        try:
            return BulkProgress.model_validate(await store.bulk_chunk(self._pool, bulk_id, 1))
        except asyncpg.PostgresError as err:
            if permanent(err) is None:
                raise
            return BulkProgress.model_validate(
                await store.bulk_fail_next(self._pool, bulk_id, f"refused: {one_line(err)}")
            )

    @activity.defn(name=Activity.BULK_PROGRESS)
    async def bulk_progress(self, bulk_id: UUID) -> BulkProgress:
        """Where a bulk operation stands, for its workflow's details."""
        row = await store.bulk(self._pool, bulk_id)
        if row is None:
            raise ApplicationError(
                f"no bulk operation {bulk_id}", type=InvalidInputError.__name__, non_retryable=True
            )
        op = store.bulk_operation(row)
        return BulkProgress(
            done=0,
            remaining=op.remaining,
            stopped=op.stop_requested_at is not None,
            counts=op.counts,
        )

    @activity.defn(name=Activity.BULK_VERDICT)
    async def bulk_verdict(self, req: BulkVerdict) -> BulkOperation | None:
        """A proposed bulk operation approved, rejected or expired; None when it was no
        longer proposed (stopped meanwhile)."""
        key = operator_key(req.operator) if req.verdict == "approved" else None
        row = await store.bulk_verdict(self._pool, req, operator_key=key)
        return None if row is None else store.bulk_operation(row)

    @activity.defn(name=Activity.BULK_FINISH)
    async def bulk_finish(self, req: BulkFinish) -> BulkOperation:
        """The end of a bulk operation: stopped (by `stopped_by`, or as asked) or finished."""
        if req.stopped_by is not None:
            await store.bulk_stop(self._pool, req.bulk_id, req.stopped_by)
        row = await store.bulk_finish(self._pool, req.bulk_id)
        if row is None:
            raise ApplicationError(
                f"no bulk operation {req.bulk_id}",
                type=InvalidInputError.__name__,
                non_retryable=True,
            )
        return store.bulk_operation(row)
