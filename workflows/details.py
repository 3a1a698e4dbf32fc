"""What an operator reads in the Temporal Web UI: a one-line summary and the current details."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from workflows.models import CommandSnapshot, TsqState

if TYPE_CHECKING:
    from workflows.models import StateView

_CANCEL_EXAMPLE = json.dumps({"reason": "Invalid account", "operator": "you@example.com"})


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
        reply = (
            f"a CANCELED reply to `{command.reply_queue}`"
            if command.reply_queue
            else ("no reply (the command has no reply queue)")
        )
        lines += [
            "### Decide",
            f"- **cancel** — status CANCELED, audit OPERATOR_CANCEL, {reply}.",
            "  Send a Signal `cancel`, or an Update `operator_cancel`, with:",
            f"  `{_CANCEL_EXAMPLE}`",
            "",
        ]
    if view.decision is not None:
        lines += [
            "### Decision",
            f"- **{view.decision.value}** by {_cell(view.decided_by)}"
            f" at {_cell(view.requested_at)}",
            f"- Reason: {_cell(view.reason)}",
        ]
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
