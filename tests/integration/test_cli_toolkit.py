"""The operator toolkit on the command line: retry, complete, list, show, audit, bulk decisions."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.helpers import (
    audit_rows,
    new_domain,
    replies_for,
    run_tsq,
    seed_command,
    seed_many,
    status_of,
)
from tsq import TroubleshootingClient
from tsq.settings import Settings
from tsq.views import AuditEvent, CommandDetails, TroubleshootingItem

_tsq = run_tsq


def _one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tsq {command}: "), done.stderr
    return lines[0]


async def _set_parked(
    pool: asyncpg.Pool, domain: str, command_id: uuid.UUID, *, at: datetime, code: str
) -> None:
    await pool.execute(
        """
        UPDATE commandbus.command SET updated_at = $3, last_error_code = $4
        WHERE domain = $1 AND command_id = $2
        """,
        domain,
        command_id,
        at,
        code,
    )


async def test_retry_resends_the_archived_message_and_sets_pending(
    settings: Settings, worker: object, pool: asyncpg.Pool
) -> None:
    """`tsq retry` puts the command PENDING and re-sends the archived original to its queue."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    queue = f"{domain}__commands"
    old_msg_id = await pool.fetchval(
        "SELECT msg_id FROM commandbus.command WHERE domain = $1 AND command_id = $2",
        domain,
        command_id,
    )
    original = await pool.fetchval(
        "SELECT tsq.archived_message($1, $2, $3)", queue, old_msg_id, command_id
    )
    assert original is not None and original["command_id"] == str(command_id)

    done = await _tsq(settings, "retry", domain, str(command_id), "--operator", "ops", "--json")

    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["carried_out"] and outcome["status"] == "PENDING"
    assert await status_of(pool, domain, command_id) == "PENDING"
    assert await replies_for(pool, queue, command_id) == [original]
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_RETRY")
    assert audit["details_json"]["operator"] == "ops"
    assert audit["details_json"]["new_msg_id"] == outcome["new_msg_id"] != old_msg_id


async def test_complete_with_result_data_sends_success_reply(
    settings: Settings, worker: object, pool: asyncpg.Pool
) -> None:
    """`tsq complete --result-data JSON` completes the command; the SUCCESS reply carries it."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    data = {"ref": "R-1", "amount": 5, "nested": {"ok": True}}

    done = await _tsq(
        settings, "complete", domain, str(command_id), "--result-data", json.dumps(data)
    )

    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout
    assert await status_of(pool, domain, command_id) == "COMPLETED"
    [reply] = await replies_for(pool, f"{domain}__replies", command_id)
    assert reply["outcome"] == "SUCCESS" and reply["data"] == data
    [audit] = await audit_rows(pool, domain, command_id, "OPERATOR_COMPLETE")
    assert audit["details_json"]["result_data"] == data


@pytest.mark.parametrize(
    ("result_data", "message"),
    [("{oops", "not valid JSON"), ("[1, 2]", "JSON object or null")],
)
async def test_complete_with_bad_result_data_exits_one(
    settings: Settings, pool: asyncpg.Pool, result_data: str, message: str
) -> None:
    """`--result-data` that is not a JSON object or null: one line, exit 1, nothing changed."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    done = await _tsq(settings, "complete", domain, str(command_id), "--result-data", result_data)
    assert message in _one_error_line(done, "complete")
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_list_json_filters_and_pages(settings: Settings, pool: asyncpg.Pool) -> None:
    """`tsq list --json` is newest first; type, error code, since/until, limit/offset all work."""
    domain = new_domain()
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    seeded: list[uuid.UUID] = []
    for i in range(5):
        command_id = await seed_command(
            pool, domain, command_type="CreditAccount" if i % 2 else "DebitAccount"
        )
        await _set_parked(
            pool,
            domain,
            command_id,
            at=start + timedelta(minutes=i),
            code="LIMIT" if i >= 3 else "ACCOUNT_CLOSED",
        )
        seeded.append(command_id)
    newest_first = seeded[::-1]

    async def ids(*args: str) -> list[uuid.UUID]:
        done = await _tsq(settings, "list", domain, "--json", *args)
        assert done.returncode == 0, done.stderr
        items = [TroubleshootingItem.model_validate(raw) for raw in json.loads(done.stdout)]
        return [item.command_id for item in items]

    assert await ids() == newest_first
    assert await ids("--type", "CreditAccount") == [seeded[3], seeded[1]]
    assert await ids("--error-code", "LIMIT") == [seeded[4], seeded[3]]
    window = ("--since", "2024-05-01T12:02:00Z", "--until", "2024-05-01T12:04:00+00:00")
    assert await ids(*window) == [seeded[3], seeded[2]]
    pages = [await ids("--limit", "2", "--offset", str(offset)) for offset in (0, 2, 4)]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]

    table = await _tsq(settings, "list", domain, "--limit", "2")
    assert table.returncode == 0, table.stderr
    assert "COMMAND_ID" in table.stdout and str(seeded[4]) in table.stdout
    assert "more may follow: --offset 2" in table.stdout


