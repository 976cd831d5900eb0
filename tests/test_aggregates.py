"""GET /v1/devices/{device}/aggregates and GET /v1/aggregates: buckets, ranges, limits, fleet."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from support import iso, store
from vitalstore import rollups
from vitalstore.app import create_app
from vitalstore.rollups import MAX_ITEMS, parse_bucket

# A UTC midnight a few days back: whole days of data before now, none in the future.
DAY0 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
H = timedelta(hours=1)
M = timedelta(minutes=1)


# The reference: what the endpoint must answer, computed with time_bucket over the raw rows.
_RAW_DEVICE_SQL = """
    SELECT to_char(start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS start,
           m.name AS metric, g.count, g.sum, g.min, g.max, g.sum / g.count AS avg
    FROM (
        SELECT metric_id, time_bucket($2::interval, ts) AS start, count(*) AS count,
               sum(value) AS sum, min(value) AS min, max(value) AS max
        FROM readings
        WHERE device_id = $1 AND ts >= $3 AND ts < $4
        GROUP BY 1, 2
    ) AS g
    JOIN metrics m ON m.id = g.metric_id
    ORDER BY m.name, g.start
"""


async def aggregates_from_raw(pool: asyncpg.Pool, device_id: int, bucket: rollups.Bucket,
                              start: datetime, end: datetime) -> list[asyncpg.Record]:
    """What the device aggregates endpoint answers (every metric), from the raw readings."""
    span = rollups.whole_buckets(start, end, bucket.width)
    if span is None:
        return []
    rows: list[asyncpg.Record] = await pool.fetch(_RAW_DEVICE_SQL, device_id, bucket.width,
                                                  *span)
    return rows


async def aggregates(client: Any, device: str, **params: str) -> Any:
    return await client.get(f"/v1/devices/{device}/aggregates",
                            params={"from": params.pop("from_", None), **params})


async def items(client: Any, device: str, **params: str) -> list[dict[str, Any]]:
    response = await aggregates(client, device, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["device"] == device
    return body["items"]


def starts(found: list[dict[str, Any]]) -> list[str]:
    return [item["start"] for item in found]


# -- bucket sizes ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "width", "table"), [
    ("1m", M, "rollup_1m"),
    ("5m", 5 * M, "rollup_1m"),
    ("90m", 90 * M, "rollup_1m"),
    ("60m", H, "rollup_1h"),
    ("1h", H, "rollup_1h"),
    ("6h", 6 * H, "rollup_1h"),
    ("36h", 36 * H, "rollup_1h"),
    ("24h", 24 * H, "rollup_1d"),
    ("1d", timedelta(days=1), "rollup_1d"),
    ("7d", timedelta(days=7), "rollup_1d"),
    ("31d", timedelta(days=31), "rollup_1d"),
    ("744h", timedelta(days=31), "rollup_1d"),
    ("44640m", timedelta(days=31), "rollup_1d"),
])
def test_bucket_is_served_by_the_coarsest_level_that_divides_it(text, width, table):
    bucket = parse_bucket(text)
    assert (bucket.width, bucket.level.table) == (width, table)


@pytest.mark.parametrize("text", [
    "", "1", "m", "0m", "0d", "30s", "1s", "1w", "32d", "745h", "44641m", "1.5h", "-1h",
    " 1h", "1h ", "1H", "01h", "1 h", "1mo", "9999999999d",
])
def test_anything_else_is_not_a_bucket(text):
    with pytest.raises(ValueError, match="bucket"):
        parse_bucket(text)


async def test_invalid_bucket_is_422_naming_the_parameter(client, device):
    await store(client, [{"device": device, "timestamp": iso(DAY0), "hr": 60}])
    for bad in ("1s", "32d", "1w", "abc", "0m"):
        response = await aggregates(client, device, bucket=bad)
        assert response.status_code == 422, bad
        assert response.json()["parameter"] == "bucket"
    response = await client.get("/v1/aggregates", params={"metric": "hr", "bucket": "2.5h"})
    assert response.status_code == 422
    assert response.json()["parameter"] == "bucket"


async def test_invalid_times_are_422(client, device):
    await store(client, [{"device": device, "timestamp": iso(DAY0), "hr": 60}])
    response = await aggregates(client, device, from_="yesterday")
    assert (response.status_code, response.json()["parameter"]) == (422, "from")
    response = await aggregates(client, device, to="2025-13-01T00:00:00Z")
    assert (response.status_code, response.json()["parameter"]) == (422, "to")


async def test_fleet_view_needs_a_metric(client):
    response = await client.get("/v1/aggregates", params={"bucket": "1h"})
    assert (response.status_code, response.json()["parameter"]) == (422, "metric")


async def test_unknown_device_is_404(client):
    response = await aggregates(client, f"nobody-{uuid.uuid4().hex}")
    assert response.status_code == 404


# -- values and order --------------------------------------------------------------------

async def test_items_combine_rollup_rows_by_metric_then_start(client, device):
    t = DAY0 + 10 * H
    await store(client, [
        {"device": device, "timestamp": iso(t), "spo2": 97, "hr": 60},
        {"device": device, "timestamp": iso(t + 59 * M), "hr": 80.5},
        {"device": device, "timestamp": iso(t + 119 * M + timedelta(seconds=59)), "hr": 70},
        {"device": device, "timestamp": iso(t + 30 * M), "spo2": 99},
    ])
    found = await items(client, device, bucket="2h", from_=iso(t), to=iso(t + 2 * H))
    assert found == [
        {"start": iso(t), "metric": "hr", "count": 3, "sum": 210.5, "min": 60.0, "max": 80.5,
         "avg": 210.5 / 3},
        {"start": iso(t), "metric": "spo2", "count": 2, "sum": 196.0, "min": 97.0,
         "max": 99.0, "avg": 98.0},
    ]
    # The same readings by hour: hr falls in two buckets, spo2 in one.
    found = await items(client, device, bucket="1h", from_=iso(t), to=iso(t + 2 * H))
    assert [(i["metric"], i["start"], i["count"]) for i in found] == [
        ("hr", iso(t), 2), ("hr", iso(t + H), 1), ("spo2", iso(t), 2)]


async def test_metrics_parameter_selects_metrics(client, device):
    t = DAY0 + 3 * H
    await store(client, [{"device": device, "timestamp": iso(t), "hr": 60, "spo2": 97,
                         "temp": 36.6}])
    found = await items(client, device, metrics="temp,hr", from_=iso(t))
    assert [i["metric"] for i in found] == ["hr", "temp"]
    assert await items(client, device, metrics="nothing-like-it", from_=iso(t)) == []
    found = await items(client, device, metrics="", from_=iso(t))
    assert [i["metric"] for i in found] == ["hr", "spo2", "temp"]


async def test_late_reading_updates_its_bucket_at_once(client, device):
    t = DAY0 + 5 * H
    await store(client, [{"device": device, "timestamp": iso(t + 10 * M), "hr": 60}])
    await store(client, [{"device": device, "timestamp": iso(DAY0 - timedelta(days=20)),
                         "hr": 10}])
    await store(client, [{"device": device, "timestamp": iso(t + 5 * M), "hr": 90}])
    found = await items(client, device, bucket="1d", from_=iso(DAY0 - timedelta(days=30)))
    assert [(i["start"], i["count"], i["min"], i["max"]) for i in found] == [
        (iso(DAY0 - timedelta(days=20)), 1, 10.0, 10.0), (iso(DAY0), 2, 60.0, 90.0)]


async def test_a_retried_reading_counts_once(client, device):
    reading = {"device": device, "timestamp": iso(DAY0 + 7 * H), "hr": 60}
    for _ in range(3):
        await store(client, [reading, reading])
    await store(client, [{**reading, "hr": 99}])  # first write wins, counted once
    found = await items(client, device, bucket="1m")
    assert [(i["count"], i["sum"]) for i in found] == [(1, 60.0)]


# -- ranges and alignment ----------------------------------------------------------------

async def hourly_readings(client: Any, device: str, first: datetime, hours: int) -> None:
    """One reading at the start and one just before the end of each hour."""
    await store(client, [
        {"device": device, "timestamp": iso(first + n * H + offset), "hr": n}
        for n in range(hours) for offset in (timedelta(0), H - timedelta(microseconds=1))
    ])


async def test_range_is_half_open(client, device):
    t = DAY0 + 10 * H
    await hourly_readings(client, device, t, 3)
    found = await items(client, device, bucket="1h", from_=iso(t), to=iso(t + 2 * H))
    assert starts(found) == [iso(t), iso(t + H)]
    assert all(i["count"] == 2 for i in found)


async def test_buckets_only_partly_in_the_range_are_left_out(client, device):
    t = DAY0 + 10 * H
    await hourly_readings(client, device, t, 3)
    # [10:30, 12:59:59) holds whole bucket 11:00 only: 10:00 and 12:00 are partly outside.
    found = await items(client, device, bucket="1h", from_=iso(t + 30 * M),
                        to=iso(t + 3 * H - timedelta(seconds=1)))
    assert starts(found) == [iso(t + H)]
    assert found[0]["count"] == 2
    # No whole bucket at all.
    assert await items(client, device, bucket="1h", from_=iso(t + M), to=iso(t + 59 * M)) == []


async def test_buckets_are_aligned_to_utc_not_to_the_range_start(client, device):
    t = DAY0 + 2 * H
    await hourly_readings(client, device, t, 20)  # 02:00 to 21:59
    found = await items(client, device, bucket="6h", from_=iso(t))
    assert starts(found) == [iso(DAY0 + 6 * H), iso(DAY0 + 12 * H), iso(DAY0 + 18 * H)]
    assert [i["count"] for i in found] == [12, 12, 8]  # the 00:00 bucket is not whole
    found = await items(client, device, bucket="90m", from_=iso(t), to=iso(DAY0 + 6 * H))
    assert starts(found) == [iso(DAY0 + 3 * H), iso(DAY0 + 270 * M)]
    # The same start with another UTC offset: the same UTC buckets.
    shifted = (t + 5 * H).isoformat()[:19] + "+05:00"
    found = await items(client, device, bucket="6h", from_=shifted)
    assert starts(found) == [iso(DAY0 + 6 * H), iso(DAY0 + 12 * H), iso(DAY0 + 18 * H)]


async def test_day_buckets_split_at_utc_midnight(client, device):
    midnight = DAY0 - timedelta(days=1)
    last = midnight - timedelta(microseconds=1)
    await store(client, [
        {"device": device, "timestamp": iso(last), "hr": 1},
        {"device": device, "timestamp": iso(midnight), "hr": 2},
        {"device": device, "timestamp": (midnight + 23 * H).isoformat()[:19] + "+05:00",
         "hr": 3},  # 18:00Z the same day
    ])
    found = await items(client, device, bucket="1d")
    assert [(i["start"], i["count"], i["sum"]) for i in found] == [
        (iso(midnight - timedelta(days=1)), 1, 1.0), (iso(midnight), 2, 5.0)]
    found = await items(client, device, bucket="1d", from_=iso(midnight),
                        to=iso(midnight + timedelta(days=1)))
    assert starts(found) == [iso(midnight)]


async def test_week_buckets_start_on_monday_and_long_buckets_at_the_origin(client, device):
    first = DAY0 - timedelta(days=40)
    await store(client, [{"device": device, "timestamp": iso(first + n * timedelta(days=1)),
                         "hr": n} for n in range(40)])
    origin = datetime(2000, 1, 3, tzinfo=UTC)
    weeks = [datetime.fromisoformat(i["start"]) for i in await items(client, device, bucket="7d")]
    assert len(weeks) in (6, 7)
    assert all(start.weekday() == 0 and start.time().isoformat() == "00:00:00"
               for start in weeks)
    months = await items(client, device, bucket="31d")
    assert len(months) in (2, 3)
    assert sum(i["count"] for i in months) == 40
    for item in months:
        assert (datetime.fromisoformat(item["start"]) - origin) % timedelta(days=31) \
            == timedelta(0)


async def test_the_oldest_readings_are_in_the_first_bucket_when_from_is_left_out(
        settings, api_headers, device):
    # Readings of the year 2000 are past any raw retention but `forever`.
    keep_all = msgspec.structs.replace(settings, retention_raw="forever")
    async with AsyncTestClient(create_app(keep_all), timeout=30) as client:
        client.headers.update(api_headers)
        await _oldest_readings_in_the_first_bucket(client, device)


async def _oldest_readings_in_the_first_bucket(client: Any, device: str) -> None:
    await store(client, [{"device": device, "timestamp": "2000-01-01T00:00:00Z", "hr": 1},
                        {"device": device, "timestamp": "2000-01-02T12:00:00Z", "hr": 2}])
    found = await items(client, device, bucket="7d")
    assert [(i["start"], i["count"]) for i in found] == [("1999-12-27T00:00:00.000000Z", 2)]
    found = await items(client, device, bucket="1d", from_="2000-01-01T00:00:01Z")
    assert [(i["start"], i["count"]) for i in found] == [("2000-01-02T00:00:00.000000Z", 1)]


async def test_empty_ranges(client, device):
    t = DAY0 + 4 * H
    await hourly_readings(client, device, t, 2)
    assert await items(client, device, from_=iso(t), to=iso(t)) == []
    # `from` after `to` is a mistake, not an empty range.
    assert (await aggregates(client, device, from_=iso(t + H), to=iso(t))).status_code == 422
    assert await items(client, device, from_=iso(t + 3 * H)) == []
    assert await items(client, device, to=iso(t)) == []
    # Far ends of the time line are fine and hold nothing.
    assert await items(client, device, bucket="31d", from_="9999-12-31T00:00:00Z") == []
    assert await items(client, device, bucket="31d", to="0001-01-01T00:00:00Z") == []


async def test_answer_equals_time_bucket_over_raw_rows(client, device, db_url):
    rng = random.Random(7)
    first = DAY0 - timedelta(days=70)
    await store(client, [
        {"device": device,
         "timestamp": iso(first + timedelta(microseconds=rng.randrange(70 * 86_400_000_000))),
         rng.choice(["hr", "spo2", "temp"]): rng.uniform(-50, 150)}
        for _ in range(3000)
    ])
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        device_id = await pool.fetchval("SELECT id FROM devices WHERE name = $1", device)
        for bucket in ("1m", "5m", "90m", "1h", "7h", "1d", "2d", "7d", "31d"):
            spec = parse_bucket(bucket)
            for lo, hi in ((first, DAY0), (first + 17 * M + timedelta(seconds=3), DAY0 - 7 * H)):
                expected = await aggregates_from_raw(pool, device_id, spec, lo, hi)
                found = await items(client, device, bucket=bucket, from_=iso(lo), to=iso(hi))
                assert len(found) == len(expected), bucket
                for item, row in zip(found, expected, strict=True):
                    assert (item["start"], item["metric"], item["count"], item["min"],
                            item["max"]) == (row["start"], row["metric"], row["count"],
                                             row["min"], row["max"])
                    assert math.isclose(item["sum"], row["sum"], rel_tol=1e-9, abs_tol=1e-9)
                    assert datetime.fromisoformat(item["start"]) >= lo
                    assert datetime.fromisoformat(item["start"]) + spec.width <= hi
    finally:
        await pool.close()


# -- the item limit ----------------------------------------------------------------------

async def test_more_than_the_limit_is_422_naming_a_coarser_bucket_that_fits(client, device):
    first = DAY0 - timedelta(days=10)
    await store(client, [{"device": device, "timestamp": iso(first + n * M), "hr": n}
                        for n in range(MAX_ITEMS + 1)])
    exactly = await items(client, device, bucket="1m", to=iso(first + MAX_ITEMS * M))
    assert len(exactly) == MAX_ITEMS
    response = await aggregates(client, device, bucket="1m")
    assert response.status_code == 422
    body = response.json()
    assert body["parameter"] == "bucket"
    assert body["suggested_bucket"] == "5m"
    assert "5m" in body["error"]
    assert len(await items(client, device, bucket=body["suggested_bucket"])) <= MAX_ITEMS
    # Two metrics: twice the items, the suggestion accounts for both.
    await store(client, [{"device": device, "timestamp": iso(first + n * M), "spo2": 1}
                        for n in range(0, MAX_ITEMS + 1, 2)])
    response = await aggregates(client, device, bucket="2m")
    assert response.status_code == 422
    suggestion = response.json()["suggested_bucket"]
    assert len(await items(client, device, bucket=suggestion)) <= MAX_ITEMS
    assert parse_bucket(suggestion).width > 2 * M


# -- the fleet view ----------------------------------------------------------------------

async def fleet(client: Any, **params: str) -> Any:
    response = await client.get("/v1/aggregates",
                                params={"from": params.pop("from_", None), **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["metric"], body["bucket"]) == (params["metric"], params.get("bucket", "1h"))
    return body["items"]


async def test_fleet_view_combines_devices_and_counts_them(client):
    tag = uuid.uuid4().hex[:8]
    metric = f"fleet_{tag}"
    t = DAY0 + 8 * H
    await store(client, [
        {"device": f"ward-{tag}-a1", "timestamp": iso(t), metric: 10},
        {"device": f"ward-{tag}-a1", "timestamp": iso(t + M), metric: 20},
        {"device": f"ward-{tag}-a2", "timestamp": iso(t + 2 * M), metric: 30},
        {"device": f"ward-{tag}-b1", "timestamp": iso(t + 3 * M), metric: -5},
        {"device": f"ward-{tag}-b1", "timestamp": iso(t + H), metric: 7},
        {"device": f"ward-{tag}-a2", "timestamp": iso(t + H), "other": 1},
    ])
    assert await fleet(client, metric=metric) == [
        {"start": iso(t), "count": 4, "sum": 55.0, "min": -5.0, "max": 30.0, "avg": 13.75,
         "devices": 3},
        {"start": iso(t + H), "count": 1, "sum": 7.0, "min": 7.0, "max": 7.0, "avg": 7.0,
         "devices": 1},
    ]
    assert await fleet(client, metric=metric, prefix=f"ward-{tag}-a") == [
        {"start": iso(t), "count": 3, "sum": 60.0, "min": 10.0, "max": 30.0, "avg": 20.0,
         "devices": 2},
    ]
    found = await fleet(client, metric=metric, bucket="1d", prefix=f"ward-{tag}-")
    assert [(i["start"], i["count"], i["devices"]) for i in found] == [(iso(DAY0), 5, 3)]
    found = await fleet(client, metric=metric, bucket="1m", from_=iso(t + M), to=iso(t + 3 * M))
    assert [(i["start"], i["count"], i["devices"]) for i in found] == [
        (iso(t + M), 1, 1), (iso(t + 2 * M), 1, 1)]
    assert await fleet(client, metric=metric, prefix="nobody-") == []
    assert await fleet(client, metric=f"unknown_{tag}") == []


async def test_fleet_view_limit(client):
    tag = uuid.uuid4().hex[:8]
    metric = f"many_{tag}"
    first = DAY0 - timedelta(days=12)
    await store(client, [{"device": f"fleet-{tag}-{n % 3}", "timestamp": iso(first + n * M),
                         metric: n} for n in range(MAX_ITEMS + 1)])
    response = await client.get("/v1/aggregates", params={"metric": metric, "bucket": "1m"})
    assert response.status_code == 422
    assert response.json()["suggested_bucket"] == "5m"
    found = await fleet(client, metric=metric, bucket="5m")
    assert sum(i["count"] for i in found) == MAX_ITEMS + 1
