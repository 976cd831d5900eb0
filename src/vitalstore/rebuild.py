"""`vitalstore rollups rebuild`: recompute the rollups of a range from the raw readings.

For repairs after manual edits. The range is widened to whole UTC days, so that every level's
buckets (1m, 1h, 1d) are whole, and worked through in slices: one day and a group of devices,
each slice one transaction that deletes the slice's rollup rows (pending deltas included) and
inserts them again from the raw rows, grouped by `time_bucket` as the fold groups them.

Safe next to live ingestion: a slice first locks the readings table against writers (`SHARE
ROW EXCLUSIVE` on the hypertable's root, which every insert locks first), so no reading can
commit between the raw rows being read and the rollups being replaced; the lock also
serialises concurrent rebuilds. Ingestion pauses for a slice's duration, then goes on: slices
are sized to about half a million raw rows (measured: 345,600 raw rows a slice took about 0.5 s
on a shared 2-core machine), never less than one device.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import asyncpg
from tqdm import tqdm

from vitalstore.database import ONE_MICROSECOND
from vitalstore.fold import FOLD_LOCK
from vitalstore.policies import horizon
from vitalstore.rollups import LEVELS, floor_to
from vitalstore.settings import Settings

DAY = timedelta(days=1)
SLICE_ROWS = 500_000
ATTEMPTS = 3

# Devices with raw rows on a day, found with one index probe each (a skip scan over the
# (device_id, ts, metric_id) index), and those with rollup rows on it (raw rows deleted by
# hand; found through the (metric_id, bucket) index, or among the pending deltas), with the
# day's row count as the rollups know it, to size the slices.
_DEVICES_OF_DAY = """
    WITH RECURSIVE raw (id) AS (
        SELECT min(device_id) FROM readings WHERE ts >= $1 AND ts < $2
        UNION ALL
        SELECT (SELECT min(device_id) FROM readings
                WHERE device_id > raw.id AND ts >= $1 AND ts < $2)
        FROM raw WHERE raw.id IS NOT NULL
    )
    SELECT id, sum(rows)::int8 AS rows FROM (
        SELECT id, 0 AS rows FROM raw WHERE id IS NOT NULL
        UNION ALL
        SELECT device_id, count FROM rollup_1d
        WHERE metric_id = ANY(ARRAY(SELECT id FROM metrics)) AND bucket = $1
        UNION ALL
        SELECT device_id, count FROM rollup_pending WHERE bucket >= $1 AND bucket < $2
    ) AS found
    GROUP BY id ORDER BY id
"""
_GIVEN_DEVICES_OF_DAY = """
    SELECT id, coalesce((SELECT sum(count) FROM rollup_1d
                         WHERE device_id = id AND bucket = $1), 0)::int8 AS rows
    FROM unnest($3::int4[]) AS id
    WHERE EXISTS (SELECT FROM readings WHERE device_id = id AND ts >= $1 AND ts < $2)
       OR EXISTS (SELECT FROM rollup_1d WHERE device_id = id AND bucket = $1)
       OR EXISTS (SELECT FROM rollup_pending
                  WHERE device_id = id AND bucket >= $1 AND bucket < $2)
    ORDER BY id
"""


def _interval(width: timedelta) -> str:
    return f"INTERVAL '{int(width.total_seconds())} seconds'"


# Table names and widths come from rollups.LEVELS, never from input (hence the noqa).
_DELETES = [
    f"DELETE FROM {table}"  # noqa: S608
    " WHERE device_id = ANY($1::int4[]) AND bucket >= $2 AND bucket < $3"
    for table in ("rollup_pending", *(level.table for level in LEVELS))
]
_LEVEL_INSERT = """
    INSERT INTO {table} (device_id, metric_id, bucket, count, sum, min, max)
    SELECT device_id, metric_id, time_bucket({width}, ts),
           count(*), sum(value), min(value), max(value)
    FROM raw GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
