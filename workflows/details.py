"""What an operator reads in the Temporal Web UI (tab "User Metadata").

- summary: one line in the workflow list and on the workflow page;
- static details: the command's fixed facts, set once at start;
- current details: where the decision stands and, while waiting, the exact JSON to send.

Every value from the database is cut to a bounded length (marked where cut): the full value
stays in PostgreSQL, and the server refuses metadata past its limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from tsq.contract import DECISIONS, DecisionKind, TsqState
from tsq.models import CommandSnapshot

if TYPE_CHECKING:
    from tsq.models import StateView

EXAMPLES = {kind: decision.example for kind, decision in DECISIONS.items()}
APPROVE_EXAMPLE = {"operator": "colleague@example.com", "comment": "checked with the ledger"}
REJECT_EXAMPLE = {"operator": "colleague@example.com", "reason": "the ledger has it already"}
NOTE_EXAMPLE = {"text": "asked the ledger team", "operator": "you@example.com"}
CLAIM_EXAMPLE = {"operator": "you@example.com", "for": "1h"}
RELEASE_EXAMPLE = {"operator": "you@example.com"}
_ANSWER = (
    " Answers once it is done; refused, with the reason, if the input is wrong or the "
    "command was already decided."
)
_STATE = " Answers with the state."


def _decision(kind: DecisionKind, answer: str = "") -> str:
    decision = DECISIONS[kind]
    return (
        f"{kind.value.capitalize()}: {decision.effect}.{answer} "
        f"Input: {json.dumps(decision.example)}"
    )


_OTHERS = {
    "snooze": "Snooze: the escalation and expiry not yet passed move later by `for`, audited. "
    'Input: {"for": "2h", "reason": "waiting for the ledger team", "operator": '
    '"you@example.com"}',
    "unschedule": "Unschedule: a retry scheduled for later is dropped and the command waits "
    'again, audited. Input: {"operator": "you@example.com", "reason": "fixed by hand"}',
    "approve": "Approve: the decision proposed (PENDING_APPROVAL) is carried out; by an "
    f"operator other than the proposer, audited. Input: {json.dumps(APPROVE_EXAMPLE)}",
    "reject": "Reject: the decision proposed is dropped and the command waits again; by an "
    f"operator other than the proposer, audited. Input: {json.dumps(REJECT_EXAMPLE)}",
    "note": f"Note: kept with the command, audited. Input: {json.dumps(NOTE_EXAMPLE)}",
    "claim": "Claim: you are on this command; other operators' decisions are refused unless "
    f"forced until the claim ends (default 1h). Input: {json.dumps(CLAIM_EXAMPLE)}",
    "release": "Release your claim (another's with force, audited). Input: "
    f"{json.dumps(RELEASE_EXAMPLE)}",
}
# What the Web UI lists beside each signal and update (Send a Signal, Send an Update).
DESCRIBE: dict[str, str] = {
    **{kind.value: _decision(kind) for kind in DecisionKind},
    **{f"operator_{kind.value}": _decision(kind, _ANSWER) for kind in DecisionKind},
    **_OTHERS,
    **{
        f"operator_{name}": text + (_ANSWER if name == "approve" else _STATE)
        for name, text in _OTHERS.items()
    },
    "tsq_refresh": "Read the command's status from the database again; sent by tsq's watcher "
    "when the command leaves the troubleshooting queue by another hand. Harmless by hand.",
    "tsq_observe": "The tsq_refresh signal as an update, which is how tsq's watcher sends it: "
    "the server writes it to the history with the workflow task that takes it, where a signal "
    "is a write of its own. Harmless by hand.",
}
# Current details travel in the UI's URLs: keep lists short.
SHOWN_REFUSALS = 5
# Longest value shown; the summary has a line of its own.
VALUE_LIMIT = 300
SUMMARY_LIMIT = 200


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def steps_of(kind: DecisionKind, command: CommandSnapshot) -> list[str]:
    """What carrying out `kind` does to `command`, step by step (all in one transaction)."""
    decision = DECISIONS[kind]
    status, event = decision.status_after.value, decision.audit_event.value
    if decision.reply_outcome is None:
        return [
            f"message re-sent to {command.domain}__commands",
            f"status {status}, attempts 0",
            f"audit {event}",
        ]
    reply = clip(command.reply_queue, 60)
    return [
        f"status {status}",
        f"audit {event}",
        f"reply {decision.reply_outcome} to {reply}" if reply else "no reply (no reply queue)",
    ]


def render_summary(command: CommandSnapshot) -> str:
    """Single line shown in the workflow list."""
    code = command.last_error_code or command.last_error_type or "error"
    line = f"{command.domain} {command.command_type} {command.command_id} — {code}"
    return clip(" ".join(line.split()), SUMMARY_LIMIT)


def _text(value: object) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return clip(str(value).replace("\n", " "), VALUE_LIMIT)


def _code(value: object) -> str:
    if value is None or value == "":
        return "—"
    # A backtick inside would end the code span early.
    return "`" + _text(value).replace("`", "'") + "`"


def render_static_details(command: CommandSnapshot) -> str:
    """The command's facts, which do not change while its workflow waits."""
    error = " ".join(_code(v) for v in (command.last_error_type, command.last_error_code))
    return "\n".join(
        [
            f"- **Domain:** {_code(command.domain)}",
            f"- **Command type:** {_code(command.command_type)}",
            f"- **Command id:** {_code(command.command_id)}",
            f"- **Correlation id:** {_code(command.correlation_id)}",
            f"- **Reply queue:** {_code(command.reply_queue)}",
            f"- **Batch:** {_code(command.batch_id)}",
            f"- **Attempts:** {command.attempts} of {_text(command.max_attempts)}",
            f"- **Error:** {error}",
            f"- **Message:** {_text(command.last_error_msg)}",
            f"- **Created:** {_text(command.created_at)}",
            f"- **Parked:** {_text(command.parked_at)}",
        ]
    )


