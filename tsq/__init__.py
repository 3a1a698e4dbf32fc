"""tsq: durable operator decisions for commands parked in a command bus's troubleshooting queue.

Services import from here; everything else is internal.
"""

from tsq.client import SyncReport, TroubleshootingClient
from tsq.errors import (
    AlreadyDecidedError,
    CommandNotFoundError,
    InvalidInputError,
    InvalidOperationError,
    PayloadNotFoundError,
    TroubleshootingError,
)
from tsq.settings import Settings
from workflows import WORKFLOW_TYPE, workflow_id
from workflows.models import DecisionOutcome

__all__ = [
    "WORKFLOW_TYPE",
    "AlreadyDecidedError",
    "CommandNotFoundError",
    "DecisionOutcome",
    "InvalidInputError",
    "InvalidOperationError",
    "PayloadNotFoundError",
    "Settings",
    "SyncReport",
    "TroubleshootingClient",
    "TroubleshootingError",
    "workflow_id",
]
