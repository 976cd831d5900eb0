"""Scenario 2: PostgreSQL kills the service's connections mid-flush, again and again."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from asyncload import percentile
from faultload import Load, check_acknowledged, check_rollups, metric, report

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

KILL_FOR_S = 3.0
KILL_EVERY_S = 0.1
FLUSH_TIMEOUT_S = 5.0


async def terminate_backends(db: asyncpg.Connection, stop_after: float) -> tuple[int, float]:
    """pg_terminate_backend on every other client connection of this database, in a loop.

    Returns (connections terminated, time of the last round).
    """
    terminated = 0
    deadline = time.monotonic() + stop_after
    while time.monotonic() < deadline:
        terminated += await db.fetchval(
            """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND backend_type = 'client backend'""")
        await asyncio.sleep(KILL_EVERY_S)
    return terminated, time.monotonic()


async def test_killed_connections_give_202_or_503_and_the_service_recovers(server_factory, db):
    server = server_factory(VITALSTORE_WORKERS="2",
                            VITALSTORE_FLUSH_TIMEOUT_S=str(FLUSH_TIMEOUT_S))
    load = Load(server.url, server.headers, per_request=10)
    stop = asyncio.Event()
    running = asyncio.create_task(load.closed_loop(stop, clients=16))
    await asyncio.sleep(0.5)
    terminated, last_kill = await terminate_backends(db, KILL_FOR_S)
    # Load goes on: the service must come back by itself.
    recovered_at = None
    while time.monotonic() < last_kill + 10:
        await asyncio.sleep(0.05)
        late = [a for a in load.answers if a.sent > last_kill]
        if len(late) >= 50 and all(a.status == 202 for a in late[-50:]):
            recovered_at = min(a.sent + a.latency for a in late[-50:])
            break
    stop.set()
    await running

    statuses = load.statuses()
    assert set(statuses) <= {202, 503}, statuses  # never a 500, never a hang or a reset
    assert statuses[503] > 0, "the connections were killed: some requests must have failed"
    assert recovered_at is not None, "no run of 50 answers all 202 within 10 s of the last kill"
    slowest = max(a.latency for a in load.answers)
    assert slowest < FLUSH_TIMEOUT_S + 5
    assert all(a.retry_after for a in load.answers if a.status == 503)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        assert (await client.get("/ready")).status_code == 200
    assert await metric(server.url, server.headers, "vitalstore_unavailable_total",
                        cause="database_unavailable") == statuses[503]
    # Each failed flush is logged once, however many requests it held.
    assert await metric(server.url, server.headers, "vitalstore_flushes_total",
                        outcome="failed") == server.log_path.read_text().count("readings failed:")

    acknowledged, stored = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)
    report("pg_terminate_backend loop", seconds=KILL_FOR_S, connections_terminated=terminated,
           statuses=dict(statuses), slowest_answer_s=slowest,
           p99_503_s=percentile(load.latencies(503), 0.99),
           recovery_s=recovered_at - last_kill, readings_acknowledged=acknowledged,
           readings_stored=stored, rollup_rows_checked=rollup_rows)
