"""Rollups stay equal to time_bucket aggregates of the raw rows: any input, concurrent writers,
two processes, and after `vitalstore rollups rebuild`."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import iso, run_cli, store
from vitalstore.app import create_app
from vitalstore.policies import HYPERTABLES
from vitalstore.rebuild import rebuild
from vitalstore.rollups import LEVELS, rows_of
from vitalstore.settings import Settings

DAY = timedelta(days=1)
# Yesterday's UTC midnight: readings around it and up to 40 days before it, none in the future.
BASE = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - DAY
Rollup = dict[tuple[int, int, datetime], tuple[int, float, float, float]]


@pytest.fixture(scope="module", name="settings")
def settings_folding_by_hand(db_url: str) -> Settings:
    """No fold on a timer: the tests fold when they choose to (and the two-process test runs
    servers that fold every 50 ms)."""
    return Settings(database_url=db_url, bench_routes=True, rollup_fold_interval_s=3600)


@pytest.fixture(scope="module")
async def client(settings: Settings, api_headers: dict[str, str]
                 ) -> AsyncIterator[httpx.AsyncClient]:
    """The service in-process on this event loop: requests gathered together really overlap
    (Litestar's test client runs the app in another thread and waits for each request)."""
    app = create_app(settings)
    started, stopping = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        # Entered and left in one task: the lifespan holds an anyio task group.
        async with app.lifespan():
            started.set()
            await stopping.wait()

    lifespan = asyncio.create_task(run())
    await asyncio.wait([lifespan, asyncio.create_task(started.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if lifespan.done():
        lifespan.result()  # the start-up failed: raise its error
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), headers=api_headers,
                                 base_url="http://vitalstore", timeout=60) as http:
        yield http
    stopping.set()
    await lifespan


@pytest.fixture(scope="module")
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection for the whole module (hypothesis examples share it)."""
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


async def device_ids(conn: asyncpg.Connection, names: list[str]) -> list[int]:
    """Ids of known devices, in the order of `names`."""
    found = dict(await conn.fetch("SELECT name, id FROM devices WHERE name = ANY($1::text[])",
                                  names))
    return [found[name] for name in names if name in found]


async def stored_rollups(conn: asyncpg.Connection, table: str, ids: list[int]) -> Rollup:
    """A level as reads see it: its rows combined with the pending deltas."""
    level = next(level for level in LEVELS if level.table == table)
    rows = await conn.fetch(
        "SELECT device_id, metric_id, start, sum(count)::int8, sum(sum), min(min), max(max)"
        f" FROM ({rows_of(level, 'device_id = ANY($1::int4[])', level.width)}) AS u"
        " GROUP BY 1, 2, 3", ids)
    return {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6]) for r in rows}


async def level_rows(conn: asyncpg.Connection, table: str, ids: list[int]) -> Rollup:
    """A level's own rows, without the pending deltas."""
    rows = await conn.fetch(
        f"SELECT device_id, metric_id, bucket, count, sum, min, max FROM {table}"
        " WHERE device_id = ANY($1::int4[])", ids)
    return {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6]) for r in rows}


async def fold(conn: asyncpg.Connection) -> int:
    """Fold the pending deltas now, as the service does every second."""
    folded: int = await conn.fetchval("SELECT fold_rollups()")
    return folded


async def raw_rollups(conn: asyncpg.Connection, width: timedelta, ids: list[int]) -> Rollup:
    rows = await conn.fetch(
        "SELECT device_id, metric_id, time_bucket($2::interval, ts), count(*), sum(value),"
        " min(value), max(value) FROM readings WHERE device_id = ANY($1::int4[])"
        " GROUP BY 1, 2, 3", ids, width)
    return {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6]) for r in rows}


def assert_same(found: Rollup, expected: Rollup, what: str) -> None:
    """Same buckets; count, min and max equal; sums equal but for summation order."""
    assert found.keys() == expected.keys(), what
    for key, (count, total, low, high) in expected.items():
        got = found[key]
        assert (got[0], got[2], got[3]) == (count, low, high), (what, key)
        assert math.isclose(got[1], total, rel_tol=1e-9, abs_tol=1e-6), (what, key)


async def assert_rollups_match_raw(conn: asyncpg.Connection, ids: list[int]) -> None:
    assert ids
    for level in LEVELS:
        assert_same(await stored_rollups(conn, level.table, ids),
                    await raw_rollups(conn, level.width, ids), level.table)


