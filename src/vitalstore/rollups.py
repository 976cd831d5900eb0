"""Aggregates from the rollup tables: bucket sizes, the level that serves them, the read SQL.

The rollup tables (revision 0002) hold count, sum, min and max per device, metric and
1-minute, 1-hour or 1-day bucket. The readings trigger appends each flush's 1-minute deltas to
`rollup_pending`, and `fold_rollups()` (run every second, see fold.py) moves
them into the three levels in one transaction (revision 0006). A request's bucket is answered
from the coarsest level whose width divides it together with the pending deltas, by combining
rows: sum of counts and sums, min of mins, max of maxes. So answers are exact the moment a
reading is acknowledged, whether the fold has run or not. Raw readings are never read here.

Alignment: buckets are `time_bucket(bucket, ts)` with TimescaleDB's default origin,
2000-01-03T00:00:00Z (a Monday), in UTC whatever the session's time zone. So buckets of whole
minutes, hours or days that divide a day start at UTC midnight and every multiple after it,
7-day buckets start on Mondays, and others (31d, 7h) at the origin plus a whole number of
buckets. Every level's buckets nest inside every request bucket the level serves, because the
origin is a UTC midnight and the level's width divides the bucket.

Ranges: `[from, to)` is clipped to whole buckets (the first bucket starting at or after `from`,
the last ending at or before `to`). An item is always a whole bucket, the same whatever range
asked for it, and no data outside `[from, to)` is ever counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from vitalstore.database import EARLIEST, LATEST
from vitalstore.problems import TooManyBuckets

MAX_ITEMS = 10_000
ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)  # time_bucket's default origin for timestamptz
MIN_BUCKET = timedelta(minutes=1)
MAX_BUCKET = timedelta(days=31)

_BUCKET = re.compile(r"([1-9][0-9]{0,5})([mhd])")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
# Coarser buckets named when a request would return too many items.
SUGGESTIONS = ("1m", "5m", "10m", "15m", "30m", "1h", "2h", "3h", "6h", "12h",
               "1d", "2d", "7d", "14d", "31d")


@dataclass(frozen=True, slots=True)
class Level:
    """A rollup table and the width of its buckets."""

    table: str
    width: timedelta


# Coarsest first: a bucket is served by the first level whose width divides it.
LEVELS = (
    Level("rollup_1d", timedelta(days=1)),
    Level("rollup_1h", timedelta(hours=1)),
    Level("rollup_1m", timedelta(minutes=1)),
)


@dataclass(frozen=True, slots=True)
class Bucket:
    """A request's bucket: its spelling, its width, and the level that serves it."""

    text: str
    width: timedelta
    level: Level


def parse_bucket(text: str) -> Bucket:
    """`5m`, `1h`, `6h`, `1d`, ...: whole minutes, hours or days, 1 minute to 31 days.

    Raises ValueError with a client-facing message.
    """
    match = _BUCKET.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not a bucket: {text!r} (a whole number of minutes, hours or days: 5m, 1h, 1d)")
    width = int(match.group(1)) * _UNITS[match.group(2)]
    if not MIN_BUCKET <= width <= MAX_BUCKET:
        raise ValueError(f"bucket {text!r} is outside 1m to 31d")
    level = next(level for level in LEVELS if width % level.width == timedelta(0))
    return Bucket(text, width, level)


