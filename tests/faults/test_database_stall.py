"""Scenario 3: the database stalls (a lock on the readings table) while requests keep coming."""

from __future__ import annotations

import asyncio
import time

import pytest

from asyncload import percentile
from faultload import Load, check_acknowledged, check_rollups, metric, report
from harness import RssSampler

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

BUFFER = 2000
PER_REQUEST = 50
RATE = 100  # requests a second: 5,000 readings/s, far below capacity, far above a stalled db
STALL_S = 4.0


async def test_stalled_database_fills_the_buffer_then_503s_fast_then_recovers(
        server_factory, db):
    server = server_factory(VITALSTORE_BUFFER_MAX_READINGS=str(BUFFER),
                            VITALSTORE_MAX_ITEMS=str(PER_REQUEST * 2))
    load = Load(server.url, server.headers, per_request=PER_REQUEST)
    stop = asyncio.Event()
    with RssSampler(server.process.pid, interval=0.05) as rss:
        running = asyncio.create_task(load.open_loop(stop, RATE))
        await asyncio.sleep(1.0)
        baseline_rss = max(rss.samples)
        async with db.transaction():
            await db.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            locked = time.monotonic()
            await asyncio.sleep(STALL_S)
        released = time.monotonic()
        await asyncio.sleep(2.0)
        stop.set()
        await running
        stall_rss = max(rss.samples)

    statuses = load.statuses()
    assert set(statuses) <= {202, 503}, statuses
    during = [a for a in load.answers if locked + 1 < a.sent < released]
    refused = [a for a in during if a.status == 503]
    assert len(refused) > len(during) / 2, "a full buffer must refuse most requests"
    assert all(a.retry_after for a in refused)
    assert all("buffer full" in (a.error or "") for a in refused)
    p99_503 = percentile([a.latency for a in refused], 0.99)
    assert p99_503 < 0.1
    # The buffered requests waited for the lock and were then committed, none failed.
    waited = [a for a in load.answers if a.status == 202 and a.sent < released < a.sent + a.latency]
    assert len(waited) >= BUFFER // PER_REQUEST - 1
    # Once the lock is gone, the 503s stop.
    after = [a for a in load.answers if a.sent > released + 0.5]
    assert after and all(a.status == 202 for a in after), load.statuses(after)
    assert await metric(server.url, server.headers, "vitalstore_unavailable_total",
                        cause="buffer_full") == statuses[503]
    growth = stall_rss - baseline_rss
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"

    acknowledged, stored = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)
    report("LOCK TABLE stall", stall_s=STALL_S, buffer=BUFFER, statuses=dict(statuses),
           answers_503_during_stall=len(refused), p50_503_ms=percentile(
               [a.latency for a in refused], 0.5) * 1000, p99_503_ms=p99_503 * 1000,
           max_503_ms=max(a.latency for a in refused) * 1000,
           buffered_then_committed=len(waited),
           rss_before_mib=baseline_rss / 2**20, rss_peak_mib=stall_rss / 2**20,
           readings_acknowledged=acknowledged, readings_stored=stored,
           rollup_rows_checked=rollup_rows)

