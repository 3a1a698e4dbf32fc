"""`tsq worker` in a process of its own, so that its memory and CPU are its own to measure."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from tsq.settings import Settings


def rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None


class WorkerProcess:
    """A `tsq worker` (and its watcher) on one task queue, its output in `log_file`."""

    def __init__(self, settings: Settings, task_queue: str, log_file: Path) -> None:
        self.settings = settings
        self.task_queue = task_queue
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        script = Path(sys.executable).parent / "tsq"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "tsq.cli"]
        env = {
            **os.environ,
            "TSQ_DATABASE_URL": self.settings.require_database_url(),
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "TEMPORAL_NAMESPACE": self.settings.temporal_namespace,
            "TSQ_TASK_QUEUE": self.task_queue,
        }
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                [*command, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(self, *exc: object) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_polling(self, within: float = 60.0) -> None:
        """Block until the worker logs that it polls its task queue."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while b"polling task queue" not in self.log_file.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"`tsq worker` exited with code {self.process.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"`tsq worker` did not start within {within:.0f}s")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / 2**20

    async def idle(self, seconds: float) -> tuple[float, float]:
        """RSS (MB) at the end of a quiet window and CPU over it (percent of one core)."""
        proc = psutil.Process(self.pid)
        before = proc.cpu_times()
        began = time.monotonic()
        await asyncio.sleep(seconds)
        after = proc.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        return proc.memory_info().rss / 2**20, 100 * used / (time.monotonic() - began)
