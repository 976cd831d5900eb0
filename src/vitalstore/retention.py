"""Retention: drop whole chunks older than each table's horizon, hourly inside the service.

Raw data (readings and their attributes) and each rollup level are hypertables of their own,
each with its own horizon: dropping raw chunks never touches a rollup, so aggregates outlive
the readings they were computed from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import asyncpg

from vitalstore.fold import fold_now
from vitalstore.settings import Settings, parse_duration

log = logging.getLogger(__name__)

# Table -> the setting holding its retention.
RETENTION = {
    "reading_attributes": "retention_raw",
    "readings": "retention_raw",
    "rollup_1m": "retention_1m",
    "rollup_1h": "retention_1h",
    "rollup_1d": "retention_1d",
}
# pg_try_advisory_lock key: one process at a time applies retention (`--workers 2` runs a
# maintenance task in each worker).
MAINTENANCE_LOCK = 0x7669_7461_6C00_0001


def horizon(settings: Settings, table: str, now: datetime) -> datetime | None:
    """Chunks of `table` wholly older than this are dropped; None keeps them forever."""
    keep = parse_duration(getattr(settings, RETENTION[table]))
    return None if keep is None else now - keep


async def apply_retention(conn: asyncpg.Connection, settings: Settings,
                          now: datetime | None = None) -> dict[str, int] | None:
    """Drop expired chunks of every table; chunks dropped per table, None if already running.

    One `drop_chunks` per table in its own transaction: no lock is held across tables, so
    ingestion (which locks attributes, readings, then rollups) cannot deadlock with it.
    """
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
        return None
    try:
        await fold_now(conn)
        now = now or await conn.fetchval("SELECT now()")
        dropped: dict[str, int] = {}
        for table in RETENTION:
            older_than = horizon(settings, table, now)
            if older_than is not None:
                chunks = await conn.fetch(
                    "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)",
                    table, older_than)
                dropped[table] = len(chunks)
        return dropped
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)


class Maintenance:
    """Applies retention every `maintenance_interval_s` in the background, first one interval
    after start (a run at start would race whatever a fresh process is asked to do first)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="maintenance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.maintenance_interval_s)
            try:
                async with self._pool.acquire() as conn:
                    dropped = await apply_retention(conn, self._settings)
            except Exception:  # the task must outlive a failed run; the next one retries
                log.exception("retention run failed")
            else:
                if dropped:
                    log.info("retention: dropped chunks %s", dropped)


async def maintenance_command(settings: Settings) -> str:
    """`vitalstore maintenance run`: returns what was done, for the terminal."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        dropped = await apply_retention(conn, settings)
    finally:
        await conn.close()
    if dropped is None:
        return "maintenance is already running in another process; nothing done"
    return "retention applied; chunks dropped: " + ", ".join(
        f"{table} {count}" for table, count in dropped.items()) if dropped else \
        "retention applied; every table is kept forever"