def render_details(
    command: CommandSnapshot,
    state: TsqState,
    view: StateView,
    *,
    failed_attempts: Sequence[str],
    failed_count: int = 0,
) -> str:
    """Markdown for "Current details": the state and what holds the command now (a claim, a
    proposal, time), how to decide, and what the decision did."""
    lines = [
        f"## {state.value}",
        f"{_text(command.command_type)} `{command.command_id}` —"
        f" {_text(command.last_error_code or command.last_error_type)}:"
        f" {_text(command.last_error_msg)}",
        "",
    ]
    lines += _people(view)
    if view.proposal is not None:
        lines += _proposal(view)
    lines += _deadlines(view)
    if state is TsqState.AWAITING_OPERATOR:
        lines += _decide(command, view)
    if view.decision is not None:
        lines += [
            "### Decision",
            "",
            f"- **{view.decision.value}** by {_text(view.decided_by)}"
            f" at {_text(view.requested_at)}",
        ]
        if view.reason is not None:
            lines.append(f"- Reason: {_text(view.reason)}")
        if view.result_data is not None:
            lines.append(f"- Result data: `{clip(json.dumps(view.result_data), VALUE_LIMIT)}`")
        lines += [f"- {step}: **{progress}**" for step, progress in view.steps.items()]
    if view.outcome is not None:
        if view.decision is None:
            lines += ["### Decided elsewhere", ""]
        lines += [f"- Outcome: {_text(view.outcome.detail)}", ""]
    elif view.decision is not None:
        lines.append("")
    lines += _notes(view)
    if failed_attempts:
        lines += ["### Decisions that could not be carried out (nothing was changed)", ""]
        lines += _last(failed_attempts, max(failed_count, len(failed_attempts)))
        lines.append("")
    if view.refused:
        lines += ["### Refused requests (nothing was changed)", ""]
        lines += _last(
            [
                f"`{_text(r.handler)}`: {_text(r.problem)} — received {_code(r.received)}"
                for r in view.refused
            ],
            max(view.refused_count, len(view.refused)),
        )
        lines.append("")
    return "\n".join(lines)


def _json(example: Mapping[str, object]) -> list[str]:
    """A JSON input to paste, one key a line: narrow enough for the details panel."""
    return ["```json", json.dumps(example, indent=1), "```"]


