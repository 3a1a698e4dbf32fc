"""The Compose deployment: valid against the Compose specification, and wired the way tsq reads it.

Nothing here needs Docker: the file is checked offline against the Compose schema that
check-jsonschema vendors, and the worker's environment is fed to `Settings.from_env`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# ruamel.yaml comes with check-jsonschema, which the tests need anyway.
from ruamel.yaml import YAML

from tsq.contract import DEFAULT_TASK_QUEUE
from tsq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
# Any attempt to download goes through this proxy and fails, so a pass proves offline validation.
UNREACHABLE_PROXY = "http://127.0.0.1:9"
_DEFAULTED_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return loaded


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as `docker compose` would pass it with no `.env` file."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: _DEFAULTED_VARIABLE.sub(r"\2", str(value)) for key, value in env.items()}


def test_compose_file_is_valid_compose_specification(tmp_path: Path) -> None:
    """docker-compose.yml validates against the vendored Compose schema without network access."""
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(
            f"{CHECK_JSONSCHEMA} is missing: install the test extras (pip install -e '.[test]')"
        )
    offline = {
        **os.environ,
        "HTTP_PROXY": UNREACHABLE_PROXY,
        "HTTPS_PROXY": UNREACHABLE_PROXY,
        "ALL_PROXY": UNREACHABLE_PROXY,
        "NO_PROXY": "",
        "XDG_CACHE_HOME": str(tmp_path),
    }
    result = subprocess.run(
        [
            str(CHECK_JSONSCHEMA),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        env=offline,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_compose_runs_postgres_temporal_ui_and_worker(compose: dict[str, Any]) -> None:
    """The deployment has PostgreSQL, Temporal, the Temporal Web UI and the tsq worker."""
    assert {"postgres", "temporal", "temporal-ui", "worker"} <= set(compose["services"])
    assert _service(compose, "postgres")["image"].startswith("postgres:16")
    assert _service(compose, "temporal")["image"].startswith("temporalio/auto-setup:")
    assert _service(compose, "temporal-ui")["image"].startswith("temporalio/ui:")


def test_postgres_keeps_data_in_a_volume(compose: dict[str, Any]) -> None:
    """PostgreSQL's data directory is a named volume, so it survives `docker compose down`."""
    mounts = _service(compose, "postgres")["volumes"]
    volume = next(m.split(":")[0] for m in mounts if m.endswith(":/var/lib/postgresql/data"))
    assert volume in compose["volumes"]


def test_temporal_persists_to_the_compose_postgres(compose: dict[str, Any]) -> None:
    """Temporal keeps its own state in the same PostgreSQL server, with its credentials."""
    temporal = _environment(_service(compose, "temporal"))
    postgres = _environment(_service(compose, "postgres"))
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] == "postgres"
    assert temporal["POSTGRES_USER"] == postgres["POSTGRES_USER"]
    assert temporal["POSTGRES_PWD"] == postgres["POSTGRES_PASSWORD"]


def test_worker_environment_is_what_tsq_reads(compose: dict[str, Any]) -> None:
    """Settings.from_env turns the worker's environment into the compose services' addresses;
    the worker connects as the worker role, not as the owner."""
    env = _environment(_service(compose, "worker"))
    postgres = _environment(_service(compose, "postgres"))
    settings = Settings.from_env(env)
    assert settings.database_url == (
        f"postgresql://tsq_worker:{postgres['TSQ_WORKER_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert settings.temporal_address == "temporal:7233"
    assert settings.temporal_namespace == "default"
    assert settings.task_queue == DEFAULT_TASK_QUEUE == "troubleshooting"


def test_owner_migrates_once_and_grants_the_worker_role(compose: dict[str, Any]) -> None:
    """The `migrate` service runs as the owner and grants `tsq_worker`, which PostgreSQL's
    first start creates; the workers wait for it to succeed."""
    migrate = _service(compose, "migrate")
    postgres = _environment(_service(compose, "postgres"))
    assert migrate["command"] == ["migrate", "--worker-role", "tsq_worker"]
    owner = Settings.from_env(_environment(migrate))
    assert owner.database_url == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert _service(compose, "worker")["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    [init] = _service(compose, "postgres")["configs"]
    assert init["target"].startswith("/docker-entrypoint-initdb.d/")
    script = compose["configs"][init["source"]]["content"]
    assert "CREATE ROLE tsq_worker LOGIN PASSWORD :'password'" in script
    assert "TSQ_WORKER_PASSWORD" in script


@pytest.mark.parametrize(
    "variable", ["TSQ_DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TSQ_TASK_QUEUE"]
)
def test_each_worker_variable_changes_settings(compose: dict[str, Any], variable: str) -> None:
    """Each variable the worker sets is read by Settings.from_env, so none is misspelt."""
    env = _environment(_service(compose, "worker"))
    assert variable in env
    changed = Settings.from_env({**env, variable: "probe"})
    assert changed != Settings.from_env(env)
    assert "probe" in dataclasses.astuple(changed)


def test_worker_waits_for_healthy_postgres_and_temporal(compose: dict[str, Any]) -> None:
    """The worker starts only once PostgreSQL and Temporal pass their healthchecks."""
    depends_on = _service(compose, "worker")["depends_on"]
    for name in ("postgres", "temporal"):
        assert depends_on[name]["condition"] == "service_healthy"
        assert _service(compose, name)["healthcheck"]["test"]


def test_worker_is_built_here_and_migrates_before_polling(compose: dict[str, Any]) -> None:
    """The worker image is built from this repository and runs `tsq migrate` then `tsq worker`."""
    worker = _service(compose, "worker")
    assert worker["build"] == "."
    assert (ROOT / "Dockerfile").exists()
    script = " ".join(worker.get("entrypoint", [])) + " " + " ".join(worker.get("command", []))
    assert "tsq migrate && exec tsq worker" in script
    assert worker["deploy"]["replicas"] >= 1


def test_web_ui_talks_to_temporal_on_port_8080(compose: dict[str, Any]) -> None:
    """The Web UI reaches the Temporal frontend and is published on port 8080."""
    ui = _service(compose, "temporal-ui")
    assert _environment(ui)["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert any(str(port).endswith(":8080") for port in ui["ports"])
