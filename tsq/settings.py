"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            database_url=env.get("TSQ_DATABASE_URL") or env.get("DATABASE_URL") or None,
            temporal_address=env.get("TEMPORAL_ADDRESS") or DEFAULT_TEMPORAL_ADDRESS,
            temporal_namespace=env.get("TEMPORAL_NAMESPACE") or "default",
            task_queue=env.get("TSQ_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
        )

    def require_database_url(self) -> str:
        if not self.database_url:
            raise InvalidInputError(
                "no database configured: set TSQ_DATABASE_URL (or DATABASE_URL), "
                "or run `tsq dev` for the embedded stack"
            )
        return self.database_url


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and banners."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
