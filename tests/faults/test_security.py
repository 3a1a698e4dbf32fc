"""Security basics, attacked rather than grepped for.

SQL-looking text in every field a caller or a command bus controls is stored as given and runs
nothing; names that become SQL identifiers are refused before they do; the audit table refuses
changes whoever asks; the database password never shows in logs, search attributes, details or
histories.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client

from tests.faults.figures import Figures
from tests.faults.services import Postgres, Temporal, Workers, tsq_command, worker_env
from tests.faults.support import (
    CANCEL,
    COMPLETE,
    DECISIONS,
    RETRY,
    WORKER_PASSWORD,
    WORKER_ROLE,
    decide_all,
    handle_of,
    seed,
    verify_exactly_once,
)
from tests.helpers import new_domain, seed_command
from tsq.client import TroubleshootingClient
from tsq.db import migrate
from tsq.errors import InvalidInputError, InvalidOperationError
from tsq.models import DecisionOutcome

DROP = "x'); DROP TABLE commandbus.audit; DELETE FROM commandbus.command; --"
TABLES = [
    "commandbus.command",
    "commandbus.audit",
    "commandbus.batch",
    "commandbus.payload_archive",
    "tsq.effect",
    "pgmq.meta",
]


SET_QUEUE = {
    "reply_queue": "UPDATE commandbus.command SET reply_queue = $3 "
    "WHERE domain = $1 AND command_id = $2",
    "queue_name": "UPDATE commandbus.command SET queue_name = $3 "
    "WHERE domain = $1 AND command_id = $2",
}


async def surviving_tables(db: asyncpg.Pool) -> list[str]:
    return [t for t in TABLES if await db.fetchval("SELECT to_regclass($1) IS NOT NULL", t)]


async def test_sql_in_every_field_is_stored_verbatim_and_runs_nothing(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """SQL in requests and in the command's own fields is data: kept as given, nothing runs."""
    await workers.start("worker")
    bystander_domain = new_domain()
    bystander = await seed_command(db, bystander_domain)
    audit_rows_before = await db.fetchval("SELECT count(*) FROM commandbus.audit")
    requests: dict[str, dict[str, Any]] = {
        "cancel": {"reason": DROP, "operator": f"admin{DROP}"},
        "retry": {"operator": DROP},
        "complete": {"result_data": {DROP: DROP, "n": [DROP]}, "operator": DROP},
    }
    for decision in DECISIONS:
        seeded = await seed(db, new_domain(), 1)
        [cid] = seeded.ids
        # What a command bus wrote is attacker-controlled too, and is shown in the UI.
        await db.execute(
            """
            UPDATE commandbus.command
            SET command_type = $3, last_error_code = $3, last_error_msg = $4
            WHERE domain = $1 AND command_id = $2
            """,
            seeded.domain,
            cid,
            DROP,
            f"{DROP} <script>alert(1)</script> [x](javascript:alert(1)) | **bold** |",
        )
        await tsq_client.start_workflow(seeded.domain, cid)
        outcome = await handle_of(temporal_client, seeded.domain, cid).execute_update(
            decision.update, requests[decision.name], result_type=DecisionOutcome
        )
        assert outcome.carried_out
        await verify_exactly_once(db, temporal_client, decision, seeded, figures)
        [details] = await db.fetch(
            """
            SELECT details_json FROM commandbus.audit
            WHERE domain = $1 AND command_id = $2 AND event_type = $3
            """,
            seeded.domain,
            cid,
            decision.audit_event,
        )
        for key, value in requests[decision.name].items():
            assert details["details_json"][key] == value
        if decision is not RETRY:
            [reply] = await db.fetch(
                "SELECT message FROM pgmq.read($1::text, 0, 10)", f"{seeded.domain}__replies"
            )
            assert reply["message"]["type"] == f"{DROP}Response"

    assert await surviving_tables(db) == TABLES
    assert await db.fetchval("SELECT count(*) FROM commandbus.audit") > audit_rows_before
    assert (
        await db.fetchval(
            "SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2",
            bystander_domain,
            bystander,
        )
        == "IN_TROUBLESHOOTING_QUEUE"
    )


