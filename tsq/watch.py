"""The watcher, run by every `tsq worker`: tsq follows the bus without being called.

The trigger on `commandbus.command` writes, in the bus's own transaction, a parking row with
work for the watcher ("start" its workflow, "tell" its workflow the command left by another
hand) and notifies `tsq_parking`. The watcher listens, and also polls every few seconds (a
notification is lost when no worker listens), and drains that work: each worker claims rows
with `FOR UPDATE SKIP LOCKED` for a short lease, so several drain at once and a claim that
outlives its worker (SIGKILL) is picked up by another. Every start is idempotent; a start or a
signal Temporal refuses (it is down) is tried again later, with backoff: the rows keep the work.

A sweep, run by one worker at a time every `TSQ_SWEEP_INTERVAL`, catches what the rows cannot
show: a workflow terminated by hand (its parking gets a new one), or a running workflow whose
command is no longer parked (it is asked to look at the database, and ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from temporalio.client import (
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import TemporalError
from temporalio.service import RPCError, RPCStatusCode

from tsq import store
from tsq.client import TroubleshootingClient, snapshot
from tsq.contract import WORKFLOW_TYPE, CommandStatus, parse_workflow_id, workflow_id
from tsq.errors import InvalidInputError, StaleParkingError
from tsq.metrics import WatcherMetrics
from tsq.render import one_line

log = logging.getLogger(__name__)

CHANNEL = "tsq_parking"
# Without a notification (none listened, or it was lost) the rows are read this often.
POLL_S = 2.0
# How long a worker holds claimed rows; another takes them over after that.
LEASE_S = 15.0
BATCH = 200
# Starts and tells in flight at once. A tell by update waits for the workflow task that takes
# it (about a second under load), so this bounds how fast workflows close after a bulk
# decision: at 32, about 32/s, under the server's own rate here.
CONCURRENCY = 64
# How long a tell by update may wait for a worker to take it before it is sent as a signal.
TELL_UPDATE_S = 10.0
# A parking younger than this (or than one sweep interval, if shorter) may not show in
# Temporal's list yet: the sweep leaves it be.
SWEEP_GRACE_S = 30.0
DEFAULT_SWEEP_S = 300.0
# The waiting gauges are read from the database this often.
GAUGE_S = 15.0
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
_TEMPORAL_ERRORS = (RPCError, TemporalError, OSError, TimeoutError, RuntimeError)


def sweep_interval(env: dict[str, str] | None = None) -> float:
    """`TSQ_SWEEP_INTERVAL` in seconds (default 300)."""
    text = (env if env is not None else os.environ).get("TSQ_SWEEP_INTERVAL")
    if not text:
        return DEFAULT_SWEEP_S
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(f"TSQ_SWEEP_INTERVAL {text!r} is not a number of seconds") from None
    if value <= 0:
        raise InvalidInputError(f"TSQ_SWEEP_INTERVAL must be above 0, not {text}")
    return value


def _backoff(attempts: int) -> float:
    return float(min(60.0, 0.5 * 2 ** min(attempts, 8)))


@dataclass
class SweepReport:
    rearmed: int = 0
    told: list[str] = field(default_factory=list)


class Watcher:
    """Drains the parking rows and sweeps, until `stop` is set (see the module docstring)."""

    def __init__(
        self,
        client: TroubleshootingClient,
        dsn: str,
        *,
        sweep_every: float = DEFAULT_SWEEP_S,
        sweep_grace: float | None = None,
        metrics: WatcherMetrics | None = None,
    ) -> None:
        self.client = client
        self.pool = client.pool
        self.dsn = dsn
        self.sweep_every = sweep_every
        self.sweep_grace = min(SWEEP_GRACE_S, sweep_every) if sweep_grace is None else sweep_grace
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = asyncio.Event()
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._listen(stop), name="tsq listen"),
            asyncio.create_task(self._drain_loop(stop), name="tsq drain"),
            asyncio.create_task(self._sweep_loop(stop), name="tsq sweep"),
        ]
        if self.metrics is not None:
            tasks.append(asyncio.create_task(self._gauge_loop(stop), name="tsq gauges"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- notifications ----------------------------------------------------------------------

    async def _listen(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                try:
                    await conn.add_listener(CHANNEL, self._notified)
                    failures = 0
                    self._wake.set()  # whatever arrived while nobody listened
                    while not stop.is_set():
                        await _sleep(stop, POLL_S * 5)
                        await conn.execute("SELECT 1")  # notices a connection that died
                finally:
                    with contextlib.suppress(*_DATABASE_ERRORS):
                        await conn.close(timeout=5)
            except _DATABASE_ERRORS as err:
                failures += 1
                log.warning("watcher: listening for parkings failed (%s); retrying", one_line(err))
                await _sleep(stop, _backoff(failures))

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    # -- draining ---------------------------------------------------------------------------

    async def _drain_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                claimed = await self.drain()
                failures = 0
            except _DATABASE_ERRORS as err:
                failures += 1
                log.warning("watcher: reading parkings failed (%s); retrying", one_line(err))
                await _sleep(stop, _backoff(failures))
                continue
            if claimed < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def drain(self) -> int:
        """Claim a batch of parkings with work and do it; returns how many were claimed.

        The database work is a few statements per batch; what is left per parking is its one
        call to Temporal (a start or a signal), many at once.
        """
        rows = await store.claim_parkings(self.pool, lease_s=LEASE_S, limit=BATCH)
        if not rows:
            await self._tell_policy_changes()
            return 0
        commands = await store.commands_of(
            self.pool, [(r["domain"], r["command_id"]) for r in rows if r["todo"] == "start"]
        )
        outcomes = await asyncio.gather(
            *(self._work(row, commands.get((row["domain"], row["command_id"]))) for row in rows)
        )
        started = [row["parking_id"] for row, outcome in zip(rows, outcomes, strict=True)
                   if outcome == "started"]  # fmt: skip
        for parking in await store.left_among(self.pool, started):
            # Decided while its start was on its way: the new run must look.
            await self._guarded_tell(workflow_id(parking["domain"], parking["command_id"]))
        await self._tell_policy_changes()
        await store.finish_todos(
            self.pool,
            [
                (row["parking_id"], row["todo_seq"], outcome.removeprefix("done:") or None)
                for row, outcome in zip(rows, outcomes, strict=True)
                if outcome == "started" or outcome.startswith("done:")
            ],
        )
        return len(rows)

    async def _tell_policy_changes(self) -> None:
        """A policy set, changed or deleted: every waiting workflow of its domain looks again
        (and follows the policy that now matches it)."""
        changes = await store.claim_policy_changes(self.pool, lease_s=LEASE_S * 4)
        if not changes:
            return
        task_queue = _quoted(self.client.task_queue)
        told: list[int] = []
        for change in changes:
            query = (
                f'WorkflowType = "{WORKFLOW_TYPE}" AND ExecutionStatus = "Running" '
                f'AND TaskQueue = "{task_queue}" AND CommandDomain = "{change["domain"]}"'
            )
            try:
                wids = [e.id async for e in self.client.temporal.list_workflows(query)]
            except _TEMPORAL_ERRORS as err:
                log.warning("watcher: policy change of %s: %s", change["domain"], one_line(err))
                continue  # the claim expires: tried again
            await asyncio.gather(*(self._guarded_tell(wid) for wid in wids))
            told.append(change["change_id"])
        await store.policy_changes_told(self.pool, told)

    async def _work(self, row: asyncpg.Record, command: asyncpg.Record | None) -> str:
        """Do one parking's work: "started", "done:" (with a problem when it can never be
        done), or "later" (the row was set to be tried again)."""
        pid, seq = row["parking_id"], row["todo_seq"]
        wid = workflow_id(row["domain"], row["command_id"])
        async with self._gate:
            try:
                if row["todo"] == "tell":
                    await self._tell(wid)
                    if self.metrics and row["left_at"] is not None:
                        self.metrics.drifted(_age(row["left_at"]))
                    return "done:"
                if (
                    command is None
                    or command["status"] != CommandStatus.IN_TROUBLESHOOTING_QUEUE
                    or command["parking_id"] != pid
                ):
                    return "done:"  # it left already; its "tell" follows when it matters
                if not await self.client.ensure_started(snapshot(command), record=False):
                    return "done:"
                if self.metrics:
                    self.metrics.discovered(_age(row["parked_at"]))
                return "started"
            except StaleParkingError as err:
                # The earlier run was asked to end; its successor starts once it has.
                await store.retry_todo(self.pool, pid, seq, after_s=1.0, problem=str(err))
            except InvalidInputError as err:
                problem = f"skipped: {err}"
                log.warning("watcher: %s", problem)
                if self.metrics:
                    self.metrics.skipped(row["domain"])
                return f"done:{problem}"
            except _TEMPORAL_ERRORS as err:
                after = _backoff(row["attempts"])
                log.warning("watcher: %s: %s; again in %.0fs", wid, one_line(err), after)
                await store.retry_todo(self.pool, pid, seq, after_s=after, problem=one_line(err))
            except _DATABASE_ERRORS as err:
                # The claim expires and the row is taken again.
                log.warning("watcher: parking %s: %s", pid, one_line(err))
        return "later"

    async def _tell(self, wid: str) -> None:
        """Ask the workflow to look at the database. By update: the server writes it in the
        workflow task that takes it, where a signal is a write of its own and wakes a task
        of its own; that is what bounds how fast thousands of workflows close after a bulk
        decision. An update is not kept until a worker takes it, so one that is not taken in
        time (or that the workflow does not know) is sent as the signal, which the server
        keeps."""
        handle = self.client.temporal.get_workflow_handle(wid)
        try:
            try:
                await asyncio.wait_for(
                    handle.start_update(
                        "tsq_observe",
                        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                        rpc_timeout=timedelta(seconds=TELL_UPDATE_S),
                    ),
                    TELL_UPDATE_S,
                )
                return
            except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None  # the watcher stops
            except WorkflowUpdateFailedError:
                pass  # a workflow without the update: the signal
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return
            await handle.signal("tsq_refresh")
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise

    # -- sweeping ---------------------------------------------------------------------------

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await store.take_lease(
                    self.pool, "sweep", self.holder, every_s=self.sweep_every
                ):
                    report = await self.sweep()
                    if report.rearmed or report.told:
                        log.info(
                            "watcher sweep: %d parking(s) without their workflow, %d workflow(s) "
                            "of commands no longer parked",
                            report.rearmed,
                            len(report.told),
                        )
                        self._wake.set()
            except (*_DATABASE_ERRORS, *_TEMPORAL_ERRORS) as err:
                log.warning("watcher: sweep failed (%s); retrying", one_line(err))
            await _sleep(stop, min(self.sweep_every, 30.0))

    async def sweep(self) -> SweepReport:
        """Parkings whose workflow is not running get their work back; running workflows of
        commands no longer parked are told to look."""
        task_queue = _quoted(self.client.task_queue)
        query = (
            f'WorkflowType = "{WORKFLOW_TYPE}" AND ExecutionStatus = "Running" '
            f'AND TaskQueue = "{task_queue}"'
        )
        running: dict[str, int | None] = {}
        async for execution in self.client.temporal.list_workflows(query, page_size=1000):
            memo = await execution.memo()
            tsq = memo.get("tsq")
            bound = tsq.get("parking_id") if isinstance(tsq, dict) else None
            running[execution.id] = bound if isinstance(bound, int) else None
        report = SweepReport()
        parkings = await store.open_parking_ids(self.pool, older_than_s=self.sweep_grace)
        lost = [
            p["parking_id"]
            for p in parkings
            if running.get(workflow_id(p["domain"], p["command_id"]), -1) != p["parking_id"]
        ]
        if lost:
            await store.rearm(self.pool, lost)
            report.rearmed = len(lost)
        named = {wid: key for wid in running if (key := parse_workflow_id(wid)) is not None}
        # Not those the rows already have a "tell" for: during a bulk decision, thousands.
        parked = await store.open_commands(
            self.pool, list(named.values()), grace_s=self.sweep_grace
        )
        report.told = [wid for wid, key in named.items() if key not in parked]
        await asyncio.gather(*(self._guarded_tell(wid) for wid in report.told))
        return report

    async def _gauge_loop(self, stop: asyncio.Event) -> None:
        assert self.metrics is not None
        while not stop.is_set():
            with contextlib.suppress(*_DATABASE_ERRORS):
                groups = await store.waiting_groups(self.pool, None)
                self.metrics.report_waiting(
                    [
                        (g["domain"], g["command_type"] or "", g["error_code"], g["count"],
                         _age(g["oldest"]))
                        for g in groups
                    ]
                )  # fmt: skip
            await _sleep(stop, GAUGE_S)

    async def _guarded_tell(self, wid: str) -> None:
        async with self._gate:
            with contextlib.suppress(*_TEMPORAL_ERRORS):
                await self._tell(wid)


def _quoted(value: str) -> str:
    """`value` inside a double-quoted string of a visibility query."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _age(since: datetime) -> float:
    return (datetime.now(UTC) - since).total_seconds()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