async def test_list_with_bad_time_exits_one(settings: Settings) -> None:
    """`--since` that is not an ISO time: one line, exit 1."""
    done = await _tsq(settings, "list", new_domain(), "--since", "yesterday")
    assert "ISO 8601" in _one_error_line(done, "list")


async def test_show_and_audit_json_hold_the_trail(
    settings: Settings, tsq: TroubleshootingClient, pool: asyncpg.Pool
) -> None:
    """`tsq show --json` and `tsq audit --json` parse and hold MOVED_TO_TSQ then OPERATOR_CANCEL."""
    domain = new_domain()
    command_id = await seed_command(pool, domain, status="PENDING")
    await tsq.move_to_troubleshooting(
        domain, command_id, error_type="PERMANENT", error_code="ACCOUNT_CLOSED"
    )
    canceled = await _tsq(
        settings, "cancel", domain, str(command_id), "--reason", "closed", "--operator", "jane"
    )
    assert canceled.returncode == 0, canceled.stderr

    shown = await _tsq(settings, "show", domain, str(command_id), "--json")
    assert shown.returncode == 0, shown.stderr
    details = CommandDetails.model_validate_json(shown.stdout)
    assert details.command.status == "CANCELED"
    assert details.command.payload is not None
    assert details.command.payload["command_id"] == str(command_id)
    assert details.workflow is not None and details.workflow.state == "CANCELED"
    assert [e.event_type for e in details.audit] == ["MOVED_TO_TSQ", "OPERATOR_CANCEL"]

    audited = await _tsq(settings, "audit", domain, str(command_id), "--json")
    assert audited.returncode == 0, audited.stderr
    events = [AuditEvent.model_validate(raw) for raw in json.loads(audited.stdout)]
    assert events == details.audit
    assert events[1].details is not None and events[1].details["operator"] == "jane"

    table = await _tsq(settings, "audit", domain, str(command_id))
    assert table.returncode == 0, table.stderr
    assert "OPERATOR_CANCEL" in table.stdout and "operator=jane" in table.stdout
    text = await _tsq(settings, "show", domain, str(command_id))
    assert text.returncode == 0, text.stderr
    assert f"workflow {details.workflow_id}" in text.stdout and "CANCELED" in text.stdout


