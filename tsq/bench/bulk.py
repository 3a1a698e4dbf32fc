"""Phase: an incident-scale bulk decision. The bus has parked `--bulk` commands, each with its
workflow waiting; one bulk cancel decides them all. How fast are the effects committed (next
to the direct-SQL rate of the same run), and how long until every command's workflow has
closed with its outcome (next to what the server needs to decide that many bare workflows)?
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from tsq import store
from tsq.bench.context import OPERATOR, REASON, Bench
from tsq.bench.measure import Check, say, until
from tsq.bench.processes import WorkerProcess
from tsq.client import TroubleshootingClient

# The watcher starts this many workflows a second at best on a small machine: the wait for
# them all is bounded by it.
_STARTS_PER_S_AT_LEAST = 10.0


async def bulk_decision(bench: Bench) -> None:
    n = bench.config.bulk
    domain, task_queue = bench.domain("bulk"), bench.task_queue("bulk")
    client = TroubleshootingClient(bench.temporal, bench.pool, task_queue=task_queue)
    running = f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"
    closed = f"CommandDomain = '{domain}' AND ExecutionStatus = 'Completed'"
    with WorkerProcess(bench.settings, task_queue, bench.work_dir / "bulk.log") as worker:
        worker.wait_polling()
        say(f"bulk: the bus parks {n} commands; the watcher starts their workflows")
        await store.send_commands(bench.pool, domain, n, parked=True)
        await until(lambda: bench.workflows(running), n, within=60 + n / _STARTS_PER_S_AT_LEAST)
        await until(lambda: bench.backlog(task_queue), 0, within=300)  # first tasks all run
        say(f"bulk: one bulk cancel of the {n} commands")
        rss: list[float] = []
        sampling = asyncio.create_task(_sample_rss(worker, rss))
        began = time.time()
        try:
            op = await client.start_bulk(
                "cancel", domain, all_waiting=True, operator=OPERATOR, reason=REASON
            )
            while op.status == "running":
                await asyncio.sleep(0.2)
                op = await client.bulk(op.bulk_id)
            say(f"bulk: effects committed; waiting for the {n} workflows to close")
            # The bulk operation's own workflow is in the domain too: n + 1 close.
            await until(lambda: bench.workflows(closed), n + 1, within=120 + 2 * n)
            last_close = 0.0
            async for execution in bench.temporal.list_workflows(closed, page_size=1000):
                if execution.close_time is not None:
                    last_close = max(last_close, execution.close_time.timestamp())
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    assert op.last_effect_at is not None
    effects_s = (op.last_effect_at - op.created_at).total_seconds()
    counts = await bench.decided_counts(domain, effects=True)
    counts["carried_out"] = op.carried_out
    counts["workflows_canceled"] = await bench.workflows(
        f"CommandDomain = '{domain}' AND TsqState = 'CANCELED'"
    )
    bench.checks["bulk"] = Check(n, counts)
    bench.result.update(
        bulk_commands=n,
        bulk_effects_s=effects_s,
        bulk_effects_per_s=op.carried_out / effects_s if effects_s > 0 else None,
        bulk_all_closed_s=last_close - began,
        bulk_exactly_once=bench.checks["bulk"].ok,
        bulk_worker_rss_mb=max(rss, default=None),
    )


async def _sample_rss(worker: WorkerProcess, into: list[float]) -> None:
    while True:
        into.append(worker.rss_mb())
        await asyncio.sleep(0.5)
