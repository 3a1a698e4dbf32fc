"""One decision for many commands: select them, confirm, decide at a steady pace, sum up."""

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
    from tsq.models import DecisionOutcome

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
        self.done += 1
        self.failed += not done
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
