"""What holds on row chunks holds on chunks converted to the columnstore: duplicates, late
readings, latest, pages and exports across the boundary, rebuild, retention, and a reading that
lands while its chunk converts.

Policies run with `CALL run_job` (`run_policies`), never by waiting for TimescaleDB's
scheduler (see conftest.set_policies_unscheduled).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from conftest import set_policies_unscheduled
from test_rollups import assert_rollups_match_raw, assert_snapshots_equal, device_ids, snapshot
from vitalstore.app import create_app
from vitalstore.fold import fold_now
from vitalstore.policies import HYPERTABLES, run_policies
from vitalstore.rebuild import rebuild
from vitalstore.rollups import LEVELS
from vitalstore.settings import Settings

DAY = timedelta(days=1)
TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
# Today's readings a second apart: 240 of them end within the 300 s future-skew bound even
# just after midnight (a minute apart, they were refused as future until 04:00 UTC).
TODAY_STEP_S = 1
OLD = TODAY - 3 * DAY  # in chunks wholly past the 1-day columnstore horizon
EXPIRED = TODAY - 30 * DAY  # past the raw (20 days) horizon; the 1-minute level keeps 60
RETENTION = {"retention_raw": "20d", "retention_1m": "60d"}


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, columnstore_after="1d", **RETENTION)


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


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def post(client: Any, body: Any) -> None:
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text


def day_of(device: str, first: datetime, count: int = 240, step_s: int = 60,
           **extra: Any) -> list[dict[str, Any]]:
    """`count` readings a `step_s` apart: two metrics with a slow wave, an attribute now and
    then."""
    return [{"device": device, "timestamp": iso(first + timedelta(seconds=step_s * n)),
             "hr": 60 + n % 7, "temp": round(36.5 + (n % 5) / 10, 1),
             **({"note": f"n{n}"} if n % 50 == 0 else {}), **extra} for n in range(count)]


async def convert(db: asyncpg.Connection) -> int:
    """Fold, then run every policy now, as `vitalstore maintenance run` does; the chunks
    converted (all the old ones are, afterwards)."""
    await fold_now(db)
    runs = await run_policies(db)
    assert runs and all(run.error is None for run in runs), [str(r) for r in runs]
    assert not await db.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE NOT is_compressed"
        " AND hypertable_name = ANY($1::name[]) AND range_end < now() - INTERVAL '1 day'",
        list(HYPERTABLES))
    return sum(run.converted for run in runs)


async def converted_chunks_of(db: asyncpg.Connection, table: str, at: datetime) -> bool:
    compressed: bool = await db.fetchval(
        "SELECT is_compressed FROM timescaledb_information.chunks WHERE hypertable_name = $1"
        " AND range_start <= $2 AND range_end > $2", table, at)
    return compressed


async def history(client: Any, device: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = (await client.get(f"/v1/devices/{device}/readings", params={
            **params, **({"cursor": cursor} if cursor else {})})).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def export(client: Any, device: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/devices/{device}/readings", params=params,
                                headers={"accept": "application/x-ndjson"})
    assert response.status_code == 200
    return [msgspec.json.decode(line) for line in response.content.splitlines()]


async def aggregates(client: Any, device: str, bucket: str, start: datetime) -> list[Any]:
    response = await client.get(f"/v1/devices/{device}/aggregates",
                                params={"bucket": bucket, "from": iso(start)})
    assert response.status_code == 200, response.text
    items: list[Any] = response.json()["items"]
    return items


async def test_old_chunks_of_every_table_are_converted_by_the_policy(client, db, device):
    month_ago = TODAY - 40 * DAY  # in wholly old 7- and 30-day rollup chunks too (raw: dropped)
    await post(client, day_of(f"{device}-old", month_ago))
    await post(client, day_of(device, OLD))
    await post(client, day_of(device, TODAY, step_s=TODAY_STEP_S))
    assert await convert(db) > 0
    for level in LEVELS:
        assert await converted_chunks_of(db, level.table, month_ago), level.table
    for table in ("readings", "reading_attributes", "rollup_1m"):
        assert await converted_chunks_of(db, table, OLD)
        assert not await converted_chunks_of(db, table, TODAY)
    await assert_rollups_match_raw(db, await device_ids(db, [device]))


async def test_duplicates_of_converted_readings_are_stored_once_first_write_wins(
        client, db, device):
    first = day_of(device, OLD)
    await post(client, first)
    await convert(db)
    before = await history(client, device)
    rollups = await snapshot(db, await device_ids(db, [device]))
    # The same readings again (a retry), then the same keys with other values.
    await post(client, first)
    await post(client, [{**r, "hr": -1, "temp": -1, **({"note": "changed"} if "note" in r else {})}
                        for r in first])
    assert await history(client, device) == before
    assert await snapshot(db, await device_ids(db, [device])) == rollups
    stored = await db.fetchval("SELECT count(*) FROM readings JOIN devices d ON d.id = device_id"
                               " WHERE d.name = $1", device)
    assert stored == 2 * len(first)


async def test_late_readings_into_converted_chunks_are_stored_and_counted_once(
        client, db, device):
    await post(client, day_of(device, OLD, step_s=120))
    await post(client, day_of(device, TODAY, step_s=TODAY_STEP_S))
    await convert(db)
    latest = (await client.get(f"/v1/devices/{device}/latest")).json()
    # Late: between the old readings (odd minutes), into converted chunks of every table.
    late = [{**r, "hr": 200 + n}
            for n, r in enumerate(day_of(device, OLD + timedelta(minutes=1), step_s=120))]
    await post(client, late)
    await post(client, late)  # and retried
    items = await history(client, device, to=iso(OLD + DAY))
    assert len(items) == 2 * 240
    assert [i["timestamp"] for i in items] == sorted(i["timestamp"] for i in items)
    assert [i["metrics"]["hr"] for i in items[1::2]] == [200.0 + n for n in range(240)]
    assert await export(client, device, to=iso(OLD + DAY)) == items
    await assert_rollups_match_raw(db, await device_ids(db, [device]))
    daily = await aggregates(client, device, "1d", OLD)
    assert {i["metric"]: i["count"] for i in daily if i["start"] == iso(OLD)} == {
        "hr": 480, "temp": 480}
    assert (await client.get(f"/v1/devices/{device}/latest")).json() == latest


async def test_pages_and_exports_across_the_converted_boundary_are_exact(client, db, device):
    # Two days before today's midnight and into today: converted chunks, then row chunks.
    start = TODAY - 2 * DAY
    now = iso(datetime.now(UTC))
    body = [r for r in day_of(device, start, count=3000, step_s=100) if r["timestamp"] < now]
    await post(client, body)
    await convert(db)
    assert await converted_chunks_of(db, "readings", start)
    assert not await converted_chunks_of(db, "readings", TODAY)
    expected = [r["timestamp"] for r in body]
    forwards = await history(client, device, limit=333)
    assert [i["timestamp"].replace("Z", "") for i in forwards] == [e[:-1] for e in expected]
    assert await history(client, device, limit=250, order="desc") == forwards[::-1]
    assert await export(client, device) == forwards
    assert [i["metrics"]["hr"] for i in forwards] == [60.0 + n % 7 for n in range(len(expected))]


def run_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VITALSTORE_DATABASE_URL": db_url,
           **{f"VITALSTORE_{name.upper()}": value for name, value in RETENTION.items()}}
    return subprocess.run([sys.executable, "-m", "vitalstore.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_rollups_rebuild_works_on_converted_days(client, db, db_url):
    names = [f"rebuild-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    for name in names:
        await post(client, day_of(name, OLD - DAY, count=500, step_s=333))
    await convert(db)
    ids = await device_ids(db, names)
    ingested = await snapshot(db, ids)
    for level in LEVELS:  # edits inside converted rollup chunks
        await db.execute(f"UPDATE {level.table} SET count = count + 1, sum = sum * 2"
                         " WHERE device_id = ANY($1::int4[])", ids)
    assert await snapshot(db, ids) != ingested
    done = run_cli(db_url, "rollups", "rebuild", "--from", iso(OLD - 2 * DAY),
                   "--to", iso(OLD + DAY))
    assert done.returncode == 0, done.stderr
    assert_snapshots_equal(await snapshot(db, ids), ingested)
    await assert_rollups_match_raw(db, ids)
    await rebuild(db, OLD - 2 * DAY, OLD + DAY, ids)  # and again, on what it just wrote
    await assert_rollups_match_raw(db, ids)


async def test_retention_policies_drop_converted_raw_chunks_and_keep_aggregates(
        client, db, db_url, device):
    await post(client, day_of(device, EXPIRED))
    await post(client, day_of(device, OLD))
    # Folded first, as `maintenance run` folds: answers before and after then add the same
    # floats in the same order (level + pending may differ from folded in the last bit).
    await fold_now(db)
    for table in HYPERTABLES:  # converted before they expire (the policy would drop them first)
        await db.execute("SELECT compress_chunk(c, true) FROM show_chunks($1::regclass,"
                         " older_than => now() - INTERVAL '1 day') c", table)
    assert await converted_chunks_of(db, "readings", EXPIRED)
    hourly = await aggregates(client, device, "1h", EXPIRED)
    daily = await aggregates(client, device, "1d", EXPIRED)
    five_minutes = await aggregates(client, device, "5m", EXPIRED)
    done = run_cli(db_url, "maintenance", "run")
    assert done.returncode == 0, done.stderr
    assert "retention on readings" in done.stderr and "chunks dropped" in done.stderr
    items = await history(client, device)
    assert min(i["timestamp"] for i in items) == iso(OLD)
    assert await history(client, device, to=iso(OLD)) == []
    # Aggregates answer as before: the 1-minute level keeps 60 days, the others forever.
    assert await aggregates(client, device, "1h", EXPIRED) == hourly
    assert await aggregates(client, device, "1d", EXPIRED) == daily
    assert await aggregates(client, device, "5m", EXPIRED) == five_minutes
    # A second run finds nothing left to do.
    again = run_cli(db_url, "maintenance", "run")
    assert again.returncode == 0, again.stderr
    dropped = [line for line in again.stderr.splitlines() if line.startswith("retention on")]
    assert len(dropped) == 3  # readings, attributes, rollup_1m; 1h and 1d are kept forever
    assert all(line.endswith(": 0 chunks dropped") for line in dropped), dropped


async def test_a_reading_landing_while_its_chunk_converts_is_stored_once(
        client, db, db_url, device):
    day = OLD - 2 * DAY
    await post(client, day_of(device, day, count=10000, step_s=8))
    job = await db.fetchval("SELECT job_id FROM timescaledb_information.jobs"
                            " WHERE hypertable_name = 'readings'"
                            " AND proc_name = 'policy_compression'")
    converter = await asyncpg.connect(db_url)
    try:
        running = asyncio.create_task(converter.execute("CALL run_job($1::int)", job))
        # New readings and duplicates of stored ones, while the conversion runs.
        landed = [day_of(device, day + timedelta(seconds=5 + n), count=20, step_s=8 * 500,
                         landed=1) for n in range(3)]
        for body in landed:
            await asyncio.sleep(0.01)
            # Stored at n = 17, 18, 19 with other values: the first write must win.
            await post(client, body + day_of(device, day + timedelta(seconds=8 * 17), count=3,
                                             step_s=8))
        await running
    finally:
        await converter.close()
    assert await converted_chunks_of(db, "readings", day)
    ids = await device_ids(db, [device])
    stored = await db.fetch("SELECT ts, metric_id, count(*) FROM readings WHERE device_id = $1"
                            " AND ts >= $2 AND ts < $3 GROUP BY 1, 2 HAVING count(*) > 1",
                            ids[0], day, day + DAY)
    assert stored == []
    landed_times = {r["timestamp"] for body in landed for r in body}
    items = await history(client, device, **{"from": iso(day), "to": iso(day + DAY)})
    assert {i["timestamp"] for i in items if "landed" in i["metrics"]} == landed_times
    assert len(items) == 10000 + len(landed_times)
    first_writes = [i["metrics"]["hr"] for i in items if i["timestamp"] in {
        iso(day + timedelta(seconds=8 * n)) for n in (17, 18, 19)}]
    assert first_writes == [60.0 + n % 7 for n in (17, 18, 19)]
    await assert_rollups_match_raw(db, ids)
