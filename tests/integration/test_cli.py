"""The `tsq` command line as an operator runs it: exit codes and one-line errors."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from tests.helpers import TSQ, audit_rows, new_domain, seed_command, status_of, tsq_env
from tsq import InvalidInputError, TroubleshootingClient
from tsq.settings import Settings

_env = tsq_env


async def _tsq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [TSQ, *args], env=env, capture_output=True, text=True, timeout=90
    )


async def test_cancel_command_exits_zero_and_cancels(
    settings: Settings, tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`tsq cancel DOMAIN ID --reason R --operator O` carries the decision out and exits 0."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    done = await _tsq(
        _env(settings),
        "cancel",
        domain,
        str(command_id),
        "--reason",
        "Invalid account",
        "--operator",
        "jane@example.com",
    )
    assert done.returncode == 0, done.stderr
    assert "canceled" in done.stdout
    assert await status_of(pool, domain, command_id) == "CANCELED"
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_CANCEL")
    assert audit["details_json"]["operator"] == "jane@example.com"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cancel", "payments", str(uuid.UUID(int=7)), "--reason", "x"], "not found"),
        (["cancel", "payments", "not-a-uuid", "--reason", "x"], "is not a UUID"),
        (["cancel", "payments", str(uuid.UUID(int=7)), "--reason", "  "], "must not be blank"),
        (["cancel", "bad domain!", str(uuid.UUID(int=7)), "--reason", "x"], "domain"),
    ],
)
async def test_cancel_failure_exits_one_with_one_line(
    settings: Settings, worker: object, args: list[str], message: str
) -> None:
    """Refusals exit 1 with a single line on stderr that says what was wrong."""
    done = await _tsq(_env(settings), *args)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert lines[0].startswith("tsq cancel: ")


async def test_cancel_of_pending_command_exits_one(
    settings: Settings, worker: object, pool: asyncpg.Pool
) -> None:
    """A command not in the troubleshooting queue: exit 1, status untouched."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="PENDING")
    done = await _tsq(_env(settings), "cancel", domain, str(command_id), "--reason", "x")
    assert done.returncode == 1 and "PENDING" in done.stderr
    assert await status_of(pool, domain, command_id) == "PENDING"


async def test_cancel_without_reason_is_a_usage_error(settings: Settings) -> None:
    """`--reason` is required: exit 2 with argparse's usage message."""
    done = await _tsq(_env(settings), "cancel", "payments", str(uuid.uuid4()))
    assert done.returncode == 2 and "--reason" in done.stderr


async def test_missing_database_setting_exits_one(settings: Settings) -> None:
    """Without TSQ_DATABASE_URL the command says how to fix it."""
    env = _env(settings)
    del env["TSQ_DATABASE_URL"]
    done = await _tsq(env, "sync")
    assert done.returncode == 1 and "TSQ_DATABASE_URL" in done.stderr


async def test_migrate_and_sync_exit_zero(settings: Settings, pool: asyncpg.Pool) -> None:
    """`tsq migrate` (again) and `tsq sync DOMAIN` succeed on a migrated database."""
    migrated = await _tsq(_env(settings), "migrate")
    assert migrated.returncode == 0, migrated.stderr
    domain = new_domain()
    await seed_command(pool, domain)
    synced = await _tsq(_env(settings), "sync", domain)
    assert synced.returncode == 0, synced.stderr
    assert "started 1 workflow(s)" in synced.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_worker_process_decides_then_stops_cleanly(
    settings: Settings,
    pool: asyncpg.Pool,
    temporal: Client,
    signum: int,
    tmp_path: Path,
) -> None:
    """`tsq worker` carries out decisions, logs a refused one in one line (no traceback), and
    on SIGTERM/SIGINT exits 0."""
    task_queue = f"tsq-cli-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [TSQ, "worker"],
            env=_env(settings, TSQ_TASK_QUEUE=task_queue),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        domain = new_domain()
        command_id = await seed_command(pool, domain)
        client = TroubleshootingClient(temporal, pool, task_queue=task_queue)
        outcome = await asyncio.wait_for(
            client.operator_cancel(domain, command_id, "Invalid account"), timeout=60
        )
        assert outcome is not None and outcome.carried_out
        unsendable = await seed_command(pool, domain, reply_queue="no such queue!")
        with pytest.raises(InvalidInputError):
            await asyncio.wait_for(client.operator_cancel(domain, unsendable, "x"), timeout=60)
        process.send_signal(signum)
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert code == 0, output
    assert "Fatal Python error" not in output
    [refused] = [line for line in output.splitlines() if "refused" in line]
    assert f"cancel of command {unsendable} refused" in refused
    assert "Traceback" not in output, output
