"""What the OpenAPI schema says about error answers and request bodies the handlers read raw.

Every route declares the 4xx/503 answers it can give (`responses=`), so that clients and
schemathesis see the same contract the handlers keep. The ingest handlers read their body
themselves (size limit while streaming, gzip, NDJSON); their `ReadingsOperation` documents the
body without making Litestar parse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.openapi.spec.enums import OpenAPIFormat

JSON = "application/json"
NDJSON = "application/x-ndjson"
# The routes of the system we replace answer errors in its shape.
COMPAT_PATH = "/vital-data"


def error_body(path: str, message: Any) -> dict[str, Any]:
    """`{"error": message}`, or `{"status": "error", "message": message}` under /vital-data."""
    if path == COMPAT_PATH or path.startswith(COMPAT_PATH + "/"):
        return {"status": "error", "message": message}
    return {"error": message}


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """`{"error": message}`, with the offending query parameter where there is one."""

    error: str
    parameter: str | None = None


class ItemErrorBody(msgspec.Struct):
    index: int
    field: str
    message: str


class ItemErrors(msgspec.Struct):
    """422 of the ingest route: every invalid item (up to 100); `index` -1: the whole request."""

    errors: list[ItemErrorBody]


class CompatError(msgspec.Struct, omit_defaults=True):
    """The replaced system's error shape."""

    status: str
    message: str
    issues: list[Any] | None = None


_DESCRIPTIONS = {
    400: "Malformed body or query, or more than one API key in the request",
    401: "Missing, unknown or revoked API key",
    403: "The key lacks the scope, or a device lies outside its prefix",
    404: "Unknown device",
    409: "Several active keys have that name: give the `id` of one",
    408: "Body not received in time",
    413: "Body or item count over the limit",
    415: "Unsupported Content-Type or Content-Encoding",
    422: "Invalid items or query parameters; nothing stored",
    429: "The key's request rate is over VITALSTORE_KEY_RATE_LIMIT; retry after Retry-After"
         " seconds",
    503: "Ingest buffer full or database unavailable; retry after Retry-After seconds",
}


def errors(*statuses: int, body: Any = ErrorBody, **bodies: Any) -> dict[int, ResponseSpec]:
    """Response specs of error answers: `errors(404, 422)`; `s422=ItemErrors` for another body.

    A route that needs a key (it lists 401) can also answer 400 (more than one key) and 429
    (the key's rate limit).
    """
    if 401 in statuses:
        statuses = tuple(sorted({*statuses, 400, 429}))
    return {
        status: ResponseSpec(data_container=bodies.get(f"s{status}", body),
                             description=_DESCRIPTIONS[status], generate_examples=False)
        for status in statuses
    }


_TIMESTAMP = Schema(one_of=[
    Schema(type=OpenAPIType.NUMBER, description="Unix seconds, microseconds kept"),
    Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME,
           description="RFC 3339 with an offset"),
])
_READING = Schema(
    type=OpenAPIType.OBJECT,
    required=["device", "timestamp"],
    properties={
        "device": Schema(type=OpenAPIType.STRING, min_length=1, max_length=128,
                         description="device id, printable characters only"),
        "timestamp": _TIMESTAMP,
    },
    additional_properties=Schema(
        description="a number is a metric (name: 1 to 64 of letters, digits, _ . -); "
                    "anything else is an attribute kept with the reading"),
    description="One reading",
)
_READINGS_BODY = Schema(one_of=[
    _READING,
    Schema(type=OpenAPIType.ARRAY, items=_READING,
           description="at most VITALSTORE_MAX_ITEMS readings"),
])


@dataclass
class ReadingsOperation(Operation):
    """An ingest operation: its body is a reading, an array of them, or NDJSON lines."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="`Content-Encoding: gzip` accepted; the inflated size counts "
                        "against VITALSTORE_MAX_BODY_BYTES",
            content={
                JSON: OpenAPIMediaType(schema=_READINGS_BODY),
                NDJSON: OpenAPIMediaType(schema=Schema(
                    type=OpenAPIType.STRING, description="one reading object per line")),
            },
        )
        retry_after_503(self)


@dataclass
class RetryAfterOperation(Operation):
    """An operation whose 503 answers carry `Retry-After`."""

    def __post_init__(self) -> None:
        retry_after_503(self)


def retry_after_503(operation: Operation) -> None:
    """503 and 429 answers carry `Retry-After`."""
    for status in ("429", "503"):
        response = (operation.responses or {}).get(status)
        if isinstance(response, OpenAPIResponse):
            response.headers = {"Retry-After": OpenAPIHeader(
                schema=Schema(type=OpenAPIType.INTEGER), description="seconds", required=True)}
