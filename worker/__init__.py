"""The tsq worker: runs `TroubleshootingWorkflow`, `TsqBulkOperation` and their activities on
one task queue."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence

import asyncpg
from temporalio.client import Client
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from tsq.activities import TroubleshootingActivities
from tsq.client import TroubleshootingClient
from tsq.db import create_pool
from tsq.metrics import WatcherMetrics, prometheus_runtime
from tsq.notify import Notifier, NotifyConfig
from tsq.settings import Settings, redact_url
from tsq.temporal import connect, register_search_attributes
from tsq.watch import Watcher, sweep_interval
from tsq.workflows.bulk import BulkOperationWorkflow
from tsq.workflows.troubleshooting import TroubleshootingWorkflow

log = logging.getLogger(__name__)


# As many pollers as the server has tasks for: five fixed ones (the SDK's default) leave
# workflow tasks waiting while thousands of workflows close after a bulk decision.
POLLERS = PollerBehaviorAutoscaling()


def new_worker(client: Client, pool: asyncpg.Pool, task_queue: str) -> Worker:
    """A worker for tsq's workflow and activities; the caller owns the pool."""
    acts = TroubleshootingActivities(pool)
    return Worker(
        client,
        task_queue=task_queue,
        workflow_task_poller_behavior=POLLERS,
        activity_task_poller_behavior=POLLERS,
        workflows=[TroubleshootingWorkflow, BulkOperationWorkflow],
        activities=[
            acts.carry_out,
            acts.record_refusal,
            acts.record_refusals,
            acts.record_event,
            acts.record,
            acts.observe,
            acts.bulk_run,
            acts.bulk_progress,
            acts.bulk_finish,
            acts.bulk_verdict,
        ],
        # The sandbox would re-import the workflow module for every workflow it loads: a third
        # of the worker's CPU, and memory, with thousands waiting. The module holds only
        # constants; the replay tests over stored histories guard its determinism.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("tsq")
        ),
    )


async def run_worker(
    settings: Settings, *, stop: asyncio.Event | None = None, signals: Sequence[int] = ()
) -> None:
    """Run until `stop` is set or a signal in `signals` arrives; finish in-flight work; return.

    Beside the Temporal worker runs the watcher, which gives commands the bus parked their
    workflows and tells workflows when their command left by another hand (`tsq.watch`).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    notify = NotifyConfig.from_env(os.environ, namespace=settings.temporal_namespace)
    runtime = prometheus_runtime(settings.metrics_port) if settings.metrics_port else None
    client = await connect(settings, runtime=runtime)
    await register_search_attributes(client)
    dsn = settings.require_database_url()
    pool = await create_pool(dsn)
    metrics = WatcherMetrics(runtime.metric_meter) if runtime else None
    try:
        watcher = Watcher(
            TroubleshootingClient(client, pool, task_queue=settings.task_queue),
            dsn,
            sweep_every=sweep_interval(),
            metrics=metrics,
        )
        worker = new_worker(client, pool, settings.task_queue)
        async with worker:
            log.info(
                "tsq worker polling task queue %r on %s (namespace %s)%s%s",
                settings.task_queue,
                settings.temporal_address,
                settings.temporal_namespace,
                f"; metrics on :{settings.metrics_port}/metrics" if runtime else "",
                f"; notifying {redact_url(notify.url)}" if notify else "",
            )
            side = [watcher.run(stop)]
            if notify is not None:
                side.append(Notifier(pool, notify, metrics).run(stop))
            await asyncio.gather(*side)
            log.info("stopping: finishing in-flight work")
    finally:
        await pool.close()
        for signum in signals:
            loop.remove_signal_handler(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
