"""Pure logic: input validation, reply shape, UI rendering, settings."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from tsq.contract import TsqState, workflow_id
from tsq.errors import InvalidInputError
from tsq.models import (
    CancelRequest,
    CommandSnapshot,
    RefusedRequest,
    StateView,
    check_queue_name,
    describe_input,
)
from tsq.settings import Settings, redact_url
from tsq.workflows.details import EXAMPLES, render_details, render_static_details, render_summary


@pytest.mark.parametrize(
    "raw",
    [
        {"reason": ""},
        {"reason": "   "},
        {"operator": "jane"},
        {"reason": "x" * 2001},
        {"reason": "nul \x00 inside"},
        {"reason": "ok", "operator": "o" * 201},
        {"reason": "ok", "reasn": "typo"},
        {"reason": ["a"]},
        "just text",
        None,
    ],
)
def test_cancel_request_refuses_bad_input(raw: object) -> None:
    """Blank, missing, oversized, unstorable, unknown or wrongly typed input is refused."""
    with pytest.raises(ValidationError):
        CancelRequest.model_validate(raw)


@pytest.mark.parametrize(
    "reason", ["'; DROP TABLE commandbus.command; --", "انتهى ✅ e\u0301", "x" * 2000]
)
def test_cancel_request_keeps_text_exactly(reason: str) -> None:
    """Storable text is kept exactly as typed, SQL-looking or not."""
    assert CancelRequest.model_validate({"reason": reason}).reason == reason


def test_workflow_id_format() -> None:
    """Workflow ids are tsq:<domain>:<command_id>."""
    command_id = uuid.uuid4()
    assert workflow_id("payments", command_id) == f"tsq:payments:{command_id}"


@pytest.mark.parametrize("name", ["payments__replies", "_x", "a" * 47])
def test_valid_queue_names_pass(name: str) -> None:
    """Plain identifiers up to 47 characters are PGMQ queue names."""
    assert check_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "a" * 48, "bad-name", "x; drop table y", "1abc", "é"])
def test_invalid_queue_names_are_refused(name: str) -> None:
    """Anything that would not be a plain table-name suffix is refused."""
    with pytest.raises(InvalidInputError):
        check_queue_name(name)


def _snapshot() -> CommandSnapshot:
    return CommandSnapshot(
        domain="payments",
        command_id=uuid.UUID(int=1),
        command_type="DebitAccount",
        reply_queue="payments__replies",
        attempts=3,
        max_attempts=3,
        last_error_type="PERMANENT",
        last_error_code="ACCOUNT_CLOSED",
        last_error_msg="closed | really",
    )


def test_details_show_error_and_the_json_to_paste_for_each_decision() -> None:
    """While waiting: the error and, for cancel, retry and complete, a JSON block to paste,
    one key a line (narrow enough for the details panel)."""
    command = _snapshot()
    text = render_details(
        command,
        TsqState.AWAITING_OPERATOR,
        StateView(command=command, state=TsqState.AWAITING_OPERATOR),
        failed_attempts=[],
    )
    assert str(command.command_id) in text and "ACCOUNT_CLOSED" in text
    for example in EXAMPLES.values():
        assert f"```json\n{json.dumps(example, indent=1)}\n```" in text
    assert "reply CANCELED to payments__replies" in text


def test_static_details_list_the_command_facts() -> None:
    """The fixed facts: ids in code spans, the error, attempts, without table markup."""
    text = render_static_details(_snapshot())
    assert f"`{uuid.UUID(int=1)}`" in text
    assert "`PERMANENT` `ACCOUNT_CLOSED`" in text
    assert "closed | really" in text and "3 of 3" in text


def test_details_keep_only_the_last_refusals() -> None:
    """Many refused requests: the last few are shown, with a count of the rest."""
    command = _snapshot()
    refused = [RefusedRequest(handler="cancel", problem=f"p{n}", received="{}") for n in range(9)]
    view = StateView(command=command, state=TsqState.AWAITING_OPERATOR, refused=refused)
    text = render_details(command, TsqState.AWAITING_OPERATOR, view, failed_attempts=[])
    assert "p8" in text and "p4" in text and "p3" not in text
    assert "4 earlier" in text


def test_summary_is_one_line() -> None:
    """The static summary fits the workflow list: domain, type, id, error code."""
    summary = render_summary(_snapshot())
    assert "\n" not in summary and "ACCOUNT_CLOSED" in summary


def test_describe_input_is_short_and_storable() -> None:
    """Refused input is kept short and without NUL characters."""
    text = describe_input({"reason": "\x00" + "x" * 1000})
    assert "\x00" not in text and len(text) < 600


def test_settings_prefer_tsq_database_url() -> None:
    """TSQ_DATABASE_URL wins over DATABASE_URL; Temporal defaults to localhost:7233."""
    settings = Settings.from_env({"TSQ_DATABASE_URL": "postgresql://a/b", "DATABASE_URL": "x"})
    assert settings.database_url == "postgresql://a/b"
    assert settings.temporal_address == "localhost:7233"
    assert settings.task_queue == "troubleshooting"
    assert (
        Settings.from_env({"DATABASE_URL": "postgresql://c/d"}).database_url == "postgresql://c/d"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tsq:s3cret@db:5432/bus", "postgresql://tsq:***@db:5432/bus"),
        (
            "postgresql://db/bus?user=tsq&password=s3cret",
            "postgresql://db/bus?user=tsq&password=***",
        ),
        (
            "postgresql://db/bus?PASSWORD=s3cret&sslmode=require",
            "postgresql://db/bus?PASSWORD=***&sslmode=require",
        ),
        (
            "postgresql://tsq:p%40ss@db/bus?sslpassword=k3y",
            "postgresql://tsq:***@db/bus?sslpassword=***",
        ),
        ("postgresql://tsq@db/bus", "postgresql://tsq@db/bus"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    """Passwords in the user part and in the query string are hidden; the rest is kept."""
    assert redact_url(url) == shown
    assert "s3cret" not in repr(Settings(database_url=url))
