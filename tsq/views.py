"""What the SDK's read calls return: plain pydantic models, easy to print as JSON."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from tsq.contract import DecisionKind
from tsq.models import StateView


class LastError(BaseModel):
    type: str | None
    code: str | None
    message: str | None


class TroubleshootingItem(BaseModel):
    """One command waiting in the troubleshooting queue."""

    domain: str
    command_id: UUID
    command_type: str
    status: str
    attempts: int
    max_attempts: int | None
    last_error: LastError
    correlation_id: UUID | None
    reply_to: str | None
    batch_id: UUID | None
    msg_id: int | None
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] | None
    state: str | None = Field(
        default=None,
        description="The workflow's TsqState; NO_WORKFLOW when none runs; None when Temporal "
        "could not be asked",
    )
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    proposal: str | None = Field(
        default=None, description='A decision awaiting approval: "cancel by alice"'
    )
    retry_at: datetime | None = Field(default=None, description="A retry scheduled for then")


class AuditEvent(BaseModel):
    audit_id: int
    event_type: str
    ts: datetime
    details: dict[str, Any] | None


class CommandDetails(BaseModel):
    """Everything about one command: row, original message, workflow state, audit trail."""

    command: TroubleshootingItem
    workflow_id: str
    run_id: str | None = Field(default=None, description="The workflow's latest run")
    workflow: StateView | None
    workflow_note: str | None = None
    audit: list[AuditEvent]


class WaitingGroup(BaseModel):
    """Waiting commands of one domain with the same error code and command type."""

    domain: str
    error_code: str | None
    command_type: str | None
    count: int
    oldest_parked_at: datetime
    newest_parked_at: datetime
    select: str = Field(
        description="The options that select this group in `tsq cancel|retry|complete DOMAIN`"
    )


class PolicyView(BaseModel):
    """A policy as `tsq policy show` and the SDK give it."""

    domain: str
    name: str
    command_type: str | None
    error_code: str | None
    escalate_after: timedelta | None
    expire_after: timedelta | None
    expire_decision: str | None
    expire_reason: str | None
    expire_result_data: dict[str, Any] | None
    require_approval: list[str] = Field(
        default_factory=list, description="Decisions that need a second operator's approval"
    )
    approval_expires_after: timedelta | None = None
    updated_at: datetime
    updated_by: str | None


class WouldSend(BaseModel):
    """A message a decision would send: the reply, or a retry's message."""

    queue: str
    body: dict[str, Any] | None


class WouldAudit(BaseModel):
    event_type: str
    command_id: UUID
    details: dict[str, Any] | None


class BatchChange(BaseModel):
    """The command's batch as it is and as the decision would leave it."""

    batch_id: UUID
    before: dict[str, Any]
    after: dict[str, Any]
    closes: bool = Field(description="Whether the decision would complete the batch")


class Would(BaseModel):
    """What a decision would write, read back from its own rolled-back transaction."""

    status_before: str
    status_after: str
    reply: WouldSend | None = None
    message: WouldSend | None = Field(default=None, description="Retry: the message re-sent")
    audit: list[WouldAudit] = Field(default_factory=list)
    batch: BatchChange | None = None


PreviewResult = Literal[
    "would_carry_out",
    "would_propose",
    "already_decided",
    "not_in_troubleshooting_queue",
    "not_found",
    "payload_not_found",
    "claimed",
    "proposal_pending",
    "invalid",
    "error",
]


class DecisionPreview(BaseModel):
    """`--dry-run`: what one decision would do, with nothing written."""

    domain: str
    command_id: UUID
    decision: DecisionKind
    result: PreviewResult
    detail: str
    needs_approval: bool = Field(
        default=False, description="A policy makes it a proposal for another operator first"
    )
    would: Would | None = None
