"""tsq's payload converter: pydantic's, except that a value without a type never fails to load.

The SDK decodes a signal's arguments before the handler runs and drops the signal, with only a
log line, when that fails. Valid JSON pydantic will not take (a lone surrogate `"\\ud800"`,
nesting past its limit) or a payload that is not JSON at all would vanish unseen. The workflow's
signal and update handlers take their arguments untyped, so such an argument arrives here as
`UndecodableInput`, and the workflow refuses it visibly, like any other bad input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter


class UndecodableInput:
    """An argument pydantic could not decode: why, its start, and what the standard library's
    JSON reader made of it (`value`, when it could read it at all)."""

    _UNREAD = object()

    def __init__(self, problem: str, excerpt: str, value: Any = _UNREAD) -> None:
        self.problem = problem
        self.excerpt = excerpt
        self.value = value

    @property
    def readable(self) -> bool:
        return self.value is not self._UNREAD

    def __repr__(self) -> str:
        return self.excerpt


class TsqPayloadConverter(PydanticPayloadConverter):
    def from_payloads(
        self, payloads: Sequence[Payload], type_hints: list[type] | None = None
    ) -> list[Any]:
        if type_hints:
            return super().from_payloads(payloads, type_hints)
        values = []
        for payload in payloads:
            try:
                [value] = super().from_payloads([payload])
            except Exception as err:
                value = _undecodable(payload, err)
            values.append(value)
        return values


def _undecodable(payload: Payload, err: Exception) -> UndecodableInput:
    encoding = payload.metadata.get("encoding", b"").decode("utf-8", "replace")
    excerpt = payload.data[:200].decode("utf-8", "backslashreplace")
    if encoding != "json/plain":
        return UndecodableInput(f"JSON expected, got {encoding or 'no'} encoding", excerpt)
    try:
        return UndecodableInput("unreadable JSON", excerpt, json.loads(payload.data))
    except RecursionError:
        return UndecodableInput("nested too deeply to read", excerpt)
    except ValueError:
        return UndecodableInput(f"not valid JSON ({type(err).__name__})", excerpt)
