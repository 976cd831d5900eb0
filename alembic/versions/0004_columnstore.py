"""The full TimescaleDB: 2.28.3 or later, the columnstore layout of every hypertable, chunk
intervals that let old data be converted.

The extension itself is moved to the installed version (`ALTER EXTENSION timescaledb UPDATE`)
by alembic/env.py before any revision runs: that statement must be the first of its session
(the session's first statement loads the old library otherwise), so it cannot run on the
connection that runs the revisions. This revision checks that it happened.

Layout, measured on integer vitals with a slow wave and +-1 jitter and temperature to 0.1
(200 devices x 4 metrics x 2 h at 1 Hz, 5.76M values, PostgreSQL 15, TimescaleDB 2.28.3, a
shared 2-core machine; rows and their unique index: 92.6 bytes a value):

| readings segmentby / orderby   | bytes a value in the columnstore |
|--------------------------------|---------------------------------:|
| device_id, metric_id / ts      | 1.70                             |
| device_id / metric_id, ts      | 2.99                             |
| metric_id / device_id, ts      | 2.99                             |

One series per segment, in time order, is what compresses best (deltas of time and of a
slowly moving value), and it is also what every read asks for: a device's metrics over a range
(history, exports; the segment index finds them) and one device's late readings, whose
duplicate check then opens only that device's batches. rollup_1m the same way: 118 bytes a row
as rows, 9.8 in the columnstore segmented by (device_id, metric_id) ordered by bucket, 8.2
segmented by metric_id ordered by (device_id, bucket); the first is kept for the same reads
and late upserts (an upsert opens one device's batch, not forty devices'), a difference of
0.03 bytes a raw value. reading_attributes: one device's text in time order.

Chunk intervals: a chunk is converted only once all of it is older than the columnstore
horizon (VITALSTORE_COLUMNSTORE_AFTER, 1 day by default), so the interval bounds how long old
data waits as rows. The rollups' 7, 90 and 365 days would keep a 1-hour rollup as rows for up
to three months and a 1-day rollup for a year. Raw data keeps VITALSTORE_CHUNK_INTERVAL (1
day); rollup_1m 1 day (1,440 rows a series a chunk: batches of 1,000 still fill); rollup_1h 7
days (168 rows a series) and rollup_1d 30 days (30): both weigh under 0.05 bytes a raw value
even as rows, so their chunks are sized for conversion within about a week and a month, not
for the ratio. Existing chunks keep the interval they were made with; new ones take these.

Under an Apache-only TimescaleDB (no columnstore) the layout is not set and a warning is
printed; everything else works there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MINIMUM_VERSION = (2, 28, 3)
LAYOUT = {
    # table: (segmentby, orderby)
    "readings": ("device_id, metric_id", "ts"),
    "reading_attributes": ("device_id", "ts"),
    "rollup_1m": ("device_id, metric_id", "bucket"),
    "rollup_1h": ("device_id, metric_id", "bucket"),
    "rollup_1d": ("device_id, metric_id", "bucket"),
}
CHUNK_INTERVALS = {
    # table: (now, before this revision)
    "rollup_1m": ("1 day", "7 days"),
    "rollup_1h": ("7 days", "90 days"),
    "rollup_1d": ("30 days", "365 days"),
}


def _version() -> tuple[int, ...]:
    text = op.get_bind().exec_driver_sql(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").scalar_one()
    return tuple(int(part) for part in str(text).split("-")[0].split("."))


def _has_columnstore() -> bool:
    license_ = op.get_bind().exec_driver_sql(
        "SELECT current_setting('timescaledb.license', true)").scalar()
    return license_ != "apache"


def upgrade() -> None:
    version = _version()
    if version < MINIMUM_VERSION:
        raise RuntimeError(
            f"TimescaleDB {'.'.join(map(str, version))} in this database; vitalstore needs"
            f" {'.'.join(map(str, MINIMUM_VERSION))} (install it: scripts/install-timescaledb.sh;"
            " `vitalstore db upgrade` then updates the extension)")
    for table, (interval, _) in CHUNK_INTERVALS.items():
        op.execute(f"SELECT set_chunk_time_interval('{table}', INTERVAL '{interval}')")
    if not _has_columnstore():
        print("vitalstore: warning: TimescaleDB here is the Apache-only edition: no columnstore,"
              " data at rest stays uncompressed")
        return
    for table, (segmentby, orderby) in LAYOUT.items():
        op.execute(f"""
            ALTER TABLE {table} SET (timescaledb.enable_columnstore = true,
                                     timescaledb.segmentby = '{segmentby}',
                                     timescaledb.orderby = '{orderby}')
        """)


def downgrade() -> None:
    if _has_columnstore():
        for table in LAYOUT:
            op.execute(f"CALL remove_columnstore_policy('{table}', if_exists => true)")
            op.execute(f"SELECT count(decompress_chunk(c, true)) FROM show_chunks('{table}') c")
            op.execute(f"ALTER TABLE {table} SET (timescaledb.enable_columnstore = false)")
    for table, (_, interval) in CHUNK_INTERVALS.items():
        op.execute(f"SELECT set_chunk_time_interval('{table}', INTERVAL '{interval}')")
