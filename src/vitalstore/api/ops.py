"""Operations: liveness and readiness."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response, get
from litestar.datastructures import State

from vitalstore.api.common import services_of
from vitalstore.api.responses import RetryAfterOperation, errors
from vitalstore.writer import CONNECTION_ERRORS


@get("/health", summary="The process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


class NotReady(msgspec.Struct):
    status: str
    problems: list[str]


@get("/ready", summary="Database reachable, schema at head, ingest buffer not full",
     operation_class=RetryAfterOperation, responses=errors(503, s503=NotReady))
async def ready(state: State) -> Response[dict[str, Any]]:
    services = services_of(state)
    problems = []
    try:
        revision = await services.pool.fetchval("SELECT version_num FROM alembic_version",
                                                timeout=2)
    except (*CONNECTION_ERRORS, Exception) as exc:  # any failure means not ready
        problems.append(f"database: {type(exc).__name__}")
    else:
        if services.schema_head is not None and revision != services.schema_head:
            problems.append(f"schema at {revision}, code expects {services.schema_head}")
    if services.batcher.full:
        problems.append("ingest buffer full")
    if not services.batcher.available:
        problems.append("writer not connected")
    if problems:
        return Response({"status": "unavailable", "problems": problems}, status_code=503,
                        headers={"Retry-After": "1"})
    return Response({"status": "ready", "buffered": services.batcher.buffered})


ROUTES = [health, ready]
