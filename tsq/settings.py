"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tsq.contract import DEFAULT_TASK_QUEUE
from tsq.errors import InvalidInputError

DEFAULT_TEMPORAL_ADDRESS = "localhost:7233"


@dataclass(frozen=True)
class Settings:
    """Where tsq finds PostgreSQL and Temporal.

    TLS and API keys for a hosted Temporal come from Temporal's own environment configuration
    (`TEMPORAL_API_KEY`, `TEMPORAL_TLS_CLIENT_CERT_PATH`, ... or a `TEMPORAL_PROFILE`), which
    `tsq.temporal.connect` loads.
    """

    database_url: str | None = None
    temporal_address: str = DEFAULT_TEMPORAL_ADDRESS
    temporal_namespace: str = "default"
    task_queue: str = DEFAULT_TASK_QUEUE
    # `tsq worker` serves Prometheus metrics on this port when set.
    metrics_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            database_url=env.get("TSQ_DATABASE_URL") or env.get("DATABASE_URL") or None,
            temporal_address=env.get("TEMPORAL_ADDRESS") or DEFAULT_TEMPORAL_ADDRESS,
            temporal_namespace=env.get("TEMPORAL_NAMESPACE") or "default",
            task_queue=env.get("TSQ_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
            metrics_port=_port(env.get("TSQ_METRICS_PORT"), "TSQ_METRICS_PORT"),
        )

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never with a password in them.
        database = redact_url(self.database_url) if self.database_url else None
        return (
            f"Settings(database_url={database!r}, temporal_address={self.temporal_address!r}, "
            f"temporal_namespace={self.temporal_namespace!r}, task_queue={self.task_queue!r}, "
            f"metrics_port={self.metrics_port!r})"
        )

    def require_database_url(self) -> str:
        if not self.database_url:
            raise InvalidInputError(
                "no database configured: set TSQ_DATABASE_URL (or DATABASE_URL), "
                "or run `tsq dev` for the embedded stack"
            )
        return self.database_url


def _port(text: str | None, what: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidInputError(f"{what} {text!r} is not a port number (1-65535)")
    return int(text)


# Query-string parameters that carry a secret (libpq's names; asyncpg reads the same).
_SECRET_PARAMETERS = {"password", "sslpassword"}


def redact_url(url: str) -> str:
    """The URL with every password (in the user part or the query string) as ***, for logs
    and banners. Built from the parsed URL, so no spelling of it slips through."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() in _SECRET_PARAMETERS for key, _ in query):
        redacted = [
            (key, "***" if key.lower() in _SECRET_PARAMETERS else value) for key, value in query
        ]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(redacted, safe="*")))
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, name: str) -> str:
    """The same server URL, naming another database (the path is the database)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
