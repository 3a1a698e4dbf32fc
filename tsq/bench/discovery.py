"""Phase: living beside the bus. The bus parks a burst of commands by plain SQL in one
transaction; how long until each has its workflow in `temporal workflow list` (discovery lag)?
Another tool then cancels them all; how long until each workflow has closed (drift lag)? And
what does tsq's trigger cost the bus's own UPDATE (the same statement on a table with the
trigger and on one without, in turns)?
"""

from __future__ import annotations

import time
import uuid

from tsq import store
from tsq.bench.context import Bench
from tsq.bench.measure import Check, percentile, say, until
from tsq.bench.processes import WorkerProcess
from tsq.contract import CommandStatus

TRIGGER_ROWS = 300


async def _lags(
    bench: Bench, query: str, wanted: int, since: float, *, closed: bool, within: float = 600.0
) -> tuple[list[float], float]:
    """Once `wanted` workflows match `query` in the list: for each, the seconds from `since`
    (wall clock) to its start (or close) as the server recorded it, and the seconds until the
    last of them showed in the list. Counting is cheap; the list is read once, at the end, so
    the measuring does not load the server it measures."""
    await until(lambda: bench.workflows(query), wanted, within=within)
    visible = time.time() - since
    lags = []
    async for execution in bench.temporal.list_workflows(query, page_size=1000):
        at = execution.close_time if closed else execution.start_time
        if at is not None:
            lags.append(at.timestamp() - since)
    return lags, visible


async def discovery_and_drift(bench: Bench) -> None:
    n = bench.config.discovery
    domain, task_queue = bench.domain("found"), bench.task_queue("found")
    ids = await store.send_commands(bench.pool, domain, n, parked=False)
    with WorkerProcess(bench.settings, task_queue, bench.work_dir / "discovery.log") as worker:
        worker.wait_polling()
        say(f"discovery: the bus parks {n} commands in one transaction")
        await store.park_as_bus(bench.pool, domain, ids)
        committed = time.time()
        found, found_all = await _lags(
            bench,
            f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'",
            n,
            committed,
            closed=False,
        )
        say(f"drift: another tool cancels the {n} commands in one statement")
        await store.set_status_as_bus(bench.pool, domain, ids, CommandStatus.CANCELED.value)
        changed = time.time()
        closed, closed_all = await _lags(
            bench,
            f"CommandDomain = '{domain}' AND ExecutionStatus = 'Completed'",
            n,
            changed,
            closed=True,
        )
    bench.checks["discovery"] = Check(n, {"found": len(found), "closed": len(closed)})
    bench.result.update(
        discovery_commands=n,
        discovery_p50_s=percentile(found, 50),
        discovery_p99_s=percentile(found, 99),
        discovery_all_listed_s=found_all,
        drift_p50_s=percentile(closed, 50),
        drift_p99_s=percentile(closed, 99),
        drift_all_listed_s=closed_all,
    )


async def trigger_cost(bench: Bench) -> None:
    """The bus's UPDATE into the troubleshooting queue, and an ordinary one (IN_PROGRESS to
    COMPLETED, where the trigger does not even run), each its own transaction, on two copies
    of commandbus.command: one bare, one with tsq's trigger. In turns, one row at a time."""
    domain = bench.domain("trigger")
    ids = [uuid.uuid4() for _ in range(2 * TRIGGER_ROWS)]
    times: dict[tuple[bool, str], list[float]] = {}
    say(f"trigger cost: {TRIGGER_ROWS} parking and {TRIGGER_ROWS} ordinary UPDATEs on each copy")
    async with bench.pool.acquire() as conn:
        await store.copies_of_the_command_table(conn, domain, ids)
        for i, command_id in enumerate(ids):
            kind = "park" if i < TRIGGER_ROWS else "other"
            status = "IN_TROUBLESHOOTING_QUEUE" if kind == "park" else "COMPLETED"
            for watched in (i % 2 == 0, i % 2 == 1):
                began = time.perf_counter()
                await store.bus_update(
                    conn, watched=watched, domain=domain, command_id=command_id, status=status
                )
                times.setdefault((watched, kind), []).append((time.perf_counter() - began) * 1000)
    p50 = {key: percentile(values, 50) for key, values in times.items()}
    bench.result.update(
        bus_park_update_ms=p50[(False, "park")],
        bus_park_update_with_trigger_ms=p50[(True, "park")],
        bus_other_update_ms=p50[(False, "other")],
        bus_other_update_with_trigger_ms=p50[(True, "other")],
    )
