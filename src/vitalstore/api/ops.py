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
from vitalstore.policies import APACHE_WARNING, PolicyHealth, policy_health
from vitalstore.services import Services
from vitalstore.telemetry import Telemetry


@get("/health", summary="The process is up", **OPEN)
async def health() -> dict[str, str]:
    """Liveness: answers 200 whenever the process serves requests; needs no key."""
    return {"status": "ok"}


class NotReady(msgspec.Struct):
    status: str
    problems: list[str]
    warnings: list[str]


async def _policies(services: Services) -> list[PolicyHealth] | None:
    """The policy jobs' health; None where there are none (Apache-only) or it cannot be read."""
    if not services.columnstore:
        return None
    try:
        return await policy_health(services.pool)
    except Exception:  # readiness and metrics answer without it
        return None


def _warnings(services: Services, policies: list[PolicyHealth] | None) -> list[str]:
    """What an operator should know that does not stop the service from taking readings."""
    if not services.columnstore:
        return [APACHE_WARNING]
    return [str(policy) for policy in policies or [] if policy.failing]


@get("/ready", summary="Database reachable, schema at head, ingest buffer not full",
     operation_class=RetryAfterOperation, responses=errors(503, s503=NotReady), **OPEN)
async def ready(state: State) -> Response[dict[str, Any]]:
    """Readiness: 200 when the database answers, its schema is at this code's head and the
    ingest buffer has room; else 503 with the problems and Retry-After. Needs no key.
    """
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
    mqtt = services.mqtt
    if mqtt is not None:
        problems += mqtt.problems()
    # A failing policy is a warning, not a problem: readings are still taken and kept.
    reachable = not any(problem.startswith("database:") for problem in problems)
    warnings = _warnings(services, await _policies(services) if reachable else None)
    extra = {} if mqtt is None else {"mqtt": mqtt.state()}
    if problems:
        return Response({"status": "unavailable", "problems": problems, "warnings": warnings,
                         **extra}, status_code=503, headers={"Retry-After": "1"})
    body: dict[str, Any] = {"status": "ready", "buffered": services.batcher.buffered,
                            "schema": schema, **extra}
    if warnings:
        body["warnings"] = warnings
    return Response(body)


@get("/metrics", summary="Prometheus metrics (text format)", media_type=CONTENT_TYPE_LATEST,
     operation_class=RetryAfterOperation, responses=errors(401, 403), **METRICS)
async def metrics_route(state: State) -> Response[bytes]:
    """Prometheus text format: requests, flushes, buffer, pool and auth failure counters.

    Needs a `read` key unless VITALSTORE_METRICS_OPEN=true.
    """
    services = services_of(state)
    telemetry: Telemetry = services.telemetry
    telemetry.sample(services.batcher.buffered, services.pool)
    policies = await _policies(services)
    if policies is not None:
        telemetry.policies(policies)
    return Response(telemetry.exposition(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [health, ready, metrics_route]
