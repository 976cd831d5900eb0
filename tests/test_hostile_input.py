"""Hostile input: each case answers 4xx (never 5xx), stores nothing, and the service stays up.

The table runs against the app in-process with small limits; what needs a real process
(memory of a gzip bomb, a trickling client, a client that hangs up mid-body) runs against
`vitalstore serve`.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from harness import rss_bytes
from support import NOW
from vitalstore.settings import Settings

MAX_BODY = 64 * 1024
MAX_ITEMS = 50
JSON = {"content-type": "application/json"}
NDJSON = {"content-type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, max_body_bytes=MAX_BODY, max_items=MAX_ITEMS)


def reading(**fields: Any) -> dict[str, Any]:
    return {"device": "hostile-ok", "timestamp": NOW, "hr": 60, **fields}


def raw(text: str) -> bytes:
    """A body written by hand, for what an encoder would never produce."""
    return text.replace("NOW", str(NOW)).encode()


@dataclass
class Case:
    name: str
    body: bytes
    status: int
    says: str  # a fragment of the answer's message
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))


def encoded(value: Any) -> bytes:
    return msgspec.json.encode(value)


def nested(depth: int) -> bytes:
    return raw('{"device":"d","timestamp":NOW,"a":' + "[" * depth + "]" * depth + "}")


CASES = [
    Case("NaN", raw('{"device":"d","timestamp":NOW,"hr":NaN}'), 400, "malformed JSON"),
    Case("Infinity", raw('{"device":"d","timestamp":NOW,"hr":Infinity}'), 400,
         "malformed JSON"),
    Case("-Infinity", raw('{"device":"d","timestamp":NOW,"hr":-Infinity}'), 400,
         "malformed JSON"),
    Case("1e400", raw('{"device":"d","timestamp":NOW,"hr":1e400}'), 400, "out of range"),
    Case("integer of 5000 digits", raw('{"device":"d","timestamp":NOW,"hr":' + "9" * 5000 + "}"),
         400, "out of range"),
    Case("duplicate key", raw('{"device":"d","timestamp":NOW,"hr":1,"hr":2}'), 400,
         "duplicate key 'hr'"),
    Case("duplicate device key", raw('{"device":"d","timestamp":NOW,"device":"e","hr":1}'),
         400, "duplicate key 'device'"),
    Case("duplicate key in an attribute",
         raw('{"device":"d","timestamp":NOW,"meta":{"fw":"1","fw":"2"}}'), 400,
         "duplicate key 'fw'"),
    Case("duplicate key hidden by an escaped colon",
         raw('{"device":"d","timestamp":NOW,"hr":1,"hr":2,"note":"\\u003a"}'), 400,
         "duplicate key 'hr'"),
    Case("duplicate key in NDJSON",
         raw('{"device":"d","timestamp":NOW,"hr":1}\n{"device":"d","timestamp":NOW,"x":1,"x":2}'),
         400, "duplicate key 'x' in a JSON object on line 2", dict(NDJSON)),
    Case("nesting 10,000 deep", nested(10_000), 400, "nested too deeply"),
    Case("attributes nesting 40 deep", nested(40), 422, "nests deeper than"),
    Case("1 KB device id", encoded(reading(device="d" * 1024)), 422, "1 to 128 characters"),
    Case("NUL (escaped) in device id", encoded(reading(device="dev\x00ice")), 422,
         "printable"),
    Case("NUL byte in the JSON text", raw('{"device":"dev\x00","timestamp":NOW,"hr":1}'), 400,
         "malformed JSON"),
    Case("NUL in an attribute", encoded(reading(note="a\x00b")), 422, "U+0000"),
    Case("invalid UTF-8", b'{"device":"dev\xff\xfe","timestamp":' + str(NOW).encode() +
         b',"hr":1}', 400, "malformed JSON"),
    Case("lone surrogate", raw('{"device":"\\ud800","timestamp":NOW,"hr":1}'), 400,
         "malformed JSON"),
    Case("zero-width space in device id", encoded(reading(device="dev\u200bice")), 422,
         "printable"),
    Case("right-to-left override in device id", encoded(reading(device="dev\u202eecived")),
         422, "printable"),
    Case("zero-width joiner in a metric name", encoded(reading(**{"h\u200dr": 1})), 422,
         "metric names"),
    Case("right-to-left override in a metric name", encoded(reading(**{"\u202ehr": 1})), 422,
         "metric names"),
    Case("timestamp in milliseconds", encoded(reading(timestamp=NOW * 1000)), 422,
         "milliseconds"),
    Case("timestamp in microseconds", encoded(reading(timestamp=NOW * 1_000_000)), 422,
         "milliseconds"),
    Case("year 1", encoded(reading(timestamp="0001-01-01T00:00:00Z")), 422, "before 2000"),
    Case("year 9999", encoded(reading(timestamp="9999-12-31T23:59:59Z")), 422, "future"),
    Case("metric name with quotes and SQL",
         encoded(reading(**{"hr'); DROP TABLE readings; --": 1})), 422, "metric names"),
    Case("metric name with a double quote", encoded(reading(**{'h"r': 1})), 422,
         "metric names"),
    Case("body over the limit with Content-Length",
         encoded([reading(note="x" * MAX_BODY)]), 413, "larger than"),
    Case("gzip body inflating over the limit",
         gzip.compress(b"[" + b" " * (MAX_BODY * 4) + b"]"), 413, "inflates to more than",
         {**JSON, "content-encoding": "gzip"}),
    Case("array over the item limit",
         encoded([reading(timestamp=NOW - i) for i in range(MAX_ITEMS + 1)]), 413,
         f"at most {MAX_ITEMS}"),
    Case("NDJSON over the item limit",
         b"\n".join(encoded(reading(timestamp=NOW - i)) for i in range(MAX_ITEMS + 1)), 413,
         f"more than {MAX_ITEMS}", dict(NDJSON)),
    Case("not a reading", b"[1, 2, 3]", 422, "must be a JSON object"),
    Case("empty body", b"", 400, "the body is empty"),
]


async def row_counts(db: Any) -> tuple[int, ...]:
    return tuple(await db.fetchrow(
        "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM reading_attributes),"
        " (SELECT count(*) FROM devices), (SELECT count(*) FROM metrics)"))


async def assert_healthy(client: Any, auth: dict[str, str], device: str) -> None:
    assert (await client.get("/health")).status_code == 200
    response = await client.post("/v1/readings", content=encoded(reading(device=device)),
                                 headers={**JSON, **auth})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_hostile_body_is_refused_and_stores_nothing(client, db, auth, device, case):
    before = await row_counts(db)
    response = await client.post("/v1/readings", content=case.body,
                                 headers={**case.headers, **auth})
    assert response.status_code == case.status, response.text
    assert case.says in response.text
    assert await row_counts(db) == before
    await assert_healthy(client, auth, device)


async def test_minus_zero_is_a_number_and_is_stored_as_zero(client, db, auth, device):
    # -0 is valid JSON; a reading's value has no sign of zero worth keeping, so it is 0.0.
    body = raw('[{"device":"DEV","timestamp":NOW,"a":-0,"b":-0.0,"c":-0e5}]'.replace(
        "DEV", device))
    response = await client.post("/v1/readings", content=body, headers={**JSON, **auth})
    assert response.status_code == 202
    rows = await db.fetch(
        "SELECT r.value::text AS text FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name = $1", device)
    assert [row["text"] for row in rows] == ["0", "0", "0"]  # never "-0"


async def test_quotes_and_sql_in_a_device_id_are_just_characters(client, auth):
    device = "x'); DROP TABLE readings; --\"\\ 🫀"
    response = await client.post("/v1/readings", content=encoded(reading(device=device)),
                                 headers={**JSON, **auth})
    assert response.status_code == 202
    latest = await client.get(f"/v1/devices/{urllib.parse.quote(device, safe='')}/latest",
                              headers=auth)
    assert latest.json()["device"] == device


# -- against a real process --------------------------------------------------------------

def gzip_bomb(inflated: int = 1 << 30) -> bytes:
    """About 1 MB of gzip that inflates to `inflated` bytes of zeros.

    Deflate output after a full flush does not depend on what came before, so one 1 MiB
    block is compressed once and repeated, and the gzip trailer (CRC, size) computed.
    """
    chunk = bytes(1 << 20)
    count = inflated // len(chunk)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    last = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    return first + block * (count - 1) + last + struct.pack("<II", crc, inflated & 0xFFFFFFFF)


async def test_gzip_bomb_is_refused_while_inflating_with_memory_flat(server_factory):
    server = server_factory()  # default limit: 16 MiB inflated
    bomb = gzip_bomb()
    assert len(bomb) < 1_100_000
    before = rss_bytes(server.process.pid)
    peak = before
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                 timeout=60) as client:

        async def one() -> httpx.Response:
            return await client.post("/v1/readings", content=bomb, headers={
                **JSON, "content-encoding": "gzip"})

        for _ in range(3):
            answers = await asyncio.gather(*(one() for _ in range(4)))
            peak = max(peak, rss_bytes(server.process.pid))
            for answer in answers:
                assert answer.status_code == 413
                assert "inflates to more than" in answer.text
        assert (await client.get("/health")).status_code == 200
    after = rss_bytes(server.process.pid)
    # Four bombs at once, three times: each inflates to 16 MiB at most, never to 1 GiB.
    assert peak - before < 200 * 2**20, (before, peak)
    print(f"\n[hostile] gzip bomb {len(bomb)} B -> 1 GiB, 4 at once x3: RSS before "
          f"{before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")


def http_head(server: Any, path: str, length: int) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in server.headers.items())
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n{extra}\r\n").encode()


async def test_body_over_the_limit_is_413_with_or_without_content_length(server_factory, db):
    server = server_factory(VITALSTORE_MAX_BODY_BYTES=str(MAX_BODY))
    body = encoded([reading(device="hostile-big", note="x" * MAX_BODY)])

    async def chunks() -> AsyncIterator[bytes]:  # sent chunked: no Content-Length
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    before = await row_counts(db)
    # A connection per request: the server answers 413 before reading the rest of the body
    # and then closes that connection, so a second request on it would race the close.
    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.url, headers=server.headers)

    async with client() as first:
        with_length = await first.post("/v1/readings", content=body, headers=JSON)
    async with client() as second:
        chunked = await second.post("/v1/readings", content=chunks(), headers=JSON)
    async with client() as third:
        assert (await third.get("/health")).status_code == 200
    assert with_length.status_code == 413, with_length.text
    assert chunked.status_code == 413, chunked.text
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert await row_counts(db) == before


async def test_trickling_client_is_cut_off_while_others_are_served(server_factory):
    body_timeout = 2.0
    server = server_factory(VITALSTORE_BODY_TIMEOUT_S=str(body_timeout))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = encoded(reading(device="hostile-trickle"))
    writer.write(http_head(server, "/v1/readings", len(body)))
    started = time.monotonic()

    async def trickle() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)

    async def answer_and_when() -> tuple[bytes, float]:
        answer = await reader.read(4096)
        return answer, time.monotonic() - started

    trickling = asyncio.create_task(trickle())
    answered = asyncio.create_task(answer_and_when())
    served = []
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        while time.monotonic() - started < body_timeout + 1:
            sent = time.monotonic()
            response = await client.post("/v1/readings", content=encoded(
                reading(device="hostile-other", timestamp=NOW - len(served))), headers=JSON)
            assert response.status_code == 202
            served.append(time.monotonic() - sent)
            await asyncio.sleep(0.1)
    answer, cut_after = await asyncio.wait_for(answered, 10)
    trickling.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"not received within" in answer
    # Generous margins: the machine is shared; a blocked server would take the whole timeout.
    assert body_timeout <= cut_after < body_timeout + 2, cut_after
    assert max(served) < body_timeout * 0.75, served
    print(f"\n[hostile] trickle: cut off after {cut_after:.1f} s (timeout {body_timeout} s); "
          f"{len(served)} other requests served meanwhile, slowest {max(served) * 1000:.0f} ms")


async def test_client_hanging_up_mid_body_is_no_server_error(server_factory):
    server = server_factory()
    body = encoded([reading(device="hostile-hangup", timestamp=NOW - i) for i in range(200)])
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(http_head(server, "/v1/readings", len(body)) + body[:100])
        # And one that hangs up after the whole body, before its answer.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(http_head(server, "/v1/readings", len(body)) + body)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        await asyncio.sleep(0.5)
        assert (await client.get("/health")).status_code == 200
        metrics = (await client.get("/metrics")).text
    requests = [line for line in metrics.splitlines()
                if line.startswith("vitalstore_http_requests_total")
                and 'route="/v1/readings"' in line]
    assert requests, metrics
    assert not [line for line in requests if 'status="5' in line], requests
    assert "unhandled error" not in server.log_path.read_text()
