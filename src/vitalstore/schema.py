"""Table metadata (SQLAlchemy Core): what Alembic's autogenerate compares against.

The TimescaleDB parts (hypertables, triggers, rollup maintenance) live in the Alembic revisions;
`tests/test_schema.py` checks these tables against the migrated database.
Layout, one row per metric value ("narrow"): a reading of 4 metrics is 4 rows of `readings`.
It inserts at about a third of the speed of a row per reading (measured: 260k against 885k
values/s) but keeps "first write wins per (device, metric, timestamp)" a plain `ON CONFLICT DO
NOTHING`, and the trigger's transition table then holds exactly the values that were really
stored.
"""

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from vitalstore.rollups import LEVELS

metadata = MetaData()

TS = DateTime(timezone=True)

devices = Table(
    "devices",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    # COLLATE "C": listing order and prefix scans are bytewise and use the unique index.
    Column("name", Text(collation="C"), nullable=False, unique=True),
    # Oldest and newest reading timestamps (not arrival times); NULL until a reading commits.
    Column("first_seen", TS),
    Column("last_seen", TS),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", Text(collation="C"), nullable=False, unique=True),
)

# Hypertable on ts. Unique (device_id, ts, metric_id): one value per device, metric and time,
# and the order history reads in. No foreign keys: they would cost a lookup per row.
readings = Table(
    "readings",
    metadata,
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("ts", TS, nullable=False),
    Column("value", Double, nullable=False),
    Index("readings_device_ts_metric", "device_id", "ts", "metric_id", unique=True),
)

# Non-numeric fields of a reading, one row per (device, ts) that had any. Hypertable on ts.
reading_attributes = Table(
    "reading_attributes",
    metadata,
    Column("device_id", Integer, nullable=False),
    Column("ts", TS, nullable=False),
    Column("attributes", JSONB, nullable=False),
    Index("reading_attributes_device_ts", "device_id", "ts", unique=True),
)

# Fed by the statement-level trigger on readings; newest value per device and metric.
latest = Table(
    "latest",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("metric_id", Integer, ForeignKey("metrics.id"), nullable=False),
    Column("ts", TS, nullable=False),
    Column("value", Double, nullable=False),
    PrimaryKeyConstraint("device_id", "metric_id"),
)


def _rollup(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("device_id", Integer, nullable=False),
        Column("metric_id", Integer, nullable=False),
        Column("bucket", TS, nullable=False),
        Column("count", BigInteger, nullable=False),
        Column("sum", Double, nullable=False),
        Column("min", Double, nullable=False),
        Column("max", Double, nullable=False),
        PrimaryKeyConstraint("device_id", "metric_id", "bucket"),
        Index(f"{name}_metric_bucket", "metric_id", "bucket"),
    )


# Per device and metric: count, sum, min, max per bucket of each level's width. Hypertables.
rollups = [_rollup(level.table) for level in LEVELS]

# 1-minute deltas appended by the readings trigger, folded into the levels (revision 0006).
# A plain table with no key or index: only appended to, scanned, and emptied by the fold.
rollup_pending = Table(
    "rollup_pending",
    metadata,
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("bucket", TS, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum", Double, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
)


# API keys (revision 0003). Only the SHA-256 of a key is stored; `device_prefix` NULL means
# every device. A name is unique among the keys not revoked of the same prefix (revision 0005).
# SQL on it lives in keys.py.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", Text(collation="C"), nullable=False),
    Column("key_hash", LargeBinary, CheckConstraint("length(key_hash) = 32"), nullable=False,
           unique=True),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("device_prefix", Text(collation="C")),
    Column("created_at", TS, nullable=False, server_default=text("now()")),
    Column("revoked_at", TS),
    CheckConstraint("cardinality(scopes) > 0 AND scopes <@ ARRAY['ingest', 'read', 'admin']"),
    CheckConstraint("device_prefix <> ''"),
    Index("api_keys_active_prefix_name", text("coalesce(device_prefix, '')"), "name",
          unique=True, postgresql_where=text("revoked_at IS NULL")),
)
