"""InfluxDB line protocol: /api/v2/write and /write, with the official client and curl."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteOptions

from conftest import ROOT, free_port
from harness import Service
from vitalstore import keys

NOW = int(time.time()) - 3600
NOW_NS = NOW * 1_000_000_000


def serve(db_url: str, headers: dict[str, str], ready_path: str = "/ready", **env: str
          ) -> Service:
    """`vitalstore serve` in its own process group (call `.start()`); stopped by the caller."""
    return Service(db_url, env, name="server", port=free_port(), headers=dict(headers),
                   log_dir=ROOT / ".pytest_cache", log_level=None, ready_path=ready_path)


@pytest.fixture(scope="module")
def server(db_url: str, api_headers: dict[str, str]) -> Iterator[Service]:
    server = serve(db_url, api_headers).start()
    yield server
    server.stop(graceful=False)


@pytest.fixture(scope="module")
def key(api_headers: dict[str, str]) -> str:
    return api_headers["Authorization"].split(" ", 1)[1]


async def stored(db: asyncpg.Connection, device: str) -> list[tuple[str, int, float]]:
    """(metric, microseconds since 2000, value) of every stored value of a device."""
    rows = await db.fetch(
        """SELECT m.name, (extract(epoch FROM r.ts - '2000-01-01Z') * 1000000)::int8 AS us,
                  r.value
           FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id
           WHERE d.name = $1 ORDER BY r.ts, m.name""", device)
    return [(r["name"], r["us"], r["value"]) for r in rows]


async def attributes(db: asyncpg.Connection, device: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT a.attributes::text FROM reading_attributes a JOIN devices d ON d.id = a.device_id
           WHERE d.name = $1 ORDER BY a.ts""", device)
    return [json.loads(r[0]) for r in rows]


def us(unix_s: float) -> int:
    return round((unix_s - 946_684_800) * 1_000_000)


async def write(client: Any, body: str | bytes, path: str = "/api/v2/write?bucket=b&org=o",
                **headers: str) -> Any:
    content = body.encode() if isinstance(body, str) else body
    return await client.post(path, content=content,
                             headers={"content-type": "text/plain; charset=utf-8", **headers})


# -- the official client ------------------------------------------------------------------

async def test_influxdb_client_synchronous_write_is_stored(server, key, db, device):
    def send() -> None:
        with InfluxDBClient(url=server.url, token=key, org="any-org") as influx:
            influx.write_api(write_options=SYNCHRONOUS).write(
                bucket="any-bucket", write_precision=WritePrecision.NS, record=[
                    Point("vitals").tag("device", device).tag("ward", "3")
                    .field("heartRateValue", 72).field("spo2", 97.5).field("note", "walk")
                    .time(NOW_NS + 123_456_789, WritePrecision.NS),
                    f"vitals,device={device} heartRateValue=73i {NOW_NS + 2_000_000_000}",
                ])

    await asyncio.to_thread(send)
    # Nanoseconds are dropped below the microsecond: ...123456789 ns is ...123456 us.
    assert await stored(db, device) == [
        ("heartRateValue", us(NOW) + 123_456, 72.0), ("spo2", us(NOW) + 123_456, 97.5),
        ("heartRateValue", us(NOW + 2), 73.0)]
    assert (await attributes(db, device))[0] == {"_measurement": "vitals", "ward": "3",
                                                 "note": "walk"}


async def test_influxdb_client_batching_writer_stores_everything(server, key, db, device):
    lines = [f"vitals,device={device} hr={60 + n % 40}i,temp=36.{n % 10} {NOW + n}"
             for n in range(2_500)]

    def send() -> None:
        with InfluxDBClient(url=server.url, token=key, org="o") as influx, influx.write_api(
                write_options=WriteOptions(batch_size=400, flush_interval=200)) as writer:
            for line in lines:
                writer.write(bucket="b", record=line, write_precision=WritePrecision.S)

    await asyncio.to_thread(send)
    values = await stored(db, device)
    assert len(values) == 5_000
    assert {ts for _, ts, _ in values} == {us(NOW + n) for n in range(2_500)}


# -- curl and v1 ----------------------------------------------------------------------------

