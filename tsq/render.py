"""Plain-text views for the command line: tables and a command's details, times in UTC."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tsq.durations import format_duration

if TYPE_CHECKING:
    from tsq.models import BulkOperation, StateView
    from tsq.views import (
        AuditEvent,
        CommandDetails,
        DecisionPreview,
        PolicyView,
        TroubleshootingItem,
        WaitingGroup,
    )


def one_line(err: BaseException) -> str:
    """The first line of an error's message, or its class name when it has none."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def item_table(items: Sequence[TroubleshootingItem]) -> str:
    """Each waiting command with where it stands: its workflow's state (`?` when Temporal
    could not be asked), who claimed it, a decision awaiting approval, a retry scheduled."""
    return _table(
        ["COMMAND_ID", "TYPE", "ERROR", "PARKED AT", "STATE", "CLAIMED BY", "PROPOSED", "RETRY AT"],
        [
            [
                str(item.command_id),
                clip(item.command_type, 24),
                clip(item.last_error.code or item.last_error.type or "", 24),
                when(item.updated_at),
                item.state or "?",
                clip(item.claimed_by, 20) or "-",
                clip(item.proposal, 30) or "-",
                when(item.retry_at) or "-",
            ]
            for item in items
        ],
    )


def group_table(groups: Sequence[WaitingGroup], now: datetime) -> str:
    return _table(
        ["ERROR CODE", "TYPE", "COUNT", "OLDEST", "NEWEST", "DECIDE THE GROUP WITH"],
        [
            [
                clip(g.error_code or "-", 40),
                clip(g.command_type or "-", 30),
                str(g.count),
                format_duration(now - g.oldest_parked_at) + " ago",
                format_duration(now - g.newest_parked_at) + " ago",
                g.select,
            ]
            for g in groups
        ],
    )


def deadlines(state: StateView) -> str:
    """One line: the escalation and expiry ahead."""
    parts = []
    if state.escalate_at is not None:
        parts.append(
            f"escalates at {when(state.escalate_at)}" + (" (escalated)" if state.escalated else "")
        )
    if state.expire_at is not None and state.expire_decision is not None:
        parts.append(f"{state.expire_decision.value} at {when(state.expire_at)}")
    return "; ".join(parts) or "no deadline"


def policy(p: PolicyView) -> str:
    narrowed = ", ".join(
        f"{name} {value}"
        for name, value in (("type", p.command_type), ("error code", p.error_code))
        if value
    )
    lines = [
        f"policy {p.name} of {p.domain}" + (f" ({narrowed})" if narrowed else " (every command)")
    ]
    if p.escalate_after is not None:
        lines.append(_field("escalate", f"after {format_duration(p.escalate_after)}"))
    if p.expire_after is not None:
        how = (
            f"cancel: {p.expire_reason}"
            if p.expire_decision == "cancel"
            else (f"complete with {json.dumps(p.expire_result_data)}")
        )
        lines.append(_field("expire", f"after {format_duration(p.expire_after)}, {how}"))
    if p.require_approval:
        expires = format_duration(p.approval_expires_after) if p.approval_expires_after else "24h"
        lines.append(
            _field("approval", f"{', '.join(p.require_approval)}: proposals expire after {expires}")
        )
    lines.append(_field("changed", f"{when(p.updated_at)} by {p.updated_by or '-'}"))
    return "\n".join(lines)


def policy_table(policies: Sequence[PolicyView]) -> str:
    return _table(
        ["NAME", "TYPE", "ERROR CODE", "ESCALATE AFTER", "EXPIRE AFTER", "THEN", "APPROVAL"],
        [
            [
                p.name,
                p.command_type or "*",
                p.error_code or "*",
                format_duration(p.escalate_after) if p.escalate_after else "-",
                format_duration(p.expire_after) if p.expire_after else "-",
                clip(p.expire_decision and f"{p.expire_decision} {p.expire_reason or ''}", 40),
                ",".join(p.require_approval) or "-",
            ]
            for p in policies
        ],
    )


def audit_table(events: Sequence[AuditEvent]) -> str:
    return _table(
        ["TS", "EVENT", "DETAILS"],
        [[when(e.ts, precise=True), e.event_type, _pairs(e.details)] for e in events],
    )


