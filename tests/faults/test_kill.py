"""Scenario 1: `kill -9` of the whole service (main process and every worker) under load."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from faultload import Load, check_acknowledged, check_rollups, report

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

ROUNDS = 3


async def test_kill_9_under_load_loses_no_acknowledged_reading(server_factory, db):
    rng = random.Random(5)
    load: Load | None = None
    acknowledged_per_round = []
    for _ in range(ROUNDS):
        server = server_factory(VITALSTORE_WORKERS="2")
        if load is None:
            load = Load(server.url, server.headers, per_request=20)
        load.url = server.url
        stop = asyncio.Event()
        before = len(load.acknowledged())
        running = asyncio.create_task(load.closed_loop(stop, clients=16))
        # A random moment, once requests are flowing.
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        server.signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(server.process.wait, 10)
        stop.set()
        await running
        acknowledged_per_round.append(len(load.acknowledged()) - before)
        assert time.monotonic() - killed < 10

    assert load is not None
    assert all(count > 0 for count in acknowledged_per_round), acknowledged_per_round
    # Restarted, the service serves, and everything it acknowledged before is there.
    server = server_factory(VITALSTORE_WORKERS="2")
    load.url = server.url
    async with load.client() as client:
        assert (await load.post_once(client)).status == 202
    acknowledged, stored = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)
    report("kill -9", rounds=ROUNDS, requests=len(load.answers),
           statuses=dict(load.statuses()), readings_acknowledged=acknowledged * 1,
           readings_stored=stored, rollup_rows_checked=rollup_rows)
