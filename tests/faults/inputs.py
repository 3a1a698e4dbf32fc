"""Hostile and malformed inputs, per entrance, with what each must lead to.

A case either names the problem its refusal must mention, or is accepted and must then be
stored exactly as given.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from tests.faults.support import CANCEL, COMPLETE, RETRY, Decision
from tsq.errors import (
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    TroubleshootingError,
)

NO_ARGUMENT = object()
"""A signal or update sent with no argument at all."""


@dataclass(frozen=True)
class Arguments:
    """A signal or update sent with several arguments (the `temporal` CLI allows it)."""

    values: tuple[Any, ...]


SQL = "x'); DROP TABLE commandbus.audit; --"
DEEP: dict[str, Any] = {"reason": "deep"}
for _ in range(60):
    DEEP = {"reason": DEEP}


@dataclass(frozen=True)
class Refused:
    """Sent as the argument of a decision's signal and of its update: refused, with `problem`."""

    id: str
    payload: Any
    problem: str
    decision: Decision = CANCEL
    # Refused by the client library itself: it cannot encode the payload, nothing is sent.
    at_client: bool = False


REFUSED = [
    Refused("no-argument", NO_ARGUMENT, "valid dictionary"),
    Refused("null", None, "valid dictionary"),
    Refused("two-arguments", Arguments(({"reason": "a"}, {"reason": "b"})), "2 arguments"),
    Refused("empty-object", {}, "reason: Field required"),
    Refused("missing-reason", {"operator": "ops"}, "reason: Field required"),
    Refused("reason-null", {"reason": None}, "reason: Input should be a valid string"),
    Refused("reason-number", {"reason": 42}, "reason: Input should be a valid string"),
    Refused("reason-bool", {"reason": True}, "reason: Input should be a valid string"),
    Refused("reason-list", {"reason": ["stop"]}, "reason: Input should be a valid string"),
    Refused("reason-object", {"reason": {"$ne": ""}}, "reason: Input should be a valid string"),
    Refused("reason-nested-deep", DEEP, "reason: Input should be a valid string"),
    Refused("operator-number", {"reason": "ok", "operator": 7}, "operator: Input should be"),
    Refused("operator-object", {"reason": "ok", "operator": {"id": 1}}, "operator: Input should"),
    Refused("typo-field", {"reasn": "typo"}, "reasn: Extra inputs are not permitted"),
    Refused("extra-field", {"reason": "ok", "status": "COMPLETED"}, "status: Extra inputs"),
    Refused("reason-blank", {"reason": ""}, "must not be blank"),
    Refused("reason-whitespace", {"reason": " \t\r\n "}, "must not be blank"),
    Refused("reason-unicode-spaces", {"reason": "\u00a0\u2003\u3000"}, "must not be blank"),
    Refused("reason-too-long", {"reason": "x" * 2001}, "at most 2000 characters"),
    Refused("reason-huge", {"reason": "x" * 200_000}, "at most 2000 characters"),
    Refused("operator-too-long", {"reason": "ok", "operator": "o" * 201}, "at most 200"),
    Refused("reason-nul", {"reason": "stop\x00here"}, "NUL"),
    Refused("operator-nul", {"reason": "ok", "operator": "ops\x00"}, "NUL"),
    Refused(
        "reason-lone-surrogate", {"reason": "\ud800"}, "surrogates not allowed", at_client=True
    ),
    Refused("payload-string", "please cancel", "valid dictionary"),
    Refused("payload-list", [{"reason": "in a list"}], "valid dictionary"),
    Refused("payload-number", 7, "valid dictionary"),
    Refused("payload-bytes", b"\x00\xff binary", "valid dictionary"),
    Refused("retry-unknown-field", {"operator": "ops", "reason": "why"}, "reason: Extra", RETRY),
    Refused("retry-operator-number", {"operator": 3}, "operator: Input should be", RETRY),
    Refused("complete-result-text", {"result_data": "done"}, "result_data: Input", COMPLETE),
    Refused("complete-result-list", {"result_data": [1, 2]}, "result_data: Input", COMPLETE),
    Refused("complete-result-nul", {"result_data": {"k\x00": "v"}}, "NUL", COMPLETE),
    Refused("complete-result-huge", {"result_data": {"x": "y" * 70_000}}, "at most", COMPLETE),
]


@dataclass(frozen=True)
class Stored:
    """Accepted: the decision is carried out with these values, byte for byte."""

    id: str
    decision: Decision
    payload: dict[str, Any]


STORED = [
    Stored("sql-reason", CANCEL, {"reason": SQL, "operator": "ops"}),
    Stored("sql-operator", CANCEL, {"reason": "audit me", "operator": "admin' OR '1'='1'; --"}),
    Stored(
        "bidi-and-rtl",
        CANCEL,
        {
            "reason": "refund \u202eredro\u202c "
            "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627"
        },
    ),
    Stored(
        "emoji",
        CANCEL,
        {
            "reason": "\U0001f525 cancel \U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd",
            "operator": "\U0001f600",
        },
    ),
    Stored("combining-marks", CANCEL, {"reason": "Cafe\u0301 Z\u0351\u0308\u036b\u0334"}),
    Stored("longest-allowed", CANCEL, {"reason": "y" * 2000, "operator": "o" * 200}),
    Stored("json-looking", CANCEL, {"reason": '{"outcome": "SUCCESS", "status": "COMPLETED"}'}),
    Stored("escapes-placeholders", CANCEL, {"reason": "C:\\temp\\x00 \\u0000 %s $1 {0} ${x}"}),
    Stored("zero-width", CANCEL, {"reason": "ok\u200b\u200d\ufeff"}),
    Stored("line-breaks", CANCEL, {"reason": "line1\r\nline2\tend\u2028"}),
    Stored("operator-null", CANCEL, {"reason": "nobody", "operator": None}),
    Stored(
        "complete-sql-result",
        COMPLETE,
        {
            "result_data": {"note": SQL, "nested": {"ok": "\u2705", "list": [1, "two", None]}},
            "operator": "ops",
        },
    ),
    Stored("retry-sql-operator", RETRY, {"operator": "'); TRUNCATE commandbus.audit; --"}),
]


