"""The rules of a command's life in tsq, in one place, pure, so that a machine can check them.

One parking of a command in the troubleshooting queue has one `Life`: waiting for an operator,
claimed by one, with a decision proposed for a second one to approve, a retry scheduled, a
policy's escalation and expiry ahead, a decision being carried out, decided. Everything that
can reach it is an event: an operator's request, a deadline coming due, the database read
again, the result of carrying a decision out. Each function here takes a life and one event to
a `Step` — the next life and what to do about it (audit records to write, search attributes
to set, a decision to carry out) — or refuses the event with `Refused`, changing nothing.

Nothing here reads a clock, a database or Temporal: each event brings the time it happens at
(`now`) and a way to name what it creates (`new_id`). The workflow (`troubleshooting.py`)
feeds events in and carries steps out; `docs/rules.md` has the same rules as a table, and
`tests/unit/test_rules_model.py` drives random interleavings of every event through here and
checks the invariants after each step.

The rules, in short:
- One decision per parking. While one is being carried out, or once decided, every other
  decision is refused; so are decisions while a proposal waits (approve or reject it first).
- A claim holds everyone else's decisions back, unless forced (audited). It holds a policy's
  expiry and another operator's scheduled retry too: those wait for the claim to end.
- A decision of a kind the policy asks approval for becomes a proposal, and is carried out
  only once an operator other than its proposer approves it — whoever proposed it: an
  operator, the policy's own expiry, or a retry scheduled before that policy was set.
- A deadline that comes due while a claim or a proposal holds the command is deferred
  (audited, once) and happens when that ends; one the database refuses for good is given up
  (audited, with a notice). None is lost without a trace.
- Time only moves forward and never past `LONGEST` from now: durations are above zero and at
  most ten years, snoozes never move a deadline more than ten years ahead.
- Names are compared by `operator_key` (NFKC, invisible characters removed, case folded).
"""

from tsq.workflows.rules._deadlines import tick
from tsq.workflows.rules._decisions import carried_out, carrying_out, held_up, observed, refused
from tsq.workflows.rules._life import (
    HELD_BACK_BY,
    KEPT,
    MAX_RECORDS_PER_STEP,
    Deadline,
    Life,
    Pending,
    Publish,
    Record,
    Refused,
    Step,
    decided,
    escalate_at,
    expire_at,
    expiry_ahead,
    held_by,
    live_claim,
    next_wake,
)
from tsq.workflows.rules._requests import (
    approve,
    claim,
    decide,
    note,
    outcome_of_proposal,
    outcome_of_schedule,
    reject,
    release,
    snooze,
    unschedule,
)

__all__ = [
    "HELD_BACK_BY",
    "KEPT",
    "MAX_RECORDS_PER_STEP",
    "Deadline",
    "Life",
    "Pending",
    "Publish",
    "Record",
    "Refused",
    "Step",
    "approve",
    "carried_out",
    "carrying_out",
    "claim",
    "decide",
    "decided",
    "escalate_at",
    "expire_at",
    "expiry_ahead",
    "held_by",
    "held_up",
    "live_claim",
    "next_wake",
    "note",
    "observed",
    "outcome_of_proposal",
    "outcome_of_schedule",
    "refused",
    "reject",
    "release",
    "snooze",
    "tick",
    "unschedule",
]
