"""POST /v1/readings, and POST /vital-data for clients of the system we replace."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from vitalstore.api.common import answer, compat_error, services_of
from vitalstore.api.responses import (
    JSON,
    NDJSON,
    CompatError,
    ItemErrors,
    ReadingsOperation,
    errors,
)
from vitalstore.auth import COMPAT_OPT, forbid_outside_prefix, requires
from vitalstore.database import CONNECTION_ERRORS
from vitalstore.keys import ApiKey
from vitalstore.problems import BodyProblem, InvalidItems, Problem, RetryLater, Unavailable
from vitalstore.services import Services

# Metric names made by other processes are known here within this many seconds (those this
# process makes or looks up, at once): until then a string in that field stays an attribute.
KNOWN_METRICS_MAX_AGE_S = 10.0


class Accepted(msgspec.Struct):
    accepted: int


class CompatAccepted(msgspec.Struct):
    status: str


def _inflate(data: bytes, limit: int) -> bytes:
    """gunzip with a cap on the inflated size, checked while inflating (a bomb stays small)."""
    inflater = zlib.decompressobj(wbits=31)
    out = bytearray()
    pending = data
    try:
        while pending and not inflater.eof:
            out += inflater.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise BodyProblem(413, f"body inflates to more than {limit} bytes")
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise BodyProblem(400, f"malformed gzip body: {exc}") from None
    if not inflater.eof:
        raise BodyProblem(400, "truncated gzip body")
    return bytes(out)


async def read_body(request: Request[Any, Any, Any], max_bytes: int, timeout_s: float) -> bytes:
    """The request body, decompressed, within the size limit and the time allowed.

    The wire size is Litestar's to check (`request_max_body_size` is `max_bytes`: it refuses
    an announced Content-Length at once and counts the bytes streamed); the inflated size of
    a gzip body is checked here, since Litestar only sees the compressed bytes.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise BodyProblem(415, f"unsupported Content-Encoding {encoding!r}; use gzip")
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                chunks.append(chunk)
    except TimeoutError:
        raise BodyProblem(408, f"body not received within {timeout_s:g} s") from None
    except RequestEntityTooLarge:
        raise BodyProblem(413, f"body larger than {max_bytes} bytes") from None
    except ClientException as exc:
        raise BodyProblem(exc.status_code, str(exc.detail)) from None
    except InternalServerException:
        # Litestar's word for a client that went away mid-body: nobody reads this answer,
        # but it must not count (or log) as a server error.
        raise BodyProblem(400, "client disconnected before the whole body arrived") from None
    body = b"".join(chunks)
    if encoding == "gzip":
        body = _inflate(body, max_bytes)
    return body