@dataclass(frozen=True)
class SdkCase:
    """`TroubleshootingClient.operator_cancel` with these arguments, on the command `target`.

    `target`: `waiting` (a command in the troubleshooting queue), `canceled`, `completed`,
    `pending`, `bad-queue` / `long-queue` (waiting, with a reply queue PGMQ cannot have),
    `missing` (an id no command has). `domain` / `command_id` replace the target's.
    """

    id: str
    target: str
    error: type[TroubleshootingError]
    problem: str
    reason: Any = "sdk refusal test"
    operator: Any = "ops"
    domain: str | None = None
    command_id: str | None = None


SDK_CASES = [
    SdkCase("id-not-uuid", "waiting", InvalidInputError, "not a UUID", command_id="not-a-uuid"),
    SdkCase("id-sql", "waiting", InvalidInputError, "not a UUID", command_id="1' OR '1'='1"),
    SdkCase("id-empty", "waiting", InvalidInputError, "not a UUID", command_id=""),
    SdkCase("id-nul", "waiting", InvalidInputError, "not a UUID", command_id="\x00"),
    SdkCase("domain-sql", "waiting", InvalidInputError, "is not valid", domain=SQL),
    SdkCase("domain-too-long", "waiting", InvalidInputError, "is not valid", domain="d" * 41),
    SdkCase("domain-homoglyph", "waiting", InvalidInputError, "is not valid", domain="p\u0430y"),
    SdkCase("domain-empty", "waiting", InvalidInputError, "is not valid", domain=""),
    SdkCase("domain-nul", "waiting", InvalidInputError, "is not valid", domain="pay\x00"),
    SdkCase(
        "domain-unknown",
        "missing",
        CommandNotFoundError,
        "not found",
        domain=f"nosuch_{uuid.uuid4().hex[:8]}",
    ),
    SdkCase("command-unknown", "missing", CommandNotFoundError, "not found"),
    SdkCase("already-canceled", "canceled", InvalidOperationError, "CANCELED"),
    SdkCase("already-completed", "completed", InvalidOperationError, "COMPLETED"),
    SdkCase("not-parked", "pending", InvalidOperationError, "PENDING"),
    SdkCase("reason-blank", "waiting", InvalidInputError, "must not be blank", reason="  "),
    SdkCase("reason-nul", "waiting", InvalidInputError, "NUL", reason="a\x00b"),
    SdkCase("reason-number", "waiting", InvalidInputError, "valid string", reason=123),
    SdkCase("reason-none", "waiting", InvalidInputError, "valid string", reason=None),
    SdkCase("reason-too-long", "waiting", InvalidInputError, "at most 2000", reason="r" * 2001),
    SdkCase("operator-nul", "waiting", InvalidInputError, "NUL", operator="o\x00"),
    SdkCase("operator-number", "waiting", InvalidInputError, "valid string", operator=5),
    SdkCase("reason-lone-surrogate", "waiting", InvalidInputError, "unicode", reason="\ud800"),
    SdkCase("reply-queue-injection", "bad-queue", InvalidInputError, "not a valid PGMQ queue"),
    SdkCase("reply-queue-too-long", "long-queue", InvalidInputError, "not a valid PGMQ queue"),
]

BAD_REPLY_QUEUES = {"bad-queue": "bad-name; drop table", "long-queue": "q" * 60}


@dataclass(frozen=True)
class CliCase:
    """`tsq cancel DOMAIN COMMAND_ID *args` (bytes where a shell could pass any)."""

    id: str
    target: str
    args: tuple[str | bytes, ...]
    exit_code: int
    problem: str
    domain: str | None = None
    command_id: str | None = None


CLI_CASES = [
    CliCase("id-not-uuid", "waiting", ("--reason", "r"), 1, "not a UUID", command_id="nope"),
    CliCase("command-unknown", "missing", ("--reason", "r"), 1, "not found"),
    CliCase("reason-blank", "waiting", ("--reason", " "), 1, "must not be blank"),
    CliCase("reason-missing", "waiting", (), 2, "--reason"),
    CliCase("domain-sql", "waiting", ("--reason", "r"), 1, "is not valid", domain=SQL),
    CliCase("already-canceled", "canceled", ("--reason", "r"), 1, "CANCELED"),
    CliCase("reply-queue-injection", "bad-queue", ("--reason", "r"), 1, "PGMQ queue name"),
    CliCase("reason-not-utf8", "waiting", (b"--reason", b"caf\xe9 \xff"), 1, "unicode"),
]

CLI_STORED = [
    ("sql-reason", SQL),
    ("bidi-emoji-reason", "\u202eevil\u202c \U0001f525 e\u0301"),
]