def command_details(details: CommandDetails) -> str:
    """Row, last error, original message, workflow state and audit trail, one section each."""
    command, error, state = details.command, details.command.last_error, details.workflow
    lines = [f"command {command.command_id} in {command.domain}"]
    lines += [
        _field(name, value)
        for name, value in (
            ("type", command.command_type),
            ("status", command.status),
            ("attempts", f"{command.attempts}/{command.max_attempts or '-'}"),
            ("correlation", command.correlation_id),
            ("reply to", command.reply_to or "(no reply queue)"),
            ("batch", command.batch_id),
            ("message", command.msg_id),
            ("created", when(command.created_at)),
            ("updated", when(command.updated_at)),
        )
        if value is not None
    ]
    if error.type or error.code or error.message:
        lines += ["", "error"]
        lines += [
            _field(name, value)
            for name, value in (
                ("type", error.type),
                ("code", error.code),
                ("message", error.message),
            )
            if value
        ]
    lines += ["", "payload"]
    if command.payload is None:
        lines.append("  (neither in the queue's PGMQ archive nor in commandbus.payload_archive)")
    else:
        lines += _indented(json.dumps(command.payload, indent=2))
    lines += ["", f"workflow {details.workflow_id}"]
    if state is None:
        lines.append(f"  {details.workflow_note or 'state unavailable'}")
        # What the database holds of the command's claim, proposal and scheduled retry.
        held = [
            (name, value)
            for name, value in (
                ("claimed", command.claimed_by and f"by {command.claimed_by} until "
                 f"{when(command.claimed_until)}"),
                ("proposal", command.proposal and f"{command.proposal}, awaits approval"),
                ("retry at", command.retry_at and when(command.retry_at)),
            )
            if value
        ]  # fmt: skip
        lines += [_field(name, value) for name, value in held]
    else:
        lines.append(_field("state", state.state.value))
        lines += _time(state)
        if state.decision is not None:
            by = f" by {state.decided_by}" if state.decided_by else ""
            lines.append(
                _field("decision", f"{state.decision.value}{by} at {when(state.requested_at)}")
            )
        if state.reason:
            lines.append(_field("reason", state.reason))
        if state.result_data is not None:
            lines.append(_field("result data", json.dumps(state.result_data)))
        lines += [_field("step", f"{step}: {progress}") for step, progress in state.steps.items()]
        if state.outcome is not None:
            lines.append(_field("outcome", state.outcome.detail))
        if state.proposal is not None:
            proposal = state.proposal
            lines.append(
                _field(
                    "proposal",
                    f"{proposal.decision.value} by {proposal.proposed_by} at "
                    f"{when(proposal.proposed_at)}, awaits approval until "
                    f"{when(proposal.expires_at)}",
                )
            )
        if state.claimed_by is not None:
            lines.append(
                _field("claimed", f"by {state.claimed_by} until {when(state.claimed_until)}")
            )
        lines += [
            _field("note", f"{when(n.at)} {n.operator or '-'}: {n.text}") for n in state.notes
        ]
        lines += [_field("refused", f"{r.handler}: {r.problem}") for r in state.refused]
    lines += ["", "audit"]
    lines += _indented(audit_table(details.audit)) if details.audit else ["  (no events)"]
    return "\n".join(lines)


def _time(state: StateView) -> list[str]:
    """The policy the command follows, its deadlines, and what holds one back."""
    lines = []
    if state.policy is not None:
        approval = ", ".join(kind.value for kind in state.require_approval)
        lines.append(
            _field("policy", state.policy + (f" (approval for: {approval})" if approval else ""))
        )
    if state.escalate_at is not None:
        escalated = " (escalated)" if state.escalated else ""
        lines.append(_field("escalates", f"at {when(state.escalate_at)}{escalated}"))
    if state.expire_at is not None and state.expire_decision is not None:
        kind = state.expire_decision.value
        if state.expiry_given_up:
            lines.append(_field("expires", f"{kind} at {when(state.expire_at)}: given up"))
        else:
            lines.append(_field("expires", f"{kind} at {when(state.expire_at)}"))
    if state.snoozed:
        lines.append(_field("snoozed", format_duration(state.snoozed) + " in all"))
    if state.retry_scheduled_for is not None:
        by = f" by {state.retry_scheduled_by}" if state.retry_scheduled_by else ""
        lines.append(_field("retry at", f"{when(state.retry_scheduled_for)}{by}"))
    lines += [
        _field("deferred", f"the {deadline}, held by the {why}")
        for deadline, why in state.deferred.items()
    ]
    return lines


def _field(name: str, value: object) -> str:
    return f"  {name:<12} {value}"


def _indented(text: str) -> list[str]:
    return ["  " + line for line in text.splitlines()]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(head), *(len(row[i]) for row in rows)]) for i, head in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    )


