"""`tsq bench`: how fast tsq parks, discovers and decides commands, next to what its servers
allow, in one run on the same servers.

Phases (one module each): tsq against a bare workflow and direct SQL (`decisions`), living
beside the bus (`discovery`: discovery and drift lag, the trigger's cost), an incident-scale
bulk decision (`bulk`), and thousands waiting (`waiting`). After each, rows are counted to
check that every decision happened exactly once. The run has a database of its own, on the
configured PostgreSQL server or an embedded one, dropped at the end; Temporal is the
configured server or a dev server started for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil  # type: ignore[import-untyped]
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from tsq.bench.bulk import bulk_decision
from tsq.bench.context import Bench, BenchConfig
from tsq.bench.decisions import compare_with_bare, direct_sql
from tsq.bench.discovery import discovery_and_drift, trigger_cost
from tsq.bench.measure import run_concurrently, say
from tsq.bench.report import format_table, summarise
from tsq.bench.waiting import waiting_at_scale
from tsq.contract import SearchAttribute
from tsq.db import create_pool, migrate
from tsq.devstack import embedded_postgres, temporal_cli
from tsq.errors import InvalidInputError, InvalidOperationError
from tsq.settings import Settings, with_database
from tsq.temporal import connect, register_search_attributes

__all__ = ["BenchConfig", "main", "run_bench"]


@contextlib.asynccontextmanager
async def _database_of_its_own(server_url: str) -> AsyncIterator[str]:
    """A new database on the server of `server_url`, migrated, dropped afterwards: the run
    never touches the data of the database it was pointed at."""
    name = f"tsq_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.InsufficientPrivilegeError as err:
            raise InvalidOperationError(
                f"tsq bench runs in a database of its own and may not create one ({err}): use "
                "a role with CREATEDB, or leave TSQ_DATABASE_URL unset for an embedded server"
            ) from None
        url = with_database(server_url, name)
        try:
            await migrate(url)
            yield url
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def run_bench(
    config: BenchConfig, settings: Settings, *, temporal_pid: int | None = None, stack: str = ""
) -> dict[str, Any]:
    """Run every phase against the servers in `settings`; return the figures as a dict."""
    async with _database_of_its_own(settings.require_database_url()) as url:
        settings = replace(settings, database_url=url)
        temporal = await connect(settings)
        await register_search_attributes(temporal)
        pool = await create_pool(url, max_size=20)
        try:
            with tempfile.TemporaryDirectory(prefix="tsq-bench-") as work_dir:
                bench = Bench(config, settings, temporal, pool, Path(work_dir), temporal_pid)
                await compare_with_bare(bench)
                await direct_sql(bench)
                if config.discovery:
                    await discovery_and_drift(bench)
                    await trigger_cost(bench)
                if config.bulk:
                    await bulk_decision(bench)
                leftovers = await waiting_at_scale(bench) if config.waiting else []
                await _end_waiting(bench, leftovers)
            return summarise(bench, stack or "configured services")
        finally:
            await pool.close()


async def _end_waiting(bench: Bench, workflow_ids: list[str]) -> None:
    """Workflows left waiting would outlive the run's database on a server that stays."""
    if not workflow_ids:
        return
    say(f"ending the {len(workflow_ids)} workflows still waiting")

    async def terminate(wid: str) -> None:
        try:
            await bench.temporal.get_workflow_handle(wid).terminate(reason="tsq bench done")
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise

    await run_concurrently(workflow_ids, terminate, bench.config.concurrency)


def _temporal_pid() -> int | None:
    """The dev server this process started (the SDK does not say which process it is)."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "temporal" in child.name():
                return int(child.pid)
    return None


async def main(args: argparse.Namespace, settings: Settings) -> None:
    """`tsq bench`: embedded services unless TSQ_DATABASE_URL / TEMPORAL_ADDRESS are set."""
    config = BenchConfig(
        commands=args.commands,
        concurrency=args.concurrency,
        waiting=args.waiting,
        discovery=args.discovery,
        bulk=args.bulk,
    )
    if (
        config.commands < 1
        or config.concurrency < 1
        or min(config.waiting, config.discovery, config.bulk) < 0
    ):
        raise InvalidInputError(
            "--commands and --concurrency must be >= 1, --waiting, --discovery and --bulk >= 0"
        )
    parts = []
    temporal_pid = None
    with tempfile.TemporaryDirectory(prefix="tsq-bench-") as tmp:
        async with contextlib.AsyncExitStack() as services:
            if settings.database_url is None:
                say("starting embedded PostgreSQL")
                url = services.enter_context(embedded_postgres(Path(tmp) / "pgdata"))
                settings = replace(settings, database_url=url)
                parts.append("embedded PostgreSQL")
            else:
                parts.append("configured PostgreSQL")
            if not os.environ.get("TEMPORAL_ADDRESS"):
                say("starting the Temporal dev server (database file)")
                # The SDK's own dev server start serves here: a short-lived server on a free
                # port. (`tsq dev` and the tests run theirs themselves: they need its log, a
                # check that it is still up after it answered, and restarts on the same port.)
                env = await services.enter_async_context(
                    await WorkflowEnvironment.start_local(
                        dev_server_existing_path=temporal_cli(),
                        dev_server_database_filename=str(Path(tmp) / "temporal.db"),
                        dev_server_extra_args=[
                            arg
                            for name in SearchAttribute
                            for arg in ("--search-attribute", f"{name.value}={name.kind}")
                        ],
                        dev_server_startup_timeout=timedelta(seconds=60),
                    )
                )
                target = env.client.service_client.config.target_host
                settings = replace(settings, temporal_address=target)
                temporal_pid = _temporal_pid()
                parts.append("Temporal dev server with a database file")
            else:
                parts.append(f"Temporal at {settings.temporal_address}")
            result = await run_bench(
                config, settings, temporal_pid=temporal_pid, stack=" + ".join(parts)
            )
    print(format_table(result))
    if args.json:
        print(json.dumps(result, default=str))
