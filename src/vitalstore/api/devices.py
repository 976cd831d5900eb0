"""Reads: the device registry, latest values, history, and the old `GET /vital-data`."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream

from vitalstore import queries
from vitalstore.api.common import (
    UNSTORABLE,
    NamesQuery,
    OptionalQuery,
    compat_error,
    error,
    query_int,
    query_names,
    query_range,
    query_text,
    services_of,
)
from vitalstore.api.responses import CompatError, RetryAfterOperation, errors
from vitalstore.auth import COMPAT_OPT, effective_prefix, requires
from vitalstore.database import EARLIEST, LATEST, ONE_MICROSECOND
from vitalstore.keys import ApiKey
from vitalstore.problems import BadQuery
from vitalstore.queries import (
    BadCursor,
    cursor_time,
    decode_cursor,
    decode_name_cursor,
    encode_cursor,
)
from vitalstore.readings import datetime_to_rfc3339, storable
from vitalstore.services import Services

EXPORT_PAGE = 1000

KeyedRequest = Request[Any, ApiKey, Any]
DeviceId = FromPath[str]


class MetricValue(msgspec.Struct):
    value: float
    timestamp: str


class LatestObject(msgspec.Struct):
    device: str
    last_seen: str
    metrics: dict[str, MetricValue]


class LatestPage(msgspec.Struct):
    items: list[LatestObject]
    next_cursor: str | None
    not_found: list[str]  # of the ids asked for by `device`


class DeviceItem(msgspec.Struct):
    device: str
    first_seen: str
    last_seen: str


class DevicePage(msgspec.Struct):
    items: list[DeviceItem]
    next_cursor: str | None


class HistoryItem(msgspec.Struct):
    timestamp: str
    metrics: dict[str, float]
    attributes: dict[str, Any]


class HistoryPage(msgspec.Struct):
    items: list[HistoryItem]
    next_cursor: str | None


class CompatPage(msgspec.Struct):
    total: int
    resources: list[dict[str, Any]]


def _cursor(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    try:
        return decode_name_cursor(value)
    except BadCursor:
        raise BadQuery("cursor", "invalid cursor") from None


def _device(request: KeyedRequest, device: str) -> bool:
    """Whether the key may see this device id; raises BadQuery for text PostgreSQL refuses."""
    return request.auth.covers(query_text("device", device))


async def _device_page(services: Services, prefix: str, size: int, after: str | None
                       ) -> tuple[list[queries.Device], str | None]:
    """Up to `size` devices by id after `after`, and the cursor of the next page (or None)."""
    found = await queries.list_devices(services.pool, prefix=prefix, limit=size, after=after)
    next_cursor = encode_cursor(found[size - 1].name) if len(found) > size else None
    return found[:size], next_cursor


def _device_item(device: queries.Device) -> DeviceItem:
    return DeviceItem(device.name, datetime_to_rfc3339(device.first_seen),
                      datetime_to_rfc3339(device.last_seen))


def _latest_object(latest: queries.Latest) -> LatestObject:
    return LatestObject(latest.device, datetime_to_rfc3339(latest.last_seen), {
        metric: MetricValue(value, datetime_to_rfc3339(ts))
        for metric, value, ts in latest.values})


def _history_item(reading: queries.StoredReading) -> HistoryItem:
    return HistoryItem(datetime_to_rfc3339(reading.ts), reading.metrics, reading.attributes)


def _compat_resource(device: queries.CompatDevice) -> dict[str, Any]:
    """The old API's resource: `deviceId`, `lastUpdated` (Unix seconds), then the metrics."""
    seconds = device.last_seen.timestamp()
    resource: dict[str, Any] = {
        "deviceId": device.device,
        "lastUpdated": int(seconds) if seconds.is_integer() else seconds,
    }
    for metric, value in device.values.items():
        resource.setdefault(metric, value)
    return resource


@get("/v1/devices", summary="Devices by id, with first and last reading times",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 422, 503),
     **requires("read"))
async def list_devices(request: KeyedRequest, state: State, prefix: OptionalQuery = None,
                       limit: OptionalQuery = None, cursor: OptionalQuery = None
                       ) -> Response[DevicePage]:
    """Devices in id order, a page of `limit` (default 100, at most 1000) at a time.

    `prefix` narrows to ids starting with it (within the key's own prefix); `next_cursor`
    gives the next page, or null after the last.
    """
    services = services_of(state)
    size = query_int("limit", limit, 100, 1, 1000)
    after = _cursor(cursor)
    visible = effective_prefix(request.auth, prefix and query_text("prefix", prefix))
    if visible is None:
        return Response(DevicePage([], None))
    found, next_cursor = await _device_page(services, visible, size, after)
    return Response(DevicePage([_device_item(d) for d in found], next_cursor))


@get("/v1/devices/{device:str}/latest", summary="Latest value of each metric of a device",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 404, 422, 503),
     **requires("read"))
