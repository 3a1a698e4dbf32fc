"""One decision for many commands, from the command line.

A decision made now is a bulk operation (`TroubleshootingClient.start_bulk`): it runs as a
workflow, and the command line only follows it, with a progress bar; Ctrl-C leaves it running.
A retry scheduled for later (`--at`, `--in`) is sent to each command's workflow, at a steady
pace (`decide_many`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict

import asyncpg
from temporalio.exceptions import TemporalError

from tsq import render
from tsq.client import TroubleshootingClient
from tsq.contract import DecisionKind
from tsq.errors import (
    AlreadyDecidedError,
    ClaimedError,
    CommandLineError,
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    PayloadNotFoundError,
    TroubleshootingError,
)
from tsq.render import one_line

if TYPE_CHECKING:
    from tsq.models import BulkOperation, DecisionOutcome

Decide = Callable[[str], Awaitable["DecisionOutcome | None"]]
"""Makes the decision for one command id; None when it was only accepted (no wait)."""


class Filters(TypedDict):
    """Which commands of the troubleshooting queue: `list_troubleshooting`'s filters."""

    command_type: str | None
    error_code: str | None
    since: datetime | None
    until: datetime | None


# What happened to each command, and how the summary names it; the first two count as done.
_LABELS = {
    "carried_out": "carried out",
    "accepted": "accepted (--no-wait)",
    "proposed": "proposed (awaits another operator's approval)",
    "claimed": "refused: claimed by another operator",
    "already_decided": "refused: already decided",
    "not_in_troubleshooting_queue": "refused: not in troubleshooting queue",
    "payload_not_found": "refused: original message not found",
    "not_found": "refused: not found",
    "invalid": "refused: invalid",
    "error": "failed",
    "not_started": "not started (interrupted)",
    "unknown": "interrupted in flight: outcome unknown (see `tsq show`)",
}
_DONE = ("carried_out", "accepted", "proposed")
_LISTED = 50
_BAR = 30


@dataclass(frozen=True)
class _Result:
    command_id: str
    result: str
    detail: str


async def decide_many(
    client: TroubleshootingClient,
    decide: Decide,
    *,
    verb: str,
    domain: str,
    filters: Filters | None,
    ask: bool,
    rate: float,
    concurrency: int,
    as_json: bool,
) -> None:
    """Decide every command `filters` selects (None: the ids on stdin, one per line).

    Prints a summary (on stderr with `as_json`, which prints one result per command on stdout)
    and raises `CommandLineError` unless every decision was carried out or accepted.
    """
    out = sys.stderr if as_json else sys.stdout
    if filters is None:
        ids, rejected = _read_ids(await asyncio.to_thread(sys.stdin.read))
    else:
        ids, rejected = await _matching(client, domain, filters), []
    if not ids and not rejected:
        print(f"no command in the troubleshooting queue of {domain} matches", file=out)
        if as_json:
            print("[]")
        return
    if ask and not await _confirm(f"{verb.capitalize()} {_commands(len(ids))} in {domain}? [y/N] "):
        raise CommandLineError("not confirmed; nothing was changed")
    run = await _decide_all(ids, decide, rate=rate, concurrency=concurrency)
    results = rejected + run.results
    title = f"{verb} in {domain}: {_commands(len(results))}"
    if run.interrupted:
        title += " (interrupted: no decision started after Ctrl-C)"
    print(_summary(title, results), file=out)
    if as_json:
        print(json.dumps([asdict(r) for r in results]))
    if run.interrupted:
        raise Interrupted("interrupted; the summary says what was done")
    failed = sum(r.result not in _DONE for r in results)
    if failed:
        raise CommandLineError(
            f"{failed} of {_commands(len(results))} not carried out (see the summary)"
        )


# A dry run prints this many previews in full after the counts (--json prints every one).
_PREVIEWED = 3
_PREVIEW_LABELS = {
    "would_carry_out": "would be carried out",
    "would_propose": "would be proposed (needs another operator's approval)",
    "already_decided": "already decided",
    "not_in_troubleshooting_queue": "not in the troubleshooting queue",
    "not_found": "not found",
    "payload_not_found": "original message not found",
    "claimed": "claimed by another operator",
    "proposal_pending": "a proposal awaits approval",
    "invalid": "invalid",
    "error": "failed",
}


