"""`tsq dev`, the README's first command: the whole stack on one machine, data kept across runs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from tsq.devstack import free_port

TSQ = str(Path(sys.executable).parent / "tsq")
BANNER = "tsq dev is running"


def _clean_env() -> dict[str, str]:
    """No configured services: `tsq dev` must start its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TSQ_", "TEMPORAL_")) and k != "DATABASE_URL"
    }


class DevStack:
    def __init__(self, data_dir: Path, log: Path, *, demo: bool) -> None:
        self.port, self.ui_port = free_port(), free_port()
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    *(TSQ, "dev", *(["--demo"] if demo else []), "--data-dir", str(data_dir)),
                    *("--port", str(self.port), "--ui-port", str(self.ui_port)),
                ],
                env=_clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, within: float = 120) -> str:
        deadline = time.monotonic() + within
        while BANNER not in (text := self.log.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tsq dev did not come up:\n{text}")
            time.sleep(0.2)
        return text

    def stop(self, signum: int = signal.SIGINT) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _export(banner: str, name: str) -> str:
    match = re.search(rf"export {name}='?([^'\n]+)'?", banner)
    assert match, banner
    return match.group(1)


@pytest.mark.timeout(400)
async def test_tsq_dev_runs_decides_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    """Every documented start: plain `tsq dev` on a fresh folder (nothing waits, it says how to
    get something), `tsq dev --demo` on it (UI up, a CLI cancel works, Ctrl-C exits 0), and
    plain `tsq dev` again, which finds the same commands and workflows."""
    data_dir = tmp_path / "data"
    fresh = DevStack(data_dir, tmp_path / "fresh.log", demo=False)
    try:
        banner = await asyncio.to_thread(fresh.wait_ready)
        assert "Nothing waits in payments yet" in banner
    finally:
        code = await asyncio.to_thread(fresh.stop)
    assert code == 0, fresh.log.read_text()[-2000:]

    first = DevStack(data_dir, tmp_path / "first.log", demo=True)
    try:
        banner = await asyncio.to_thread(first.wait_ready)
        database_url = _export(banner, "TSQ_DATABASE_URL")
        address = _export(banner, "TEMPORAL_ADDRESS")
        assert f"http://127.0.0.1:{first.ui_port}" in banner
        waiting = re.search(r"Waiting in payments: (.+)", banner)
        assert waiting, banner
        ids = waiting.group(1).split(", ")
        assert len(ids) == 4, banner
        env = {**_clean_env(), "TSQ_DATABASE_URL": database_url, "TEMPORAL_ADDRESS": address}
        done = await asyncio.to_thread(
            subprocess.run,
            [TSQ, "cancel", "payments", ids[0], "--reason", "Invalid account"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
    finally:
        code = await asyncio.to_thread(first.stop)
    assert code == 0, first.log.read_text()[-2000:]

    second = DevStack(data_dir, tmp_path / "second.log", demo=False)
    try:
        banner = await asyncio.to_thread(second.wait_ready)
        conn = await asyncpg.connect(_export(banner, "TSQ_DATABASE_URL"))
        try:
            statuses = dict(
                await conn.fetch(
                    "SELECT command_id::text, status FROM commandbus.command "
                    "WHERE domain = 'payments'"
                )
            )
        finally:
            await conn.close()
        # The demo seeds once: the same four commands, one of them canceled.
        assert len(statuses) == 4 and statuses[ids[0]] == "CANCELED"
        assert ids[0] not in banner and ids[1] in banner
        env["TSQ_DATABASE_URL"] = _export(banner, "TSQ_DATABASE_URL")
        env["TEMPORAL_ADDRESS"] = _export(banner, "TEMPORAL_ADDRESS")
        # The workflows started before the restart are still there and still decide.
        done = await asyncio.to_thread(
            subprocess.run,
            [TSQ, "cancel", "payments", ids[1], "--reason", "after restart"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
    finally:
        code = await asyncio.to_thread(second.stop, signal.SIGTERM)
    assert code == 0, second.log.read_text()[-2000:]