def when(value: datetime | None, *, precise: bool = False) -> str:
    if value is None:
        return ""
    if precise:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def clip(text: str | None, width: int) -> str:
    """One line of at most `width` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _pairs(details: dict[str, Any] | None) -> str:
    """Audit details as `key=value`: text with spaces and structures as JSON, unset keys omitted."""
    parts = []
    for key, value in (details or {}).items():
        if value is None:
            continue
        plain = isinstance(value, str) and value and not re.search(r'[\s"=]', value)
        parts.append(f"{key}={value if plain else json.dumps(value, default=str)}")
    return " ".join(parts)


def preview(p: DecisionPreview) -> str:
    """A dry run: the outcome, then each thing the decision would write."""
    lines = [f"{p.decision.value} of {p.command_id} (dry run, nothing written): {p.detail}"]
    would = p.would
    if would is None:
        return "\n".join(lines)
    lines.append(_field("status", f"{would.status_before} -> {would.status_after}"))
    for name, sent in (("reply", would.reply), ("message", would.message)):
        if sent is not None:
            lines.append(_field(name, f"to {sent.queue}:"))
            lines += ["    " + line for line in json.dumps(sent.body, indent=2).splitlines()]
    for row in would.audit:
        lines.append(_field("audit", f"{row.event_type} {_pairs(row.details)}"))
    if would.batch is not None:
        batch = would.batch
        changed = ", ".join(
            f"{key} {batch.before[key]} -> {batch.after[key]}"
            for key in batch.before
            if key.endswith("_count") and batch.before[key] != batch.after[key]
        )
        closes = "; the batch would complete" if batch.closes else ""
        lines.append(_field("batch", f"{batch.batch_id}: {changed or 'no change'}{closes}"))
    return "\n".join(lines)


# What each item of a bulk operation came to, as its summary names it.
BULK_LABELS = {
    "carried_out": "carried out",
    "already_decided": "skipped: already decided",
    "not_in_troubleshooting_queue": "skipped: not in troubleshooting queue",
    "not_found": "skipped: not found",
    "needs_approval": "refused: needs another operator's approval",
    "proposal_pending": "refused: a proposal awaits another operator's approval",
    "claimed": "refused: claimed by another operator",
    "payload_not_found": "refused: original message not found",
    "invalid": "refused: invalid",
    "error": "failed",
}


def bulk_operation(op: BulkOperation) -> str:
    """A bulk operation: what it decides, where it stands, its counts per result."""
    rate = f"at most {op.rate:g}/s" if op.rate is not None else "as fast as the database goes"
    lines = [
        f"bulk operation {op.bulk_id}: {op.decision.value} in {op.domain}, {op.status}",
        f"  {op.total} commands ({op.selection}), by {op.operator} at {when(op.created_at)}, "
        + rate,
        f"  {op.carried_out} carried out, {op.skipped} skipped, {op.failed} failed, "
        f"{op.remaining} remaining",
    ]
    lines += [
        f"    {label:<44} {op.counts[result]:>7}"
        for result, label in BULK_LABELS.items()
        if op.counts.get(result)
    ]
    if op.status == "proposed":
        lines.append(
            f"  awaits approval by an operator other than {op.operator} until "
            f"{when(op.approval_expires_at)} (a policy asks it for {op.needing_approval} of the "
            f"commands): `tsq bulk approve {op.bulk_id}` or `tsq bulk reject {op.bulk_id}`"
        )
    if op.approved_by is not None:
        comment = f": {op.approval_comment}" if op.approval_comment else ""
        lines.append(f"  approved by {op.approved_by} at {when(op.approved_at)}{comment}")
    if op.rejected_by is not None:
        lines.append(f"  rejected by {op.rejected_by}: {op.rejection_reason}")
    if op.status == "expired":
        lines.append(f"  not approved by {when(op.approval_expires_at)}: nothing was decided")
    if op.stop_requested_at is not None:
        lines.append(
            f"  stopped by {op.stop_requested_by} at {when(op.stop_requested_at)}: "
            f"{op.remaining} left untouched"
        )
    if op.finished_at is not None:
        lines.append(f"  ended at {when(op.finished_at)}")
    return "\n".join(lines)


def bulk_table(ops: Sequence[BulkOperation]) -> str:
    return _table(
        ["BULK_ID", "DOMAIN", "DECISION", "STATUS", "TOTAL", "DONE", "SKIPPED", "FAILED", "LEFT",
         "BY", "STARTED"],
        [
            [str(op.bulk_id), op.domain, op.decision.value, op.status, str(op.total),
             str(op.carried_out), str(op.skipped), str(op.failed), str(op.remaining),
             clip(op.operator, 30), when(op.created_at)]
            for op in ops
        ],
    )  # fmt: skip