def floor_to(moment: datetime, width: timedelta) -> datetime:
    """The start of the bucket holding `moment` (what time_bucket computes)."""
    return ORIGIN + ((moment - ORIGIN) // width) * width


def whole_buckets(start: datetime, end: datetime, width: timedelta
                  ) -> tuple[datetime, datetime] | None:
    """`[start, end)` clipped to whole buckets, or None when no whole bucket fits.

    A bucket that begins before 2000 is whole as far as data goes: no reading is older.
    """
    start = floor_to(EARLIEST, width) if start <= EARLIEST else min(start, LATEST)
    end = min(max(end, EARLIEST), LATEST)
    first = floor_to(start, width)
    if first < start:
        first += width
    last = floor_to(end, width)
    return (first, last) if first < last else None


# RFC 3339 like readings.datetime_to_rfc3339, built by PostgreSQL: rows go straight into JSON.
_START = """to_char(start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


def rows_of(level: Level, where: str, width: timedelta) -> str:
    """A level's rows and the pending deltas, both filtered by `where`, each with the
    `start` of its bucket of `width` (a multiple of the level's), for the caller to group.

    The same bounds fit both: range bounds are whole buckets of the level, so a pending
    1-minute bucket lies inside them exactly when the level's bucket holding it does. A
    level row is its own bucket when the widths agree: no time_bucket per row there.
    Measured, 30 days hourly (2,880 rows, machine shared and noisy): time_bucket on every
    row 42-55 ms, against 24-37 ms for the level's rows alone before revision 0006; without
    it on the level's rows 16-33 ms, within the noise of the rows alone.
    """
    to_width = f"time_bucket(INTERVAL '{int(width.total_seconds())} seconds', bucket)"
    own = "bucket" if width == level.width else to_width
    return f"""
        SELECT device_id, metric_id, {own} AS start, count, sum, min, max FROM {level.table}
        WHERE {where}
        UNION ALL
        SELECT device_id, metric_id, {to_width}, count, sum, min, max FROM rollup_pending
        WHERE {where}"""  # noqa: S608


# Table names and bucket widths come from LEVELS and parse_bucket, never from raw input
# (hence the noqa). Rows come out in the order and shape of the JSON items.
def _device_sql(bucket: Bucket, filtered: bool) -> str:
    only = "AND metric_id = ANY($4::int4[])" if filtered else ""
    where = f"device_id = $1 AND bucket >= $2 AND bucket < $3 {only}"
    rows = f"""
        SELECT metric_id, start, sum(count)::int8 AS count,
               sum(sum) AS sum, min(min) AS min, max(max) AS max
        FROM ({rows_of(bucket.level, where, bucket.width)}) AS u
        GROUP BY 1, 2"""  # noqa: S608
    return f"""
        SELECT {_START} AS start, m.name AS metric, g.count, g.sum, g.min, g.max,
               g.sum / g.count AS avg
        FROM ({rows}) AS g
        JOIN metrics m ON m.id = g.metric_id
        ORDER BY m.name, g.start
        LIMIT {MAX_ITEMS + 1}
    """  # noqa: S608


def _fleet_sql(bucket: Bucket, prefixed: bool) -> str:
    devices = "AND device_id IN (SELECT id FROM devices WHERE starts_with(name, $4))" \
        if prefixed else ""
    where = f"metric_id = $1 AND bucket >= $2 AND bucket < $3 {devices}"
    return f"""
        SELECT {_START} AS start, count, sum, min, max, sum / count AS avg, devices
        FROM (
            SELECT start, sum(count)::int8 AS count,
                   sum(sum) AS sum, min(min) AS min, max(max) AS max,
                   count(DISTINCT device_id) AS devices
            FROM ({rows_of(bucket.level, where, bucket.width)}) AS u
            GROUP BY 1
        ) AS g
        ORDER BY g.start
        LIMIT {MAX_ITEMS + 1}
    """  # noqa: S608


async def device_aggregates(pool: asyncpg.Pool, device_id: int, bucket: Bucket,
                            start: datetime, end: datetime,
                            metric_ids: list[int] | None) -> list[asyncpg.Record]:
    """Rows (start, metric, count, sum, min, max, avg) by metric name, then start.

    Raises TooManyBuckets beyond MAX_ITEMS.
    """
    span = whole_buckets(start, end, bucket.width)
    if span is None or metric_ids == []:
        return []
    scope: list[Any] = [device_id] if metric_ids is None else [device_id, metric_ids]
    rows: list[asyncpg.Record] = await pool.fetch(
        _device_sql(bucket, metric_ids is not None), device_id, *span, *scope[1:])
    if len(rows) > MAX_ITEMS:
        where = "device_id = $1" + (" AND metric_id = ANY($2::int4[])" if metric_ids else "")
        raise TooManyBuckets(MAX_ITEMS, await _suggest(pool, bucket, start, end, where, scope))
    return rows


async def fleet_aggregates(pool: asyncpg.Pool, metric_id: int, bucket: Bucket,
                           start: datetime, end: datetime,
                           prefix: str) -> list[asyncpg.Record]:
    """Rows (start, count, sum, min, max, avg, devices) by start, across devices.

    Raises TooManyBuckets beyond MAX_ITEMS.
    """
    span = whole_buckets(start, end, bucket.width)
    if span is None:
        return []
    rows: list[asyncpg.Record] = await pool.fetch(
        _fleet_sql(bucket, bool(prefix)), metric_id, *span, *([prefix] if prefix else []))
    if len(rows) > MAX_ITEMS:
        # Over the same devices as the answer: a suggestion must tell nothing about others.
        scope = "metric_id = $1"
        args: list[Any] = [metric_id]
        if prefix:
            scope += " AND device_id IN (SELECT id FROM devices WHERE starts_with(name, $2))"
            args.append(prefix)
        raise TooManyBuckets(MAX_ITEMS, await _suggest(pool, bucket, start, end, scope, args))
    return rows


async def _suggest(pool: asyncpg.Pool, bucket: Bucket, start: datetime, end: datetime,
                   scope: str, args: list[Any]) -> str | None:
    """The finest bucket coarser than `bucket` that surely yields at most MAX_ITEMS items.

    The bound counts, per metric, every bucket from its first to its last one holding data:
    exact for dense data, an over-estimate for sparse data, so the suggestion always fits.
    Each candidate is measured on the level that would serve it (levels have their own
    retention, so a coarser level may hold more history).
    """
    spans: dict[str, list[asyncpg.Record]] = {}
    for text in SUGGESTIONS:
        candidate = parse_bucket(text)
        if candidate.width <= bucket.width:
            continue
        clipped = whole_buckets(start, end, candidate.width)
        if clipped is None:
            continue  # it would fit by answering nothing: no help
        key = f"{candidate.level.table} {clipped}"
        if key not in spans:
            where = f"{scope} AND bucket >= ${len(args) + 1} AND bucket < ${len(args) + 2}"
            spans[key] = await pool.fetch(
                "SELECT min(start) AS first, max(start) AS last FROM"  # noqa: S608
                f" ({rows_of(candidate.level, where, candidate.level.width)}) AS u"
                " GROUP BY metric_id",
                *args, *clipped)
        items = sum((floor_to(row["last"], candidate.width) - floor_to(row["first"],
                     candidate.width)) // candidate.width + 1 for row in spans[key])
        if items <= MAX_ITEMS:
            return text
    return None