async def device_latest(request: KeyedRequest, state: State, device: DeviceId
                        ) -> Response[LatestObject]:
    """The newest value and time of every metric of one device.

    A late reading never replaces a newer value. A device outside the key's prefix answers
    404, as an unknown one does.
    """
    # Outside the key's prefix answers as an unknown device: no hint that it exists.
    pool = services_of(state).pool
    found = await queries.latest(pool, [device]) if _device(request, device) else []
    if not found:
        return error(404, f"unknown device {device!r}")
    return Response(_latest_object(found[0]))


@get("/v1/latest", summary="Latest values of several devices (by id, or all by page)",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 422, 503),
     **requires("read"))
async def bulk_latest(request: KeyedRequest, state: State,
                      device: Annotated[list[str] | None, QueryParameter(required=False)] = None,
                      limit: OptionalQuery = None, cursor: OptionalQuery = None
                      ) -> Response[LatestPage]:
    """Latest values of the devices named by repeated `device=` (at most 1000), or of every
    device by page (`limit`, `cursor`) when none is named.

    Devices unknown or outside the key's prefix are left out.
    """
    services = services_of(state)
    key = request.auth
    if device:
        if len(device) > 1000:
            return error(422, "at most 1000 device ids", parameter="device")
        items = await queries.latest(services.pool,
                                     sorted({d for d in device if _device(request, d)}))
        # Unknown devices (and those outside the key's prefix, alike) are named, not dropped.
        not_found = sorted(set(device).difference(item.device for item in items))
        return Response(LatestPage([_latest_object(i) for i in items], None, not_found))
    size = query_int("limit", limit, 100, 1, 1000)
    after = _cursor(cursor)
    page, next_cursor = await _device_page(services, key.prefix, size, after)
    items = await queries.latest(services.pool, [d.name for d in page])
    return Response(LatestPage([_latest_object(i) for i in items], next_cursor, []))


class _HistoryQuery(msgspec.Struct):
    device_id: int
    start: datetime
    end: datetime
    metric_ids: dict[int, str] | None
    descending: bool


async def _history_query(services: Services, device_id: int, from_: str | None,
                         to: str | None, metrics: list[str] | None, order: str | None
                         ) -> _HistoryQuery:
    start, end = query_range(from_, to, EARLIEST, LATEST)
    if order not in (None, "", "asc", "desc"):
        raise BadQuery("order", "must be asc or desc")
    metric_ids = None
    names = query_names("metrics", metrics)
    if names:
        known = await services.metric_ids.ids(services.pool, names, create=False)
        metric_ids = {metric_id: name for name, metric_id in known.items()}
    return _HistoryQuery(device_id, start, end, metric_ids, order == "desc")


async def _page(services: Services, q: _HistoryQuery, limit: int,
                after: datetime | None) -> tuple[list[queries.StoredReading], bool]:
    start, end = q.start, q.end
    if after is not None:
        if q.descending:
            end = min(end, after)
        else:
            start = max(start, after + ONE_MICROSECOND)
    if q.metric_ids is not None and not q.metric_ids:
        return [], False
    all_names = await services.metric_ids.names(
        services.pool, await queries.device_metric_ids(services.pool, q.device_id))
    return await queries.history_page(
        services.pool, device_id=q.device_id, start=start, end=end, metric_ids=q.metric_ids,
        metric_names=all_names, descending=q.descending, limit=limit)


@get("/v1/devices/{device:str}/readings",
     summary="Readings of a device in [from, to); JSON pages, or NDJSON/CSV export",
     operation_class=RetryAfterOperation, responses=errors(401, 403, 404, 422, 503),
     **requires("read"))
async def device_readings(
    request: KeyedRequest, state: State, device: DeviceId,
    from_: Annotated[str | None, QueryParameter(name="from", required=False)] = None,
    to: OptionalQuery = None, metrics: NamesQuery = None, order: OptionalQuery = None,
    limit: OptionalQuery = None, cursor: OptionalQuery = None,
) -> Response[HistoryPage] | Stream:
    """One item per reading (`timestamp`, `metrics`, `attributes`) in [from, to), oldest first
    (`order=desc`: newest first), a page of `limit` (default 1000, at most 10,000) at a time.

    `metrics=a,b` keeps only those metrics. With `Accept: application/x-ndjson` or `text/csv`
    the whole range is streamed instead of a page.
    """
    services = services_of(state)
    found = (await queries.find_device(services.pool, device)
             if _device(request, device) else None)
    if found is None:
        return error(404, f"unknown device {device!r}")
    q = await _history_query(services, found.id, from_, to, metrics, order)
    size = query_int("limit", limit, 1000, 1, 10_000)
    after = _history_cursor(cursor, q.descending)
    accept = request.headers.get("accept", "")
    if "application/x-ndjson" in accept:
        return Stream(_export_ndjson(services, q), media_type="application/x-ndjson")
    if "text/csv" in accept:
        return Stream(_export_csv(services, q), media_type="text/csv")
    items, more = await _page(services, q, size, after)
    next_cursor = (encode_cursor(f"{_order(q.descending)}:{items[-1].ts.isoformat()}")
                   if more else None)
    return Response(HistoryPage([_history_item(i) for i in items], next_cursor))


