"""Operators are told: digests of commands arriving in the troubleshooting queue, and of
commands escalated by their policy (the same way: per domain, error code and window).

When commands of a domain arrive with an error code, a message goes out at once, and then at
most one per window for that domain and error code, counting what arrived meanwhile: an
incident that parks 5,000 commands sends a few messages, not 5,000. Each message is an HTTP
POST of JSON to `TSQ_NOTIFY_URL`; its `text` reads as it is in a Slack or Mattermost incoming
webhook, and the other fields carry the same facts for a program.

Messages are rows in `tsq.notice`, written in the transaction that counted them, and sent
from there: retried with backoff, with the same idempotency key each time (header
`Idempotency-Key` and field `idempotency_key`), so a receiver can drop a redelivery. A
receiver that fails, hangs or refuses holds up nothing but its own messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg

from tsq import store
from tsq.durations import format_duration, parse_duration
from tsq.errors import InvalidInputError
from tsq.metrics import WatcherMetrics
from tsq.render import one_line

log = logging.getLogger(__name__)

DEFAULT_WINDOW = timedelta(minutes=5)
TIMEOUT_S = 10.0
MAX_ATTEMPTS = 12  # about an hour of backoff, then the message is given up (and logged)
TICK_S = 1.0


@dataclass(frozen=True)
class NotifyConfig:
    """Where messages go and how often; from `TSQ_NOTIFY_URL`, `TSQ_NOTIFY_WINDOW` and
    `TSQ_WEB_UI_URL` (the Temporal Web UI, for links to the filtered list)."""

    url: str
    window: timedelta = DEFAULT_WINDOW
    web_ui_url: str | None = None
    namespace: str = "default"
    timeout_s: float = TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, namespace: str) -> NotifyConfig | None:
        url = env.get("TSQ_NOTIFY_URL")
        if not url:
            return None
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"TSQ_NOTIFY_URL {url!r} is not an http(s) URL")
        window = env.get("TSQ_NOTIFY_WINDOW")
        return cls(
            url=url,
            window=parse_duration(window, "TSQ_NOTIFY_WINDOW") if window else DEFAULT_WINDOW,
            web_ui_url=(env.get("TSQ_WEB_UI_URL") or "").rstrip("/") or None,
            namespace=namespace,
        )

    def link(self, query: str) -> str | None:
        """The Web UI's workflow list filtered by `query`."""
        if self.web_ui_url is None:
            return None
        return f"{self.web_ui_url}/namespaces/{self.namespace}/workflows?query={quote(query)}"


def digest_message(
    config: NotifyConfig, group: asyncpg.Record, now: datetime
) -> tuple[str, dict[str, Any]]:
    """The idempotency key and body of one digest: arrivals, or escalations (commands left
    undecided past their policy's `escalate_after`)."""
    kind, domain, code = group["kind"], group["domain"], group["error_code"]
    oldest = now - group["oldest"] if group["oldest"] is not None else timedelta(0)
    query = f'CommandDomain="{domain}" AND TsqState="AWAITING_OPERATOR"'
    if code:
        query += f' AND LastErrorCode="{code}"'
    url = config.link(query)
    arrived = group["arrived"]
    what = "parked" if kind == "arrivals" else "escalated, undecided past their policy"
    text = (
        f"{domain}: {arrived} command{'s' if arrived != 1 else ''} {what}"
        + (f" with {code}" if code else "")
        + (f" in the last {format_duration(config.window)}" if group["repeat"] else "")
        + f"; {group['waiting']} waiting, the oldest for {format_duration(oldest)}."
        + (f" Decide: {url}" if url else "")
    )
    key = f"tsq:{kind}:{domain}:{code}:{group['sent_at'].isoformat()}"
    return key, {
        "text": text,
        "kind": kind,
        "domain": domain,
        "error_code": code or None,
        "arrived": arrived,
        "waiting": group["waiting"],
        "oldest_age_s": int(oldest.total_seconds()),
        "window_s": int(config.window.total_seconds()),
        "url": url,
        "idempotency_key": key,
        "at": now.isoformat(),
    }


class Notifier:
    """Counts arrivals into digests and delivers them, until `stop` is set."""

    def __init__(
        self, pool: asyncpg.Pool, config: NotifyConfig, metrics: WatcherMetrics | None = None
    ) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.digest()
                while await self.deliver():
                    pass
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
                log.warning("notifier: %s; retrying", one_line(err))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def digest(self) -> int:
        """Count new arrivals; write a message for each group whose window allows one now."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.notify_lock(conn):
                return 0  # another worker is at it
            await store.count_arrivals(conn)
            due = await store.due_notices(conn, self.config.window)
            now = datetime.now(UTC)
            for group in due:
                if group["waiting"] == 0:
                    # Every command of it was decided meanwhile: nothing to tell anyone.
                    continue
                key, body = digest_message(self.config, group, now)
                await store.add_notice(conn, key, body)
        return len(due)

    async def deliver(self) -> int:
        """Send a batch of the messages due; returns how many were tried."""
        notices = await store.claim_notices(self.pool, lease_s=self.config.timeout_s + 5)
        await asyncio.gather(*(self._send(notice) for notice in notices))
        return len(notices)

    async def _send(self, notice: asyncpg.Record) -> None:
        try:
            await asyncio.to_thread(self._post, notice["idempotency_key"], notice["body"])
        except (OSError, urllib.error.URLError, TimeoutError, ValueError) as err:
            problem = one_line(err)
            gave_up = notice["attempts"] >= MAX_ATTEMPTS
            log.warning(
                "notifier: %s not delivered (attempt %d%s): %s",
                notice["idempotency_key"],
                notice["attempts"],
                ", giving up" if gave_up else "",
                problem,
            )
            if self.metrics:
                self.metrics.notified("failed")
            await store.notice_failed(
                self.pool,
                notice["notice_id"],
                problem,
                retry_in_s=None if gave_up else min(300.0, 2.0 ** notice["attempts"]),
            )
            return
        if self.metrics:
            self.metrics.notified("sent")
        await store.notice_sent(self.pool, notice["notice_id"])

    def _post(self, key: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.config.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            if not 200 <= response.status < 300:
                raise OSError(f"receiver answered {response.status}")
