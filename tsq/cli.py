"""The `tsq` command line. Every command exits 0 on success, 1 with a one-line reason otherwise."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import asyncpg
from temporalio.service import RPCError

from tsq.errors import TroubleshootingError
from tsq.settings import Settings

log = logging.getLogger("tsq")

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _default_operator() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.db import migrate
    from tsq.temporal import connect, register_search_attributes

    result = await migrate(settings.require_database_url())
    print(f"database migrated (pgmq: {result['pgmq']})")
    if args.skip_temporal:
        return
    client = await connect(settings)
    added = await register_search_attributes(client)
    print(
        f"search attributes on namespace {settings.temporal_namespace}: "
        + (f"added {', '.join(added)}" if added else "already registered")
    )


async def _worker(args: argparse.Namespace, settings: Settings) -> None:
    from worker import STOP_SIGNALS, run_worker

    await run_worker(settings, signals=STOP_SIGNALS)


async def _sync(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.client import TroubleshootingClient

    async with await TroubleshootingClient.connect(settings) as client:
        report = await client.sync(args.domain)
    print(
        f"started {len(report.started)} workflow(s); {len(report.already_running)} already running"
    )
    for wid in report.started:
        print(f"  started {wid}")


async def _cancel(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.client import TroubleshootingClient

    async with await TroubleshootingClient.connect(settings) as client:
        outcome = await client.operator_cancel(
            args.domain,
            args.command_id,
            args.reason,
            operator=args.operator,
            wait=not args.no_wait,
        )
    if outcome is None:
        print(f"cancel of {args.command_id} accepted; the worker carries it out")
    elif args.json:
        print(outcome.model_dump_json())
    else:
        print(f"{args.command_id}: {outcome.detail}")


async def _dev(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.dev import run_dev

    await run_dev(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsq",
        description="Operator decisions for commands in a PostgreSQL command bus's "
        "troubleshooting queue, carried out durably by Temporal.",
        epilog="Settings: TSQ_DATABASE_URL (or DATABASE_URL), TEMPORAL_ADDRESS, "
        "TEMPORAL_NAMESPACE, TSQ_TASK_QUEUE, TEMPORAL_API_KEY / TEMPORAL_TLS_*.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="create the schema, PGMQ and search attributes (idempotent)")
    p.add_argument(
        "--skip-temporal", action="store_true", help="only the database, not search attributes"
    )
    p.set_defaults(run=_migrate)

    p = sub.add_parser("worker", help="run the worker until SIGINT/SIGTERM")
    p.set_defaults(run=_worker)

    p = sub.add_parser(
        "dev", help="embedded PostgreSQL + Temporal dev server with Web UI + worker, all local"
    )
    p.add_argument("--data-dir", default=".tsq", help="where data is kept (default: .tsq)")
    p.add_argument("--port", type=int, default=7233, help="Temporal gRPC port (default 7233)")
    p.add_argument("--ui-port", type=int, default=8233, help="Web UI port (default 8233)")
    p.add_argument("--demo", action="store_true", help="seed a few troubleshooting commands")
    p.set_defaults(run=_dev)

    p = sub.add_parser("sync", help="start workflows for troubleshooting commands that have none")
    p.add_argument("domain", nargs="?", help="only this domain")
    p.set_defaults(run=_sync)

    p = sub.add_parser("cancel", help="cancel a command in the troubleshooting queue")
    p.add_argument("domain")
    p.add_argument("command_id")
    p.add_argument("--reason", required=True, help="why (sent in the reply, kept in the audit)")
    p.add_argument(
        "--operator", default=_default_operator(), help="who decides (default: your user name)"
    )
    p.add_argument("--no-wait", action="store_true", help="return once the decision is accepted")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(run=_cancel)
    return parser


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO
        if args.verbose or args.command in ("worker", "dev")
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, None]] = args.run
    try:
        asyncio.run(run(args, Settings.from_env()))
    except KeyboardInterrupt:
        return 130
    except TroubleshootingError as err:
        print(f"tsq {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except RPCError as err:
        print(f"tsq {args.command}: Temporal refused: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.PostgresError as err:
        print(f"tsq {args.command}: PostgreSQL refused: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, RuntimeError, TimeoutError, asyncpg.InterfaceError) as err:
        print(f"tsq {args.command}: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def entry() -> None:
    """Console-script entry: flush and leave without running interpreter teardown.

    A process that ran a Temporal worker has been seen to abort during interpreter shutdown
    ("PyGILState_Release"); the exit code must be the one `main` chose.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
