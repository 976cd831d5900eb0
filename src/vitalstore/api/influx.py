"""InfluxDB's write endpoints: POST /api/v2/write (InfluxDB 2) and POST /write (InfluxDB 1).

Answers as InfluxDB does, so that Telegraf and the Influx client libraries retry and report
as they are built to: 204 after the commit, errors as `{"code": ..., "message": ...}`.
The key is checked here rather than by the middleware: v1 clients may put credentials in the
URL (`u`, `p`), which must get a 401 that says why, in InfluxDB's error shape.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    RequestBody,
    Schema,
)
from litestar.params import QueryParameter

from vitalstore.api.common import services_of
from vitalstore.api.ingest import read_body
from vitalstore.api.responses import RetryAfterOperation
from vitalstore.auth import CHECKED_BY_HANDLER, forbid_outside_prefix
from vitalstore.lineprotocol import PRECISION_V1, PRECISION_V2, LineParser, Precision
from vitalstore.problems import Problem, RetryLater

# InfluxDB's `code` for each status it answers.
_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden", 408: "invalid",
          413: "request too large", 415: "unsupported media type",
          422: "unprocessable entity", 503: "unavailable"}


class InfluxError(msgspec.Struct):
    """InfluxDB's error body."""

    code: str
    message: str


def _error(status: int, message: str, headers: dict[str, str] | None = None
           ) -> Response[Any]:
    return Response(InfluxError(_CODES[status], message), status_code=status, headers=headers)


class LineProtocolOperation(RetryAfterOperation):
    """The body is line protocol text, read raw by the handler."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, description="InfluxDB line protocol, one point a line; gzip accepted",
            content={"text/plain": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))})
        stored = (self.responses or {}).get("204")
        if isinstance(stored, OpenAPIResponse):
            stored.content = None  # 204 has no body (Litestar would declare a JSON one)
        super().__post_init__()


_RESPONSES = {
    status: ResponseSpec(data_container=InfluxError, description=description,
                         generate_examples=False)
    for status, description in {
        400: "A line that cannot be stored (all are named), or a missing parameter;"
             " nothing stored",
        401: "Missing, unknown or revoked key, or credentials in the URL",
        403: "The key lacks the ingest scope, or a device lies outside its prefix",
        408: "Body not received in time",
        413: "Body or line count over the limit",
        422: "The database refused the data",
        503: "Ingest buffer full or database unavailable; retry after Retry-After seconds",
    }.items()
}
_Query = Annotated[str | None, QueryParameter(required=False)]


async def _write(request: Request[Any, Any, Any], state: State, precisions: dict[str, Precision],
                 precision: str) -> Response[Any]:
    services = services_of(state)
    try:
        key = await services.keys.authorize(request.scope, "ingest")
    except HTTPException as exc:
        return _error(exc.status_code if exc.status_code in _CODES else 401, exc.detail,
                      exc.headers)
    if precision not in precisions:
        return _error(400, f"precision must be one of {', '.join(precisions)}")
    settings = services.settings
    parser = LineParser(services.validator, settings.lp_device_tag)
    batcher = services.batcher
    try:
        batcher.admit()
        try:
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            readings = parser.parse(body, precisions[precision], time.time())
            if not readings:
                return Response(None, status_code=204)
            forbid_outside_prefix(key, (r.device for r in readings))
            rows = await services.rows(readings)
        finally:
            batcher.leave()
        await batcher.submit(rows)
    except HTTPException as exc:  # outside the key's prefix
        return _error(exc.status_code, exc.detail)
    except Problem as exc:  # bad lines or body (4xx), the buffer full or no database (503)
        if isinstance(exc, RetryLater):
            services.telemetry.unavailable.labels(exc.cause).inc()
        return _error(exc.status if exc.status in _CODES else 400, str(exc), exc.headers)
    services.telemetry.accepted(len(readings))
    return Response(None, status_code=204)


@post("/api/v2/write", status_code=204, summary="InfluxDB 2 write: line protocol",
      operation_class=LineProtocolOperation, response_description="Stored (committed)",
      responses=_RESPONSES, **CHECKED_BY_HANDLER)
async def write_v2(
    request: Request[Any, Any, Any], state: State,
    bucket: _Query = None, org: _Query = None,
    org_id: Annotated[str | None, QueryParameter(name="orgID", required=False)] = None,
    precision: Annotated[str, QueryParameter(required=False)] = "ns",
) -> Response[None]:
    """Points as InfluxDB 2 takes them; `bucket` and `org` (or `orgID`) are required, any value."""
    if not bucket:
        return _error(400, "bucket is required")
    if not org and not org_id:
        return _error(400, "org or orgID is required")
    return await _write(request, state, PRECISION_V2, precision)


@post("/write", status_code=204, summary="InfluxDB 1 write: line protocol",
      operation_class=LineProtocolOperation, response_description="Stored (committed)",
      responses=_RESPONSES, **CHECKED_BY_HANDLER)
async def write_v1(
    request: Request[Any, Any, Any], state: State, db: _Query = None,
    precision: Annotated[str, QueryParameter(required=False)] = "n",
    user: Annotated[str | None, QueryParameter(name="u", required=False)] = None,
    password: Annotated[str | None, QueryParameter(name="p", required=False)] = None,
) -> Response[None]:
    """Points as InfluxDB 1 takes them; `db` is required, any value."""
    if user is not None or password is not None:
        # URLs end up in logs and proxies: a key there is a leaked key.
        return _error(401, "credentials in the URL (u, p) are not accepted: send the API key as"
                           " 'Authorization: Token <key>'")
    if not db:
        return _error(400, "database is required (db)")
    return await _write(request, state, PRECISION_V1, precision)


ROUTES = [write_v2, write_v1]