async def test_bulk_cancel_by_error_code_cancels_exactly_the_matches(
    settings: Settings, worker: object, pool: asyncpg.Pool
) -> None:
    """`tsq cancel DOMAIN --error-code C --yes` cancels the matching commands and no other."""
    domain = new_domain()
    matching = [await seed_command(pool, domain) for _ in range(3)]
    others = [await seed_command(pool, domain) for _ in range(2)]
    for command_id in others:
        await _set_parked(pool, domain, command_id, at=datetime.now(UTC), code="LIMIT")

    done = await _tsq(
        settings,
        *("cancel", domain, "--error-code", "ACCOUNT_CLOSED", "--reason", "bulk", "--yes"),
        "--json",
    )

    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert sorted(r["command_id"] for r in results) == sorted(str(c) for c in matching)
    assert {r["result"] for r in results} == {"carried_out"}
    assert "carried out" in done.stderr
    for command_id in matching:
        assert await status_of(pool, domain, command_id) == "CANCELED"
    for command_id in others:
        assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
        assert await audit_rows(pool, domain, command_id) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--error-code", "ACCOUNT_CLOSED"], "pass --yes"),
        (["--stdin"], "pass --yes"),
        (["--yes"], "pass --all"),
    ],
    ids=["no-tty", "stdin-without-yes", "no-filter"],
)
async def test_bulk_refusal_changes_nothing(
    settings: Settings, worker: object, pool: asyncpg.Pool, args: list[str], message: str
) -> None:
    """A bulk call that cannot be confirmed, or selects nothing on purpose, exits 1 untouched."""
    domain = new_domain()
    seeded = [await seed_command(pool, domain) for _ in range(2)]

    done = await _tsq(
        settings,
        *("cancel", domain, "--reason", "bulk", *args),
        stdin="\n".join(str(c) for c in seeded),
    )

    assert message in _one_error_line(done, "cancel")
    for command_id in seeded:
        assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"
        assert await audit_rows(pool, domain, command_id) == []


