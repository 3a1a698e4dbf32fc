"""The figures of a run: one JSON object (ratios, targets, exactly-once checks) and a table."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

import psutil  # type: ignore[import-untyped]
import temporalio

from tsq.bench.context import Bench


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(bench: Bench, stack: str) -> dict[str, Any]:
    r, config = bench.result, bench.config
    decisions, bare_decisions = r["decisions_per_s"], r["bare_decisions_per_s"]
    ratios = {
        "start_vs_bare": _ratio(r["start_per_s"], r["bare_start_per_s"]),
        # What the search attributes, summary and details cost the server by themselves.
        "bare_marked_start_vs_bare": _ratio(r["bare_marked_start_per_s"], r["bare_start_per_s"]),
        "start_vs_bare_marked": _ratio(r["start_per_s"], r["bare_marked_start_per_s"]),
        "decisions_vs_bare": _ratio(decisions, bare_decisions),
        "decision_p50_over_bare_ms": r["decision_p50_ms"] - r["bare_p50_ms"],
        "single_p50_over_bare_ms": r["single_p50_ms"] - r["bare_single_p50_ms"],
        "decisions_vs_direct_sql": _ratio(decisions, r["direct_sql_per_s"]),
        "bare_decisions_vs_direct_sql": _ratio(bare_decisions, r["direct_sql_per_s"]),
    }
    targets = {
        "decisions_ge_0.8_bare": (ratios["decisions_vs_bare"] or 0) >= 0.8,
        "starts_ge_0.9_bare": (ratios["start_vs_bare"] or 0) >= 0.9,
        "p50_le_bare_plus_15ms": ratios["decision_p50_over_bare_ms"] <= 15,
        "p99_le_150ms": r["decision_p99_ms"] <= 150,
        # Under load, latency is mostly queueing (concurrency / throughput): also judge it
        # where it measures the work, one decision at a time.
        "single_p50_le_bare_plus_15ms": ratios["single_p50_over_bare_ms"] <= 15,
        "single_p99_le_150ms": r["single_p99_ms"] <= 150,
    }
    if config.discovery:
        ratios["trigger_park_update"] = _ratio(
            r["bus_park_update_with_trigger_ms"], r["bus_park_update_ms"]
        )
        ratios["trigger_other_update"] = _ratio(
            r["bus_other_update_with_trigger_ms"], r["bus_other_update_ms"]
        )
        # What the same server needs, flat out, to start (or decide) that many bare workflows.
        r["discovery_ceiling_s"] = r["discovery_commands"] / r["bare_start_per_s"]
        r["drift_ceiling_s"] = r["discovery_commands"] / r["bare_decisions_per_s"]
        ratios["discovery_p99_vs_ceiling"] = _ratio(r["discovery_p99_s"], r["discovery_ceiling_s"])
        ratios["drift_p99_vs_ceiling"] = _ratio(r["drift_p99_s"], r["drift_ceiling_s"])
        targets["discovery_p99_le_2s"] = r["discovery_p99_s"] <= 2.0
        targets["drift_p99_le_5s"] = r["drift_p99_s"] <= 5.0
        targets["trigger_le_1.2x_update"] = (ratios["trigger_park_update"] or math.inf) <= 1.2
    if config.bulk:
        # What the same server needs, flat out, to decide that many bare workflows.
        r["bulk_ceiling_s"] = r["bulk_commands"] / bare_decisions
        ratios["bulk_vs_direct_sql"] = _ratio(r["bulk_effects_per_s"], r["direct_sql_per_s"])
        ratios["bulk_all_closed_vs_ceiling"] = _ratio(r["bulk_all_closed_s"], r["bulk_ceiling_s"])
        targets["bulk_effects_ge_0.5_direct_sql"] = (ratios["bulk_vs_direct_sql"] or 0) >= 0.5
        targets["bulk_all_closed_le_1.2_ceiling"] = (
            ratios["bulk_all_closed_vs_ceiling"] or math.inf
        ) <= 1.2
    if config.waiting:
        targets["rss_le_250mb"] = (r.get("worker_rss_mb") or math.inf) <= 250
        growth = r.get("single_decision_growth")
        targets["single_decision_growth_le_1.5"] = growth is not None and growth <= 1.5
    summary: dict[str, Any] = _rounded(
        {
            "config": {
                "commands": config.commands,
                "concurrency": config.concurrency,
                "waiting": config.waiting,
                "discovery": config.discovery,
                "bulk": config.bulk,
                "probes": config.probes,
            },
            "stack": stack,
            **{key: value for key, value in r.items() if key != "phases"},
            "worker_rss_mb": r.get("worker_rss_mb"),
            "ratios": ratios,
            "targets": targets,
            "exactly_once": all(check.ok for check in bench.checks.values()) and not bench.errors,
            "checks": {name: check.as_dict() for name, check in bench.checks.items()},
            "errors": bench.errors,
            "phases": r.get("phases", {}),
            "machine": {
                "cores": os.cpu_count(),
                "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "python": platform.python_version(),
                "temporalio": temporalio.__version__,
            },
        }
    )
    return summary


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


_ROWS = [
    ("tsq: move into TSQ + start workflow", "tsq_start"),
    ("bare workflow: start (ceiling)", "bare_start"),
    ("bare workflow + tsq's search attributes: start", "bare_marked_start"),
    ("tsq: operator_cancel, reply committed", "tsq_decide"),
    ("bare workflow: update-with-start (ceiling)", "bare_decide"),
    ("tsq: operator_cancel, one at a time", "tsq_single"),
    ("bare workflow: one at a time (ceiling)", "bare_single"),
    ("direct SQL cancel, 1 transaction (ceiling)", "direct_sql"),
    ("waiting: parked by the bus, started by the watcher", "waiting_start"),
    ("waiting: parked and started, to --waiting", "waiting_start_more"),
]


def format_table(result: dict[str, Any]) -> str:
    """The figures for a person: one row per measurement, then ratios, targets and checks."""
    c, m, ph = result["config"], result["machine"], result["phases"]
    lines = [
        f"tsq bench: {c['commands']} commands at concurrency {c['concurrency']} "
        f"(+{c['probes']} one at a time), discovery {c['discovery']}, waiting {c['waiting']}; "
        f"{result['stack']}; {m['cores']} cores, {m['memory_gb']} GB",
        "",
        f"{'measurement':<52}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    rows = [
        *_ROWS,
        (f"single decision at {result.get('low_waiting', 0)} waiting", "probe_low"),
        (f"single decision at {c['waiting']} waiting", "probe_high"),
    ]
    for label, key in rows:
        if key in ph:
            p = ph[key]
            lines.append(
                f"{label:<52}{_num(p['per_s']):>10}{_num(p['p50_ms']):>10}{_num(p['p99_ms']):>10}"
            )
    r = result["ratios"]
    lines += [
        "",
        "tsq latency is the operator_cancel call: it returns after the transaction that wrote "
        "the reply committed.",
        f"decisions/s vs bare: {_num(r['decisions_vs_bare'], 2)}   "
        f"starts/s vs bare: {_num(r['start_vs_bare'], 2)} "
        f"(bare with tsq's search attributes vs bare: {_num(r['bare_marked_start_vs_bare'], 2)})   "
        f"p50 over bare: {_num(r['decision_p50_over_bare_ms'])} ms "
        f"(one at a time: {_num(r['single_p50_over_bare_ms'])} ms)   "
        f"decisions/s vs direct SQL: {_num(r['decisions_vs_direct_sql'], 3)}",
    ]
    if c["discovery"]:
        lines.append(
            f"discovery of {c['discovery']} parked in one transaction: p50 "
            f"{_num(result['discovery_p50_s'], 2)} s, p99 {_num(result['discovery_p99_s'], 2)} s"
            f"; drift: p50 {_num(result['drift_p50_s'], 2)} s, p99 "
            f"{_num(result['drift_p99_s'], 2)} s (the server's own ceilings for that many: "
            f"{_num(result['discovery_ceiling_s'], 2)} s to start, "
            f"{_num(result['drift_ceiling_s'], 2)} s to decide); the bus's parking UPDATE with "
            "the trigger: "
            f"x{_num(r['trigger_park_update'], 2)} ({_num(result['bus_park_update_ms'], 2)} → "
            f"{_num(result['bus_park_update_with_trigger_ms'], 2)} ms), other UPDATEs "
            f"x{_num(r['trigger_other_update'], 2)}"
        )
    if c.get("bulk"):
        lines.append(
            f"bulk cancel of {c['bulk']}: effects committed in "
            f"{_num(result['bulk_effects_s'], 2)} s ({_num(result['bulk_effects_per_s'])}/s, "
            f"x{_num(r['bulk_vs_direct_sql'], 2)} direct SQL); every workflow closed in "
            f"{_num(result['bulk_all_closed_s'], 1)} s (x{_num(r['bulk_all_closed_vs_ceiling'], 2)}"
            f" the server's {_num(result['bulk_ceiling_s'], 1)} s to decide that many bare "
            f"workflows); worker RSS at most {_num(result.get('bulk_worker_rss_mb'))} MB"
        )
    if c["waiting"]:
        lines.append(
            f"worker at {c['waiting']} waiting: RSS {_num(result.get('worker_rss_mb'))} MB "
            f"(at start {_num(result.get('worker_rss_start_mb'))} MB), idle CPU "
            f"{_num(result.get('worker_idle_cpu_pct'), 2)}% of a core; Temporal server RSS "
            f"{_num(result.get('temporal_server_rss_mb'))} MB; single-decision p50 growth "
            f"x{_num(result.get('single_decision_growth'), 2)}"
        )
    targets = "  ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["targets"].items())
    checks = "  ".join(
        f"{k} {'ok' if v['ok'] else 'MISMATCH'}" for k, v in result["checks"].items()
    )
    lines += [f"targets: {targets}", f"exactly-once: {checks}"]
    for phase, error in result["errors"].items():
        lines.append(f"errors in {phase}: {error}")
    return "\n".join(lines)
