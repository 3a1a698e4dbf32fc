"""When something is due for a waiting command: its policy's escalation and expiry, counted
from when it was parked and pushed later by snoozes, or a retry scheduled for later.

Pure logic on the workflow's state: the workflow sleeps until `next()` and asks `due()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tsq.models import Policy, ScheduledRetry


class Due(StrEnum):
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
        if self.scheduled is not None:
            # An operator decided; the policy waits with them.
            return self.scheduled.at
        times = [
            at
            for at in (
                None if self.escalated else self.escalate_at(),
                None if self.expiry_refused else self.expire_at(),
            )
            if at is not None
        ]
        return min(times, default=None)

    def due(self, now: datetime) -> Due | None:
        """What is due at `now`, the most decisive first."""
        if self.scheduled is not None:
            return Due.RETRY if self.scheduled.at <= now else None
        expire = self.expire_at()
        if expire is not None and expire <= now and not self.expiry_refused:
            return Due.EXPIRE
        escalate = self.escalate_at()
        if escalate is not None and escalate <= now and not self.escalated:
            return Due.ESCALATE
        return None

    def snoozable(self) -> bool:
        return self.scheduled is None and self.next() is not None