@pytest.mark.timeout(180)
async def test_bulk_cancel_of_500_commands(
    settings: Settings, worker: object, pool: asyncpg.Pool
) -> None:
    """A bulk cancel of 500 commands ends with 500 CANCELED, 500 replies and 500 audit rows."""
    domain = new_domain()
    seeded = await seed_many(pool, domain, 500)

    done = await _tsq(
        settings,
        *("cancel", domain, "--all", "--reason", "incident", "--yes", "--json"),
        *("--rate", "200", "--concurrency", "20"),
        deadline=170,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert len(results) == 500 and {r["result"] for r in results} == {"carried_out"}
    counts: dict[str, Any] = dict(
        await pool.fetchrow(
            """
            SELECT count(*) FILTER (WHERE status = 'CANCELED') AS canceled,
                   (SELECT count(*) FROM commandbus.audit a
                    WHERE a.domain = $1 AND a.event_type = 'OPERATOR_CANCEL') AS audits,
                   (SELECT count(DISTINCT a.command_id) FROM commandbus.audit a
                    WHERE a.domain = $1 AND a.event_type = 'OPERATOR_CANCEL') AS audited
            FROM commandbus.command WHERE domain = $1
            """,
            domain,
        )
    )
    assert counts == {"canceled": 500, "audits": 500, "audited": 500}
    replies = await pool.fetch(
        "SELECT message FROM pgmq.read($1::text, 0, 1000)", f"{domain}__replies"
    )
    assert sorted(r["message"]["command_id"] for r in replies) == sorted(str(c) for c in seeded)
    assert {r["message"]["outcome"] for r in replies} == {"CANCELED"}


async def test_selection_of_all_misses_none_while_others_decide(
    pool: asyncpg.Pool, tsq: TroubleshootingClient
) -> None:
    """The ids of `--all` come from one snapshot: commands decided by others meanwhile cannot
    shift a page and hide commands that are still waiting."""
    domain = new_domain()
    ids = await seed_many(pool, domain, 2500)
    newest = ids[-600:]

    async def others_decide() -> None:
        for command_id in newest:
            await pool.execute(
                "UPDATE commandbus.command SET status = 'CANCELED' WHERE command_id = $1",
                command_id,
            )

    selected, _ = await asyncio.gather(tsq.waiting_ids(domain), others_decide())
    still_waiting = {
        row["command_id"]
        for row in await pool.fetch(
            "SELECT command_id FROM commandbus.command WHERE domain = $1 AND status = $2",
            domain,
            "IN_TROUBLESHOOTING_QUEUE",
        )
    }
    assert still_waiting <= set(selected)


async def test_policy_commands_set_list_show_delete(settings: Settings, pool: asyncpg.Pool) -> None:
    """`tsq policy set|list|show|delete`: the example of the README, as JSON and as text."""
    domain = new_domain()
    await seed_command(pool, domain)
    done = await _tsq(
        settings,
        *("policy", "set", domain, "--name", "slow-ledger", "--error-code", "LEDGER_TIMEOUT"),
        *("--escalate-after", "1h", "--expire-after", "7d", "--expire-decision", "cancel"),
        *("--reason", "ledger never answered", "--json"),
    )
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    assert (policy["escalate_after"], policy["expire_after"]) == ("PT1H", "P7D")
    listed = await _tsq(settings, "policy", "list", domain)
    assert "slow-ledger" in listed.stdout and "LEDGER_TIMEOUT" in listed.stdout
    shown = await _tsq(settings, "policy", "show", domain, "slow-ledger")
    assert "after 1h" in shown.stdout and "cancel: ledger never answered" in shown.stdout
    assert (await _tsq(settings, "policy", "delete", domain, "slow-ledger")).returncode == 0
    gone = await _tsq(settings, "policy", "show", domain, "slow-ledger")
    assert "no policy named 'slow-ledger'" in _one_error_line(gone, "policy")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--escalate-after", "0s"), "longer than zero"),
        (("--escalate-after", "11y"), "not a duration"),
        (("--expire-after", "1h", "--expire-decision", "cancel"), "--reason"),
        (("--expire-after", "1h"), "go together"),
    ],
)
async def test_bad_policy_exits_one_naming_the_option(
    settings: Settings, args: tuple[str, ...], problem: str
) -> None:
    """A bad policy: one line naming what is wrong, exit 1, nothing stored."""
    domain = new_domain()
    done = await _tsq(settings, "policy", "set", domain, "--name", "p", *args)
    assert problem in _one_error_line(done, "policy")
    assert "no policy" in (await _tsq(settings, "policy", "list", domain)).stdout


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        (("--at", "2026-12-02T06:00"), "no time zone"),
        (("--at", "2020-01-01T00:00Z"), "in the past"),
        (("--at", "tomorrow"), "not an ISO 8601 time"),
        (("--in", "soon"), "not a duration"),
    ],
)
async def test_retry_at_a_bad_time_is_refused(
    settings: Settings, pool: asyncpg.Pool, when: tuple[str, ...], problem: str
) -> None:
    """`--at` without a zone (refused, not guessed), in the past, or unreadable: exit 1."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    done = await _tsq(settings, "retry", domain, str(command_id), *when)
    assert problem in _one_error_line(done, "retry")
    assert await status_of(pool, domain, command_id) == "IN_TROUBLESHOOTING_QUEUE"


async def test_retry_in_schedules_and_unschedule_drops_it(
    settings: Settings, pool: asyncpg.Pool, tsq: TroubleshootingClient
) -> None:
    """`retry --in 1h` schedules; `unschedule` drops it; the command waits again."""
    domain = new_domain()
    command_id = await seed_command(pool, domain)
    done = await _tsq(settings, "retry", domain, str(command_id), "--in", "1h")
    assert done.returncode == 0, done.stderr
    assert "retry scheduled for" in done.stdout
    dropped = await _tsq(settings, "unschedule", domain, str(command_id), "--reason", "no")
    assert dropped.returncode == 0, dropped.stderr
    events = [e.event_type for e in await tsq.get_audit_trail(domain, command_id)]
    assert events == ["TSQ_RETRY_SCHEDULED", "TSQ_RETRY_UNSCHEDULED"]


async def test_snooze_command_pushes_the_deadlines(
    settings: Settings, pool: asyncpg.Pool, tsq: TroubleshootingClient
) -> None:
    """`tsq snooze DOMAIN ID --for 2h --reason R` prints the new deadlines."""
    domain = new_domain()
    await tsq.set_policy(domain, "p", escalate_after="1h")
    command_id = await seed_command(pool, domain)
    done = await _tsq(
        settings, "snooze", domain, str(command_id), "--for", "2h", "--reason", "later"
    )
    assert done.returncode == 0, done.stderr
    assert "snoozed for 2h; escalates at" in done.stdout
