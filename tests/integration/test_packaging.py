"""What `pip install tsq` puts on a machine: one package, typed, light to import."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = """
from tsq import DecisionOutcome, TroubleshootingClient


async def decide(client: TroubleshootingClient) -> DecisionOutcome | None:
    outcome = await client.operator_cancel("payments", "x", "why")
    reveal_type(outcome)
    return outcome
"""


def test_wheel_installs_one_typed_package(tmp_path: Path) -> None:
    """The wheel holds the single top-level package `tsq` (with workflows, activities and
    worker inside), and mypy --strict in a service that installed it sees the real types."""
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("tsq-*.whl")
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    before = {path.name for path in purelib.iterdir()}
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    added = {path.name for path in purelib.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"tsq"}
    for part in ("workflows", "activities", "worker"):
        assert (purelib / "tsq" / part / "__init__.py").is_file(), part
    assert (purelib / "tsq" / "py.typed").is_file()

    # The service's own dependencies (temporalio, pydantic, ...) come from this environment;
    # tsq itself from the wheel.
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    consumer = tmp_path / "service.py"
    consumer.write_text(CONSUMER)
    checked = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--no-incremental"),
            *("--python-executable", str(python), str(consumer)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert 'Revealed type is "tsq.models.DecisionOutcome | None"' in checked.stdout, checked.stdout
    assert "error" not in checked.stdout.replace("Revealed", ""), checked.stdout


def test_importing_the_package_or_its_errors_loads_no_database_or_temporal_client() -> None:
    """`import tsq` and `import tsq.errors` stay light: asyncpg and the Temporal client load
    only when a name that needs them is used."""
    for statement in ("import tsq", "import tsq.errors", "from tsq import CommandNotFoundError"):
        loaded = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", statement],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stderr
        modules = {line.rsplit("|", 1)[-1].strip() for line in loaded.splitlines()}
        assert not {m for m in modules if m.split(".")[0] in ("asyncpg", "temporalio")}, statement