async def snapshot(conn: asyncpg.Connection, ids: list[int]) -> dict[str, Rollup]:
    return {level.table: await stored_rollups(conn, level.table, ids) for level in LEVELS}


# -- any input ---------------------------------------------------------------------------

# Seconds from BASE: both sides of midnight and of an hour, the odd microsecond, and days late.
offsets = st.builds(
    lambda day, second, micro: day * -86_400 + second + micro / 1e6,
    st.sampled_from([0, 0, 1, 3, 40]),
    st.integers(-130, 3_730),
    st.sampled_from([0, 0, 0, 1, 999_999]),
)
values = st.integers(-300, 300) | st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
reading = st.tuples(
    st.integers(0, 2),  # device
    offsets,
    st.dictionaries(st.sampled_from(["hr", "spo2", "temp"]), values, min_size=1, max_size=3),
)


async def convert_every_chunk(conn: asyncpg.Connection) -> None:
    """Every chunk of every hypertable to the columnstore (again, where late rows came in)."""
    for table in HYPERTABLES:
        await conn.execute("SELECT count(compress_chunk(c, true)) FROM show_chunks($1) c", table)
    assert not await conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE NOT is_compressed"
        " AND hypertable_name = ANY($1::name[])", list(HYPERTABLES))


@pytest.mark.parametrize("converted", [False, True], ids=["rows", "converted"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), readings=st.lists(reading, min_size=1, max_size=60))
async def test_rollups_equal_time_bucket_over_raw_rows(client, conn, converted, data, readings):
    """With `converted`, every chunk goes to the columnstore after the first wave: the later
    waves are late writes, duplicates and conflicts into converted chunks."""
    tag = uuid.uuid4().hex[:10]
    names = [f"prop-{tag}-{n}" for n in range(3)]
    # Retries and conflicting duplicates: the same device and time again, maybe other values.
    again = data.draw(st.lists(st.sampled_from(readings), max_size=10), label="again")
    changed = data.draw(st.lists(st.tuples(st.sampled_from(readings), values), max_size=5),
                        label="changed")
    items = [{"device": names[d], "timestamp": (BASE + timedelta(seconds=s)).timestamp(), **m}
             for d, s, m in readings + again]
    items += [{"device": names[d], "timestamp": (BASE + timedelta(seconds=s)).timestamp(),
               next(iter(m)): v} for (d, s, m), v in changed]
    items = data.draw(st.permutations(items), label="order")
    # Requests of random sizes, posted in waves; the requests of a wave go concurrently.
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(items) - 1)), max_size=8),
                            label="cuts"))
    requests = [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)], strict=True)]
    waves = data.draw(st.lists(st.integers(0, 2), min_size=len(requests),
                               max_size=len(requests)), label="waves")
    # A fold before, during or after each wave, or none: answers are exact either way (the
    # aggregate lag is 0), so they are checked after every wave, not only at the end.
    folds = data.draw(st.lists(st.sampled_from(["none", "before", "during", "after"]),
                               min_size=3, max_size=3), label="folds")
    for wave in range(3):
        if converted and wave == 1:
            await convert_every_chunk(conn)
        if folds[wave] == "before":
            await fold(conn)
        posts = [store(client, body) for body, w in zip(requests, waves, strict=True)
                 if w == wave]
        await asyncio.gather(*posts, *([fold(conn)] if folds[wave] == "during" else []))
        if folds[wave] == "after":
            await fold(conn)
        ids = await device_ids(conn, names)
        if ids:
            await assert_rollups_match_raw(conn, ids)
    await fold(conn)
    # Folded, the levels alone hold everything.
    ids = await device_ids(conn, names)
    assert not await conn.fetchval(
        "SELECT count(*) FROM rollup_pending WHERE device_id = ANY($1::int4[])", ids)
    for level in LEVELS:
        assert_same(await level_rows(conn, level.table, ids),
                    await raw_rollups(conn, level.width, ids), level.table)


# -- two processes -----------------------------------------------------------------------

