"""Aggregates by bucket, from the rollups: one device's metrics, or one metric across devices."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter

from vitalstore import queries, rollups
from vitalstore.api.common import (
    NamesQuery,
    OptionalQuery,
    error,
    query_names,
    query_range,
    query_text,
    services_of,
)
from vitalstore.api.responses import RetryAfterOperation, errors
from vitalstore.auth import effective_prefix, requires
from vitalstore.database import EARLIEST, LATEST
from vitalstore.keys import ApiKey
from vitalstore.problems import BadQuery
from vitalstore.rollups import Bucket

FromQuery = Annotated[str | None, QueryParameter(name="from", required=False)]
DEFAULT_BUCKET = "1h"


class DeviceAggregate(msgspec.Struct):
    start: str
    metric: str
    count: int
    sum: float
    min: float
    max: float
    avg: float


class DeviceAggregates(msgspec.Struct):
    device: str
    bucket: str
    items: list[DeviceAggregate]


class FleetAggregate(msgspec.Struct):
    start: str
    count: int
    sum: float
    min: float
    max: float
    avg: float
    devices: int


class FleetAggregates(msgspec.Struct):
    metric: str
    bucket: str
    items: list[FleetAggregate]


def _range(bucket: str | None, from_: str | None, to: str | None
           ) -> tuple[Bucket, datetime, datetime]:
    try:
        spec = rollups.parse_bucket(DEFAULT_BUCKET if bucket is None else bucket)
    except ValueError as exc:
        raise BadQuery("bucket", str(exc)) from None
    return (spec, *query_range(from_, to, EARLIEST, LATEST))


@get("/v1/devices/{device:str}/aggregates",
     summary="Count, sum, min, max, avg of a device's metrics per bucket, in [from, to)",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 404, 422, 503),
     **requires("read"))
async def device_aggregates(request: Request[Any, ApiKey, Any], state: State,
                            device: FromPath[str], from_: FromQuery = None,
                            to: OptionalQuery = None, bucket: OptionalQuery = None,
                            metrics: NamesQuery = None) -> Response[DeviceAggregates]:
    """Items by metric, then start; buckets without data are left out.

    `bucket` (default 1h) is a whole number of minutes, hours or days from 1m to 31d; buckets
    start at 2000-01-03T00:00:00Z plus whole buckets (UTC), and the range is clipped to whole
    buckets, so an item never counts data outside [from, to).
    """
    services = services_of(state)
    spec, start, end = _range(bucket, from_, to)
    visible = request.auth.covers(query_text("device", device))
    names = query_names("metrics", metrics)
    # Outside the key's prefix: the same 404 as an unknown device, no hint that it exists.
    found = await queries.find_device(services.pool, device) if visible else None
    if found is None:
        return error(404, f"unknown device {device!r}")
    metric_ids = None
    if names:
        metric_ids = sorted((await services.metric_ids.ids(
            services.pool, names, create=False)).values())
    rows = await rollups.device_aggregates(services.pool, found.id, spec, start, end, metric_ids)
    return Response(DeviceAggregates(device, spec.text, [DeviceAggregate(*row) for row in rows]))


@get("/v1/aggregates",
     summary="Count, sum, min, max, avg of one metric per bucket across devices, in [from, to)",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 422, 503),
     **requires("read"))
async def fleet_aggregates(request: Request[Any, ApiKey, Any], state: State,
                           metric: OptionalQuery = None, from_: FromQuery = None,
                           to: OptionalQuery = None, bucket: OptionalQuery = None,
                           prefix: OptionalQuery = None) -> Response[FleetAggregates]:
    """Items by start, over every device (or those whose id starts with `prefix`).

    `devices` is how many devices reported in the bucket. Buckets and ranges as for one
    device's aggregates.
    """
    services = services_of(state)
    if not metric:
        raise BadQuery("metric", "required")
    query_text("metric", metric)
    spec, start, end = _range(bucket, from_, to)
    # Only the key's devices count: the narrower of its prefix and the one asked for.
    visible = effective_prefix(request.auth, prefix and query_text("prefix", prefix))
    known = await services.metric_ids.ids(services.pool, [metric], create=False)
    rows = []
    if metric in known and visible is not None:
        rows = await rollups.fleet_aggregates(services.pool, known[metric], spec, start, end,
                                              visible)
    return Response(FleetAggregates(metric, spec.text, [FleetAggregate(*row) for row in rows]))


ROUTES = [device_aggregates, fleet_aggregates]
