"""Scenario 5: offered load several times what the service can store."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from asyncload import percentile
from faultload import Load, check_acknowledged, check_rollups, report
from harness import RssSampler, rss_bytes

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

PER_REQUEST = 500
BUFFER = 20_000
TIMES_CAPACITY = 4
OVERLOAD_S = 3.0


async def closed_loop_rate(load: Load, seconds: float, clients: int = 8) -> tuple[float, int]:
    """Readings acknowledged per second by a closed loop, and how many answers were not 202."""
    stop = asyncio.Event()
    start = len(load.answers)
    began = time.monotonic()
    running = asyncio.create_task(load.closed_loop(stop, clients))
    await asyncio.sleep(seconds)
    stop.set()
    await running
    answers = load.answers[start:]
    acknowledged = sum(a.count for a in answers if a.status == 202)
    return acknowledged / (time.monotonic() - began), sum(a.status != 202 for a in answers)


async def test_overload_gives_only_202_or_fast_503_and_throughput_returns(server_factory, db):
    server = server_factory(VITALSTORE_BUFFER_MAX_READINGS=str(BUFFER))
    load = Load(server.url, server.headers, per_request=PER_REQUEST)
    capacity, _ = await closed_loop_rate(load, 2.0)
    rate = TIMES_CAPACITY * capacity / PER_REQUEST  # requests a second
    overload_from = len(load.answers)
    baseline_rss = rss_bytes(server.process.pid)
    with RssSampler(server.process.pid, interval=0.05) as rss:
        await load.open_loop(asyncio.Event(), rate, outstanding=200, seconds=OVERLOAD_S)
    overload = load.answers[overload_from:]
    began = min(a.sent for a in overload)
    overload_s = max(a.sent for a in overload) - began
    offered = sum(a.count for a in overload) / overload_s
    ended = max(a.sent + a.latency for a in overload)
    accepted = sum(a.count for a in overload if a.status == 202) / (ended - began)

    statuses = load.statuses(overload)
    assert set(statuses) <= {202, 503}, statuses
    assert statuses[503] > 0, "several times capacity must overflow the buffer"
    latencies_503 = load.latencies(503)
    p99_503 = percentile(latencies_503, 0.99)
    assert p99_503 < 1.0
    growth = rss.peak - baseline_rss
    assert growth < 200 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"

    # Load gone, the service is ready and stores at its usual rate again.
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        for _ in range(50):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("not ready after the overload")
    after, refused_after = await closed_loop_rate(load, 2.0)
    assert refused_after == 0
    assert after > capacity / 3, (after, capacity)

    acknowledged, stored = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)
    report("overload", capacity_readings_per_s=round(capacity),
           offered_readings_per_s=round(offered), accepted_readings_per_s=round(accepted),
           statuses=dict(statuses), p50_503_ms=percentile(latencies_503, 0.5) * 1000,
           p99_503_ms=p99_503 * 1000, max_503_ms=max(latencies_503) * 1000,
           p99_202_ms=percentile(load.latencies(202), 0.99) * 1000,
           rss_before_mib=baseline_rss / 2**20, rss_peak_mib=rss.peak / 2**20,
           readings_per_s_after=round(after), readings_acknowledged=acknowledged,
           readings_stored=stored, rollup_rows_checked=rollup_rows)
