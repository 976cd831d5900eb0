"""schema.py, rollups.LEVELS and /ready's schema check against the database the migrations build."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from litestar.testing import AsyncTestClient
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from vitalstore import database
from vitalstore.app import create_app
from vitalstore.rollups import LEVELS, floor_to
from vitalstore.schema import metadata

# What TimescaleDB adds by itself, which no revision spells: create_hypertable's default
# time index on each hypertable.
TIMESCALE_INDEXES = {f"{table}_{column}_idx" for table, column in (
    ("reading_attributes", "ts"), ("readings", "ts"),
    *((level.table, "bucket") for level in LEVELS))}


def _differences(connection: Connection) -> list[Any]:
    def include(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
        if kind == "table" and reflected and compare_to is None:
            return name != "alembic_version"
        return not (kind == "index" and reflected and name in TIMESCALE_INDEXES)

    context = MigrationContext.configure(connection, opts={"include_object": include})
    return list(compare_metadata(context, metadata))


async def test_schema_py_matches_the_migrated_database(db_url):
    engine = create_async_engine(db_url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(_differences)
    finally:
        await engine.dispose()
    assert differences == []


async def test_the_trigger_buckets_at_the_widths_of_rollups_levels(db, device):
    moment = datetime(2026, 3, 4, 10, 17, 23, 500_000, tzinfo=UTC)
    await db.execute("INSERT INTO devices (name) VALUES ($1)", device)
    await db.execute("INSERT INTO metrics (name) VALUES ('width') ON CONFLICT DO NOTHING")
    await db.execute(
        "INSERT INTO readings (device_id, metric_id, ts, value)"
        " SELECT d.id, m.id, $2, 1 FROM devices d, metrics m WHERE d.name = $1"
        " AND m.name = 'width'", device, moment)
    await db.execute("SELECT fold_rollups()")  # the trigger's 1-minute delta into the levels
    for level in LEVELS:
        buckets = await db.fetch(
            f"SELECT r.bucket FROM {level.table} r JOIN devices d ON d.id = r.device_id"
            " WHERE d.name = $1", device)
        assert [row["bucket"] for row in buckets] == [floor_to(moment, level.width)], level


async def test_ready_names_the_schema_revision_it_checked(client):
    answer = (await client.get("/ready")).json()
    assert answer["status"] == "ready"
    assert answer["schema"] == database.schema_head() is not None


async def test_ready_says_it_could_not_check_without_migrations(settings, monkeypatch):
    # What an install from a wheel looks like: no alembic.ini beside the package.
    monkeypatch.setattr(database, "ALEMBIC_INI", Path("/nonexistent/alembic.ini"))
    assert database.schema_head() is None
    async with AsyncTestClient(create_app(settings)) as fresh:
        answer = (await fresh.get("/ready")).json()
    assert answer["status"] == "ready"
    assert answer["schema"] == "not checked: no migrations installed with this code"
