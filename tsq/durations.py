"""Durations as operators type them (`90s`, `15m`, `2h`, `7d`, `1h30m`) and read them."""

from __future__ import annotations

import re
from datetime import timedelta

from tsq.errors import InvalidInputError

_PART = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LONGEST = timedelta(days=3653)


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """`1h30m` → 1:30:00. Refuses zero, negative, unknown units and more than ten years,
    naming `what` (the option or setting) in the message."""
    compact = text.strip().lower().replace(" ", "")
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise InvalidInputError(
            f"{what} {text!r} is not a duration: use a number and s, m, h or d (90s, 15m, 2h, "
            "7d, 1h30m)"
        )
    value = timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts))
    if value <= timedelta(0):
        raise InvalidInputError(f"{what} {text!r} must be longer than zero")
    if value > LONGEST:
        raise InvalidInputError(f"{what} {text!r} is more than ten years")
    return value


def format_duration(value: timedelta) -> str:
    """1:30:05 → `1h 30m`: the two largest units, for people."""
    seconds = max(0, int(value.total_seconds()))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2]) or "0s"
