"""The operator's night: every state visible, every mistake explained, reading while Temporal is
away. The `tsq` command line as an operator runs it, against the session's services (or
against addresses where nothing, or the wrong thing, listens)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.helpers import (
    TSQ,
    assert_eventually,
    new_domain,
    run_temporal_cli,
    scratch_database,
    seed_command,
    tsq_env,
)
from tsq.client import TroubleshootingClient
from tsq.devstack import TemporalDevServer, free_port
from tsq.errors import PayloadNotFoundError
from tsq.models import StateView
from tsq.settings import Settings


async def _tsq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [TSQ, *args], env=env, capture_output=True, text=True, timeout=90
    )


def _without_temporal(settings: Settings) -> dict[str, str]:
    """The session's database, and a Temporal address where nothing listens."""
    return tsq_env(settings, TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}")


async def _waiting_with_holds(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> tuple[str, dict[str, uuid.UUID]]:
    """A domain with four waiting commands: untouched, claimed by jane, with a cancel proposed
    by alice awaiting approval, and with a retry scheduled by bob."""
    domain = new_domain()
    await tsq.set_policy(domain, "four-eyes", require_approval=["cancel"], operator="lead")
    ids = {name: await seed_command(pool, domain) for name in ("plain", "claimed", "proposed")}
    ids["scheduled"] = await seed_command(pool, domain)
    for cid in ids.values():
        await tsq.start_workflow(domain, cid)
    await tsq.claim(domain, ids["claimed"], operator="jane", for_="1h")
    await tsq.operator_cancel(domain, ids["proposed"], "duplicate", operator="alice")
    at = datetime.now(UTC) + timedelta(hours=2)
    await tsq.operator_retry(domain, ids["scheduled"], operator="bob", not_before=at)
    await assert_eventually(
        lambda: pool.fetchval(
            """
            SELECT (SELECT count(*) FROM tsq.claim WHERE domain = $1)
                + (SELECT count(*) FROM tsq.proposal WHERE domain = $1)
                + (SELECT count(*) FROM tsq.scheduled_retry WHERE domain = $1)
            """,
            domain,
        ),
        lambda n: n == 3,
    )
    return domain, ids


async def test_list_shows_each_commands_state_claim_proposal_and_retry(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq list` says where each command stands: its workflow's state, who claimed it, a
    decision awaiting approval, a retry scheduled; `--json` carries the same."""
    domain, ids = await _waiting_with_holds(tsq, pool)
    query = f'CommandDomain = "{domain}" AND TsqState = "RETRY_SCHEDULED"'
    await assert_eventually(lambda: tsq.temporal.count_workflows(query), lambda n: n.count == 1)
    done = await _tsq(tsq_env(settings), "list", domain, "--json")
    assert done.returncode == 0, done.stderr
    items = {item["command_id"]: item for item in json.loads(done.stdout)}
    claimed, proposed = items[str(ids["claimed"])], items[str(ids["proposed"])]
    scheduled, plain = items[str(ids["scheduled"])], items[str(ids["plain"])]
    assert (plain["state"], plain["claimed_by"], plain["proposal"]) == (
        "AWAITING_OPERATOR",
        None,
        None,
    )
    assert claimed["claimed_by"] == "jane" and claimed["claimed_until"]
    assert proposed["proposal"] == "cancel by alice" and proposed["state"] == "PENDING_APPROVAL"
    assert scheduled["retry_at"] and scheduled["state"] == "RETRY_SCHEDULED"
    table = await _tsq(tsq_env(settings), "list", domain)
    header = table.stdout.splitlines()[0].split()
    assert ["STATE", "CLAIMED", "BY", "PROPOSED", "RETRY", "AT"] == header[-6:]
    assert "PENDING_APPROVAL" in table.stdout and "cancel by alice" in table.stdout


async def test_reading_works_while_temporal_is_away(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """With Temporal unreachable, `list`, `groups`, `audit` and `show` exit 0 with what
    PostgreSQL holds; the workflows' part is shown unknown, saying why; deciding fails in one
    line naming Temporal and its setting."""
    domain, ids = await _waiting_with_holds(tsq, pool)
    env = _without_temporal(settings)
    listed = await _tsq(env, "list", domain)
    assert listed.returncode == 0, listed.stderr
    assert "jane" in listed.stdout and "cancel by alice" in listed.stdout
    assert " ? " in listed.stdout and "refused the connection" in listed.stderr
    groups = await _tsq(env, "groups", domain)
    assert groups.returncode == 0 and "ACCOUNT_CLOSED" in groups.stdout, groups.stderr
    audit = await _tsq(env, "audit", domain, str(ids["proposed"]))
    assert audit.returncode == 0 and "TSQ_PROPOSED" in audit.stdout, audit.stderr
    shown = await _tsq(env, "show", domain, str(ids["claimed"]))
    assert shown.returncode == 0, shown.stderr
    assert "workflow state unknown: Temporal at 127.0.0.1" in shown.stdout
    assert "claimed      by jane until" in shown.stdout
    decided = await _tsq(env, "cancel", domain, str(ids["plain"]), "--reason", "x")
    assert decided.returncode == 1
    [line] = decided.stderr.strip().splitlines()
    assert "Temporal at 127.0.0.1" in line and "TEMPORAL_ADDRESS" in line


async def test_show_says_when_no_workflow_runs_for_a_parked_command(
    tsq: TroubleshootingClient,
    pool: asyncpg.Pool,
    settings: Settings,
    temporal_server: TemporalDevServer,
) -> None:
    """After `temporal workflow terminate`, `show` does not pretend the command waits on a
    workflow: it says none runs, since when, and how one is started again; and it shows the
    policy and deadlines while one does."""
    domain = new_domain()
    await tsq.set_policy(
        domain, "p", escalate_after="1h", expire_after="7d", expire_decision="cancel",
        reason="too old", operator="lead",
    )  # fmt: skip
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    ui = tsq_env(settings, TSQ_WEB_UI_URL="http://ui.example:8233")
    shown = await _tsq(ui, "show", domain, str(command_id))
    assert "policy       p" in shown.stdout and "escalates    at" in shown.stdout
    assert "expires      cancel at" in shown.stdout
    run_id = (await tsq.temporal.get_workflow_handle(wid).describe()).run_id
    assert f"http://ui.example:8233/namespaces/default/workflows/tsq%3A{domain}%3A" in shown.stdout
    assert f"/{run_id}/user-metadata" in shown.stdout
    run_temporal_cli(temporal_server, "workflow", "terminate", "--workflow-id", wid)
    shown = await _tsq(tsq_env(settings), "show", domain, str(command_id))
    assert "no workflow runs for this command: its last run is TERMINATED" in shown.stdout
    assert "tsq sync" in shown.stdout and "AWAITING_OPERATOR" not in shown.stdout


async def test_connection_problems_name_the_service_the_setting_and_the_fix(
    settings: Settings, admin_url: str, temporal_server: TemporalDevServer
) -> None:
    """A port where PostgreSQL does not listen; a database without the bus's tables; a
    PostgreSQL port given as TEMPORAL_ADDRESS: one line each, naming what is wrong, never the
    password."""
    nothing = f"postgresql://tsq:s3cret@127.0.0.1:{free_port()}/bus"
    done = await _tsq(tsq_env(settings, TSQ_DATABASE_URL=nothing), "list", "payments")
    [line] = done.stderr.strip().splitlines()
    assert "PostgreSQL at 127.0.0.1" in line and "refused the connection" in line
    assert "TSQ_DATABASE_URL" in line and "s3cret" not in line
    async with scratch_database(admin_url) as empty:
        done = await _tsq(tsq_env(settings, TSQ_DATABASE_URL=empty), "list", "payments")
    [line] = done.stderr.strip().splitlines()
    assert "has no command bus tables (commandbus.command)" in line and "tsq migrate" in line
    database = urlsplit(settings.database_url or "")
    postgres = f"{database.hostname}:{database.port or 5432}"
    args = ("cancel", "d", str(uuid.uuid4()), "--reason", "r")
    done = await _tsq(tsq_env(settings, TEMPORAL_ADDRESS=postgres), *args)
    [line] = done.stderr.strip().splitlines()
    assert "not as a Temporal frontend" in line and "TEMPORAL_ADDRESS" in line, line


async def test_a_domain_the_bus_never_had_is_called_out(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq list paymnts` says the domain is unknown and suggests `payments`-like ones; `tsq
    policy set` for it is refused unless forced."""
    domain = new_domain()
    await seed_command(pool, domain)
    typo = domain[:-1] + ("x" if domain[-1] != "x" else "y")
    listed = await _tsq(tsq_env(settings), "list", typo)
    assert listed.returncode == 0
    assert f"domain {typo} is unknown" in listed.stderr and domain in listed.stderr
    args: list[Any] = ["policy", "set", typo, "--name", "p", "--escalate-after", "1h"]
    refused = await _tsq(tsq_env(settings), *args)
    assert refused.returncode == 1 and "pass --force" in refused.stderr
    forced = await _tsq(tsq_env(settings), *args, "--force")
    assert forced.returncode == 0, forced.stderr


async def test_each_surface_says_how_to_force_its_own_way(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """A decision on a command jane claimed: the CLI says `--force`, a signal's refusal (what
    the Web UI shows) says `"force": true`."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    wid = await tsq.start_workflow(domain, command_id)
    await tsq.claim(domain, command_id, operator="jane", for_="1h")
    done = await _tsq(tsq_env(settings), "cancel", domain, str(command_id), "--reason", "x")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("pass --force") and '"force"' not in done.stderr
    handle = tsq.temporal.get_workflow_handle(wid)
    await handle.signal("cancel", {"reason": "x", "operator": "bob"})
    state = await assert_eventually(
        lambda: handle.query("state", result_type=StateView), lambda s: s.refused_count == 1
    )
    assert state.refused[0].problem.endswith('add "force": true to the input')


async def test_stopping_a_finished_bulk_operation_records_nothing(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq bulk stop` on an operation that has ended says so and changes nothing."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    op = await tsq.start_bulk("cancel", domain, command_ids=[command_id], reason="r", operator="g")
    finished = await tsq.wait_bulk(op.bulk_id)
    assert finished.status == "finished"
    done = await _tsq(tsq_env(settings), "bulk", "stop", str(op.bulk_id), "--operator", "ann")
    assert done.returncode == 1 and "had already finished" in done.stderr
    assert "nothing recorded" in done.stderr
    after = await tsq.bulk(op.bulk_id)
    assert after.stop_requested_by is None and after.status == "finished"


async def test_output_read_only_in_part_ends_quietly(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """`tsq list ... | head -1`: the reader goes away; tsq exits 0 without a traceback."""
    domain = new_domain()
    for _ in range(3):
        await seed_command(pool, domain)
    process = await asyncio.to_thread(
        subprocess.Popen,
        [TSQ, "list", domain],
        env=tsq_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    code = await asyncio.to_thread(process.wait, 60)
    with process.stderr:
        errors = process.stderr.read().decode()
    assert code == 0 and "Traceback" not in errors and "BrokenPipe" not in errors, errors


async def test_a_note_on_a_decided_command_goes_to_the_audit_trail(
    tsq: TroubleshootingClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    """A post-mortem note, after the decision: kept in the audit trail, from the SDK and the
    CLI alike."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    await tsq.operator_cancel(domain, command_id, "duplicate", operator="ann")
    assert await tsq.note(domain, command_id, "the bank confirmed", operator="ann") is None
    done = await _tsq(tsq_env(settings), "note", domain, str(command_id), "closed the ticket")
    assert done.returncode == 0, done.stderr
    notes = await pool.fetch(
        "SELECT details_json FROM commandbus.audit WHERE command_id = $1 AND event_type = $2",
        command_id,
        "TSQ_NOTE",
    )
    texts = [row["details_json"]["text"] for row in notes]
    assert texts == ["the bank confirmed", "closed the ticket"]
    assert notes[0]["details_json"]["status"] == "CANCELED"


async def test_the_readmes_parking_sql_parks_a_command_that_can_be_retried(
    tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """The README's plain SQL, run as written on a running command, parks it as the bus does:
    its workflow starts (the session's worker, told by `sync`) and a retry sends the message
    again; parked by the status alone, a retry is refused and nothing changes."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    sql = readme.split("### Park a command as the bus does", 1)[1].split("```sql\n", 1)[1]
    sql = sql.split("```", 1)[0]
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="IN_PROGRESS")
    msg_id = await pool.fetchval(
        "SELECT msg_id FROM commandbus.command WHERE command_id = $1", command_id
    )
    script = (
        sql.replace("'payments__commands'", f"'{domain}__commands'")
        .replace("'payments'", f"'{domain}'")
        .replace("<command_id>", str(command_id))
        .replace("<msg_id>", str(msg_id))
    )
    await pool.execute(script)
    await tsq.sync(domain)
    outcome = await tsq.operator_retry(domain, command_id, operator="ann")
    assert outcome is not None and outcome.carried_out and outcome.new_msg_id

    bare = await seed_command(pool, domain, status="IN_PROGRESS")
    await pool.execute(f'DELETE FROM pgmq."q_{domain}__commands"')
    await pool.execute(
        "UPDATE commandbus.command SET status = 'IN_TROUBLESHOOTING_QUEUE' WHERE command_id = $1",
        bare,
    )
    with pytest.raises(PayloadNotFoundError):
        await tsq.operator_retry(domain, bare, operator="ann")
    outcome = await tsq.operator_cancel(domain, bare, "nothing to retry", operator="ann")
    assert outcome is not None and outcome.carried_out
