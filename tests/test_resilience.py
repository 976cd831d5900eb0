"""The service process under database trouble and shutdown: 503 then recovery, no loss."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import asyncpg
import httpx
import msgspec

from support import NOW


async def post(http: httpx.AsyncClient, server: Any, body: Any) -> httpx.Response:
    return await http.post(server.url + "/v1/readings", content=msgspec.json.encode(body),
                           headers={"content-type": "application/json", **server.headers})


async def count_stored(db: asyncpg.Connection, prefix: str) -> int:
    value: int = await db.fetchval(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE starts_with(d.name, $1)", prefix)
    return value


async def kill_service_connections(db: asyncpg.Connection) -> int:
    value: int = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'")
    return value


async def test_killed_connections_give_503_then_recover_without_restart(
        server_factory, db, device):
    server = server_factory()
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await post(http, server, {"device": device, "timestamp": NOW, "hr": 1})
                ).status_code == 202
        assert await kill_service_connections(db) >= 1
        codes = []
        acknowledged = 1
        deadline = time.monotonic() + 15
        i = 0
        while time.monotonic() < deadline:
            i += 1
            response = await post(http, server, {"device": device, "timestamp": NOW + i, "hr": i})
            codes.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"]
            if response.status_code == 202:
                acknowledged += 1
                if codes.count(202) >= 5:
                    break
            await asyncio.sleep(0.05)
        assert set(codes) <= {202, 503}
        assert codes[-5:] == [202] * 5  # recovered by itself
        latest = await http.get(f"{server.url}/v1/devices/{device}/latest",
                                headers={"content-type": "application/json", **server.headers})
        assert latest.status_code == 200
    assert await count_stored(db, device) == acknowledged


async def test_full_buffer_answers_503_at_once_and_drains_after_the_stall(
        server_factory, db_url, device):
    server = server_factory(VITALSTORE_MAX_ITEMS="50", VITALSTORE_BUFFER_MAX_READINGS="200")
    locker = await asyncpg.connect(db_url)
    checker = await asyncpg.connect(db_url)
    try:
        async with httpx.AsyncClient(timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as http:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")

            async def one(i: int) -> tuple[int, float, str | None]:
                started = time.monotonic()
                body = [{"device": f"{device}-{i}", "timestamp": NOW + k, "hr": k}
                        for k in range(50)]
                response = await post(http, server, body)
                return (response.status_code, time.monotonic() - started,
                        response.headers.get("retry-after"))

            tasks = [asyncio.create_task(one(i)) for i in range(12)]
            await asyncio.sleep(2)
            refused = [t.result() for t in tasks if t.done()]
            # 200 readings fit in the buffer: four requests wait, the others are refused now.
            assert len(refused) == 8
            assert all(code == 503 and retry for code, _, retry in refused)
            assert max(seconds for _, seconds, _ in refused) < 1.0
            await transaction.rollback()  # the stall ends
            results = await asyncio.gather(*tasks)
        waited = [r for r in results if r not in refused]
        assert [code for code, _, _ in waited] == [202] * 4
        assert await count_stored(checker, device) == 4 * 50
    finally:
        await locker.close()
        await checker.close()


async def test_sigterm_flushes_and_answers_what_is_buffered(server_factory, db_url, device):
    server = server_factory(VITALSTORE_SHUTDOWN_TIMEOUT_S="20")
    locker = await asyncpg.connect(db_url)
    checker = await asyncpg.connect(db_url)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            tasks = [asyncio.create_task(post(http, server, [
                {"device": f"{device}-{i}", "timestamp": NOW, "hr": i}])) for i in range(20)]
            await asyncio.sleep(1)  # all twenty are buffered, waiting on the stalled database
            assert not any(t.done() for t in tasks)
            server.signal(signal.SIGTERM)
            await asyncio.sleep(1)
            await transaction.rollback()
            responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [202] * 20
        assert server.process.wait(timeout=30) == 0
        assert await count_stored(checker, device) == 20
    finally:
        await locker.close()
        await checker.close()
