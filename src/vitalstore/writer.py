"""The bulk write: readings to columnar rows, names to ids, one `write_batch` call per flush."""

from __future__ import annotations

import math
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from vitalstore.readings import Reading

WRITE_BATCH = (
    "SELECT write_batch($1::int4[], $2::int4[], $3::timestamptz[], $4::float8[],"
    " $5::int4[], $6::timestamptz[], $7::jsonb[])"
)


async def init_writer_connection(conn: asyncpg.Connection) -> None:
    """Timestamps as integer microseconds since 2000-01-01: no datetime objects per reading."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=lambda us: (us,),
        decoder=lambda value: value[0],
        format="tuple",
    )


@dataclass(slots=True)
class Rows:
    """Columnar rows of one or more requests, in the shape `write_batch` takes."""

    device: list[int] = field(default_factory=list)
    metric: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    attr_device: list[int] = field(default_factory=list)
    attr_ts: list[int] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    readings: int = 0

    def extend(self, other: Rows) -> None:
        self.device += other.device
        self.metric += other.metric
        self.ts += other.ts
        self.value += other.value
        self.attr_device += other.attr_device
        self.attr_ts += other.attr_ts
        self.attributes += other.attributes
        self.readings += other.readings

    def args(self) -> tuple[list[Any], ...]:
        return (self.device, self.metric, self.ts, self.value,
                self.attr_device, self.attr_ts, self.attributes)


def to_rows(readings: list[Reading], device_ids: dict[str, int],
            metric_ids: dict[str, int]) -> Rows:
    """The one place a reading becomes rows: a row per metric value, a row for attributes."""
    rows = Rows(readings=len(readings))
    device, metric, ts, value = rows.device, rows.metric, rows.ts, rows.value
    for reading in readings:
        device_id = device_ids[reading.device]
        for name, number in reading.metrics:
            device.append(device_id)
            metric.append(metric_ids[name])
            ts.append(reading.ts_us)
            value.append(number)
        if reading.attributes is not None:
            rows.attr_device.append(device_id)
            rows.attr_ts.append(reading.ts_us)
            rows.attributes.append(reading.attributes.decode())
    return rows


async def write(conn: asyncpg.Connection, rows: Rows) -> None:
    """Store rows in one transaction; duplicates of stored values are skipped (first wins)."""
    await conn.execute(WRITE_BATCH, *rows.args())


class NameIds:
    """Ids of device or metric names, created on first sight and cached in the process.

    New names arrive concurrently in several processes: insert with ON CONFLICT DO NOTHING,
    then read the ones another writer created (an insert alone returns only its own).
    """

    def __init__(self, table: str) -> None:
        if table not in ("devices", "metrics"):
            raise ValueError(f"no name table {table!r}")
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._insert = (
            f"INSERT INTO {table} (name) SELECT unnest($1::text[]) ORDER BY 1"
            " ON CONFLICT (name) DO NOTHING RETURNING id, name"
        )
        self._select = f"SELECT id, name FROM {table} WHERE name = ANY($1::text[])"
        self._select_ids = f"SELECT id, name FROM {table} WHERE id = ANY($1::int4[])"
        self._select_all = f"SELECT id, name FROM {table}"
        self._loaded_at = -math.inf

    async def all_names(self, conn: asyncpg.Connection | asyncpg.Pool, max_age_s: float
                        ) -> Container[str]:
        """Every name of the table, reloaded once older than `max_age_s` (for the few metrics,
        not for devices); names this process created or looked up are in at once."""
        now = time.monotonic()
        if now - self._loaded_at >= max_age_s:
            self._loaded_at = now  # one reload at a time, not one per waiting request
            try:
                self._remember(await conn.fetch(self._select_all))
            except BaseException:
                self._loaded_at = -math.inf
                raise
        return self._ids.keys()

    def _remember(self, records: Iterable[asyncpg.Record]) -> None:
        for record in records:
            self._ids[record["name"]] = record["id"]
            self._names[record["id"]] = record["name"]

    async def ids(self, conn: asyncpg.Connection | asyncpg.Pool, names: Iterable[str],
                  *, create: bool) -> dict[str, int]:
        """Ids of `names`; with create=False, unknown names are left out."""
        wanted = set(names)
        missing = sorted(wanted.difference(self._ids))
        if missing:
            if create:
                self._remember(await conn.fetch(self._insert, missing))
                missing = [name for name in missing if name not in self._ids]
            if missing:
                self._remember(await conn.fetch(self._select, missing))
        return {name: self._ids[name] for name in wanted if name in self._ids}

    async def names(self, conn: asyncpg.Connection | asyncpg.Pool,
                    ids: Iterable[int]) -> dict[int, str]:
        """Names of `ids` (for reads)."""
        wanted = set(ids)
        missing = [i for i in wanted if i not in self._names]
        if missing:
            self._remember(await conn.fetch(self._select_ids, missing))
        return {i: self._names[i] for i in wanted if i in self._names}
