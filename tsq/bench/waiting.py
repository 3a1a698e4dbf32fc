"""Phase: thousands of commands waiting. The bus parks them by plain SQL and the watcher of a
`tsq worker` process gives each its workflow; a policy (escalate after an hour, cancel after
a week) gives each its timers. Then the worker's memory and idle CPU, and how a single
decision's latency grows from a hundred waiting to all of them.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence

from tsq import store
from tsq.bench.context import OPERATOR, REASON, Bench
from tsq.bench.measure import Check, Rate, run_concurrently, say, until
from tsq.bench.processes import WorkerProcess, rss_mb
from tsq.client import TroubleshootingClient
from tsq.contract import workflow_id

# Single decisions are probed at this many waiting workflows and at `--waiting`.
LOW_WAITING = 100
PARK_BATCH = 1000


async def _park_and_wait(
    bench: Bench, domain: str, ids: Sequence[uuid.UUID], *, waiting: int
) -> Rate:
    """The bus parks `ids` (a transaction per thousand) beside `waiting` workflows already
    waiting; until the watcher has started all. (Counted, not read from the list before the
    parking: workflows decided just before may still be listed as running for a moment.)"""
    began = time.perf_counter()
    for i in range(0, len(ids), PARK_BATCH):
        await store.park_as_bus(bench.pool, domain, ids[i : i + PARK_BATCH])
    running = f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"
    found = await until(lambda: bench.workflows(running), waiting + len(ids), within=1800)
    seconds = time.perf_counter() - began
    return Rate(seconds, [seconds * 1000] * max(0, found - waiting))


async def _probe(
    client: TroubleshootingClient, domain: str, candidates: Sequence[uuid.UUID], probes: int
) -> tuple[Rate, list[uuid.UUID]]:
    """Decide `probes` random waiting commands one at a time: latency without contention."""
    chosen = random.sample(list(candidates), min(probes, len(candidates)))
    rate = await run_concurrently(
        chosen, lambda cid: client.operator_cancel(domain, cid, REASON, operator=OPERATOR), 1
    )
    return rate, chosen


async def waiting_at_scale(bench: Bench) -> list[str]:
    """Returns the workflows left waiting (to be ended if the services outlive the run)."""
    m, probes = bench.config.waiting, bench.config.probes
    low = min(LOW_WAITING, m)
    domain, task_queue = bench.domain("wait"), bench.task_queue("wait")
    ids = await store.send_commands(bench.pool, domain, m + 2 * probes, parked=False)
    client = TroubleshootingClient(bench.temporal, bench.pool, task_queue=task_queue)
    await client.set_policy(
        domain,
        "bench",
        escalate_after="1h",
        expire_after="7d",
        expire_decision="cancel",
        reason="waited a week",
        operator=OPERATOR,
    )
    first, rest = ids[: low + probes], ids[low + probes :]

    with WorkerProcess(bench.settings, task_queue, bench.work_dir / "waiting.log") as worker:
        worker.wait_polling()
        bench.result["worker_rss_start_mb"] = worker.rss_mb()
        say(f"waiting: the bus parks {len(first)} commands")
        started = await _park_and_wait(bench, domain, first, waiting=0)
        await bench.settled(task_queue, workflow_id(domain, first[-1]))
        low_probe, decided_low = await _probe(client, domain, first, probes)

        say(f"waiting: the bus parks {len(rest)} more (to {m + probes} waiting)")
        more = (
            await _park_and_wait(bench, domain, rest, waiting=len(first) - len(decided_low))
            if rest
            else Rate.empty()
        )
        if rest:
            await bench.settled(task_queue, workflow_id(domain, rest[-1]))
        say(f"waiting: worker idle for {bench.config.idle_seconds:.0f}s")
        rss, cpu = await worker.idle(bench.config.idle_seconds)
        server_rss = rss_mb(bench.temporal_pid) if bench.temporal_pid else None
        undecided = [cid for cid in ids if cid not in set(decided_low)]
        high_probe, decided_high = await _probe(client, domain, undecided, probes)

    counts = await bench.decided_counts(domain, effects=True)
    counts["calls_returned"] = low_probe.done + high_probe.done
    bench.checks["waiting_decide"] = Check(2 * probes, counts)
    running = await until(
        lambda: bench.workflows(f"CommandDomain = '{domain}' AND ExecutionStatus = 'Running'"),
        m,
        within=60,
    )
    bench.checks["waiting_running"] = Check(m, {"running_workflows": running})
    for name, rate in (
        ("waiting_start", started),
        ("waiting_start_more", more),
        ("probe_low", low_probe),
        ("probe_high", high_probe),
    ):
        bench.record(name, rate)
    low_p50, high_p50 = low_probe.pct(50), high_probe.pct(50)
    bench.result.update(
        worker_rss_mb=rss,
        worker_idle_cpu_pct=cpu,
        temporal_server_rss_mb=server_rss,
        waiting_start_per_s=(started.done + more.done) / max(started.seconds + more.seconds, 1e-9),
        low_waiting=low,
        single_decision_p50_ms_low=low_p50,
        single_decision_p50_ms_high=high_p50,
        single_decision_growth=high_p50 / low_p50 if low_p50 else None,
    )
    decided = set(decided_low) | set(decided_high)
    return [workflow_id(domain, cid) for cid in ids if cid not in decided]