async def deadlocks(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    return count


async def test_two_processes_on_overlapping_devices_neither_deadlock_nor_lose_updates(
        server_factory, conn):
    # Both fold every 50 ms while they ingest: folds race each other and every flush.
    servers = [server_factory(VITALSTORE_ROLLUP_FOLD_INTERVAL_S="0.05") for _ in range(2)]
    tag = uuid.uuid4().hex[:8]
    names = [f"two-{tag}-{n}" for n in range(6)]
    before = await deadlocks(conn)
    rng = random.Random(3)

    def body() -> list[dict[str, Any]]:
        # Every device in every request, in random order, into the same few minutes and
        # hours; the same (device, time) often posted by both processes.
        return [{"device": rng.choice(names),
                 "timestamp": (BASE - rng.choice([0, 0, 2]) * DAY
                               + timedelta(seconds=rng.randrange(0, 7200, 7))).timestamp(),
                 "hr": rng.uniform(40, 180), "spo2": rng.randrange(80, 100)}
                for _ in range(200)]

    async def client_loop(url: str, headers: dict[str, str]) -> set[tuple[str, float]]:
        sent = set()
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            for _ in range(25):
                readings = body()
                await store(http, readings)
                sent |= {(r["device"], r["timestamp"]) for r in readings}
        return sent

    results = await asyncio.gather(*(client_loop(server.url, server.headers)
                                     for server in servers for _ in range(4)))
    ids = await device_ids(conn, names)
    assert len(ids) == len(names)
    await assert_rollups_match_raw(conn, ids)
    # Every distinct (device, time, metric) sent is stored once: nothing lost.
    sent = set().union(*results)
    stored = await conn.fetchval(
        "SELECT count(*) FROM readings WHERE device_id = ANY($1::int4[])", ids)
    assert stored == 2 * len(sent)
    total = sum(count for count, *_ in (await stored_rollups(conn, "rollup_1d", ids)).values())
    assert total == stored
    # The servers' folds merge what is pending, soon after the load stops.
    for _ in range(100):
        if not await conn.fetchval("SELECT count(*) FROM rollup_pending"):
            break
        await asyncio.sleep(0.1)
    assert not await conn.fetchval("SELECT count(*) FROM rollup_pending")
    await assert_rollups_match_raw(conn, ids)
    # A deadlock would have been retried by the writer; the database still counts it.
    await asyncio.sleep(1.5)  # backends report their statistics at most once a second
    assert await deadlocks(conn) == before


# -- rebuild -----------------------------------------------------------------------------

async def ingest_sample(client: Any, names: list[str], seed: int) -> None:
    """Several days, late data, fractional values, in many requests."""
    rng = random.Random(seed)
    readings = [{"device": rng.choice(names),
                 "timestamp": (BASE - rng.choice([0, 1, 1, 2, 5]) * DAY
                               + timedelta(microseconds=rng.randrange(86_400_000_000))
                               ).timestamp(),
                 rng.choice(["hr", "spo2"]): rng.uniform(-100, 100)}
                for _ in range(1500)]
    await asyncio.gather(*(store(client, readings[i:i + 100])
                           for i in range(0, len(readings), 100)))


async def sample_devices(client: Any, conn: asyncpg.Connection, kind: str, count: int,
                         seed: int) -> tuple[list[str], list[int]]:
    """New devices holding a sample: their names and ids."""
    tag = uuid.uuid4().hex[:8]
    names = [f"{kind}-{tag}-{n}" for n in range(count)]
    await ingest_sample(client, names, seed)
    return names, await device_ids(conn, names)


def assert_snapshots_equal(found: dict[str, Rollup], expected: dict[str, Rollup]) -> None:
    for table, rows in expected.items():
        assert_same(found[table], rows, table)


async def corrupt(conn: asyncpg.Connection, ids: list[int]) -> None:
    """Wrong sums and counts, lost rows and stray rows in every level."""
    for level in LEVELS:
        await conn.execute(f"UPDATE {level.table} SET count = count + 1, sum = sum * 2"
                           " WHERE device_id = ANY($1::int4[]) AND metric_id % 2 = 0", ids)
        await conn.execute(f"DELETE FROM {level.table} WHERE device_id = ANY($1::int4[])"
                           " AND metric_id % 2 = 1", ids)
        await conn.execute(
            f"INSERT INTO {level.table} SELECT $1, 1, $2, 5, 5, 1, 1 ON CONFLICT DO NOTHING",
            ids[0], BASE - DAY)


async def test_rebuild_leaves_rollups_as_ingestion_made_them(client, conn, db_url):
    _, ids = await sample_devices(client, conn, "rebuild", 3, seed=1)
    ingested = await snapshot(conn, ids)
    await corrupt(conn, ids)
    done = run_cli(db_url, "rollups", "rebuild", "--from", iso(BASE - 6 * DAY),
                   "--to", iso(BASE + DAY))
    assert done.returncode == 0, done.stderr
    assert "rebuilt" in done.stderr
    assert_snapshots_equal(await snapshot(conn, ids), ingested)
    await assert_rollups_match_raw(conn, ids)


async def test_rebuild_repairs_manual_edits_of_raw_rows(client, conn):
    _, ids = await sample_devices(client, conn, "edit", 2, seed=2)
    # Hand edits bypass the trigger's arithmetic: an UPDATE of values, a DELETE of rows.
    await conn.execute("UPDATE readings SET value = value + 1000"
                       " WHERE device_id = $1 AND ts >= $2 AND ts < $3", ids[0], BASE, BASE + DAY)
    await conn.execute("DELETE FROM readings WHERE device_id = $1", ids[1])
    assert await raw_rollups(conn, LEVELS[0].width, ids) != \
        await stored_rollups(conn, LEVELS[0].table, ids)
    await rebuild(conn, BASE - 6 * DAY, BASE + DAY)
    await assert_rollups_match_raw(conn, ids)
    assert await stored_rollups(conn, "rollup_1d", ids[1:]) == {}


async def test_rebuild_touches_only_the_days_and_device_asked_for(client, conn, db_url):
    names, ids = await sample_devices(client, conn, "scope", 2, seed=3)
    ingested = await snapshot(conn, ids)
    await corrupt(conn, ids)
    corrupted = await snapshot(conn, ids)
    # The whole UTC day holding a range that starts mid-day, one device only.
    done = run_cli(db_url, "rollups", "rebuild", "--from", iso(BASE - DAY + timedelta(hours=5)),
                   "--to", str((BASE - DAY + timedelta(hours=6)).timestamp()),
                   "--device", names[0])
    assert done.returncode == 0, done.stderr
    after = await snapshot(conn, ids)

    def part(rows: Rollup, device: int, inside: bool) -> Rollup:
        return {key: value for key, value in rows.items()
                if key[0] == device and (BASE - DAY <= key[2] < BASE) == inside}

    for level in LEVELS:
        table = level.table
        assert_same(part(after[table], ids[0], True), part(ingested[table], ids[0], True), table)
        assert part(after[table], ids[0], False) == part(corrupted[table], ids[0], False)
        assert part(after[table], ids[1], True) == part(corrupted[table], ids[1], True)


async def test_rebuild_of_an_unknown_device_fails_clearly(db_url):
    done = run_cli(db_url, "rollups", "rebuild", "--from", "2025-01-01T00:00:00Z",
                   "--to", "2025-01-02T00:00:00Z", "--device", "no-such-device")
    assert done.returncode != 0
    assert "unknown device" in done.stderr
    done = run_cli(db_url, "rollups", "rebuild", "--from", "soon", "--to", "later")
    assert done.returncode == 2
    assert "--from" in done.stderr


async def test_rebuild_next_to_live_ingestion_stays_exact(client, conn, db_url):
    names, ids = await sample_devices(client, conn, "live", 4, seed=4)
    await corrupt(conn, ids)
    rng = random.Random(5)
    stop = asyncio.Event()

    async def live() -> int:
        posted = 0
        while not stop.is_set():
            await store(client, [{"device": rng.choice(names),
                                 "timestamp": (BASE - rng.choice([0, 1]) * DAY + timedelta(
                                     seconds=rng.randrange(86_400))).timestamp(),
                                 "hr": rng.uniform(0, 100)} for _ in range(50)])
            posted += 1
        return posted

    writers = [asyncio.create_task(live()) for _ in range(3)]
    rebuilder = await asyncpg.connect(db_url)
    try:
        for _ in range(5):
            await rebuild(rebuilder, BASE - 6 * DAY, BASE + DAY)
    finally:
        stop.set()
        posted = await asyncio.gather(*writers)
        await rebuilder.close()
    assert sum(posted) > 3
    await assert_rollups_match_raw(conn, ids)
