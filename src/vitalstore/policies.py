"""TimescaleDB's own policies: every hypertable goes to the columnstore, then away, on its own
horizon.

`vitalstore db upgrade` sets, per hypertable, a columnstore policy (`add_columnstore_policy`,
chunks wholly older than VITALSTORE_COLUMNSTORE_AFTER are converted) and a retention policy
(`add_retention_policy`, chunks wholly older than the table's VITALSTORE_RETENTION_* are
dropped). TimescaleDB's background scheduler runs them; `vitalstore maintenance run` runs them
all once, now, with `CALL run_job`. Raw data and each rollup level are hypertables of their own
with their own horizon, so dropping raw chunks never touches a rollup.

On an Apache-only TimescaleDB (no columnstore, no policy jobs) nothing is converted, and
retention falls back to `drop_chunks` from the service (every VITALSTORE_MAINTENANCE_INTERVAL_S)
and from `vitalstore maintenance run`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from vitalstore.fold import fold_now
from vitalstore.periodic import Periodic
from vitalstore.settings import Settings, parse_duration

log = logging.getLogger(__name__)

# The one place that says what each hypertable gets: the setting holding its retention; all of
# them go to the columnstore after VITALSTORE_COLUMNSTORE_AFTER. Their layout in the
# columnstore (segmentby, orderby) and their chunk intervals are schema: revision 0004.
HYPERTABLES = {
    "reading_attributes": "retention_raw",
    "readings": "retention_raw",
    "rollup_1m": "retention_1m",
    "rollup_1h": "retention_1h",
    "rollup_1d": "retention_1d",
}
COLUMNSTORE = "policy_compression"
RETENTION = "policy_retention"
POLICY_NAMES = {COLUMNSTORE: "columnstore", RETENTION: "retention"}
_VERB = {COLUMNSTORE: "converted", RETENTION: "dropped"}
# pg_try_advisory_lock key: one process at a time applies the Apache-only fallback retention
# (`--workers 2` runs a maintenance task in each worker).
MAINTENANCE_LOCK = 0x7669_7461_6C00_0001
APACHE_WARNING = ("TimescaleDB here is the Apache-only edition: data at rest is not compressed"
                  " (the columnstore needs the community edition); retention runs from vitalstore")


async def has_columnstore(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    """False on an Apache-only TimescaleDB, which has neither the columnstore nor policy jobs."""
    license_: str | None = await conn.fetchval(
        "SELECT current_setting('timescaledb.license', true)")
    return license_ != "apache"


def horizon(settings: Settings, table: str, now: datetime) -> datetime | None:
    """Chunks of `table` wholly older than this are dropped; None keeps them forever."""
    keep = parse_duration(getattr(settings, HYPERTABLES[table]))
    return None if keep is None else now - keep


# -- setting the policies (vitalstore db upgrade) ----------------------------------------------

_POLICY = """
    SELECT job_id, (config->>$3)::interval FROM timescaledb_information.jobs
    WHERE hypertable_schema = current_schema() AND hypertable_name = $1 AND proc_name = $2
"""
_ADD = {COLUMNSTORE: "CALL add_columnstore_policy($1::regclass, after => $2::interval)",
        RETENTION: "SELECT add_retention_policy($1::regclass, drop_after => $2::interval)"}
_REMOVE = {COLUMNSTORE: "CALL remove_columnstore_policy($1::regclass, if_exists => true)",
           RETENTION: "SELECT remove_retention_policy($1::regclass, if_exists => true)"}
_CONFIG_KEY = {COLUMNSTORE: "compress_after", RETENTION: "drop_after"}


async def _set_policy(conn: asyncpg.Connection, table: str, proc: str,
                      after: timedelta | None) -> str | None:
    """Make `table`'s policy `proc` act after `after` (None: no policy); what changed, if any."""
    current = await conn.fetchrow(_POLICY, table, proc, _CONFIG_KEY[proc])
    if (current[1] if current else None) == after:
        return None
    async with conn.transaction():
        if current is not None:
            await conn.execute(_REMOVE[proc], table)
        if after is not None:
            await conn.execute(_ADD[proc], table, after)
    if after is None:
        return f"{table}: {POLICY_NAMES[proc]} policy removed"
    return f"{table}: {POLICY_NAMES[proc]}, chunks {_VERB[proc]} after {_text(after)}"


def _text(interval: timedelta) -> str:
    seconds = int(interval.total_seconds())
    return f"{seconds // 86400}d" if seconds % 86400 == 0 else f"{seconds}s"