async def preview_many(
    client: TroubleshootingClient,
    kind: DecisionKind,
    fields: dict[str, Any],
    *,
    domain: str,
    filters: Filters | None,
    as_json: bool,
) -> None:
    """`--dry-run` of a bulk decision: the count per outcome and the first few in full, from
    the decisions' own transactions, rolled back. Nothing is written."""
    out = sys.stderr if as_json else sys.stdout
    if filters is None:
        ids, rejected = _read_ids(await asyncio.to_thread(sys.stdin.read))
    else:
        ids, rejected = await _matching(client, domain, filters), []
    previews = await client.preview_many(kind, domain, ids, fields) if ids else []
    counts: Counter[str] = Counter(p.result for p in previews)
    lines = [f"{kind.value} in {domain} (dry run, nothing written): {_commands(len(previews))}"]
    if counts["would_propose"]:
        lines.append(
            f"  a policy asks approval for {_commands(counts['would_propose'])}: the operation "
            "would be proposed as a whole, and run once another operator approves it"
        )
    lines += [
        f"  {label:<56} {counts[result]:>6}"
        for result, label in _PREVIEW_LABELS.items()
        if counts[result]
    ]
    lines += [f"  {r.command_id}  {_LABELS[r.result]}: {r.detail}" for r in rejected]
    print("\n".join(lines), file=out)
    if as_json:
        print(json.dumps([p.model_dump(mode="json") for p in previews]))
    else:
        for preview in previews[:_PREVIEWED]:
            print("\n" + render.preview(preview))
        if len(previews) > _PREVIEWED:
            print(f"\n... and {len(previews) - _PREVIEWED} more (--json shows every one)")
    refused = sum(p.would is None for p in previews) + len(rejected)
    if refused:
        raise CommandLineError(
            f"{refused} of {_commands(len(previews) + len(rejected))} would not be carried out"
        )


