"""`tsq dev`: the whole stack on one machine, with data kept under one folder."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from tsq import store
from tsq.client import TroubleshootingClient
from tsq.db import create_pool, migrate
from tsq.devstack import embedded_postgres, start_temporal
from tsq.settings import Settings, redact_url
from tsq.temporal import connect

log = logging.getLogger(__name__)

DEMO_DOMAIN = "payments"
# The waiting ids the banner names; more are counted.
BANNER_IDS = 10
DEMO_COMMANDS = [
    ("DebitAccount", "PERMANENT", "ACCOUNT_CLOSED", "account ACC-1042 is closed", True),
    ("DebitAccount", "TRANSIENT", "LEDGER_TIMEOUT", "ledger did not answer in 30s (3 of 3)", True),
    ("RefundPayment", "PERMANENT", "DUPLICATE_REFUND", "refund R-77 already issued", True),
    ("SendReceipt", "PERMANENT", "INVALID_EMAIL", "no such mailbox", False),
]


def _check_port_free(port: int, what: str, flag: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} for the {what} is in use (another `tsq dev` or Temporal server?); "
                f"stop it or pass {flag}"
            ) from None


async def seed_demo(client: TroubleshootingClient) -> None:
    """Send a few commands as a command bus would, then park them as its worker would."""
    replies = f"{DEMO_DOMAIN}__replies"
    for command_type, error_type, code, message, has_reply in DEMO_COMMANDS:
        command_id, correlation_id = uuid.uuid4(), uuid.uuid4()
        body = {
            "domain": DEMO_DOMAIN,
            "command_type": command_type,
            "command_id": str(command_id),
            "correlation_id": str(correlation_id),
            "data": {"account": "ACC-1042", "amount": 125},
        }
        if has_reply:
            body["reply_to"] = replies
        await store.send_command(
            client.pool,
            DEMO_DOMAIN,
            command_id,
            command_type=command_type,
            correlation_id=correlation_id,
            body=body,
            reply_queue=replies if has_reply else "",
        )
        await client.move_to_troubleshooting(
            DEMO_DOMAIN, command_id, error_type=error_type, error_code=code, error_message=message
        )


def _banner(settings: Settings, ui_url: str | None, waiting: list[str], embedded_db: bool) -> str:
    example = waiting[0] if waiting else "<command-id>"
    wid = f"tsq:{DEMO_DOMAIN}:{example}"
    # A database the user configured may carry a password: never print it.
    database = settings.database_url if embedded_db else redact_url(settings.database_url or "")
    lines = [
        "",
        "tsq dev is running. Ctrl-C stops everything; data stays for the next start.",
        f"  Temporal Web UI : {ui_url or '(external Temporal server)'}",
        f"  Temporal        : {settings.temporal_address}"
        f" (namespace {settings.temporal_namespace})",
        f"  PostgreSQL      : {database}",
        "",
        "Use tsq and temporal from another shell with:",
        f"  export PATH={Path(sys.executable).parent}:$PATH",
        f"  export TSQ_DATABASE_URL='{database}'",
        f"  export TEMPORAL_ADDRESS={settings.temporal_address}",
        *([f"  export TSQ_WEB_UI_URL={ui_url}"] if ui_url else []),
        "",
    ]
    if waiting:
        shown = waiting[:BANNER_IDS]
        more = f" and {len(waiting) - len(shown)} more" if len(waiting) > len(shown) else ""
        lines += [f"Waiting in {DEMO_DOMAIN}: {', '.join(shown)}{more}", ""]
    else:
        lines += [
            f"Nothing waits in {DEMO_DOMAIN} yet: `tsq dev --demo` parks four demo commands, or",
            "park one of your own with plain SQL as the bus would (README: Operator guide).",
            "",
        ]
    lines.append("Cancel a command:")
    if ui_url:
        query = quote(f'CommandDomain="{DEMO_DOMAIN}" AND TsqState="AWAITING_OPERATOR"')
        lines += [
            f"  Web UI : {ui_url}/namespaces/{settings.temporal_namespace}/workflows?query={query}",
            "           open a workflow > More Actions > Send a Signal > cancel >",
            '           {"reason": "Invalid account", "operator": "you@example.com"}',
        ]
    lines += [
        f"  temporal workflow signal --workflow-id {wid} --name cancel \\",
        f'      --input \'{{"reason": "Invalid account", "operator": "you@example.com"}}\' '
        f"--address {settings.temporal_address}",
        f"  tsq cancel {DEMO_DOMAIN} {example} --reason 'Invalid account'",
        "",
    ]
    return "\n".join(lines)


def _data_dir(path: str) -> Path:
    data_dir = Path(path).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


async def run_dev(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.worker import STOP_SIGNALS, run_worker

    data_dir = _data_dir(args.data_dir)
    with contextlib.ExitStack() as stack:
        embedded_db = settings.database_url is None
        if embedded_db:
            log.info("starting embedded PostgreSQL in %s", data_dir / "pgdata")
            database_url = stack.enter_context(embedded_postgres(data_dir / "pgdata"))
            settings = replace(settings, database_url=database_url)
        ui_url = None
        if not os.environ.get("TEMPORAL_ADDRESS"):
            _check_port_free(args.port, "Temporal server", "--port")
            _check_port_free(args.ui_port, "Web UI", "--ui-port")
            log.info("starting the Temporal dev server (state in %s)", data_dir / "temporal.db")
            server = start_temporal(
                port=args.port,
                ui_port=args.ui_port,
                db_file=data_dir / "temporal.db",
                log_file=data_dir / "temporal.log",
            )
            stack.callback(server.stop)
            settings = replace(settings, temporal_address=server.address)
            ui_url = server.ui_url
        database_url = settings.require_database_url()
        await migrate(database_url)
        pool = await create_pool(database_url)
        try:
            if args.demo and not await store.has_commands(pool, DEMO_DOMAIN):
                temporal = await connect(settings)
                await seed_demo(
                    TroubleshootingClient(temporal, pool, task_queue=settings.task_queue)
                )
            waiting = await store.waiting_ids(
                pool, DEMO_DOMAIN, command_type=None, error_code=None, since=None, until=None
            )
        finally:
            await pool.close()
        ids = [str(cid) for cid in waiting]
        print(_banner(settings, ui_url, ids, embedded_db), flush=True)
        if ui_url:
            # Notifications (TSQ_NOTIFY_URL) link to this Web UI unless told otherwise.
            os.environ.setdefault("TSQ_WEB_UI_URL", ui_url)
        await run_worker(settings, signals=STOP_SIGNALS)
