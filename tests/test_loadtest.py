"""The benchmark and load-run tooling: the bench routes, the SQL loader, the load generators,
the naive baseline and the locust fleet really do what their figures claim."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

import asyncload
import harness
from support import NOW
from vitalstore.app import create_app
from vitalstore.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def key_of(server: Any) -> str:
    """The API key the test server was given (its Authorization header)."""
    return str(server.headers["Authorization"]).removeprefix("Bearer ")


async def test_noop_get_answers_a_latest_shaped_object_without_the_database(client):
    response = await client.get("/bench/noop")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"device", "last_seen", "metrics"}
    assert set(body["metrics"]["spo2"]) == {"value", "timestamp"}


async def test_bench_routes_exist_only_when_enabled(db_url):
    app = create_app(Settings(database_url=db_url))
    async with AsyncTestClient(app) as plain:
        assert (await plain.get("/bench/noop")).status_code == 404
        assert (await plain.post("/bench/noop", content=b"{}")).status_code == 404


async def test_sql_loader_fills_readings_latest_rollups_and_registry(db):
    start = datetime(2025, 3, 1, tzinfo=UTC)
    end = start + timedelta(hours=2)
    devices = ["load-a", "load-b"]
    rows = await harness.load_readings(db, devices, start, end, timedelta(seconds=10),
                                       rows_per_statement=3000)
    assert rows == 2 * 720 * len(harness.METRICS)
    registry = await db.fetch("SELECT name, first_seen, last_seen FROM devices"
                              " WHERE name = ANY($1) ORDER BY name", devices)
    assert [(r["first_seen"], r["last_seen"]) for r in registry] == \
        [(start, end - timedelta(seconds=10))] * 2
    latest_ts = await db.fetch(
        "SELECT DISTINCT l.ts FROM latest l JOIN devices d ON d.id = l.device_id"
        " WHERE d.name = ANY($1)", devices)
    assert [r["ts"] for r in latest_ts] == [end - timedelta(seconds=10)]
    # The trigger fired on every slice: hourly rollups equal the raw aggregate.
    mismatches = await db.fetchval(
        """SELECT count(*) FROM (
               SELECT device_id, metric_id, time_bucket('1 hour', ts) AS bucket,
                      count(*) AS n, sum(value) AS s FROM readings
               WHERE device_id IN (SELECT id FROM devices WHERE name = ANY($1))
               GROUP BY 1, 2, 3) raw
           FULL JOIN rollup_1h r USING (device_id, metric_id, bucket)
           WHERE r.device_id IN (SELECT id FROM devices WHERE name = ANY($1))
             AND (raw.n IS DISTINCT FROM r.count OR abs(raw.s - r.sum) > 1e-6)""",
        devices)
    assert mismatches == 0
    low, high = harness.METRICS["spo2"]
    spo2 = await db.fetchrow(
        "SELECT min(value), max(value) FROM readings r JOIN metrics m ON m.id = r.metric_id"
        " WHERE m.name = 'spo2'")
    assert low <= spo2["min"] <= spo2["max"] <= high


@needs_wrk
async def test_wrk_posts_store_every_reading_once(server_factory, db):
    server = server_factory(VITALSTORE_BENCH_ROUTES="true")
    result = await asyncio.to_thread(
        harness.run_wrk, "wrk", server.url, "post_readings.lua",
        ["/v1/readings", "wrk-", "5", "50", str(NOW), key_of(server)], seconds=1,
        connections=4)
    assert result.ok > 0 and not result.errors
    assert result.p50_ms <= result.p99_ms
    stored = await db.fetchval(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name LIKE 'wrk-%'")
    # Unique (device, timestamp) per reading, 4 metrics each: nothing deduplicated away.
    # wrk does not count the requests still in flight when it stops (at most one a
    # connection); the service stores them all the same.
    assert stored % 20 == 0
    assert result.ok * 20 <= stored <= (result.ok + 4) * 20


@needs_wrk
async def test_wrk_get_script_cycles_through_its_paths(server_factory, tmp_path):
    server = server_factory(VITALSTORE_BENCH_ROUTES="true")
    conn = asyncload.Client(server.url, dict(server.headers))
    body = json.dumps([{"device": f"get-{i}", "timestamp": NOW, "spo2": 97} for i in range(3)])
    assert (await conn.request("POST", "/v1/readings", body.encode(),
                               {"Content-Type": "application/json"}))[0] == 202
    await conn.close()
    paths = tmp_path / "paths.txt"
    paths.write_text("".join(f"/v1/devices/get-{i}/latest\n" for i in range(3)))
    result = await asyncio.to_thread(harness.run_wrk, "wrk", server.url, "get_paths.lua",
                                     [str(paths), key_of(server)], seconds=1,
                                     connections=2)
    assert result.ok == result.requests > 0


async def test_asyncio_client_loads_and_reads_chunked_exports(server_factory):
    server = server_factory(VITALSTORE_BENCH_ROUTES="true")

    def noop(i: int) -> tuple[str, str, bytes]:
        return "POST", "/bench/noop", json.dumps(
            {"device": "async-1", "timestamp": NOW + i % 1000, "spo2": 97}).encode()

    result = await asyncload.load(server.url, noop, seconds=1, connections=4,
                                  headers={"Content-Type": "application/json", **server.headers})
    assert result.ok == result.requests > 0 and not result.errors

    conn = asyncload.Client(server.url, {"Content-Type": "application/json", **server.headers})
    body = json.dumps([{"device": "async-2", "timestamp": NOW + i, "spo2": 90 + i}
                       for i in range(5)]).encode()
    assert (await conn.request("POST", "/v1/readings", body))[0] == 202
    status, _, export = await conn.request("GET", "/v1/devices/async-2/readings",
                                           headers={"Accept": "application/x-ndjson"})
    await conn.close()
    assert status == 200
    assert [json.loads(line)["metrics"]["spo2"] for line in export.splitlines()] == \
        [90.0, 91.0, 92.0, 93.0, 94.0]


async def test_naive_baseline_stores_into_the_same_tables(db_url, db):
    naive = harness.Service(
        db_url, env={"NAIVE_DATABASE_URL": db_url}, name="naive-test", ready_path="/health",
        command=[sys.executable, "-m", "uvicorn", "naive_app:app", "--app-dir",
                 str(harness.LOADTEST), "--port", "{port}", "--log-level", "warning"])
    await asyncio.to_thread(naive.start)
    try:
        conn = asyncload.Client(naive.url, {"Content-Type": "application/json"})
        for ts in (NOW, NOW + 1):
            status, _, _ = await conn.request("POST", "/v1/readings", json.dumps(
                {"device": "naive-1", "timestamp": ts, "heartRateValue": 70, "spo2": 97,
                 "respiratoryRate": 14, "temperature": 36.8}).encode())
            assert status == 202
        await conn.close()
    finally:
        naive.stop()
    assert naive.peak_rss > 0
    device = await db.fetchrow("SELECT id, first_seen, last_seen FROM devices"
                               " WHERE name = 'naive-1'")
    assert (device["last_seen"] - device["first_seen"]).total_seconds() == 1
    assert await db.fetchval("SELECT count(*) FROM readings WHERE device_id = $1",
                             device["id"]) == 8
    assert await db.fetchval("SELECT count(*) FROM latest WHERE device_id = $1",
                             device["id"]) == 4


def test_a_key_given_in_the_environment_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("VITALSTORE_API_KEY", "given-key")
    assert harness.api_key("postgresql://unused/x") == "given-key"


@pytest.mark.slow
async def test_locust_fleet_runs_headless_without_failures(server_factory, tmp_path):
    server = server_factory()
    env = {**os.environ, "LOADTEST_API_KEY": key_of(server)}
    done = await asyncio.to_thread(subprocess.run, [
        str(harness.BIN / "locust"), "-f", str(harness.LOADTEST / "locustfile.py"),
        # Devices start at a random moment within their period (a gateway's is 5 s).
        "--headless", "--users", "40", "--spawn-rate", "40", "--run-time", "9s",
        "--host", server.url, "--only-summary", "--csv", str(tmp_path / "run"),
        "--weights", "bedside=10,wearable=5,gateway=1,cuff=2,dashboard=2,clinician=2",
        "--duplicate-share", "0.2", "--late-share", "0.2",
    ], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as stats:
        rows: list[dict[str, Any]] = list(csv.DictReader(stats))
    by_name = {row["Name"]: row for row in rows}
    assert int(by_name["Aggregated"]["Failure Count"]) == 0
    assert int(by_name["/v1/readings [bedside]"]["Request Count"]) > 0
    assert any(name.startswith("/v1/readings [gateway ndjson") for name in by_name)
    assert "/v1/latest?device=[ward]" in by_name


async def test_asyncpg_connects_to_scratch_databases_and_drops_them():
    scratch = harness.ScratchDatabase("selftest")
    await scratch.create()
    conn = await asyncpg.connect(scratch.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
    finally:
        await conn.close()
    await scratch.drop()
    admin = await asyncpg.connect(harness.ADMIN_URL)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1",
                                    scratch.name) == 0
    finally:
        await admin.close()
