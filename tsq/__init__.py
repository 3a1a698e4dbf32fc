"""tsq: durable operator decisions for commands parked in a command bus's troubleshooting queue.

Services import from here; everything else is internal. The names load on first use, so
`import tsq` (or `from tsq import CommandNotFoundError`) costs next to nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tsq.client import SyncReport, TroubleshootingClient
    from tsq.contract import WORKFLOW_TYPE, workflow_id
    from tsq.errors import (
        AlreadyDecidedError,
        CommandNotFoundError,
        InvalidInputError,
        InvalidOperationError,
        PayloadNotFoundError,
        TroubleshootingError,
    )
    from tsq.models import DecisionOutcome
    from tsq.settings import Settings

    __version__: str

_EXPORTS = {
    "AlreadyDecidedError": "tsq.errors",
    "CommandNotFoundError": "tsq.errors",
    "DecisionOutcome": "tsq.models",
    "InvalidInputError": "tsq.errors",
    "InvalidOperationError": "tsq.errors",
    "PayloadNotFoundError": "tsq.errors",
    "Settings": "tsq.settings",
    "SyncReport": "tsq.client",
    "TroubleshootingClient": "tsq.client",
    "TroubleshootingError": "tsq.errors",
    "WORKFLOW_TYPE": "tsq.contract",
    "workflow_id": "tsq.contract",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tsq")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tsq' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
    "__version__",
    "workflow_id",
]
