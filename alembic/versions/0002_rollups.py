"""Rollups: count, sum, min, max per device and metric at 1 minute, 1 hour and 1 day.

Kept in the ingest transaction by the readings trigger, so they are exact the moment a
request is acknowledged, count only rows really inserted (the transition table after
ON CONFLICT DO NOTHING), and outlive raw-data retention (separate hypertables).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEVELS = {
    # table: (bucket width, chunk interval)
    "rollup_1m": ("1 minute", "7 days"),
    "rollup_1h": ("1 hour", "90 days"),
    "rollup_1d": ("1 day", "365 days"),
}


def _rollup_upsert(table: str, width: str) -> str:
    # GROUP BY then ORDER BY the key: one row per bucket, row locks taken in key order so
    # that concurrent writers on overlapping devices cannot deadlock.
    return f"""
        INSERT INTO {table} AS r (device_id, metric_id, bucket, count, sum, min, max)
        SELECT device_id, metric_id, time_bucket(INTERVAL '{width}', ts),
               count(*), sum(value), min(value), max(value)
        FROM new_rows
        GROUP BY 1, 2, 3
        ORDER BY 1, 2, 3
        ON CONFLICT (device_id, metric_id, bucket) DO UPDATE SET
            count = r.count + excluded.count,
            sum = r.sum + excluded.sum,
            min = least(r.min, excluded.min),
            max = greatest(r.max, excluded.max);
    """


# Revision 0001's latest-value upsert, repeated: a revision is a snapshot, not shared code.
LATEST_UPSERT = """
    INSERT INTO latest AS l (device_id, metric_id, ts, value)
    SELECT DISTINCT ON (device_id, metric_id) device_id, metric_id, ts, value
    FROM new_rows
    ORDER BY device_id, metric_id, ts DESC
    ON CONFLICT (device_id, metric_id) DO UPDATE
        SET ts = excluded.ts, value = excluded.value
        WHERE l.ts < excluded.ts;
"""


def upgrade() -> None:
    for table, (_, chunk) in LEVELS.items():
        op.execute(f"""
            CREATE TABLE {table} (
                device_id integer NOT NULL,
                metric_id integer NOT NULL,
                bucket timestamptz NOT NULL,
                count bigint NOT NULL,
                sum double precision NOT NULL,
                min double precision NOT NULL,
                max double precision NOT NULL,
                PRIMARY KEY (device_id, metric_id, bucket)
            )
        """)
        op.execute(f"""
            SELECT create_hypertable('{table}', by_range('bucket', INTERVAL '{chunk}'),
                                     create_default_indexes => false)
        """)
        # The fleet view reads one metric across devices.
        op.execute(f"CREATE INDEX {table}_metric_bucket ON {table} (metric_id, bucket)")

    rollups = "".join(_rollup_upsert(table, width) for table, (width, _) in LEVELS.items())
    # `SET vitalstore.rollups = off` (bench-only) measures ingest without rollup maintenance.
    op.execute(f"""
        CREATE OR REPLACE FUNCTION readings_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {LATEST_UPSERT}
            IF current_setting('vitalstore.rollups', true) IS DISTINCT FROM 'off' THEN
                {rollups}
            END IF;
            RETURN NULL;
        END
        $$
    """)


def downgrade() -> None:
    op.execute(f"""
        CREATE OR REPLACE FUNCTION readings_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {LATEST_UPSERT}
            RETURN NULL;
        END
        $$
    """)
    op.execute("DROP TABLE " + ", ".join(LEVELS))
