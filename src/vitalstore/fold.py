"""The rollup fold: pending 1-minute deltas into rollup_1m, rollup_1h and rollup_1d.

The readings trigger appends each flush's deltas to `rollup_pending`, and `fold_rollups()`
moves them into the three levels in one transaction (revision 0006). Reads add what is
pending to each level (rollups.rows_of), so no answer waits for the fold: it only keeps the
pending table, which reads scan, down to about one interval of ingest. It runs in the service
whatever TimescaleDB's edition (the Apache-only one has no jobs). Under `--workers N` a fold
that finds another one running skips its turn.
"""

from __future__ import annotations

import asyncpg

from vitalstore.periodic import Periodic
from vitalstore.settings import Settings

# Revision 0006's pg_advisory_xact_lock key: one fold at a time, and none during a rebuild
# slice (`vitalstore rollups rebuild` takes it too).
FOLD_LOCK = 0x7669_7461_6C00_0002


async def fold_now(conn: asyncpg.Connection) -> None:
    """Fold at once, waiting for a fold already running (retention drops levels after it:
    a delta folded later would bring back a dropped bucket until the next run)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", FOLD_LOCK)
        await conn.execute("SELECT fold_rollups()")  # the lock is this session's: it folds


def fold_task(settings: Settings, pool: asyncpg.Pool) -> Periodic:
    """Folds every `rollup_fold_interval_s` in the background."""

    async def fold() -> None:
        await pool.execute("SELECT fold_rollups()")

    return Periodic("rollup fold", settings.rollup_fold_interval_s, fold)
