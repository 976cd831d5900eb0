"""Against scratch PostgreSQL servers of our own: the Apache-only edition still works, and a
policy that TimescaleDB's scheduler fails to run shows in /ready and /metrics.

Each server is initdb'd into a temporary folder (as user postgres), on a free port, with
TimescaleDB preloaded: `-c timescaledb.license=apache` makes it behave as the Apache-only
edition (Debian's own package, say). The shared server's scheduler slots are not needed: the
scratch server has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from conftest import ADMIN_URL, free_port
from vitalstore import keys
from vitalstore.app import create_app
from vitalstore.database import schema_head
from vitalstore.policies import APACHE_WARNING
from vitalstore.settings import Settings

pytestmark = pytest.mark.slow  # scratch PostgreSQL servers of our own (tens of seconds each)

HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
OLD = HOUR - timedelta(days=20)


def _bindir() -> Path:
    """The binaries of the shared server's major version, where TimescaleDB is installed."""
    version = subprocess.run(["psql", ADMIN_URL, "-XAtc", "SHOW server_version_num"],
                             check=True, capture_output=True, text=True, timeout=10).stdout
    return Path(f"/usr/lib/postgresql/{int(version) // 10000}/bin")


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@contextlib.contextmanager
def scratch_server(*settings: str) -> Iterator[str]:
    """A PostgreSQL server of its own with TimescaleDB preloaded; yields its admin URL."""
    bindir = _bindir()
    folder = Path(tempfile.mkdtemp(prefix="vitalstore-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    options = " ".join(["-p", str(port), "-k", str(folder), "-c listen_addresses=127.0.0.1",
                        "-c shared_preload_libraries=timescaledb",
                        "-c timescaledb.telemetry_level=off", *(f"-c {s}" for s in settings)])
    try:
        subprocess.run(_as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8"),
                       check=True, capture_output=True, timeout=120)
        subprocess.run(_as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l",
                                    str(folder / "log"), "-w", "-o", options, "start"),
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                    "-w", "stop"), capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def cli(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitalstore.cli", *args],
                          env={**os.environ, "VITALSTORE_DATABASE_URL": db_url, **env},
                          capture_output=True, text=True, timeout=180, check=False)


async def new_key(db_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(db_url)
    try:
        key, _ = await keys.create(conn, f"test-admin-{uuid.uuid4().hex[:8]}", list(keys.SCOPES))
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {key}"}


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hours_of(device: str, first: datetime) -> list[dict[str, Any]]:
    return [{"device": device, "timestamp": iso(first + timedelta(minutes=10 * n)),
             "hr": 60 + n, "posture": "sitting"} for n in range(18)]


async def post(client: Any, body: Any) -> None:
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text


# -- the Apache-only edition ---------------------------------------------------------------

RETENTION = {"VITALSTORE_RETENTION_RAW": "2d", "VITALSTORE_RETENTION_1M": "5d"}


@pytest.fixture(scope="module")
def apache_url() -> Iterator[str]:
    """A database migrated by `vitalstore db upgrade` on an Apache-only TimescaleDB."""
    with scratch_server("timescaledb.license=apache") as server:
        db_url = f"{server}/vitalstore"
        done = cli(db_url, "db", "upgrade", **RETENTION)
        assert done.returncode == 0, done.stderr
        assert APACHE_WARNING in done.stderr
        assert "policy set" not in done.stderr
        yield db_url


async def test_apache_edition_has_no_columnstore(apache_url):
    conn = await asyncpg.connect(apache_url)
    try:
        assert await conn.fetchval("SHOW timescaledb.license") == "apache"
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="apache"):
            await conn.execute("ALTER TABLE readings SET (timescaledb.enable_columnstore)")
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == schema_head()
    finally:
        await conn.close()


