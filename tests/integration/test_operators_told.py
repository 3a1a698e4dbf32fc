"""Operators are told: digests of arrivals to a webhook, Prometheus metrics, and the groups.

The webhook receiver is a real HTTP server on localhost that can answer, fail, hang and
refuse; commands are parked by plain SQL, as the bus parks them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client

from tests.helpers import assert_eventually, new_domain, scratch_database, seed_command
from tsq.client import TroubleshootingClient
from tsq.db import create_pool
from tsq.devstack import free_port
from tsq.notify import Notifier, NotifyConfig
from tsq.settings import Settings
from tsq.watch import Watcher
from tsq.worker import new_worker

TSQ = str(Path(sys.executable).parent / "tsq")


@dataclass
class Receiver:
    """A webhook receiver: `answers` is the status for each request in turn (then 200);
    `hang` makes it wait that long before answering."""

    answers: list[int] = field(default_factory=list)
    hang: float = 0.0
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[dict[str, Any]]:
        return [body for _, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            found.requests.append((dict(self.headers), body))
            if found.hang:
                time.sleep(found.hang)
            status = found.answers.pop(0) if found.answers else 200
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()
    thread.join(5)


@dataclass
class Stack:
    url: str
    pool: asyncpg.Pool
    client: TroubleshootingClient
    stop: asyncio.Event


@pytest.fixture
async def stack(admin_url: str, temporal: Client) -> AsyncIterator[Stack]:
    """A database of its own, with a worker and a watcher on a task queue of its own."""
    async with scratch_database(admin_url, migrated=True) as url:
        pool = await create_pool(url)
        client = TroubleshootingClient(
            temporal, pool, task_queue=f"tsq-told-{uuid.uuid4().hex[:8]}"
        )
        stop = asyncio.Event()
        try:
            async with new_worker(temporal, pool, client.task_queue):
                watching = asyncio.create_task(Watcher(client, url).run(stop))
                yield Stack(url, pool, client, stop)
                stop.set()
                await watching
        finally:
            await pool.close()


def _config(receiver: Receiver, window: float = 3.0, timeout: float = 5.0) -> NotifyConfig:
    return NotifyConfig(
        url=receiver.url,
        window=timedelta(seconds=window),
        web_ui_url="http://ui.example:8233",
        timeout_s=timeout,
    )


async def park(pool: asyncpg.Pool, domain: str, code: str | None, count: int) -> None:
    """`count` commands parked by the bus in one transaction."""
    await pool.execute(
        """
        INSERT INTO commandbus.command (domain, queue_name, command_id, command_type, status,
            max_attempts, last_error_type, last_error_code)
        SELECT $1, $1 || '__commands', gen_random_uuid(), 'DebitAccount',
            'IN_TROUBLESHOOTING_QUEUE', 3, 'PERMANENT', $2
        FROM generate_series(1, $3)
        """,
        domain,
        code,
        count,
    )


async def test_arrivals_are_told_as_one_digest_per_domain_and_error_code_and_window(
    stack: Stack, receiver: Receiver
) -> None:
    """An incident parks 110 commands: three messages at once (one per domain and error code),
    then one more for the 30 that arrived within the window, after it."""
    notifier = Notifier(stack.pool, _config(receiver, window=3.0))
    telling = asyncio.create_task(notifier.run(stack.stop))
    a, b = new_domain(), new_domain()
    await park(stack.pool, a, "ACCOUNT_CLOSED", 50)
    await park(stack.pool, a, "LEDGER_DOWN", 20)
    await park(stack.pool, b, None, 10)
    first = await assert_eventually(
        lambda: asyncio.sleep(0, receiver.delivered()), lambda sent: len(sent) == 3
    )
    await park(stack.pool, a, "ACCOUNT_CLOSED", 30)
    await asyncio.sleep(1)
    assert len(receiver.delivered()) == 3, "a second message within the window"
    sent = await assert_eventually(
        lambda: asyncio.sleep(0, receiver.delivered()), lambda sent: len(sent) == 4, within=10
    )
    stack.stop.set()
    await telling

    by_group = {(m["domain"], m["error_code"]): m for m in first}
    closed = by_group[(a, "ACCOUNT_CLOSED")]
    assert (closed["arrived"], closed["waiting"]) == (50, 50)
    assert closed["text"].startswith(f"{a}: 50 commands parked with ACCOUNT_CLOSED; 50 waiting")
    assert (
        closed["url"] in closed["text"] and "LastErrorCode%3D%22ACCOUNT_CLOSED%22" in closed["url"]
    )
    assert by_group[(b, None)]["arrived"] == 10
    later = sent[3]
    assert (later["domain"], later["error_code"], later["arrived"], later["waiting"]) == (
        a,
        "ACCOUNT_CLOSED",
        30,
        80,
    )
    assert "in the last 3s" in later["text"]
    for headers, body in receiver.requests:
        assert headers["Idempotency-Key"] == body["idempotency_key"]
    assert len({body["idempotency_key"] for body in sent}) == 4


async def test_failing_receiver_gets_the_same_message_again_until_it_takes_it(
    stack: Stack, receiver: Receiver
) -> None:
    """A receiver answering 500 twice: the message comes again, with the same key, and is
    recorded as delivered once it is taken; discovery went on meanwhile."""
    receiver.answers = [500, 500]
    notifier = Notifier(stack.pool, _config(receiver))
    telling = asyncio.create_task(notifier.run(stack.stop))
    domain = new_domain()
    command_id = await seed_command(stack.pool, domain)
    await assert_eventually(
        lambda: asyncio.sleep(0, len(receiver.requests)), lambda n: n == 3, within=20
    )
    stack.stop.set()
    await telling
    keys = {headers["Idempotency-Key"] for headers, _ in receiver.requests}
    assert len(keys) == 1
    notice = await stack.pool.fetchrow("SELECT * FROM tsq.notice")
    assert notice["sent_at"] is not None and notice["attempts"] == 3
    described = await stack.client.temporal.get_workflow_handle(
        f"tsq:{domain}:{command_id}"
    ).describe()
    assert described.run_id


@pytest.mark.parametrize("fault", ["hangs", "refuses connections"])
async def test_receiver_that_hangs_or_is_down_holds_up_nothing(
    stack: Stack, receiver: Receiver, fault: str
) -> None:
    """A receiver that hangs past the timeout, or a port nobody listens on: the failure is
    recorded on the message (and retried later); commands keep getting their workflows."""
    config = _config(receiver, timeout=1.0)
    if fault == "hangs":
        receiver.hang = 5.0
    else:
        config = NotifyConfig(url=f"http://127.0.0.1:{free_port()}/hook", timeout_s=1.0)
    notifier = Notifier(stack.pool, config)
    telling = asyncio.create_task(notifier.run(stack.stop))
    domain = new_domain()
    ids = [await seed_command(stack.pool, domain) for _ in range(5)]
    notice = await assert_eventually(
        lambda: stack.pool.fetchrow("SELECT * FROM tsq.notice"),
        lambda row: row is not None and row["last_error"] is not None,
        within=20,
    )
    assert notice["sent_at"] is None
    for command_id in ids:
        described = await stack.client.temporal.get_workflow_handle(
            f"tsq:{domain}:{command_id}"
        ).describe()
        assert described.run_id
    stack.stop.set()
    await telling


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


async def test_worker_serves_sdk_and_tsq_metrics_on_one_endpoint(
    admin_url: str, settings: Settings, temporal: Client, tmp_path: Path
) -> None:
    """`tsq worker` with TSQ_METRICS_PORT: the SDK's runtime metrics and tsq's (waiting by
    domain, type and error code; oldest; decisions; discovery lag) on one endpoint."""
    async with scratch_database(admin_url, migrated=True) as url:
        port = free_port()
        task_queue = f"tsq-metrics-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "TSQ_DATABASE_URL": url,
            "TEMPORAL_ADDRESS": settings.temporal_address,
            "TSQ_TASK_QUEUE": task_queue,
            "TSQ_METRICS_PORT": str(port),
        }
        log = tmp_path / "worker.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [TSQ, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        pool = await create_pool(url)
        try:
            domain = new_domain()
            await park(pool, domain, "ACCOUNT_CLOSED", 3)
            client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
            labels = f'command_type="DebitAccount",domain="{domain}",error_code="ACCOUNT_CLOSED"'
            waiting = re.compile(r"tsq_commands_waiting\{[^}]*" + re.escape(labels) + r"[^}]*\} 3")

            async def scraped() -> str:
                try:
                    return await asyncio.to_thread(_scrape, port)
                except OSError:
                    return ""

            text = await assert_eventually(scraped, lambda t: bool(waiting.search(t)), within=60)
            [command_id] = (await client.waiting_ids(domain))[:1]
            await client.operator_cancel(domain, command_id, "metrics")
            text = await assert_eventually(
                scraped,
                lambda t: "tsq_decisions_total{" in t and 'result="carried_out"' in t,
                within=30,
            )
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait, 30)
            await pool.close()
    for name in (
        "tsq_oldest_waiting_seconds{",
        "tsq_discovery_lag_seconds_bucket{",
        "temporal_workflow_task_execution_latency",
        "temporal_request",
    ):
        assert name in text, name
    assert process.returncode == 0, log.read_text()


async def test_groups_say_what_waits_and_how_to_decide_it(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """Waiting commands by error code and type, with counts, newest group first, and the
    options that decide each group."""
    domain = new_domain()
    for _ in range(3):
        await seed_command(pool, domain)
    await seed_command(pool, domain, command_type="Refund")
    groups = await tsq.groups(domain)
    assert [(g.error_code, g.command_type, g.count) for g in groups] == [
        ("ACCOUNT_CLOSED", "Refund", 1),
        ("ACCOUNT_CLOSED", "DebitAccount", 3),
    ]
    assert groups[1].select == "--error-code ACCOUNT_CLOSED --type DebitAccount"
    env = {
        **os.environ,
        "TSQ_DATABASE_URL": settings.database_url or "",
        "TEMPORAL_ADDRESS": settings.temporal_address,
    }
    done = await asyncio.to_thread(
        subprocess.run, [TSQ, "groups", domain], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--error-code ACCOUNT_CLOSED --type DebitAccount" in done.stdout
    assert "4 command(s) in 2 group(s)" in done.stdout
    as_json = await asyncio.to_thread(
        subprocess.run, [TSQ, "groups", domain, "--json"], env=env, capture_output=True, text=True
    )
    assert [g["count"] for g in json.loads(as_json.stdout)] == [1, 3]


async def test_a_digest_of_commands_all_decided_meanwhile_is_not_sent(
    stack: Stack, receiver: Receiver
) -> None:
    """Commands parked and decided before their digest went out: no "3 parked, 0 waiting"."""
    domain = new_domain()
    await park(stack.pool, domain, "GONE_SOON", 3)
    await stack.pool.execute(
        "UPDATE commandbus.command SET status = 'CANCELED' WHERE domain = $1", domain
    )
    notifier = Notifier(stack.pool, _config(receiver))
    await notifier.digest()
    while await notifier.deliver():
        pass
    assert [body for body in receiver.delivered() if body["domain"] == domain] == []
