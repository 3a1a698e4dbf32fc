"""What an operator reads in the Temporal Web UI: a one-line summary and the current details."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from workflows.models import CommandSnapshot, DecisionKind, TsqState

if TYPE_CHECKING:
    from workflows.models import StateView

EXAMPLES = {
    DecisionKind.CANCEL: {"reason": "Invalid account", "operator": "you@example.com"},
    DecisionKind.RETRY: {"operator": "you@example.com"},
    DecisionKind.COMPLETE: {"result_data": {"note": "done by hand"}, "operator": "you@example.com"},
}


def steps_of(kind: DecisionKind, command: CommandSnapshot) -> list[str]:
    """What carrying out `kind` does to `command`, step by step (all in one transaction)."""
    if kind is DecisionKind.RETRY:
        return [
            f"message re-sent to {command.domain}__commands",
            "status PENDING, attempts 0",
            "audit OPERATOR_RETRY",
        ]
    status, event, outcome = (
        ("CANCELED", "OPERATOR_CANCEL", "CANCELED")
        if kind is DecisionKind.CANCEL
        else ("COMPLETED", "OPERATOR_COMPLETE", "SUCCESS")
    )
    reply = command.reply_queue
    return [
        f"status {status}",
        f"audit {event}",
        f"reply {outcome} to {reply}" if reply else "no reply (no reply queue)",
    ]


def render_summary(command: CommandSnapshot) -> str:
    """Single line shown in the workflow list."""
    code = command.last_error_code or command.last_error_type or "error"
    return f"{command.domain} {command.command_type} {command.command_id} — {code}"


def _cell(value: object) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_details(
    command: CommandSnapshot,
    state: TsqState,
    view: StateView,
    *,
    failed_attempts: list[str],
) -> str:
    """Markdown for the UI's "Current details": the command, why it failed, how to decide."""
    lines = [
        f"## {_cell(command.command_type)} in {_cell(command.domain)} — {state.value}",
        "",
        "| | |",
        "|---|---|",
        f"| Command id | `{command.command_id}` |",
        f"| Correlation id | {_cell(command.correlation_id)} |",
        f"| Reply queue | {_cell(command.reply_queue)} |",
        f"| Batch | {_cell(command.batch_id)} |",
        f"| Attempts | {command.attempts} of {_cell(command.max_attempts)} |",
        f"| Error | {_cell(command.last_error_type)} `{_cell(command.last_error_code)}` |",
        f"| Message | {_cell(command.last_error_msg)} |",
        f"| Parked at | {_cell(command.parked_at)} |",
        "",
    ]
    if state is TsqState.AWAITING_OPERATOR:
        lines += [
            "### Decide",
            "Send a Signal with the JSON below (or an Update `operator_<name>` to get an answer):",
            "",
        ]
        for kind, example in EXAMPLES.items():
            lines += [
                f"- **{kind.value}** — {', '.join(steps_of(kind, command))}",
                f"  `{json.dumps(example)}`",
            ]
        lines.append("")
    if view.decision is not None:
        lines += [
            "### Decision",
            f"- **{view.decision.value}** by {_cell(view.decided_by)}"
            f" at {_cell(view.requested_at)}",
        ]
        if view.reason is not None:
            lines.append(f"- Reason: {_cell(view.reason)}")
        if view.result_data is not None:
            lines.append(f"- Result data: `{_cell(json.dumps(view.result_data))}`")
        lines += [f"- {step}: **{progress}**" for step, progress in view.steps.items()]
        if view.outcome is not None:
            lines.append(f"- Outcome: {_cell(view.outcome.detail)}")
        lines.append("")
    if failed_attempts:
        lines.append("### Decisions that could not be carried out (nothing was changed)")
        lines += [f"- {_cell(text)}" for text in failed_attempts]
        lines.append("")
    if view.refused:
        lines.append("### Refused signals (nothing was changed)")
        lines += [
            f"- `{r.handler}`: {_cell(r.problem)} — received {_cell(r.received)}"
            for r in view.refused
        ]
        lines.append("")
    return "\n".join(lines)