async def test_apache_edition_serves_warns_once_and_keeps_everything_else(apache_url, caplog):
    headers = await new_key(apache_url)
    settings = Settings(database_url=apache_url, retention_raw="2d", retention_1m="5d")
    # Readings older than the raw horizon are refused at ingest: post them with no horizon,
    # then let the 2-day retention drop them.
    posting = msgspec.structs.replace(settings, retention_raw="forever")
    device = "apache-1"
    with caplog.at_level(logging.WARNING, logger="vitalstore.app"):
        async with AsyncTestClient(create_app(posting), timeout=30) as client:
            client.headers.update(headers)
            ready = await client.get("/ready")
            assert ready.status_code == 200
            assert ready.json()["warnings"] == [APACHE_WARNING]
            await post(client, hours_of(device, OLD))
            await post(client, hours_of(device, HOUR - timedelta(hours=4)))
            await post(client, [{**r, "hr": 0} for r in hours_of(device, OLD)])  # duplicates
            latest = (await client.get(f"/v1/devices/{device}/latest")).json()
            assert latest["metrics"]["hr"]["value"] == 77.0
            items = (await client.get(f"/v1/devices/{device}/readings")).json()["items"]
            assert [i["metrics"]["hr"] for i in items] == [60.0 + n % 18 for n in range(36)]
            assert {i["attributes"]["posture"] for i in items} == {"sitting"}
            hourly = (await client.get(f"/v1/devices/{device}/aggregates", params={
                "bucket": "1h", "from": iso(OLD)})).json()["items"]
            assert sum(i["count"] for i in hourly) == 36
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "vitalstore_policy_failing{" not in metrics.text
    assert len([r for r in caplog.records if r.getMessage() == APACHE_WARNING]) == 1
    # The service drops expired chunks itself here: no policy jobs on this edition.
    fast = msgspec.structs.replace(settings, maintenance_interval_s=0.2)
    async with AsyncTestClient(create_app(fast), timeout=30) as client:
        client.headers.update(headers)
        deadline = time.monotonic() + 30
        while len((await client.get(f"/v1/devices/{device}/readings")).json()["items"]) > 18:
            assert time.monotonic() < deadline, "raw chunks not dropped by the service"
            await asyncio.sleep(0.2)
        assert (await client.get(f"/v1/devices/{device}/aggregates", params={
            "bucket": "1h", "from": iso(OLD)})).json()["items"] == hourly


async def test_apache_edition_maintenance_drops_chunks_itself(apache_url):
    headers = await new_key(apache_url)
    async with AsyncTestClient(create_app(Settings(database_url=apache_url)),
                               timeout=30) as client:
        client.headers.update(headers)
        await post(client, hours_of("apache-2", OLD - timedelta(days=3)))
    done = cli(apache_url, "maintenance", "run", **RETENTION)
    assert done.returncode == 0, done.stderr
    assert APACHE_WARNING in done.stderr
    assert "retention applied by drop_chunks; chunks dropped: reading_attributes" in done.stderr
    conn = await asyncpg.connect(apache_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM readings WHERE ts < $1",
                                   HOUR - timedelta(days=3)) == 0
    finally:
        await conn.close()


# -- a failing policy, as TimescaleDB's scheduler runs it -----------------------------------

@pytest.fixture(scope="module")
async def community_url() -> AsyncIterator[str]:
    with scratch_server() as server:
        db_url = f"{server}/vitalstore"
        done = await asyncio.to_thread(cli, db_url, "db", "upgrade", **RETENTION)
        assert done.returncode == 0, done.stderr
        assert "policy set: readings: retention" in done.stderr
        yield db_url


async def test_a_failing_policy_shows_in_ready_and_metrics_and_ingestion_goes_on(community_url):
    headers = await new_key(community_url)
    settings = Settings(database_url=community_url)
    conn = await asyncpg.connect(community_url)
    try:
        async with AsyncTestClient(create_app(settings), timeout=30) as client:
            client.headers.update(headers)
            await post(client, hours_of("failing-1", OLD))
            # Someone made a view on an expired raw chunk: the retention policy cannot drop it.
            chunk = await conn.fetchval(
                "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information"
                ".chunks WHERE hypertable_name = 'readings' ORDER BY range_start LIMIT 1")
            await conn.execute(f"CREATE VIEW old_readings AS SELECT * FROM {chunk}")
            job = await conn.fetchval(
                "SELECT job_id FROM timescaledb_information.jobs"
                " WHERE hypertable_name = 'readings' AND proc_name = 'policy_retention'")
            await conn.execute("SELECT alter_job($1, next_start => now())", job)
            deadline = time.monotonic() + 60
            while await conn.fetchval("SELECT last_run_status FROM timescaledb_information"
                                      ".job_stats WHERE job_id = $1", job) != "Failed":
                assert time.monotonic() < deadline, "the scheduler did not run the job"
                await asyncio.sleep(0.3)
            ready = await client.get("/ready")
            assert ready.status_code == 200
            error = await conn.fetchval(
                "SELECT err_message FROM timescaledb_information.job_errors WHERE job_id = $1"
                " ORDER BY finish_time DESC LIMIT 1", job)
            assert f"retention policy on readings (job {job}) failed its last run: {error}" in \
                ready.json()["warnings"]
            metrics = (await client.get("/metrics")).text
            assert 'vitalstore_policy_failing{policy="retention",table="readings"} 1.0' in metrics
            assert 'vitalstore_policy_failures{policy="retention",table="readings"}' in metrics
            await post(client, hours_of("failing-2", HOUR - timedelta(hours=3)))
        done = await asyncio.to_thread(cli, community_url, "maintenance", "run", **RETENTION)
        assert done.returncode == 1
        assert f"retention on readings (job {job}): FAILED" in done.stderr
        assert "old_readings" in done.stderr
        assert "columnstore on readings" in done.stderr  # the other jobs still ran
    finally:
        await conn.close()
