"""Scenario 6: PostgreSQL refuses one request's data in a flush shared with other requests.

Nothing our validator lets through is refused by this schema (finite floats, printable ids,
NUL-free attributes, bounded timestamps and nesting), so this test's own database gets a
CHECK constraint that refuses the value 666: one request carries it, its batch-mates do not.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from faultload import Load, check_acknowledged, check_rollups, report, stored

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

ROUNDS = 3
REQUESTS = 20
BAD = 666.0


async def test_one_refused_request_does_not_take_its_batch_mates_down(server_factory, db):
    await db.execute(f"ALTER TABLE readings ADD CONSTRAINT refuses_{int(BAD)} "
                     f"CHECK (value <> {BAD})")
    # A long flush interval gathers the concurrent requests into one flush.
    server = server_factory(VITALSTORE_FLUSH_INTERVAL_MS="50", VITALSTORE_WRITER_CONNECTIONS="1")
    load = Load(server.url, server.headers, per_request=5)

    def poison(readings: list[dict]) -> None:
        readings[2]["hr"] = BAD

    bad_requests = []
    async with load.client() as client:
        for round_ in range(ROUNDS):
            bad_at = (round_ * 7) % REQUESTS
            answers = await asyncio.gather(*(
                load.post_once(client, patch=poison if i == bad_at else None)
                for i in range(REQUESTS)))
            bad = answers[bad_at]
            bad_requests.append(bad)
            assert bad.status == 422, bad
            assert "refused" in bad.error and f"refuses_{int(BAD)}" in bad.error, bad.error
            assert [a.status for a in answers if a is not bad] == [202] * (REQUESTS - 1)

    # The refused requests stored nothing (all or nothing), the others everything.
    found = await stored(db, load)
    for bad in bad_requests:
        for n in range(bad.first, bad.first + bad.count):
            reading = load.reading(n)
            assert (reading["device"], reading["timestamp"], "hr") not in found
    acknowledged, stored_count = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)

    # Each refused flush was retried request by request, and logged once, not per request.
    log_lines = [json.loads(line) for line in server.log_path.read_text().splitlines()
                 if line.startswith("{")]
    retried = [int(re.search(r"retrying its (\d+) requests", e["message"]).group(1))
               for e in log_lines if "retrying its" in e["message"]]
    assert retried and all(size > 1 for size in retried), retried
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        metrics = (await client.get("/metrics")).text
    rejected_flushes = float(re.search(
        r'^vitalstore_flushes_total\{outcome="rejected"\} (\S+)$', metrics, re.M).group(1))
    assert rejected_flushes == len(retried)
    report("refused flush", rounds=ROUNDS, requests_per_round=REQUESTS,
           refused_flush_sizes=retried, readings_acknowledged=acknowledged,
           readings_stored=stored_count, rollup_rows_checked=rollup_rows)