async def run_bulk(
    client: TroubleshootingClient,
    kind: DecisionKind,
    fields: dict[str, Any],
    *,
    domain: str,
    filters: Filters | None,
    ask: bool,
    rate: float | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Start a bulk operation over the commands `filters` select (None: the ids on stdin,
    one per line, all of them UUIDs) and follow it to its end; sum up.

    Raises `CommandLineError` unless every command was carried out, `Interrupted` on Ctrl-C
    (the operation goes on)."""
    out = sys.stderr if as_json else sys.stdout
    selection: dict[str, Any]
    if filters is None:
        ids = _strict_ids(await asyncio.to_thread(sys.stdin.read))
        selection, count = {"command_ids": ids}, len(ids)
    else:
        selection = {**filters, "all_waiting": not any(v is not None for v in filters.values())}
        count = len(await _matching(client, domain, filters))
    if count == 0:
        raise InvalidInputError(
            f"no command in the troubleshooting queue of {domain} matches; nothing was started"
        )
    if ask and not await _confirm(
        f"{kind.value.capitalize()} {_commands(count)} in {domain}? [y/N] "
    ):
        raise CommandLineError("not confirmed; nothing was changed")
    # Ctrl-C from here on leaves the operation running: the command line only follows it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        started = await client.start_bulk(kind, domain, **fields, **selection, rate=rate)
        op = await _started(client, started, kind, wait=wait, as_json=as_json, stop=stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if op is None:
        return
    items = await client.bulk_items(op.bulk_id)
    print(render.bulk_operation(op), file=out)
    unsuccessful = [i for i in items if i.result not in (None, "carried_out")]
    if unsuccessful:
        print("not carried out:", file=out)
        for item in unsuccessful[:_LISTED]:
            print(f"  {item.command_id}  {render.BULK_LABELS[item.result or 'error']}: "
                  f"{item.detail}", file=out)  # fmt: skip
        if len(unsuccessful) > _LISTED:
            print(f"  ... and {len(unsuccessful) - _LISTED} more (--json lists every one)",
                  file=out)  # fmt: skip
    if as_json:
        print(json.dumps([
            {"command_id": str(i.command_id), "result": i.result or "not_started",
             "detail": i.detail or "left untouched: the operation was stopped"}
            for i in items
        ]))  # fmt: skip
    if op.carried_out < op.total:
        raise CommandLineError(
            f"{op.total - op.carried_out} of {_commands(op.total)} not carried out "
            "(see the summary)"
        )


async def _started(
    client: TroubleshootingClient,
    op: BulkOperation,
    kind: DecisionKind,
    *,
    wait: bool,
    as_json: bool,
    stop: asyncio.Event,
) -> BulkOperation | None:
    """Say the operation started; follow it to its end unless told not to (None), or it
    waits for another operator's approval (None)."""
    if op.status == "proposed":
        print(
            f"bulk operation {op.bulk_id} proposed: {kind.value} of {_commands(op.total)} in "
            f"{op.domain}; a policy asks another operator's approval for "
            f"{_commands(op.needing_approval)} of them, so the operation waits, as a whole, "
            f"until {render.when(op.approval_expires_at)} for another operator to approve it: "
            f"`tsq bulk approve {op.bulk_id}` (or `tsq bulk reject {op.bulk_id} --reason ...`)",
            file=sys.stderr,
        )
        print(op.model_dump_json() if as_json else op.bulk_id)
        return None
    print(
        f"bulk operation {op.bulk_id} started: {kind.value} of {_commands(op.total)} in "
        f"{op.domain} (`tsq bulk status {op.bulk_id}`)",
        file=sys.stderr,
    )
    if not wait:
        print(op.model_dump_json() if as_json else op.bulk_id)
        return None
    return await _follow(client, op, stop)


# With no progress for this long, the command line says what may be missing.
_SILENT_S = 15.0


async def _follow(
    client: TroubleshootingClient, op: BulkOperation, stop: asyncio.Event
) -> BulkOperation:
    """Poll the operation until it ends, drawing a bar; `stop` (Ctrl-C) leaves it running."""
    progress = _Progress(op.total)
    last, moved, warned = 0, time.monotonic(), False
    while op.status == "running" and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        op = await client.bulk(op.bulk_id)
        done = op.total - op.remaining
        progress.show(done, op.skipped + op.failed)
        if done != last:
            last, moved = done, time.monotonic()
        elif not warned and time.monotonic() - moved > _SILENT_S:
            warned = True
            print(
                f"\nno progress for {_SILENT_S:.0f}s: is a `tsq worker` running on task "
                f"queue {client.task_queue!r}?",
                file=sys.stderr,
            )
    progress.finish()
    if stop.is_set() and op.status == "running":
        raise Interrupted(
            f"detached; bulk operation {op.bulk_id} goes on "
            f"({op.total - op.remaining} of {op.total} done): `tsq bulk status {op.bulk_id}` "
            f"follows it, `tsq bulk stop {op.bulk_id}` stops it"
        )
    return op


def _strict_ids(text: str) -> list[str]:
    """Ids from stdin, one per line, in order and once each; any line that is not a UUID
    refuses them all, before anything starts."""
    ids, rejected = _read_ids(text)
    if rejected:
        lines = "; ".join(r.detail for r in rejected[:5])
        more = f" and {len(rejected) - 5} more" if len(rejected) > 5 else ""
        raise InvalidInputError(
            f"{len(rejected)} line(s) of stdin are not command ids: {lines}{more}; "
            "nothing was started"
        )
    return ids


class Interrupted(CommandLineError):
    """Ctrl-C stopped a bulk decision; exits 130 once the summary is printed."""


def _read_ids(text: str) -> tuple[list[str], list[_Result]]:
    """Ids from stdin, one per line, in order and once each; bad lines become results."""
    ids: dict[str, None] = {}
    rejected = []
    for number, line in enumerate(text.splitlines(), start=1):
        raw = line.strip()
        if not raw:
            continue
        try:
            ids[str(uuid.UUID(raw))] = None
        except ValueError:
            rejected.append(_Result(raw, "invalid", f"line {number}: {raw!r} is not a UUID"))
    return list(ids), rejected


async def _matching(client: TroubleshootingClient, domain: str, filters: Filters) -> list[str]:
    """Every matching id, in one snapshot, before any is decided (decisions would shift pages)."""
    return [str(cid) for cid in await client.waiting_ids(domain, **filters)]


async def _confirm(question: str) -> bool:
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


@dataclass
class _Run:
    results: list[_Result]
    interrupted: bool


async def _decide_all(ids: Sequence[str], decide: Decide, *, rate: float, concurrency: int) -> _Run:
    """Decide `ids` at a steady pace. The first Ctrl-C stops starting decisions and waits for
    those in flight; a second one gives up on them (their outcome is then unknown)."""
    results: dict[int, _Result] = {}
    pacer = _Pacer(rate)
    progress = _Progress(len(ids))
    todo = iter(enumerate(ids))
    stop = asyncio.Event()
    in_flight: dict[int, asyncio.Task[_Result]] = {}

    def interrupt() -> None:
        if stop.is_set():
            for task in in_flight.values():
                task.cancel()
        stop.set()

    async def work() -> None:
        # Workers share one iterator: each takes the next id when it is free.
        for index, command_id in todo:
            await pacer.wait(stop)
            if stop.is_set():
                return
            task = asyncio.ensure_future(_decide_one(decide, command_id))
            in_flight[index] = task
            try:
                results[index] = await task
            except asyncio.CancelledError:
                results[index] = _Result(command_id, "unknown", "interrupted while in flight")
            finally:
                del in_flight[index]
            progress.advance(results[index].result in _DONE)

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        await asyncio.gather(*(work() for _ in range(min(concurrency, len(ids)))))
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    progress.finish()
    return _Run(
        [
            results.get(index) or _Result(cid, "not_started", "stopped by Ctrl-C before it began")
            for index, cid in enumerate(ids)
        ],
        stop.is_set(),
    )


async def _decide_one(decide: Decide, command_id: str) -> _Result:
    try:
        outcome = await decide(command_id)
    except CommandNotFoundError as err:
        return _Result(command_id, "not_found", str(err))
    except InvalidInputError as err:
        return _Result(command_id, "invalid", str(err))
    except AlreadyDecidedError as err:
        return _Result(command_id, "already_decided", str(err))
    except PayloadNotFoundError as err:
        return _Result(command_id, "payload_not_found", str(err))
    except ClaimedError as err:
        return _Result(command_id, "claimed", str(err))
    except InvalidOperationError as err:
        return _Result(command_id, "not_in_troubleshooting_queue", str(err))
    except (
        TroubleshootingError,
        TemporalError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
        TimeoutError,
    ) as err:
        # One command's failure must not stop the others: it is reported in the summary.
        return _Result(command_id, "error", f"{type(err).__name__}: {one_line(err)}")
    if outcome is None:
        return _Result(command_id, "accepted", "accepted; the worker carries it out")
    if outcome.proposal is not None:
        return _Result(command_id, "proposed", outcome.detail)
    return _Result(
        command_id, "carried_out" if outcome.carried_out else "already_decided", outcome.detail
    )


def _summary(title: str, results: Sequence[_Result]) -> str:
    counts = Counter(r.result for r in results)
    lines = [title]
    lines += [
        f"  {label:<40} {counts[result]:>6}" for result, label in _LABELS.items() if counts[result]
    ]
    failed = [r for r in results if r.result not in _DONE]
    if failed:
        lines.append("not carried out:")
        lines += [f"  {r.command_id}  {_LABELS[r.result]}: {r.detail}" for r in failed[:_LISTED]]
        if len(failed) > _LISTED:
            lines.append(f"  ... and {len(failed) - _LISTED} more (--json lists every one)")
    return "\n".join(lines)


def _commands(count: int) -> str:
    return f"{count} command" if count == 1 else f"{count} commands"


class _Pacer:
    """Spaces decision starts 1/rate seconds apart, whichever worker starts the next one."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self, stop: asyncio.Event) -> None:
        """Until this worker's slot comes, or `stop` is set."""
        now = time.monotonic()
        # A slot in the past is not saved up: after a slow stretch there is no burst.
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), slot - now)


class _Progress:
    """A one-line bar on stderr, drawn only when stderr is a terminal; then a final line."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self._tty = sys.stderr.isatty()
        self._start = self._drawn = time.monotonic()

    def advance(self, done: bool) -> None:
        self.show(self.done + 1, self.failed + (not done))

    def show(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        now = time.monotonic()
        if self._tty and (now - self._drawn >= 0.1 or self.done == self.total):
            self._drawn = now
            filled = _BAR * self.done // self.total
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (_BAR - filled)}] {self.done}/{self.total}"
                f" ({self.failed} not carried out)"
            )
            sys.stderr.flush()

    def finish(self) -> None:
        elapsed = time.monotonic() - self._start
        if self._tty:
            sys.stderr.write("\n")
        print(
            f"{self.done} of {self.total} processed in {elapsed:.1f}s "
            f"({self.done / elapsed if elapsed > 0 else 0:.0f}/s)",
            file=sys.stderr,
        )
