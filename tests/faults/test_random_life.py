"""An operator's night at random, against the real stack: a few dozen commands under a policy
that escalates, expires and asks approval for completes; a few hundred operator actions from
every entrance (decisions, approvals, claims, notes, snoozes, retries for later, bulk
operations) with lookalike names, while the bus decides some commands itself. Afterwards
every command is decided once, by the fault suite's exactly-once check, and the audit trail
holds what the rules promise.

Seeded: `TSQ_RANDOM_SEED=<n> pytest tests/faults/test_random_life.py` replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError

from tests.faults.figures import Figures
from tests.faults.services import Workers
from tests.faults.support import (
    DECISIONS,
    Seeded,
    handle_of,
    seed,
    verify_exactly_once,
    wait_closed,
    winners,
)
from tests.helpers import new_domain
from tsq.client import TroubleshootingClient
from tsq.contract import operator_key
from tsq.errors import TroubleshootingError

SEED = int(os.environ.get("TSQ_RANDOM_SEED", "20261204"))
COMMANDS = 24
ACTIONS = 240
OPERATORS = ["alice", "bob", "carol", " ALICE ", "bob\u200b", "Carol\u00a0"]
pytestmark = pytest.mark.timeout(240)


class Night:
    """The random operators: each action picks a command and does something to it."""

    def __init__(
        self, rng: random.Random, client: TroubleshootingClient, temporal: Client, seeded: Seeded
    ) -> None:
        self.rng = rng
        self.client = client
        self.temporal = temporal
        self.domain = seeded.domain
        self.ids = seeded.ids
        self.elsewhere: set[uuid.UUID] = set()
        self.tried: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def action(self, db: asyncpg.Pool) -> tuple[str, Awaitable[Any]]:
        rng, client, domain = self.rng, self.client, self.domain
        cid = rng.choice(self.ids)
        who = rng.choice(OPERATORS)
        handle = handle_of(self.temporal, domain, cid)
        kind = rng.choices(
            ["decide", "later", "approve", "reject", "claim", "release", "note", "snooze",
             "signal", "bulk", "bus"],
            weights=[6, 2, 4, 1, 3, 2, 3, 2, 4, 1, 1],
        )[0]  # fmt: skip
        if kind == "decide":
            decision = rng.choice(DECISIONS)
            request = decision.request(who) | ({"force": True} if rng.random() < 0.2 else {})
            if rng.random() < 0.5:
                return kind, handle.execute_update(decision.update, request)
            return kind, decision.sdk(client, domain, cid, request)
        if kind == "later":
            at = datetime.now(UTC) + timedelta(seconds=rng.uniform(1, 4))
            return kind, client.operator_retry(domain, cid, operator=who, not_before=at)
        if kind == "approve":
            return kind, client.approve(domain, cid, operator=who)
        if kind == "reject":
            return kind, client.reject(domain, cid, "not tonight", operator=who)
        if kind == "claim":
            for_ = f"{rng.randint(1, 5)}s"
            return kind, client.claim(
                domain, cid, operator=who, for_=for_, force=rng.random() < 0.3
            )
        if kind == "release":
            return kind, client.release(domain, cid, operator=who, force=rng.random() < 0.3)
        if kind == "note":
            return kind, client.note(
                domain, cid, f"looked at it ({rng.random():.3f})", operator=who
            )
        if kind == "snooze":
            return kind, client.snooze(domain, cid, f"{rng.randint(1, 3)}s", "later", operator=who)
        if kind == "signal":
            name = rng.choice(["cancel", "complete", "approve", "claim", "note", "snooze"])
            payload = {"operator": who, "reason": "by signal", "text": "hi", "for": "2s"}
            payload = {k: v for k, v in payload.items() if rng.random() < 0.7}
            return kind, handle.signal(name, payload)
        if kind == "bulk":
            picked = rng.sample(self.ids, 4)
            return kind, client.start_bulk("cancel", domain, command_ids=picked, operator="gus")
        return kind, self._bus_decides(db, cid)

    async def _bus_decides(self, db: asyncpg.Pool, cid: uuid.UUID) -> None:
        """The bus completes a parked command itself, as another tool would: plain SQL."""
        done = await db.fetchval(
            """
            UPDATE commandbus.command SET status = 'COMPLETED', updated_at = now()
            WHERE domain = $1 AND command_id = $2 AND status = 'IN_TROUBLESHOOTING_QUEUE'
            RETURNING true
            """,
            self.domain,
            cid,
        )
        if done:
            self.elsewhere.add(cid)

    async def run(self, db: asyncpg.Pool) -> None:
        """The actions in waves of ten at once, with time between them for timers to fire."""
        for _ in range(ACTIONS // 10):
            wave = [self.action(db) for _ in range(10)]
            results = await asyncio.gather(*(call for _, call in wave), return_exceptions=True)
            for (kind, _), result in zip(wave, results, strict=True):
                self.tried[kind] += 1
                if isinstance(result, TroubleshootingError | WorkflowUpdateFailedError | RPCError):
                    self.refused[kind] += 1
                elif isinstance(result, BaseException):
                    raise result
            await asyncio.sleep(self.rng.uniform(0, 0.6))

    async def close(self, db: asyncpg.Pool) -> None:
        """Morning: whatever is still parked is decided (claims and proposals end first)."""

        async def one(cid: uuid.UUID) -> None:
            for call in (
                lambda: self.client.reject(self.domain, cid, "morning", operator="closer"),
                lambda: self.client.release(self.domain, cid, operator="closer", force=True),
                lambda: self.client.unschedule(self.domain, cid, operator="closer"),
                lambda: self.client.operator_cancel(
                    self.domain, cid, "morning", operator="closer", force=True
                ),
            ):
                try:
                    await call()
                except (TroubleshootingError, WorkflowUpdateFailedError, RPCError):
                    pass

        async def parked() -> list[uuid.UUID]:
            rows = await db.fetch(
                "SELECT command_id FROM commandbus.command WHERE domain = $1 AND status = $2",
                self.domain,
                "IN_TROUBLESHOOTING_QUEUE",
            )
            return [row["command_id"] for row in rows]

        for _ in range(10):
            left = await parked()
            if not left:
                return
            await asyncio.gather(*(one(cid) for cid in left))
        assert await parked() == [], f"seed {SEED}: still parked in the morning"


async def test_a_random_night_decides_every_command_once(
    db: asyncpg.Pool,
    temporal_client: Client,
    tsq_client: TroubleshootingClient,
    workers: Workers,
    figures: Figures,
) -> None:
    """Random operators, timers of seconds, bulk operations and the bus's own decisions, over
    24 commands: each is decided once (or by the bus, and its workflow says so); every complete
    was approved by someone else; every retry scheduled ended once; no deadline lost."""
    await workers.start("night", env={"TSQ_SWEEP_INTERVAL": "2"})
    seeded = await seed(db, new_domain(), COMMANDS, batch=False)
    await tsq_client.set_policy(
        seeded.domain,
        "night",
        escalate_after="3s",
        expire_after="12s",
        expire_decision="cancel",
        reason="expired overnight",
        require_approval=["complete"],
        approval_expires_after="6s",
        operator="lead",
    )
    await tsq_client.sync(seeded.domain)
    night = Night(random.Random(SEED), tsq_client, temporal_client, seeded)
    await night.run(db)
    await night.close(db)
    figures.fault("random operator actions in a night (all entrances, lookalike names)", ACTIONS)

    by_tsq = [cid for cid in seeded.ids if cid not in night.elsewhere]
    won = await winners(db, seeded.domain)
    assert set(by_tsq) <= set(won), f"seed {SEED}: decided by nobody: {set(by_tsq) - set(won)}"
    await verify_exactly_once(
        db,
        temporal_client,
        {cid: won[cid] for cid in by_tsq},
        Seeded(seeded.domain, by_tsq, None),
        figures,
        later_runs=True,
    )
    ended = await wait_closed(temporal_client, seeded.domain, list(night.elsewhere), 60)
    for cid, outcome in ended.items():
        # Its workflow ends with what it found: nothing carried out (a decision of its own that
        # met the bus's is named, not carried out), the command as the bus left it.
        assert not isinstance(outcome, BaseException), f"seed {SEED}: {cid}: {outcome}"
        assert not outcome.carried_out and outcome.status == "COMPLETED", f"seed {SEED}: {outcome}"
    await _audit_holds_the_promises(db, seeded.domain)
    assert sum(night.tried.values()) == ACTIONS


async def _audit_holds_the_promises(db: asyncpg.Pool, domain: str) -> None:
    rows = await db.fetch(
        """
        SELECT command_id, event_type, details_json AS d FROM commandbus.audit
        WHERE domain = $1 ORDER BY audit_id
        """,
        domain,
    )
    for row in rows:
        if row["event_type"] == "OPERATOR_COMPLETE":
            approver = row["d"].get("approved_by")
            assert approver, f"seed {SEED}: a complete without approval: {row['d']}"
            assert operator_key(approver) != operator_key(row["d"].get("operator"))
    scheduled: Counter[uuid.UUID] = Counter()
    ends: Counter[uuid.UUID] = Counter()
    for row in rows:
        cid, event, d = row["command_id"], row["event_type"], row["d"]
        if event == "TSQ_RETRY_SCHEDULED":
            scheduled[cid] += 1
        elif (
            event == "TSQ_RETRY_UNSCHEDULED"
            or (event == "OPERATOR_RETRY" and d.get("via") == "schedule")
            or (event == "TSQ_DEADLINE_GIVEN_UP" and d.get("deadline") == "retry")
            or (event == "TSQ_PROPOSED" and d.get("via") == "schedule")
        ):
            ends[cid] += 1
    assert scheduled == ends, f"seed {SEED}: retries scheduled {scheduled} ended {ends}"
