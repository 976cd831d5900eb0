"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST

from vitalstore.api.common import services_of
from vitalstore.api.responses import RetryAfterOperation, errors
from vitalstore.auth import METRICS, OPEN
from vitalstore.telemetry import Telemetry


@get("/health", summary="The process is up", **OPEN)
async def health() -> dict[str, str]:
    return {"status": "ok"}


class NotReady(msgspec.Struct):
    status: str
    problems: list[str]


@get("/ready", summary="Database reachable, schema at head, ingest buffer not full",
     operation_class=RetryAfterOperation, responses=errors(503, s503=NotReady), **OPEN)
async def ready(state: State) -> Response[dict[str, Any]]:
    services = services_of(state)
    problems = []
    # Installed without its migrations (a wheel), the service cannot know the head: it says so.
    schema = "not checked: no migrations installed with this code"
    try:
        revision = await services.pool.fetchval("SELECT version_num FROM alembic_version",
                                                timeout=2)
    except Exception as exc:  # any failure at all means not ready
        problems.append(f"database: {type(exc).__name__}")
    else:
        if services.schema_head is not None:
            schema = revision
            if revision != services.schema_head:
                problems.append(f"schema at {revision}, code expects {services.schema_head}")
    if services.batcher.full:
        problems.append("ingest buffer full")
    if not services.batcher.available:
        problems.append("writer not connected")
    if problems:
        return Response({"status": "unavailable", "problems": problems}, status_code=503,
                        headers={"Retry-After": "1"})
    return Response({"status": "ready", "buffered": services.batcher.buffered, "schema": schema})


@get("/metrics", summary="Prometheus metrics (text format)", media_type=CONTENT_TYPE_LATEST,
     sync_to_thread=False, operation_class=RetryAfterOperation, responses=errors(401, 403),
     **METRICS)
def metrics_route(state: State) -> Response[bytes]:
    services = state.services
    telemetry: Telemetry = services.telemetry
    telemetry.sample(services.batcher.buffered, services.pool)
    return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [health, ready, metrics_route]
