"""POST /v1/readings: storage rules, all-or-nothing requests, bodies, latest and registry."""

from __future__ import annotations

import asyncio
import calendar
import gzip
import time

import asyncpg
import httpx
import msgspec

from support import NOW, post


async def stored(db: asyncpg.Connection, device: str) -> list[tuple[str, float, float]]:
    """(metric, unix seconds, value) of every stored value of a device."""
    rows = await db.fetch(
        """SELECT m.name, extract(epoch FROM r.ts)::float8 AS ts, r.value
           FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id
           WHERE d.name = $1 ORDER BY r.ts, m.name""", device)
    return [(r["name"], r["ts"], r["value"]) for r in rows]


async def test_reading_is_readable_right_after_202(client, device):
    response = await post(client, {"device": device, "timestamp": NOW, "heartRateValue": 72})
    assert response.status_code == 202
    assert response.json() == {"accepted": 1}
    latest = (await client.get(f"/v1/devices/{device}/latest")).json()
    assert latest["metrics"]["heartRateValue"]["value"] == 72.0


async def test_every_numeric_field_is_a_metric_and_others_are_attributes(client, db, device):
    body = {"device": device, "timestamp": NOW, "hr": 60, "spo2": 97.5, "note": "walk",
            "flags": [1, 2], "meta": {"fw": "1.2"}, "ok": True, "gone": None}
    assert (await post(client, body)).status_code == 202
    assert await stored(db, device) == [("hr", NOW, 60.0), ("spo2", NOW, 97.5)]
    items = (await client.get(f"/v1/devices/{device}/readings")).json()["items"]
    assert items[0]["attributes"] == {"note": "walk", "flags": [1, 2], "meta": {"fw": "1.2"},
                                      "ok": True, "gone": None}
    assert items[0]["metrics"] == {"hr": 60.0, "spo2": 97.5}


async def test_duplicate_reading_is_stored_once_and_first_write_wins(client, db, device):
    first = {"device": device, "timestamp": NOW, "hr": 60}
    assert (await post(client, first)).status_code == 202
    assert (await post(client, first)).status_code == 202
    assert (await post(client, {**first, "hr": 99})).status_code == 202
    assert await stored(db, device) == [("hr", NOW, 60.0)]


async def test_duplicates_inside_one_request_are_stored_once(client, db, device):
    body = [{"device": device, "timestamp": NOW, "hr": 60},
            {"device": device, "timestamp": NOW, "hr": 61}]
    assert (await post(client, body)).status_code == 202
    assert len(await stored(db, device)) == 1


async def test_two_sources_with_different_metrics_at_the_same_second_both_stored(
        client, db, device):
    assert (await post(client, {"device": device, "timestamp": NOW, "hr": 60})).status_code == 202
    assert (await post(client, {"device": device, "timestamp": NOW, "sys": 120})).status_code == 202
    assert await stored(db, device) == [("hr", NOW, 60.0), ("sys", NOW, 120.0)]


async def test_microseconds_are_kept(client, device):
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 86400))
    seconds = calendar.timegm(time.strptime(f"{day}T10:00:01", "%Y-%m-%dT%H:%M:%S"))
    assert (await post(client, {"device": device, "timestamp": seconds + 0.25, "hr": 1})
            ).status_code == 202
    assert (await post(client, {"device": device, "timestamp": f"{day}T12:00:01.123456+02:00",
                                "hr": 2})).status_code == 202
    items = (await client.get(f"/v1/devices/{device}/readings")).json()["items"]
    assert [i["timestamp"] for i in items] == [f"{day}T10:00:01.123456Z",
                                               f"{day}T10:00:01.250000Z"]


async def test_late_reading_does_not_replace_latest(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 70, "spo2": 99})
    await post(client, {"device": device, "timestamp": NOW - 60, "hr": 50})
    await post(client, {"device": device, "timestamp": NOW + 5, "spo2": 95})
    metrics = (await client.get(f"/v1/devices/{device}/latest")).json()["metrics"]
    assert metrics["hr"]["value"] == 70.0
    assert metrics["spo2"]["value"] == 95.0
    assert metrics["spo2"]["timestamp"] > metrics["hr"]["timestamp"]


async def test_registry_tracks_reading_times_not_arrival(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 70})
    await post(client, {"device": device, "timestamp": NOW - 86400, "hr": 70})
    await post(client, {"device": device, "timestamp": NOW - 100, "note": "attribute only"})
    items = (await client.get("/v1/devices", params={"prefix": device})).json()["items"]
    assert len(items) == 1
    assert items[0]["first_seen"] < items[0]["last_seen"]
    latest = (await client.get(f"/v1/devices/{device}/latest")).json()
    assert latest["last_seen"] == items[0]["last_seen"]