@pytest.mark.parametrize(
    ("column", "name", "decision", "error"),
    [
        ("reply_queue", "r; DROP TABLE commandbus.audit; --", CANCEL, InvalidInputError),
        ("reply_queue", 'r"; DROP TABLE tsq.effect; --', COMPLETE, InvalidInputError),
        ("queue_name", "q; DROP TABLE commandbus.audit; --", RETRY, InvalidOperationError),
    ],
    ids=["cancel-reply-queue", "complete-reply-queue", "retry-command-queue"],
)
async def test_queue_names_are_refused_before_they_become_identifiers(
    column: str,
    name: str,
    decision: Any,
    error: type[Exception],
    db: asyncpg.Pool,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """A PGMQ queue name that is not a plain identifier is refused; no table appears or goes."""
    figures.input_tried("sdk", refused=True)
    await workers.start("worker")
    seeded = await seed(db, new_domain(), 1, batch=False)
    [cid] = seeded.ids
    await db.execute(SET_QUEUE[column], seeded.domain, cid, name)
    tables = await db.fetchval("SELECT count(*) FROM pg_tables")
    queues = await db.fetchval("SELECT count(*) FROM pgmq.meta")
    with pytest.raises(error):
        await decision.sdk(tsq_client, seeded.domain, cid, decision.request("attacker"))
    assert await db.fetchval("SELECT count(*) FROM pg_tables") == tables
    assert await db.fetchval("SELECT count(*) FROM pgmq.meta") == queues
    assert await surviving_tables(db) == TABLES
    status = await db.fetchval(
        "SELECT status FROM commandbus.command WHERE domain = $1 AND command_id = $2",
        seeded.domain,
        cid,
    )
    assert status == "IN_TROUBLESHOOTING_QUEUE"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE commandbus.audit SET details_json = '{}' WHERE domain = $1",
        "UPDATE commandbus.audit SET event_type = 'OPERATOR_CANCEL' WHERE false AND domain = $1",
        "DELETE FROM commandbus.audit WHERE domain = $1",
        "DELETE FROM commandbus.audit WHERE false AND domain = $1",
    ],
    ids=["update", "update-no-row", "delete", "delete-no-row"],
)
@pytest.mark.parametrize("role", ["worker", "superuser"])
async def test_audit_table_refuses_update_and_delete(
    statement: str, role: str, db: asyncpg.Pool, worker_db_url: str
) -> None:
    """UPDATE and DELETE on the audit table fail for every role, even matching no row."""
    domain = new_domain()
    command_id = await seed_command(db, domain)
    await db.execute(
        """
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES ($1, $2, 'MOVED_TO_TSQ', $3)
        """,
        domain,
        command_id,
        {"attempt": 3},
    )
    conn = await asyncpg.connect(worker_db_url) if role == "worker" else await db.acquire()
    try:
        # The worker role has no right to change the table; the trigger stops everyone else.
        refusal = "permission denied" if role == "worker" else "append-only"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=refusal):
            await conn.execute(statement, domain)
    finally:
        if role == "worker":
            await conn.close()
        else:
            await db.release(conn)
    rows = await db.fetch(
        "SELECT event_type, details_json FROM commandbus.audit WHERE domain = $1", domain
    )
    assert [(r["event_type"], r["details_json"]) for r in rows] == [
        ("MOVED_TO_TSQ", {"attempt": 3})
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE commandbus.audit DISABLE TRIGGER tsq_audit_append_only",
        "ALTER TABLE commandbus.audit DISABLE TRIGGER ALL",
        "SET session_replication_role = replica",
        "TRUNCATE commandbus.audit",
        "DROP TABLE commandbus.audit",
        "ALTER TABLE commandbus.audit OWNER TO CURRENT_USER",
    ],
    ids=[
        "disable-guard",
        "disable-triggers",
        "replication-role",
        "truncate",
        "drop",
        "own",
    ],
)
async def test_worker_role_cannot_get_round_the_append_only_audit(
    statement: str, worker_db_url: str, figures: Figures
) -> None:
    """The role tsq runs as owns nothing and is no superuser: it cannot switch the guard off,
    skip triggers, take the table or grant itself more."""
    figures.fault("privileges: audit tampering tried as the worker role")
    conn = await asyncpg.connect(worker_db_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        # Granting itself more only warns that nothing was granted.
        await conn.execute("GRANT UPDATE, DELETE ON commandbus.audit TO CURRENT_USER")
        assert not await conn.fetchval(
            "SELECT has_table_privilege('commandbus.audit', 'UPDATE, DELETE, TRUNCATE')"
        )
    finally:
        await conn.close()


async def test_migrate_as_the_worker_role_checks_and_changes_nothing(
    worker_db_url: str, postgres: Postgres, db: asyncpg.Pool
) -> None:
    """`tsq migrate` as the worker role succeeds when nothing is missing (no DDL at all), and
    says what is missing, and who may add it, when something is."""
    up_to_date = await migrate(worker_db_url)
    assert up_to_date.applied == []
    env = {**os.environ, "TSQ_DATABASE_URL": worker_db_url}
    done = await asyncio.create_subprocess_exec(
        *tsq_command(), "migrate", "--skip-temporal", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await done.communicate()
    assert done.returncode == 0 and "up to date" in out.decode()

    # A database tsq has not migrated yet: the worker role may not create the schema.
    admin = await asyncpg.connect(postgres.url("postgres"))
    name = f"tsq_new_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        fresh = worker_db_url.rsplit("/", 1)[0] + f"/{name}"
        with pytest.raises(InvalidOperationError, match="run `tsq migrate` as the owner"):
            await migrate(fresh)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_audit_table_refuses_truncate_and_migrations_keep_one_guard(
    db: asyncpg.Pool, admin_db_url: str
) -> None:
    """TRUNCATE fails too; migrating again (also concurrently) keeps exactly one guard."""
    before = await db.fetchval("SELECT count(*) FROM commandbus.audit")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("TRUNCATE commandbus.audit")
    await asyncio.gather(migrate(admin_db_url), migrate(admin_db_url))
    guards = await db.fetchval(
        """
        SELECT count(*) FROM pg_trigger
        WHERE tgrelid = 'commandbus.audit'::regclass AND tgname = 'tsq_audit_append_only'
        """
    )
    assert guards == 1
    assert await db.fetchval("SELECT count(*) FROM commandbus.audit") >= before


async def test_no_password_in_logs_search_attributes_details_or_histories(
    db: asyncpg.Pool,
    postgres: Postgres,
    temporal_dev: Temporal,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    worker_db_url: str,
    figures: Figures,
) -> None:
    """The database password appears nowhere: not even when connections fail."""
    worker = await workers.start("secret-keeper")
    seeded = await seed(db, new_domain(), 3)
    for decision, cid in zip(DECISIONS, seeded.ids, strict=True):
        await decide_all(decision, tsq_client, temporal_client, seeded, [cid], ("update",))
    # A refused signal, and connections cut under the worker, so there is something to log.
    broken = await seed(db, new_domain(), 1, batch=False)
    await tsq_client.start_workflow(broken.domain, broken.ids[0])
    await handle_of(temporal_client, broken.domain, broken.ids[0]).signal("cancel", {"x": 1})
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", WORKER_ROLE
    )
    await handle_of(temporal_client, broken.domain, broken.ids[0]).signal(
        "cancel", {"reason": "after the cut"}
    )
    workflows = [(seeded.domain, cid) for cid in seeded.ids] + [(broken.domain, broken.ids[0])]
    for domain, cid in workflows:
        await handle_of(temporal_client, domain, cid).result()

    places: dict[str, str] = {"worker log": worker.output()}
    for domain, cid in workflows:
        handle = handle_of(temporal_client, domain, cid)
        description = await handle.describe()
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        places[f"{cid} search attributes"] = repr(description.typed_search_attributes)
        places[f"{cid} summary"] = str(await description.static_summary())
        places[f"{cid} details"] = metadata.current_details
        places[f"{cid} history"] = (await handle.fetch_history()).to_json()
    # The CLI, told a wrong database, says so without repeating the URL.
    env = worker_env(worker_db_url, temporal_dev, "unused")
    for url in (
        worker_db_url.replace(f":{postgres.port}/", ":1/"),
        worker_db_url.rsplit("/", 1)[0] + "/no_such_database",
    ):
        env["TSQ_DATABASE_URL"] = url
        process = await asyncio.create_subprocess_exec(
            *tsq_command(),
            "cancel",
            seeded.domain,
            str(uuid.uuid4()),
            "--reason",
            "r",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 1
        places[f"cli with {url.rsplit('@', 1)[-1]}"] = (out + err).decode(errors="replace")

    leaked = [where for where, text in places.items() if WORKER_PASSWORD in text]
    figures.secrets_leaked += len(leaked)
    assert not leaked, leaked
