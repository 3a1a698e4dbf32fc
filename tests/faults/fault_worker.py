"""`tsq worker` that SIGKILLs itself after decisions committed but before workflows recorded them.

The real `tsq.carry_out` runs and commits; the wrapper then holds the activity open, so the
workflow task that would record the outcome is never completed. Once `TSQ_FAULT_KILL_AFTER`
decisions have committed (or `TSQ_FAULT_KILL_WITHIN` seconds after the first one), the process
kills itself with SIGKILL. Each commit is logged as `committed <effect key>`.

Run as `python fault_worker.py worker`, with the same environment as `tsq worker`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

# tsq before `activities`: importing `activities` first fails on a circular import.
from tsq.cli import entry

# isort: split
from temporalio import activity

from tsq.activities import TroubleshootingActivities
from tsq.models import CarryOut, DecisionOutcome

KILL_AFTER = int(os.environ.get("TSQ_FAULT_KILL_AFTER", "1"))
KILL_WITHIN = float(os.environ.get("TSQ_FAULT_KILL_WITHIN", "15"))

_real_carry_out = TroubleshootingActivities.carry_out
_committed: list[str] = []


def _die() -> None:
    print(f"killing myself after {len(_committed)} committed decision(s)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# `self` stays unannotated: the SDK takes an annotated first parameter for an argument.
@activity.defn(name="tsq.carry_out")
async def _carry_out_then_die(self, req: CarryOut) -> DecisionOutcome:  # type: ignore[no-untyped-def]
    await _real_carry_out(self, req)
    _committed.append(req.effect_key)
    print(f"committed {req.effect_key}", flush=True)
    if len(_committed) == 1:
        asyncio.get_running_loop().call_later(KILL_WITHIN, _die)
    if len(_committed) >= KILL_AFTER:
        _die()
    # Never return: the outcome must not reach the workflow.
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


TroubleshootingActivities.carry_out = _carry_out_then_die  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "tsq"
    entry()