def _order(descending: bool) -> str:
    return "desc" if descending else "asc"


def _history_cursor(cursor: str | None, descending: bool) -> datetime | None:
    """The time a history cursor continues from; it must come from a page of the same order."""
    if cursor is None or cursor == "":
        return None
    try:
        text = decode_cursor(cursor)
    except BadCursor:
        raise BadQuery("cursor", "invalid cursor") from None
    order, _, moment = text.partition(":")
    if order not in ("asc", "desc"):
        raise BadQuery("cursor", "invalid cursor")
    if order != _order(descending):
        raise BadQuery("cursor", f"this cursor continues an order={order} page: ask again with"
                       f" order={order} (and the same from, to and metrics)")
    try:
        return cursor_time(moment)
    except BadCursor:
        raise BadQuery("cursor", "invalid cursor") from None


async def _all_items(services: Services, q: _HistoryQuery
                     ) -> AsyncIterator[queries.StoredReading]:
    """Every reading of the range, a page at a time: constant memory for any range."""
    after = None
    while True:
        items, more = await _page(services, q, EXPORT_PAGE, after)
        for item in items:
            yield item
        if not more:
            return
        after = items[-1].ts


async def _export_ndjson(services: Services, q: _HistoryQuery) -> AsyncIterator[bytes]:
    encoder = msgspec.json.Encoder()
    async for item in _all_items(services, q):
        yield encoder.encode(_history_item(item)) + b"\n"


async def _export_csv(services: Services, q: _HistoryQuery) -> AsyncIterator[str]:
    if q.metric_ids is not None:
        names = sorted(q.metric_ids.values())
    else:
        ids = await queries.device_metric_ids(services.pool, q.device_id)
        names = sorted((await services.metric_ids.names(services.pool, ids)).values())
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["timestamp", *names, "attributes"])
    encoder = msgspec.json.Encoder()
    async for item in _all_items(services, q):
        attributes = encoder.encode(item.attributes).decode() if item.attributes else ""
        out.writerow([datetime_to_rfc3339(item.ts),
                      *(item.metrics.get(name, "") for name in names), attributes])
        if buffer.tell() > 65536:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


_VITAL_DATA_ANSWER = (
    'Answers `{"total": N, "resources": [{"deviceId": "bed-1", "lastUpdated": 1750240800,'
    ' "heartRateValue": 72, ...}]}`: `total` counts every device the key may read,'
    " `lastUpdated` is the Unix time (seconds) of the device's newest reading, and each metric"
    " the device has reported appears under its own name with its latest value. Errors answer"
    ' `{"status": "error", "message": ...}`. Without a key, the rights of the key named by'
    " VITALSTORE_COMPAT_KEY_NAME apply, when it is set.")


@get("/vital-data", summary="Compatibility: devices with their latest values (old API)",
     description=_VITAL_DATA_ANSWER, operation_class=RetryAfterOperation,
     responses=errors(400, 401, 403, 422, 503, body=CompatError),
     opt={COMPAT_OPT: True}, **requires("read"))
async def get_vital_data(
    request: KeyedRequest, state: State,
    count: Annotated[str | None, QueryParameter(
        required=False, description="devices per page, 1 to 100 (default 20)")] = None,
    offset: Annotated[str | None, QueryParameter(
        required=False, description="devices to skip (default 0)")] = None,
    sort_by: Annotated[str | None, QueryParameter(
        name="sortBy", required=False,
        description="`timestamp` (last reading, the default), `deviceId`, or a metric name:"
                    " by its latest value, devices without it last")] = None,
    order_by: Annotated[str | None, QueryParameter(
        name="orderBy", required=False, description="`desc` (default) or `asc`")] = None,
) -> Response[CompatPage]:
    """The replaced system's listing: `{"total", "resources": [{"deviceId", "lastUpdated", ...}]}`.

    `count` (default 20, at most 100), `offset`, `sortBy` and `orderBy` (`asc` or `desc`,
    default desc) as the old API took them.
    """
    try:
        size = query_int("count", count, 20, 1, 100)
        skip = query_int("offset", offset, 0, 0, 10_000_000)
    except BadQuery as exc:  # the old API's error shape, not the problem's
        return _compat_error(str(exc))
    if order_by not in (None, "", "asc", "desc"):
        return _compat_error("orderBy: must be asc or desc")
    if sort_by and not storable(sort_by):
        return _compat_error(f"sortBy: {UNSTORABLE}")
    total, resources = await queries.compat_page(
        services_of(state).pool, sort_by=sort_by or "timestamp",
        descending=order_by != "asc", count=size, offset=skip, prefix=request.auth.prefix)
    return Response(CompatPage(total, [_compat_resource(d) for d in resources]))


def _compat_error(message: str) -> Response[Any]:
    return compat_error(400, message)


ROUTES = [list_devices, device_latest, bulk_latest, device_readings, get_vital_data]