def _media_type(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("content-type", JSON).split(";", 1)[0].strip().lower()


async def ingest(request: Request[Any, ApiKey, Any], services: Services) -> int:
    """Validate, check the key's prefix, resolve ids, and wait for the commit.

    Returns how many readings were stored. Raises a Problem (BodyProblem, MalformedBody,
    TooManyReadings, InvalidItems, Overloaded, Unavailable, Rejected) or
    PermissionDeniedException (a device outside the key's prefix); nothing of the request is
    stored unless it returns.
    """
    settings = services.settings
    media_type = _media_type(request)
    if media_type not in (JSON, NDJSON):
        raise BodyProblem(415, f"unsupported Content-Type {media_type!r}; use {JSON} or {NDJSON}")
    batcher = services.batcher
    # Refuse before reading the body: a full buffer answers at once.
    batcher.admit()
    try:
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        try:
            known_metrics = await services.metric_ids.all_names(services.pool,
                                                                KNOWN_METRICS_MAX_AGE_S)
        except CONNECTION_ERRORS as exc:
            raise Unavailable("database unavailable") from exc
        readings = services.validator.decode(body, media_type, known_metrics=known_metrics)
        if not readings:
            return 0
        # Before ids are resolved: a refused request must not even register its devices.
        forbid_outside_prefix(request.auth, (r.device for r in readings))
        rows = await services.rows(readings)
    finally:
        batcher.leave()
    await batcher.submit(rows)
    services.telemetry.accepted(len(readings))
    return len(readings)


def _answer(services: Services, problem: Problem) -> Response[Any]:
    if isinstance(problem, RetryLater):
        services.telemetry.unavailable.labels(problem.cause).inc()
    return answer(problem)


@post("/v1/readings", status_code=202, summary="Store readings; answers after they commit",
      operation_class=ReadingsOperation, response_description="Stored (committed)",
      responses=errors(400, 401, 403, 408, 413, 415, 422, 503, s422=ItemErrors),
      **requires("ingest"))
async def post_readings(request: Request[Any, ApiKey, Any], state: State) -> Response[Accepted]:
    """One reading object or an array of them (JSON), or one per line (NDJSON); gzip allowed."""
    services = services_of(state)
    # Caught here rather than by the app's exception handler: an overload 503 stays cheap.
    try:
        accepted = await ingest(request, services)
    except Problem as exc:
        return _answer(services, exc)
    return Response(Accepted(accepted), status_code=202)


@post("/vital-data", status_code=202, summary="Compatibility: store readings (old API)",
      operation_class=ReadingsOperation, response_description="Stored (committed)",
      responses=errors(400, 401, 403, 408, 413, 415, 503, body=CompatError),
      opt={COMPAT_OPT: True}, **requires("ingest"))
async def post_vital_data(request: Request[Any, ApiKey, Any],
                          state: State) -> Response[CompatAccepted]:
    """The replaced system's ingest route, now durable: 202 only after commit."""
    services = services_of(state)
    try:
        await ingest(request, services)
    except Problem as exc:
        # The old API's clients know one refusal, 400 "Invalid payload", besides the
        # transport's own answers (body too large, too slow, wrong encoding; 503).
        if isinstance(exc, InvalidItems):
            return _compat_invalid(exc.content()["errors"])
        if isinstance(exc, RetryLater) or (isinstance(exc, BodyProblem)
                                           and exc.status in (408, 413, 415)):
            if isinstance(exc, RetryLater):
                services.telemetry.unavailable.labels(exc.cause).inc()
            return compat_error(exc.status, str(exc), headers=exc.headers)
        return _compat_invalid([str(exc)])
    return Response(CompatAccepted("accepted"), status_code=202)


def _compat_invalid(issues: list[Any]) -> Response[Any]:
    return Response({"status": "error", "message": "Invalid payload", "issues": issues},
                    status_code=400)


@post("/bench/noop", status_code=202, include_in_schema=False, **requires("ingest"))
async def post_noop(request: Request[Any, ApiKey, Any], state: State) -> Response[Any]:
    """Benchmark reference: read, decode, validate, authorize like /v1/readings; store nothing."""
    services = services_of(state)
    body = await read_body(request, services.settings.max_body_bytes,
                           services.settings.body_timeout_s)
    readings = services.validator.decode(body, _media_type(request))
    forbid_outside_prefix(request.auth, (r.device for r in readings))
    return Response(Accepted(len(readings)), status_code=202)


# The size and shape of a device's latest values: what GET /v1/devices/{id}/latest answers.
_NOOP_LATEST = {
    "device": "bench-noop",
    "last_seen": "2025-06-18T10:00:01.250000Z",
    "metrics": {name: {"value": 72.0, "timestamp": "2025-06-18T10:00:01.250000Z"}
                for name in ("heartRateValue", "respiratoryRate", "spo2", "temperature")},
}


@get("/bench/noop", include_in_schema=False, **requires("read"))
async def get_noop() -> dict[str, Any]:
    """Benchmark reference for reads: the same stack answering a latest-sized JSON, no query."""
    return _NOOP_LATEST


ROUTES = [post_readings, post_vital_data]
BENCH_ROUTES = [post_noop, get_noop]
