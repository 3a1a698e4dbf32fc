"""Errors raised by tsq. Every one is a `TroubleshootingError`."""

from __future__ import annotations


class TroubleshootingError(Exception):
    """Base class of every error tsq raises on purpose."""


class CommandNotFoundError(TroubleshootingError):
    """No command with that domain and id exists."""


class NotFoundError(TroubleshootingError):
    """Something else named does not exist (a policy, say)."""


class InvalidOperationError(TroubleshootingError):
    """The command exists but cannot be decided now (wrong status, already decided)."""


class AlreadyDecidedError(InvalidOperationError):
    """The command already has a decision (a second one is refused), or is finished."""


class PayloadNotFoundError(InvalidOperationError):
    """Retry refused: the command's original message is in no archive tsq can read."""


class ClaimedError(InvalidOperationError):
    """Another operator has claimed the command: their claim must be released, expire, or be
    overridden with `force` (audited)."""


class ApprovalRequiredError(InvalidOperationError):
    """The decision needs a second operator's approval (a policy says so): it is proposed
    through the workflow, never carried out directly."""


class StaleParkingError(InvalidOperationError):
    """The workflow reached is finishing an earlier parking of the command; its workflow for
    the current parking follows once it has ended."""


class InvalidInputError(TroubleshootingError, ValueError):
    """An argument is malformed (blank reason, id that is not a UUID, bad queue name, ...)."""


class UnavailableError(TroubleshootingError):
    """A service tsq needs (PostgreSQL, Temporal) cannot be reached, or is not what tsq needs
    there: the message names the service, the setting it was found by and the likely fix."""


class CommandLineError(TroubleshootingError):
    """The command line stopped on purpose: not confirmed, or commands left undecided."""


# Names used as `ApplicationError.type` across the Temporal boundary, so a refusal raised in a
# workflow or activity comes back to the SDK as the same Python class.
ERROR_TYPES: dict[str, type[TroubleshootingError]] = {
    cls.__name__: cls
    for cls in (
        CommandNotFoundError,
        InvalidOperationError,
        AlreadyDecidedError,
        PayloadNotFoundError,
        ClaimedError,
        ApprovalRequiredError,
        StaleParkingError,
        InvalidInputError,
        UnavailableError,
    )
}