def curl(*args: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=30, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


async def test_v1_write_with_curl_gzip_and_seconds(server, key, db, device, tmp_path):
    body = tmp_path / "points.lp.gz"
    body.write_bytes(gzip.compress(f"m,device={device} hr=61 {NOW}\n"
                                   f"m,device={device} hr=62 {NOW + 1}\n".encode()))
    status, text = curl(f"{server.url}/write?db=telegraf&precision=s",
                        "-H", f"Authorization: Token {key}", "-H", "Content-Encoding: gzip",
                        "--data-binary", f"@{body}")
    assert (status, text) == (204, "")
    assert await stored(db, device) == [("hr", us(NOW), 61.0), ("hr", us(NOW + 1), 62.0)]


async def test_v1_credentials_in_the_url_are_refused_saying_why(server, key, db, device):
    status, text = curl(f"{server.url}/write?db=x&u=admin&p={key}",
                        "--data-binary", f"m,device={device} hr=1 {NOW_NS}")
    assert status == 401
    assert json.loads(text)["code"] == "unauthorized"
    assert "Authorization: Token" in json.loads(text)["message"]
    assert await stored(db, device) == []


@pytest.mark.parametrize("header", ["Authorization: Bearer {}", "X-API-Key: {}",
                                    "Authorization: Token {}"])
async def test_every_key_header_is_accepted(server, key, db, device, header):
    status, _ = curl(f"{server.url}/write?db=x", "-H", header.format(key),
                     "--data-binary", f"m,device={device} hr=1 {NOW_NS}")
    assert status == 204
    assert await stored(db, device) == [("hr", us(NOW), 1.0)]


async def test_without_a_key_401_in_influxdb_shape(server):
    status, text = curl(f"{server.url}/api/v2/write?bucket=b&org=o", "--data-binary", "m hr=1")
    assert status == 401
    assert json.loads(text)["code"] == "unauthorized"


@pytest.mark.parametrize("path, message", [
    ("/api/v2/write?org=o", "bucket is required"),
    ("/api/v2/write?bucket=b", "org or orgID is required"),
    ("/write", "database is required"),
    ("/api/v2/write?bucket=b&org=o&precision=n", "precision must be one of"),
    ("/write?db=d&precision=ns", "precision must be one of"),
])
async def test_required_parameters_as_influxdb_requires_them(client, device, path, message):
    response = await write(client, f"m,device={device} hr=1", path)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert message in response.json()["message"]


async def test_org_id_stands_for_org(client, db, device):
    response = await write(client, f"m,device={device} hr=1 {NOW_NS}",
                           "/api/v2/write?bucket=b&orgID=0123456789abcdef")
    assert response.status_code == 204


# -- mapping and edge cases ---------------------------------------------------------------

async def test_precisions_are_stored_to_the_microsecond(client, db, device):
    for precision, stamp in [("s", NOW), ("ms", NOW * 1000 + 1), ("us", NOW * 10**6 + 2),
                             ("ns", NOW * 10**9 + 3_999)]:
        response = await write(client, f"m,device={device} {precision}=1 {stamp}",
                               f"/api/v2/write?bucket=b&org=o&precision={precision}")
        assert response.status_code == 204, response.text
    assert await stored(db, device) == [("s", us(NOW), 1.0), ("us", us(NOW) + 2, 1.0),
                                        ("ns", us(NOW) + 3, 1.0), ("ms", us(NOW) + 1000, 1.0)]


async def test_a_line_without_a_timestamp_gets_the_time_of_arrival(client, db, device):
    before = time.time()
    assert (await write(client, f"m,device={device} hr=70")).status_code == 204
    [(_, stamp, _)] = await stored(db, device)
    assert us(before) <= stamp <= us(time.time())


async def test_escaping_in_measurement_tags_and_strings(client, db):
    device = f"dev {uuid.uuid4().hex[:6]},x=1"
    escaped = device.replace(" ", "\\ ").replace(",", "\\,").replace("=", "\\=")
    body = (f'my\\ vitals\\,v2,device={escaped},site\\ name=ward\\=3\\,b '
            f'note="say \\"hi\\", c:\\\\temp",hr=72 {NOW_NS}')
    assert (await write(client, body)).status_code == 204
    assert await stored(db, device) == [("hr", us(NOW), 72.0)]
    assert await attributes(db, device) == [
        {"_measurement": "my vitals,v2", "site name": "ward=3,b", "note": 'say "hi", c:\\temp'}]


async def test_unicode_crlf_comments_and_blank_lines(client, db):
    device = f"capteur-é-{uuid.uuid4().hex[:6]}-心"
    body = (f"# a comment\r\n\r\nmesure,device={device} hr=1,unité=\"°C\" {NOW_NS}\r\n"
            f"  # indented comment\r\nmesure,device={device} hr=2 {NOW_NS + 10**9}\r\n")
    response = await write(client, body)
    assert response.status_code == 204, response.text
    assert await stored(db, device) == [("hr", us(NOW), 1.0), ("hr", us(NOW + 1), 2.0)]
    assert (await attributes(db, device))[0]["unité"] == "°C"


async def test_a_line_of_one_megabyte(client, db, device):
    text = "x" * 1_000_000
    assert (await write(client, f'm,device={device} hr=1,blob="{text}" {NOW_NS}')
            ).status_code == 204
    assert (await attributes(db, device))[0]["blob"] == text


async def test_a_field_string_on_one_line_and_number_on_another(client, db, device):
    # As in JSON: a number is a metric, a string an attribute; both lines are kept.
    body = f'm,device={device} level="high" {NOW_NS}\nm,device={device} level=3 {NOW_NS + 10**9}'
    assert (await write(client, body)).status_code == 204
    assert await stored(db, device) == [("level", us(NOW + 1), 3.0)]
    assert (await attributes(db, device))[0]["level"] == "high"


async def test_integers_unsigned_and_booleans(client, db, device):
    body = f"m,device={device} a=-5i,b=7u,c=1.5e2,ok=t,bad=FALSE {NOW_NS}"
    assert (await write(client, body)).status_code == 204
    assert await stored(db, device) == [("a", us(NOW), -5.0), ("b", us(NOW), 7.0),
                                        ("c", us(NOW), 150.0)]
    assert (await attributes(db, device))[0] == {"_measurement": "m", "ok": True, "bad": False}


async def test_empty_body_is_204_and_stores_nothing(client):
    assert (await write(client, "")).status_code == 204
    assert (await write(client, "\n# only a comment\n")).status_code == 204


@pytest.mark.parametrize("bad", [
    "hr=NaN", "hr=nan", "hr=inf", "hr=-Infinity", "hr=1,hr=2", 'hr="unterminated',
    "hr=1_000", "hr=0x10", "hr=12i3", "hr=99999999999999999999i", "hr=-1u", "hr=",
])
async def test_bad_fields_refuse_the_whole_request_naming_the_lines(client, db, device, bad):
    body = (f"m,device={device} ok=1 {NOW_NS}\n"
            f"m,device={device} {bad} {NOW_NS + 10**9}\n"
            f"m,device={device} ok=3 {NOW_NS + 2 * 10**9}\n"
            f"m,device={device},x {bad} {NOW_NS + 3 * 10**9}\n")
    response = await write(client, body)
    assert response.status_code == 400, (bad, response.text)
    error = response.json()
    assert error["code"] == "invalid"
    assert "line 2:" in error["message"] and "line 4:" in error["message"]
    assert "line 1:" not in error["message"] and "line 3:" not in error["message"]
    assert await stored(db, device) == []


@pytest.mark.parametrize("line, says", [
    ("m hr=1", "missing the device tag 'device'"),
    ("m,device=d", "separated by single spaces"),
    ("m,device=d hr=1 12x", "invalid timestamp"),
    ("m,device=d hr=1 5", "is `precision` right?"),
    ("m,device=d hr=1 99999999999999999999999", "far in the future"),
    ("m,device=d timestamp=1", "reserved"),
    ("m,device=d h\u00e9=1", "metric names are"),
    ("m,device=d,ward hr=1", "tag 'ward' has no value"),
])
async def test_bad_lines_say_why(client, line, says):
    response = await write(client, line)
    assert response.status_code == 400
    assert says in response.json()["message"]


async def test_future_timestamps_beyond_the_skew_are_refused(client, db, device):
    future = (int(time.time()) + 3600) * 10**9
    response = await write(client, f"m,device={device} hr=1 {future}")
    assert response.status_code == 400
    assert "in the future" in response.json()["message"]


async def test_first_write_wins_across_json_and_line_protocol(client, db, device):
    assert (await client.post("/v1/readings", json={"device": device, "timestamp": NOW, "hr": 60})
            ).status_code == 202
    assert (await write(client, f"m,device={device} hr=99,spo2=97 {NOW_NS}")).status_code == 204
    assert await stored(db, device) == [("hr", us(NOW), 60.0), ("spo2", us(NOW), 97.0)]
    latest = (await client.get(f"/v1/devices/{device}/latest")).json()["metrics"]
    assert latest["spo2"]["value"] == 97.0


async def test_too_many_lines_is_413(client, settings, device):
    body = "\n".join(f"m,device={device} hr=1 {NOW_NS + n}" for n in range(settings.max_items + 1))
    response = await write(client, body)
    assert response.status_code == 413
    assert response.json()["code"] == "request too large"


async def test_device_outside_the_keys_prefix_is_403(client, db, db_url, device):
    conn = await asyncpg.connect(db_url)
    try:
        bound, _ = await keys.create(conn, f"bound-{uuid.uuid4().hex[:6]}", ["ingest"],
                                     prefix="ward-1:")
    finally:
        await conn.close()
    response = await write(client, f"m,device={device} hr=1 {NOW_NS}",
                           Authorization=f"Token {bound}")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert await stored(db, device) == []
