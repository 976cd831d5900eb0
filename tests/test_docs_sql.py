"""Every `sql` block of docs/sql.md runs on a database the service filled, and finds rows."""

from __future__ import annotations

import re
import time

import asyncpg
import msgspec
import pytest

from conftest import ROOT
from vitalstore.fold import fold_now

QUERIES = re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "sql.md").read_text(), re.S)
NOW = int(time.time())


@pytest.fixture(scope="module")
async def filled(client, db_url):
    """Readings of the page's examples: fitband-7 over the last hour, a ward-3 device."""
    body = [{"device": "fitband-7", "timestamp": NOW - 60 * n, "heartRateValue": 60 + n,
             "spo2": 97, **({"note": "walk"} if n == 0 else {})} for n in range(30)]
    body += [{"device": "ward-3:bed-1", "timestamp": NOW - 60 * n, "spo2": 95 + n % 3}
             for n in range(30)]
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    # SQL readers see the rollup levels once the service has folded the pending deltas in.
    conn = await asyncpg.connect(db_url)
    try:
        await fold_now(conn)
    finally:
        await conn.close()


def test_the_page_has_its_queries():
    assert len(QUERIES) >= 6


@pytest.mark.parametrize("query", QUERIES, ids=[q.split("\n", 1)[0][:40] for q in QUERIES])
async def test_documented_query_runs_and_finds_rows(filled, db, query):
    rows = await db.fetch(query)
    assert rows, query
