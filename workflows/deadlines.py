"""When something is due for a waiting command: its policy's escalation and expiry, counted
from when it was parked and pushed later by snoozes, a retry scheduled for later, the expiry of
a proposal waiting for approval and of an operator's claim.

Pure logic on the workflow's state: the workflow sleeps until `next()` and asks `due()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tsq.models import Claim, Policy, Proposal, ScheduledRetry


class Due(StrEnum):
    PROPOSAL_EXPIRED = "proposal_expired"
    CLAIM_EXPIRED = "claim_expired"
    RETRY = "retry"
    EXPIRE = "expire"
    ESCALATE = "escalate"


@dataclass
class Deadlines:
    parked_at: datetime
    policy: Policy | None = None
    snoozed: timedelta = timedelta(0)
    escalated: bool = False
    scheduled: ScheduledRetry | None = None
    # While a proposal waits for approval, the decisions that would pre-empt it (a scheduled
    # retry, the policy's expiry) wait with it; escalation does not.
    proposal: Proposal | None = None
    claim: Claim | None = None
    # A policy's decision that was refused (its reply queue is no PGMQ name, say) is not tried
    # again by itself: an operator decides.
    expiry_refused: bool = False

    def escalate_at(self) -> datetime | None:
        if self.policy is None or self.policy.escalate_after is None:
            return None
        return self.parked_at + self.policy.escalate_after + self.snoozed

    def expire_at(self) -> datetime | None:
        if self.policy is None or self.policy.expire_after is None:
            return None
        return self.parked_at + self.policy.expire_after + self.snoozed

    def next(self) -> datetime | None:
        """The next moment something is due; None: nothing ever is."""
        times = [at for at in (self._proposal_ends(), self._claim_ends()) if at is not None]
        if self.scheduled is not None:
            # An operator decided; the policy waits with them.
            if self.proposal is None:
                times.append(self.scheduled.at)
        else:
            times += self._policy_times()
        return min(times, default=None)

    def due(self, now: datetime) -> Due | None:
        """What is due at `now`, the most decisive first."""
        proposal_ends, claim_ends = self._proposal_ends(), self._claim_ends()
        if proposal_ends is not None and proposal_ends <= now:
            return Due.PROPOSAL_EXPIRED
        if claim_ends is not None and claim_ends <= now:
            return Due.CLAIM_EXPIRED
        if self.scheduled is not None:
            ready = self.proposal is None and self.scheduled.at <= now
            return Due.RETRY if ready else None
        expire = self.expire_at()
        if expire is not None and expire <= now and self._may_expire():
            return Due.EXPIRE
        escalate = self.escalate_at()
        if escalate is not None and escalate <= now and not self.escalated:
            return Due.ESCALATE
        return None

    def snoozable(self) -> bool:
        """Whether a snooze has anything to move: the policy's escalation or expiry ahead."""
        return self.scheduled is None and bool(self._policy_times(during_proposal=False))

    def _policy_times(self, *, during_proposal: bool = True) -> list[datetime]:
        escalate = None if self.escalated else self.escalate_at()
        held = during_proposal and self.proposal is not None
        expire = None if self.expiry_refused or held else self.expire_at()
        return [at for at in (escalate, expire) if at is not None]

    def _may_expire(self) -> bool:
        return not self.expiry_refused and self.proposal is None

    def _proposal_ends(self) -> datetime | None:
        return self.proposal.expires_at if self.proposal is not None else None

    def _claim_ends(self) -> datetime | None:
        return self.claim.until if self.claim is not None else None