# One read of the raw rows feeds every level. Each INSERT groups and orders like the trigger's
# upsert; there is nothing to conflict with, the slice's rows having just been deleted.
_INSERT = (
    "WITH raw AS MATERIALIZED (SELECT device_id, metric_id, ts, value FROM readings"  # noqa: S608
    " WHERE device_id = ANY($1::int4[]) AND ts >= $2 AND ts < $3)"
    + "".join(f", written_{index} AS ("
              + _LEVEL_INSERT.format(table=level.table, width=_interval(level.width)) + ")"
              for index, level in enumerate(LEVELS))
    + " SELECT count(*) FROM raw"
)


def days(start: datetime, end: datetime) -> Iterator[datetime]:
    """The UTC days that hold any of [start, end)."""
    day = floor_to(start, DAY)
    while day < end:
        yield day
        day += DAY


def _groups(found: list[asyncpg.Record]) -> Iterator[list[int]]:
    group: list[int] = []
    rows = 0
    for device_id, count in found:
        if group and rows + count > SLICE_ROWS:
            yield group
            group, rows = [], 0
        group.append(device_id)
        rows += count
    if group:
        yield group


async def _rebuild_slice(conn: asyncpg.Connection, device_ids: list[int], day: datetime) -> int:
    for attempt in range(ATTEMPTS):
        try:
            async with conn.transaction():
                # No fold between the deletes and the inserts: it would merge deltas of
                # readings the inserts count again.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", FOLD_LOCK)
                await conn.execute("LOCK TABLE ONLY readings IN SHARE ROW EXCLUSIVE MODE")
                for delete in _DELETES:
                    await conn.execute(delete, device_ids, day, day + DAY)
                count: int = await conn.fetchval(_INSERT, device_ids, day, day + DAY)
                return count
        except (asyncpg.exceptions.DeadlockDetectedError,
                asyncpg.exceptions.SerializationError):
            # Only against a concurrent drop_chunks; the slice is simply done again.
            if attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def rebuild(conn: asyncpg.Connection, start: datetime, end: datetime,
                  device_ids: list[int] | None = None, *, progress: bool = False) -> int:
    """Recompute every rollup level for the whole UTC days holding [start, end).

    Only `device_ids` when given. Returns how many raw rows were read.
    """
    total = 0
    all_days = list(days(start, end))
    with tqdm(all_days, unit="day", disable=not progress, desc="rebuilding rollups") as bar:
        for day in bar:
            if device_ids is None:
                found = await conn.fetch(_DEVICES_OF_DAY, day, day + DAY)
            else:
                found = await conn.fetch(_GIVEN_DEVICES_OF_DAY, day, day + DAY, device_ids)
            for group in _groups(found):
                total += await _rebuild_slice(conn, group, day)
            bar.set_postfix(day=day.date().isoformat(), rows=f"{total:,}")
    return total


async def rebuild_command(settings: Settings, start: datetime, end: datetime,
                          device: str | None) -> str:
    """`vitalstore rollups rebuild`: returns what was done, for the terminal."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        device_ids = None
        if device is not None:
            device_id = await conn.fetchval("SELECT id FROM devices WHERE name = $1", device)
            if device_id is None:
                raise SystemExit(f"vitalstore: unknown device {device!r}")
            device_ids = [device_id]
        # Before the raw horizon, raw chunks may have been dropped: rebuilding there would
        # erase rollups that are meant to outlive them.
        oldest = horizon(settings, "readings", await conn.fetchval("SELECT now()"))
        if oldest is not None and floor_to(start, DAY) < oldest:
            safe = floor_to(oldest - ONE_MICROSECOND, DAY) + DAY
            print(f"vitalstore: raw readings before {oldest:%Y-%m-%dT%H:%M:%SZ} may be gone"
                  f" (VITALSTORE_RETENTION_RAW={settings.retention_raw}); rollups before"
                  f" {safe:%Y-%m-%d} are kept as they are", file=sys.stderr)
            start = max(start, safe)
        rows = await rebuild(conn, start, end, device_ids, progress=True)
    finally:
        await conn.close()
    return f"rollups rebuilt from {rows} raw rows"