async def test_invalid_item_rejects_whole_request(client, db, device):
    body = [{"device": device, "timestamp": NOW, "hr": 60},
            {"device": device, "timestamp": NOW + 1, "hr": "fast", "bad name!": 3}]
    response = await post(client, body)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"index": 1, "field": "hr", "message": "is a metric: send a number, not a string"},
        {"index": 1, "field": "bad name!",
         "message": "metric names are 1 to 64 letters, digits, '_', '.' or '-'"}]
    assert await stored(db, device) == []


async def test_ndjson_body(client, db, device):
    lines = b"\n".join(msgspec.json.encode({"device": device, "timestamp": NOW + i, "hr": i})
                       for i in range(3))
    response = await client.post("/v1/readings", content=lines,
                                 headers={"content-type": "application/x-ndjson"})
    assert response.json() == {"accepted": 3}
    assert len(await stored(db, device)) == 3


async def test_malformed_ndjson_names_the_line(client, device):
    lines = msgspec.json.encode({"device": device, "timestamp": NOW, "hr": 1}) + b"\n{oops\n"
    response = await client.post("/v1/readings", content=lines,
                                 headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 400
    assert "line 2" in response.json()["error"]


async def test_gzip_body(client, db, device):
    body = gzip.compress(msgspec.json.encode([{"device": device, "timestamp": NOW, "hr": 1}]))
    response = await client.post("/v1/readings", content=body, headers={
        "content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 202
    assert len(await stored(db, device)) == 1


async def test_gzip_bomb_is_refused_while_inflating(client, settings):
    bomb = gzip.compress(b"[" + b" " * (settings.max_body_bytes + 10) + b"]")
    assert len(bomb) < settings.max_body_bytes // 100
    response = await client.post("/v1/readings", content=bomb, headers={
        "content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 413


async def test_other_content_type_is_415(client):
    response = await client.post("/v1/readings", content=b"x",
                                 headers={"content-type": "text/plain"})
    assert response.status_code == 415


async def test_too_many_items_is_413(client, settings, device):
    body = [{"device": device, "timestamp": NOW, "hr": 1}] * (settings.max_items + 1)
    assert (await post(client, body)).status_code == 413


async def test_concurrent_requests_each_get_their_own_answer(server_factory, db, device):
    # A real server: Litestar's test client would run the requests one at a time.
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                 timeout=30) as http:
        async def one(i: int) -> int:
            response = await http.post("/v1/readings", json=[
                {"device": f"{device}-{i % 7}", "timestamp": NOW + i, "hr": i,
                 "spo2": 90 + i % 10}])
            return response.status_code

        codes = await asyncio.gather(*(one(i) for i in range(200)))
    assert set(codes) == {202}
    count = await db.fetchval(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE starts_with(d.name, $1)", device)
    assert count == 400


async def test_single_post_is_not_held_behind_large_flushes(server_factory, db, db_url,
                                                            device):
    """Both general writers stuck in 3,000-reading flushes: a single POST still commits."""
    server = server_factory()
    big, small = f"{device}-big", f"{device}-small"
    holder = await asyncpg.connect(db_url)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                 timeout=60) as http:
        assert (await http.post("/v1/readings", json={"device": big, "timestamp": NOW,
                                                      "hr": 1})).status_code == 202
        # Hold the big device's latest row: its flushes wait on it inside the database.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT FROM latest l JOIN devices d ON d.id = l.device_id"
                             " WHERE d.name = $1 FOR UPDATE OF l", big)
        try:
            # 3,000 readings each: two requests never fit one 5,000-reading flush, so each
            # general writer takes one and waits.
            uploads = [asyncio.create_task(http.post("/v1/readings", json=[
                {"device": big, "timestamp": NOW - 7000 + part * 3000 + i, "hr": i}
                for i in range(3000)])) for part in range(2)]
            for _ in range(400):
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'")
                if waiting == 2:
                    break
                await asyncio.sleep(0.05)
            assert waiting == 2, "both large flushes should be waiting on the row lock"
            began = time.monotonic()
            response = await http.post("/v1/readings", json={"device": small,
                                                             "timestamp": NOW, "hr": 2})
            assert response.status_code == 202
            assert time.monotonic() - began < 2.0  # a flush of one reading takes milliseconds
            assert not any(upload.done() for upload in uploads)
        finally:
            await transaction.rollback()
            await holder.close()
        assert [(await upload).status_code for upload in uploads] == [202, 202]
    assert len(await stored(db, big)) == 6001
    assert await stored(db, small) == [("hr", NOW, 2.0)]
