"""The figures the fault suite publishes: what it broke, and what survived."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Figures:
    """Filled by the tests as they go; printed at the end of the run."""

    faults: Counter[str] = field(default_factory=Counter)
    decisions_completed: int = 0
    replies_lost: int = 0
    replies_duplicated: int = 0
    audits_lost: int = 0
    audits_duplicated: int = 0
    status_changes_duplicated: int = 0
    workflows_stuck: int = 0
    inputs: Counter[str] = field(default_factory=Counter)
    inputs_refused: Counter[str] = field(default_factory=Counter)
    inputs_stored: Counter[str] = field(default_factory=Counter)
    secrets_leaked: int = 0

    def fault(self, kind: str, count: int = 1) -> None:
        self.faults[kind] += count

    def input_tried(self, entrance: str, *, refused: bool) -> None:
        self.inputs[entrance] += 1
        if refused:
            self.inputs_refused[entrance] += 1
        else:
            self.inputs_stored[entrance] += 1

    def empty(self) -> bool:
        return not self.faults and not self.inputs and not self.decisions_completed

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = []
        for kind, count in sorted(self.faults.items()):
            rows.append((f"fault: {kind}", str(count)))
        rows += [
            ("decisions completed (verified once each)", str(self.decisions_completed)),
            ("replies lost", str(self.replies_lost)),
            ("replies duplicated", str(self.replies_duplicated)),
            ("audit rows lost", str(self.audits_lost)),
            ("audit rows duplicated", str(self.audits_duplicated)),
            ("status changes duplicated", str(self.status_changes_duplicated)),
            ("workflows stuck", str(self.workflows_stuck)),
        ]
        for entrance in sorted(self.inputs):
            rows.append(
                (
                    f"hostile inputs via {entrance}: tried / refused / stored verbatim",
                    f"{self.inputs[entrance]} / {self.inputs_refused[entrance]}"
                    f" / {self.inputs_stored[entrance]}",
                )
            )
        rows.append(
            (
                "hostile inputs, all entrances: tried / refused / stored verbatim",
                f"{sum(self.inputs.values())} / {sum(self.inputs_refused.values())}"
                f" / {sum(self.inputs_stored.values())}",
            )
        )
        rows.append(("secrets found in logs, search attributes, details", str(self.secrets_leaked)))
        width = max(len(name) for name, _ in rows)
        out = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        out += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
        return out


FIGURES = Figures()
