"""`tsq bench` with tiny numbers on the session's services: shape and correctness, not speed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tsq.bench import BenchConfig, run_bench
from tsq.settings import Settings

FIGURES = (
    "start_per_s",
    "decisions_per_s",
    "decision_p50_ms",
    "decision_p99_ms",
    "bare_start_per_s",
    "bare_marked_start_per_s",
    "bare_decisions_per_s",
    "bare_p50_ms",
    "direct_sql_per_s",
    "direct_sql_p50_ms",
)


def _tsq_command() -> list[str]:
    script = Path(sys.executable).parent / "tsq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tsq.cli"]


async def test_bench_decides_every_command_exactly_once(settings: Settings) -> None:
    """Every phase, the waiting one included, leaves one reply, audit and decision per command."""
    config = BenchConfig(
        commands=20, concurrency=5, waiting=5, discovery=10, bulk=30, probes=3, idle_seconds=1
    )
    result = await run_bench(config, settings)

    assert result["exactly_once"] is True, result["checks"]
    assert result["errors"] == {}
    for name in FIGURES:
        assert result[name] > 0, name
    assert set(result["checks"]) == {
        "tsq_start",
        "tsq_decide",
        "bare",
        "direct_sql",
        "waiting_decide",
        "waiting_running",
        "discovery",
        "bulk",
    }
    assert result["bulk_commands"] == 30 and result["bulk_exactly_once"] is True
    assert result["bulk_effects_per_s"] > 0 and result["bulk_all_closed_s"] > 0
    assert result["ratios"]["bulk_vs_direct_sql"] > 0 and result["bulk_worker_rss_mb"] > 0
    # The 20 decided in bulk and the 3 decided one at a time.
    assert result["checks"]["tsq_decide"]["replies"] == 23
    assert result["checks"]["tsq_decide"]["decisions"] == 23
    assert result["checks"]["waiting_decide"]["decisions"] == 6
    assert result["checks"]["waiting_running"]["running_workflows"] == 5
    assert result["worker_rss_mb"] > 0
    assert result["worker_idle_cpu_pct"] >= 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["memory_gb"] > 0
    assert result["ratios"]["decisions_vs_bare"] > 0
    assert result["checks"]["discovery"] == {"expected": 10, "ok": True, "found": 10, "closed": 10}
    assert 0 < result["discovery_p50_s"] <= result["discovery_p99_s"]
    assert result["ratios"]["trigger_park_update"] > 0
    json.dumps(result)


async def test_bench_cli_prints_json_last(settings: Settings) -> None:
    """`tsq bench --json` on configured services ends its output with the figures as JSON."""
    assert settings.database_url is not None
    env = {
        **os.environ,
        "TSQ_DATABASE_URL": settings.database_url,
        "TEMPORAL_ADDRESS": settings.temporal_address,
    }
    process = await asyncio.create_subprocess_exec(
        *_tsq_command(),
        "bench",
        "--commands",
        "10",
        "--concurrency",
        "5",
        "--discovery",
        "5",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().strip().splitlines()
    assert "per s" in out.decode()
    result = json.loads(lines[-1])
    assert result["exactly_once"] is True
    assert result["stack"].startswith("configured PostgreSQL")
    for name in (*FIGURES, "worker_rss_mb", "machine", "ratios"):
        assert name in result, name