def _decide(command: CommandSnapshot, view: StateView) -> list[str]:
    lines = [
        "### Decide",
        "",
        "**More Actions → Send a Signal**, pick one of these names and paste its JSON (or "
        "**Send an Update** `operator_<name>` to get an answer). *Request Cancellation* and "
        "*Terminate* stop the workflow, not the command: tsq refuses the first, and the second "
        "leaves the command parked without a workflow until the sweep starts a new one.",
        "",
    ]
    for kind, example in EXAMPLES.items():
        lines += [f"**{kind.value}** — {', '.join(steps_of(kind, command))}", *_json(example)]
    if view.policy is not None and view.require_approval:
        kinds = ", ".join(kind.value for kind in view.require_approval)
        lines += [
            "",
            f"Policy {_code(view.policy)} asks for a second operator's approval of: {kinds}. "
            "Such a decision becomes a proposal; name your `operator`.",
        ]
    lines += [
        "",
        "**note** (kept with the command), **claim** (others' decisions are then refused "
        'unless they add `"force": true`), **release**:',
        *_json(NOTE_EXAMPLE),
        *_json(CLAIM_EXAMPLE),
        *_json(RELEASE_EXAMPLE),
        "",
    ]
    return lines


def _deadlines(view: StateView) -> list[str]:
    """The policy's escalation and expiry, snoozes, a retry scheduled for later, and what
    holds a deadline back."""
    lines = []
    if view.retry_scheduled_for is not None:
        lines.append(
            f"- **Retry scheduled** for {_text(view.retry_scheduled_for)} by "
            f"{_text(view.retry_scheduled_by)} (`unschedule` drops it; any other decision "
            "replaces it)"
        )
    if view.policy is not None:
        lines.append(f"- Policy: {_code(view.policy)}")
        if view.escalate_at is not None:
            done = " — **escalated**" if view.escalated else ""
            lines.append(f"- Escalates at {_text(view.escalate_at)}{done}")
        if view.expire_at is not None and view.expire_decision is not None:
            kind = view.expire_decision.value
            if view.expiry_given_up:
                lines.append(
                    f"- Expired at {_text(view.expire_at)}: the policy's {kind} was not carried "
                    "out (see the audit trail); an operator decides"
                )
            else:
                how = "propose to" if view.expire_decision in view.require_approval else "will"
                lines.append(
                    f"- Expires at {_text(view.expire_at)}: the policy {how} **{kind}** it"
                )
        if view.snoozed:
            lines.append(f"- Snoozed for {_text(view.snoozed)} in all")
    lines += [
        f"- The {deadline} is due but held back by the {_text(why)}: it happens once that ends"
        for deadline, why in view.deferred.items()
    ]
    return ["### Time", "", *lines, ""] if lines else []


def _proposal(view: StateView) -> list[str]:
    proposal = view.proposal
    assert proposal is not None
    request = {k: v for k, v in proposal.request.items() if k not in ("operator", "parking_id")}
    return [
        "### Awaiting approval",
        "",
        f"- **{proposal.decision.value}** proposed by {_text(proposal.proposed_by)} at "
        f"{_text(proposal.proposed_at)}" + (f": `{_text(json.dumps(request))}`" if request else ""),
        f"- Expires at {_text(proposal.expires_at)} unless approved",
        "",
        "**Send a Signal** (or **Send an Update** `operator_<name>`), as an operator other than "
        f"{_text(proposal.proposed_by)}:",
        "",
        "**approve**",
        *_json(APPROVE_EXAMPLE),
        "**reject**",
        *_json(REJECT_EXAMPLE),
        "",
    ]


def _people(view: StateView) -> list[str]:
    """Who is on the command."""
    if view.claimed_by is None:
        return []
    return [
        f"**Claimed by {_text(view.claimed_by)}** until {_text(view.claimed_until)}: other "
        'operators\' decisions are refused unless they add `"force": true`.',
        "",
    ]


def _notes(view: StateView) -> list[str]:
    if not view.notes:
        return []
    lines = ["### Notes", ""]
    lines += _last(
        [f"{_text(n.at)} {_text(n.operator)}: {_text(n.text)}" for n in view.notes],
        max(view.notes_count, len(view.notes)),
    )
    return [*lines, ""]


def _last(items: Sequence[str], total: int) -> list[str]:
    shown = [f"- {item}" for item in items[-SHOWN_REFUSALS:]]
    if total > len(shown):
        shown.insert(0, f"- … {total - len(shown)} earlier (see the audit trail)")
    return shown
