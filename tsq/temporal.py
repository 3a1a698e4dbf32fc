"""The one place that builds a Temporal client, for the worker, the SDK, the CLI and the tests."""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.failure.v1 import Failure
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime

from tsq.contract import SearchAttribute
from tsq.converter import TsqPayloadConverter
from tsq.errors import ERROR_TYPES, UnavailableError
from tsq.settings import Settings


class _OperatorFacingFailures(DefaultFailureConverter):
    """tsq's own refusals reach operators (Web UI dialogs, CLI): message only, no stack trace."""

    def to_failure(
        self, exception: BaseException, payload_converter: PayloadConverter, failure: Failure
    ) -> None:
        super().to_failure(exception, payload_converter, failure)
        if isinstance(exception, ApplicationError) and exception.type in ERROR_TYPES:
            failure.stack_trace = ""


DATA_CONVERTER = DataConverter(
    payload_converter_class=TsqPayloadConverter, failure_converter_class=_OperatorFacingFailures
)


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """Connect with the pydantic data converter (workers built on the client inherit it).

    TLS and API key come from Temporal's environment configuration (`TEMPORAL_API_KEY`,
    `TEMPORAL_TLS_*`, `TEMPORAL_PROFILE`), the same variables the `temporal` CLI reads.
    """
    config: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    config["target_host"] = settings.temporal_address
    config["namespace"] = settings.temporal_namespace
    try:
        return await Client.connect(**config, data_converter=DATA_CONVERTER, runtime=runtime)
    except RuntimeError as err:
        raise explain(settings.temporal_address, err) from None


def explain(address: str, err: BaseException) -> UnavailableError:
    """What a failed connection to Temporal means: the service, the setting, the likely fix."""
    text = str(err)
    setting = "TEMPORAL_ADDRESS"
    if "ConnectionRefused" in text or "Connection refused" in text:
        why = f"refused the connection: is the Temporal server running there? Check {setting}"
    elif "dns error" in text or "lookup address" in text:
        why = f"is a host name that does not resolve: check {setting}"
    elif "get_system_info" in text or "transport error" in text or "BrokenPipe" in text:
        why = (
            "answered, but not as a Temporal frontend (gRPC): is that another service's port "
            f"(PostgreSQL's, the Web UI's)? Temporal's gRPC port is usually 7233; check {setting}"
        )
    elif "Unauthenticated" in text or "PermissionDenied" in text or "API key" in text:
        why = "refused tsq's credentials: check TEMPORAL_API_KEY or TEMPORAL_TLS_* / the profile"
    else:
        why = f"could not be reached ({text.splitlines()[0] if text else type(err).__name__})"
    return UnavailableError(f"Temporal at {address} {why}")


_INDEXED = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
}


async def register_search_attributes(client: Client) -> list[str]:
    """Add tsq's Keyword search attributes to the namespace; returns the ones it added."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {
        name.value: _INDEXED[name.kind]
        for name in SearchAttribute
        if name.value not in existing.custom_attributes
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    return sorted(missing)
