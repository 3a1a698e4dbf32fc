"""Workflows started before the rules module: what their histories need to replay.

Commands wait for days on the version of tsq that started their workflow, so a workflow's
history must replay on every later version. Two earlier versions are still told apart here,
by their input:
- tsq 0.1 (no `parking_id`): decisions keyed by the run, each refused signal written to the
  audit trail as it came, new signal names refused as unknown, undecodable signals dropped, and
  a Request Cancellation that could interrupt a decision's activity;
- 0.2 before the rules (a `parking_id`, no `rules`): each audit record written by its handler
  as it ran, refused signals written by the run loop in batches of their own.

Either takes the current rules at its next event (a signal, an update, a deadline coming due):
behind a patch marker named after the history length (`tsq-2-upgrade@<n>`, `tsq-3-rules@<n>`),
so each workflow has its own and finds it when replayed, and a history written before the
upgrade replays the old way. The stored histories of both are in `tests/histories/v0.1`,
`v0.1-upgraded` and `v0.2-dev`.

Delete this module, with the branches that call it, once no workflow of those versions waits.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

from tsq.contract import RULES, Activity
from tsq.models import CommandSnapshot, RecordEvent, RecordRefusal, RecordRefusals, RefusedRequest
from tsq.workflows.shell import ACTIVITY_RETRY, ACTIVITY_TIMEOUT

if TYPE_CHECKING:
    from tsq.workflows.rules import Record

REFUSALS_PER_WRITE = 200
UPGRADE_01 = "tsq-2-upgrade"
UPGRADE_02 = "tsq-3-rules"


class Version(IntEnum):
    V01 = 1
    V02 = 2
    RULES = 3


def version_of(command: CommandSnapshot) -> Version:
    if command.parking_id is None:
        return Version.V01
    return Version.RULES if command.rules == RULES else Version.V02


def upgraded(version: Version) -> Version:
    """The version a workflow follows from this event on (see the module docstring)."""
    length = workflow.info().get_current_history_length()
    if version is Version.V01 and workflow.patched(f"{UPGRADE_01}@{length}"):
        version = Version.V02
    if version is Version.V02 and workflow.patched(f"{UPGRADE_02}@{length}"):
        version = Version.RULES
    return version


UNKNOWN_TO_01 = "unknown signal {name!r}: the decisions are cancel, retry and complete"


async def write_record(call: Any, record: Record, command: CommandSnapshot, seq: int) -> None:
    """A record as 0.2 wrote it, by its own activity, in the handler that made it."""
    info = workflow.info()
    try:
        await call(
            Activity.RECORD_EVENT,
            RecordEvent(
                effect_key=f"{info.workflow_id}/parking/{command.parking_id}/event/{seq}",
                workflow_id=info.workflow_id,
                domain=command.domain,
                command_id=command.command_id,
                event=record.event,
                details=record.details,
                seq=seq,
                notice=record.notice,
                error_code=command.last_error_code,
                claim=record.claim,
                release=record.release,
                parking_id=command.parking_id,
            ),
            ACTIVITY_RETRY,
        )
    except ActivityError as err:
        workflow.logger.warning("%s not written to the audit trail: %s", record.event, err)


async def write_refusals(
    call: Any, unwritten: list[RefusedRequest], command: CommandSnapshot, refused_count: int
) -> None:
    """Refused signals as 0.2 wrote them: one activity per batch, numbered from the first not
    written; written ones leave `unwritten`."""
    while unwritten:
        refusals = unwritten[:REFUSALS_PER_WRITE]
        try:
            await call(
                Activity.RECORD_REFUSALS,
                RecordRefusals(
                    workflow_id=workflow.info().workflow_id,
                    domain=command.domain,
                    command_id=command.command_id,
                    parking_id=command.parking_id,
                    first=refused_count - len(unwritten) + 1,
                    refusals=refusals,
                ),
                ACTIVITY_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("refusals not written to the audit trail: %s", err)
        del unwritten[: len(refusals)]


async def write_refusal_01(refusal: RefusedRequest, command: CommandSnapshot, count: int) -> None:
    """A refused signal as 0.1 wrote it: at once, keyed by the run."""
    info = workflow.info()
    await workflow.execute_local_activity(
        Activity.RECORD_REFUSAL,
        RecordRefusal(
            effect_key=f"{info.workflow_id}/{info.run_id}/refused/{count}",
            workflow_id=info.workflow_id,
            domain=command.domain,
            command_id=command.command_id,
            refusal=refusal,
        ),
        start_to_close_timeout=ACTIVITY_TIMEOUT,
        retry_policy=ACTIVITY_RETRY,
    )