async def apply_policies(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Set every hypertable's columnstore and retention policy from the settings.

    Returns what changed; nothing on an Apache-only TimescaleDB (no policy jobs there).
    """
    if not await has_columnstore(conn):
        return []
    convert_after = parse_duration(settings.columnstore_after)
    changes = []
    for table, retention in HYPERTABLES.items():
        for proc, after in ((COLUMNSTORE, convert_after),
                            (RETENTION, parse_duration(getattr(settings, retention)))):
            change = await _set_policy(conn, table, proc, after)
            if change is not None:
                changes.append(change)
    return changes


# -- running them now (vitalstore maintenance run) ---------------------------------------------

@dataclass(frozen=True, slots=True)
class JobRun:
    """One policy job run by `run_policies`: what it did to its table's chunks."""

    table: str
    policy: str
    job_id: int
    converted: int
    dropped: int
    error: str | None

    def __str__(self) -> str:
        head = f"{self.policy} on {self.table} (job {self.job_id})"
        if self.error is not None:
            return f"{head}: FAILED: {self.error}"
        if self.policy == POLICY_NAMES[COLUMNSTORE]:
            return f"{head}: {self.converted} chunks converted"
        return f"{head}: {self.dropped} chunks dropped"


# Retention before conversion: a chunk about to be dropped is not worth converting.
_JOBS = """
    SELECT job_id, hypertable_name, proc_name FROM timescaledb_information.jobs
    WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1::name[])
      AND proc_name = ANY($2::name[])
    ORDER BY proc_name = 'policy_compression', hypertable_name
"""
_CHUNKS = """
    SELECT count(*) FILTER (WHERE is_compressed), count(*) FROM timescaledb_information.chunks
    WHERE hypertable_schema = current_schema() AND hypertable_name = $1
"""


async def run_policies(conn: asyncpg.Connection) -> list[JobRun]:
    """Run every vitalstore policy job once, now, in this session (whatever the scheduler does).

    A job that fails is reported and the others still run.
    """
    runs = []
    jobs = await conn.fetch(_JOBS, list(HYPERTABLES), list(POLICY_NAMES))
    for job_id, table, proc in jobs:
        converted_before, chunks_before = await conn.fetchrow(_CHUNKS, table)
        error = None
        try:
            await conn.execute("CALL run_job($1::int)", job_id)
        except asyncpg.PostgresError as exc:
            error = f"{type(exc).__name__}: {exc}"
        converted, chunks = await conn.fetchrow(_CHUNKS, table)
        runs.append(JobRun(table, POLICY_NAMES[proc], job_id, converted - converted_before,
                           chunks_before - chunks, error))
    return runs


# -- their health (GET /ready, GET /metrics) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class PolicyHealth:
    table: str
    policy: str
    job_id: int
    failing: bool  # the scheduler's last run of it failed
    failures: int
    error: str | None

    def __str__(self) -> str:
        return (f"{self.policy} policy on {self.table} (job {self.job_id}) failed its last run:"
                f" {self.error or 'no error recorded'}")


_HEALTH = """
    SELECT j.hypertable_name, j.proc_name, j.job_id,
           coalesce(s.last_run_status = 'Failed', false), coalesce(s.total_failures, 0),
           (SELECT e.err_message FROM timescaledb_information.job_errors e
            WHERE e.job_id = j.job_id ORDER BY e.finish_time DESC NULLS LAST LIMIT 1)
    FROM timescaledb_information.jobs j
    LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
    WHERE j.hypertable_schema = current_schema() AND j.hypertable_name = ANY($1::name[])
      AND j.proc_name = ANY($2::name[])
    ORDER BY 1, 2
"""


async def policy_health(pool: asyncpg.Pool) -> list[PolicyHealth]:
    """The state of every vitalstore policy job as TimescaleDB's scheduler last ran it."""
    rows = await pool.fetch(_HEALTH, list(HYPERTABLES), list(POLICY_NAMES), timeout=2)
    return [PolicyHealth(table, POLICY_NAMES[proc], job_id, failing, failures, error)
            for table, proc, job_id, failing, failures, error in rows]


# -- the Apache-only fallback: drop_chunks from vitalstore -------------------------------------

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
        for table in HYPERTABLES:
            older_than = horizon(settings, table, now)
            if older_than is not None:
                chunks = await conn.fetch(
                    "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)",
                    table, older_than)
                dropped[table] = len(chunks)
        return dropped
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)


def maintenance_task(settings: Settings, pool: asyncpg.Pool) -> Periodic:
    """Apache-only servers: applies retention every `maintenance_interval_s` in the background,
    first one interval after start (a run at start would race whatever a fresh process is asked
    to do first)."""

    async def retention() -> None:
        async with pool.acquire() as conn:
            dropped = await apply_retention(conn, settings)
        if dropped:
            log.info("retention: dropped chunks %s", dropped)

    return Periodic("retention run", settings.maintenance_interval_s, retention)


async def maintenance_command(settings: Settings) -> tuple[str, bool]:
    """`vitalstore maintenance run`: what was done, for the terminal, and whether all went well."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        if await has_columnstore(conn):
            # Fold first, as the fallback does: a delta folded after the drop would bring back
            # a dropped bucket.
            await fold_now(conn)
            runs = await run_policies(conn)
            if not runs:
                return "no vitalstore policy jobs: run `vitalstore db upgrade` first", True
            return "\n".join(map(str, runs)), all(run.error is None for run in runs)
        dropped = await apply_retention(conn, settings)
    finally:
        await conn.close()
    if dropped is None:
        return "maintenance is already running in another process; nothing done", True
    done = ", ".join(f"{table} {count}" for table, count in dropped.items()) if dropped else \
        "none, every table is kept forever"
    return f"{APACHE_WARNING}.\nretention applied by drop_chunks; chunks dropped: {done}", True
