"""Retention: raw chunks and rollup levels expire on their own horizons (TimescaleDB's
retention policies; `drop_chunks` from vitalstore on Apache-only servers, see
test_editions.py); aggregates outlive the raw readings they came from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from conftest import set_policies_unscheduled
from support import iso, run_cli
from vitalstore.app import create_app
from vitalstore.policies import HYPERTABLES, MAINTENANCE_LOCK, apply_policies, apply_retention
from vitalstore.settings import Settings

RETENTION = {"retention_raw": "2d", "retention_1m": "5d"}
RETENTION_ENV = {f"VITALSTORE_{name.upper()}": value for name, value in RETENTION.items()}
HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
OLD = HOUR - timedelta(days=20)  # past the raw and the 1-minute horizons
RECENT = HOUR - timedelta(hours=4)


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    """Short raw and 1-minute retention; nothing converted to the columnstore."""
    return Settings(database_url=db_url, columnstore_after="never", **RETENTION)


@pytest.fixture(scope="module", autouse=True)
async def policies(settings: Settings) -> None:
    await set_policies_unscheduled(settings)


@pytest.fixture(scope="module")
async def client(settings: Settings, api_headers: dict[str, str]) -> Any:
    """A service that takes readings past the horizon (it would refuse them), to expire them."""
    takes_old = msgspec.structs.replace(settings, retention_raw="forever")
    async with AsyncTestClient(create_app(takes_old), timeout=30) as service:
        service.headers.update(api_headers)
        yield service


async def post_hours(client: Any, device: str, first: datetime) -> None:
    """Readings every 10 minutes for 3 hours, with an attribute."""
    body = [{"device": device, "timestamp": iso(first + timedelta(minutes=10 * n)),
             "hr": 60 + n, "spo2": 95, "posture": "sitting"} for n in range(18)]
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text


async def aggregates(client: Any, device: str, bucket: str, start: datetime) -> list[Any]:
    response = await client.get(f"/v1/devices/{device}/aggregates",
                                params={"bucket": bucket, "from": iso(start)})
    assert response.status_code == 200, response.text
    items: list[Any] = response.json()["items"]
    return items


async def raw_times(db: asyncpg.Connection, device: str) -> tuple[set[datetime], set[datetime]]:
    """Timestamps of the device's stored readings and attribute rows."""
    readings = await db.fetch("SELECT DISTINCT ts FROM readings JOIN devices d ON d.id = device_id"
                              " WHERE d.name = $1", device)
    attributes = await db.fetch("SELECT ts FROM reading_attributes JOIN devices d"
                                " ON d.id = device_id WHERE d.name = $1", device)
    return {r["ts"] for r in readings}, {r["ts"] for r in attributes}


async def test_maintenance_drops_raw_data_and_keeps_aggregates(client, db, db_url, device):
    await post_hours(client, device, OLD)
    await post_hours(client, device, RECENT)
    hourly = await aggregates(client, device, "1h", OLD)
    daily = await aggregates(client, device, "1d", OLD - timedelta(days=1))
    assert sum(i["count"] for i in hourly) == 2 * 2 * 18
    done = run_cli(db_url, "maintenance", "run", **RETENTION_ENV)
    assert done.returncode == 0, done.stderr
    assert "readings" in done.stderr
    # Raw readings and attributes of 20 days ago are gone, recent ones stay.
    readings, attributes = await raw_times(db, device)
    assert readings == attributes
    assert min(readings) == RECENT
    assert len(readings) == 18
    # Hourly and daily aggregates answer as before; 1-minute rollups expired after 5 days.
    assert await aggregates(client, device, "1h", OLD) == hourly
    assert await aggregates(client, device, "1d", OLD - timedelta(days=1)) == daily
    five_minutes = await aggregates(client, device, "5m", OLD)
    assert {i["start"] for i in five_minutes} == {
        iso(RECENT + timedelta(minutes=10 * n)) for n in range(18)}
    history = await client.get(f"/v1/devices/{device}/readings",
                               params={"from": iso(OLD), "to": iso(RECENT)})
    assert history.json()["items"] == []


async def test_rebuild_never_erases_rollups_whose_raw_data_expired(client, db, db_url, device):
    await post_hours(client, device, OLD)
    await post_hours(client, device, RECENT)
    assert run_cli(db_url, "maintenance", "run", **RETENTION_ENV).returncode == 0
    hourly = await aggregates(client, device, "1h", OLD)
    done = run_cli(db_url, "rollups", "rebuild", "--from", iso(OLD - timedelta(days=1)),
                   "--to", iso(HOUR + timedelta(hours=1)), "--device", device, **RETENTION_ENV)
    assert done.returncode == 0, done.stderr
    assert "VITALSTORE_RETENTION_RAW=2d" in done.stderr
    assert await aggregates(client, device, "1h", OLD) == hourly


async def test_one_process_at_a_time_applies_retention(db, settings):
    other = await asyncpg.connect(settings.database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK)
        assert await apply_retention(db, settings) is None
        await other.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
        dropped = await apply_retention(db, settings)
        assert dropped is not None
        assert set(dropped) == {"readings", "reading_attributes", "rollup_1m"}
    finally:
        await other.close()


async def test_forever_keeps_every_table(db, db_url):
    forever = Settings(database_url=db_url, retention_raw="forever", retention_1m="forever")
    assert await apply_retention(db, forever) == {}


async def test_policies_follow_the_settings(db, settings):
    assert await apply_policies(db, settings) == []  # set by the fixture already: unchanged
    changed = msgspec.structs.replace(settings, retention_raw="30d", retention_1h="400d",
                                      columnstore_after="2d")
    assert set(await apply_policies(db, changed)) == {
        "readings: retention, chunks dropped after 30d",
        "reading_attributes: retention, chunks dropped after 30d",
        "rollup_1h: retention, chunks dropped after 400d",
        *(f"{table}: columnstore, chunks converted after 2d" for table in HYPERTABLES)}
    jobs = await db.fetch("SELECT hypertable_name, proc_name, config::text FROM"
                          " timescaledb_information.jobs WHERE hypertable_name IS NOT NULL")
    retention = {r[0]: msgspec.json.decode(r[2])["drop_after"]
                 for r in jobs if r[1] == "policy_retention"}
    assert retention == {"readings": "30 days", "reading_attributes": "30 days",
                         "rollup_1m": "5 days", "rollup_1h": "400 days"}
    assert set(await apply_policies(db, msgspec.structs.replace(
        changed, retention_1h="forever", columnstore_after="never"))) == {
        "rollup_1h: retention policy removed",
        *(f"{table}: columnstore policy removed" for table in HYPERTABLES)}
    left = await db.fetch("SELECT hypertable_name, proc_name FROM timescaledb_information.jobs"
                          " WHERE hypertable_name IS NOT NULL ORDER BY 1, 2")
    assert [tuple(r) for r in left] == [("reading_attributes", "policy_retention"),
                                        ("readings", "policy_retention"),
                                        ("rollup_1m", "policy_retention")]
    await apply_policies(db, settings)
