"""What every phase of the benchmark measures with: rates, latencies, percentiles, checks."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Rate:
    """Calls made with bounded concurrency: wall time, per-call latency, failures."""

    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    first_error: str | None = None

    @property
    def done(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def pct(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @classmethod
    def empty(cls) -> Rate:
        return cls(0.0, [])

    def __add__(self, other: Rate) -> Rate:
        """Two runs as one: their wall times add up."""
        return Rate(
            self.seconds + other.seconds,
            self.latencies_ms + other.latencies_ms,
            self.errors + other.errors,
            self.first_error or other.first_error,
        )


@dataclass
class Check:
    """Row and workflow counts after a phase, against what the phase should have left."""

    expected: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(value == self.expected for value in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "ok": self.ok, **self.counts}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def chunks(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """`items` cut into `parts` consecutive slices of near-equal size."""
    size = len(items)
    return [items[i * size // parts : (i + 1) * size // parts] for i in range(parts)]


def say(message: str) -> None:
    # Progress goes to stderr: stdout carries the table and, last, the JSON line.
    print(f"tsq bench: {message}", file=sys.stderr, flush=True)


async def run_concurrently(
    items: Sequence[T], call: Callable[[T], Awaitable[object]], concurrency: int
) -> Rate:
    """Call `call` on each item, `concurrency` at a time; failures are counted, not raised."""
    pending = iter(items)
    latencies: list[float] = []
    errors: list[str] = []

    async def lane() -> None:
        for item in pending:
            began = time.perf_counter()
            try:
                await call(item)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(items))))))
    seconds = time.perf_counter() - began
    return Rate(seconds, latencies, len(errors), errors[0] if errors else None)


async def until(probe: Callable[[], Awaitable[int]], expected: int, *, within: float) -> int:
    """Poll a count until it reaches `expected` (visibility lags a little); return the last."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)
