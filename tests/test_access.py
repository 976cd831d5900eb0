"""Access control without gaps (issue 15): each test is one finding of the adversarial probe.

Everything goes through HTTP to the service (in-process, real database).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from litestar import get
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from harness import auth_headers as bearer
from support import JSON, NOW, post, store
from vitalstore import auth, database, keys, logs, queries
from vitalstore.app import create_app
from vitalstore.settings import Settings

FUZZ = hypothesis_settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    """Readings of any age taken (one test stores a reading older than the raw horizon)."""
    return Settings(database_url=db_url, bench_routes=True, retention_raw="forever")


def tag() -> str:
    return uuid.uuid4().hex[:8]


async def send(client: Any, method: str, path: str, headers: list[tuple[str, str]],
               **kwargs: Any) -> httpx.Response:
    """A request with exactly these headers as credentials (the client's default key removed)."""
    request = client.build_request(method, path, **kwargs)
    request.headers = httpx.Headers(
        [(k, v) for k, v in request.headers.multi_items() if k != "authorization"] + headers)
    response: httpx.Response = await client.send(request)
    return response


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


# 1. Scope escalation --------------------------------------------------------------------------

async def test_admin_cannot_mint_a_key_with_scopes_it_lacks(client, make_key):
    t = tag()
    admin = bearer(await make_key("admin", f"{t}-ward-1:"))
    for scopes in (["read", "ingest", "admin"], ["read"], ["ingest"], ["admin", "read"]):
        response = await client.post("/v1/keys", headers=admin, json={
            "name": f"{t}-a6", "scopes": scopes, "prefix": f"{t}-ward-1:"})
        assert response.status_code == 403, scopes
        assert "scope" in response.json()["error"]
    listed = (await client.get("/v1/keys")).json()["items"]
    assert f"{t}-a6" not in {item["name"] for item in listed}
    # Within its own scopes and prefix it may.
    reader_admin = bearer(await make_key("admin,read", f"{t}-ward-1:"))
    for scopes, status in ((["read"], 201), (["admin", "read"], 201), (["ingest"], 403),
                           (["read", "ingest"], 403)):
        response = await client.post("/v1/keys", headers=reader_admin, json={
            "name": f"{t}-{'-'.join(scopes)}", "scopes": scopes, "prefix": f"{t}-ward-1:bed"})
        assert response.status_code == status, scopes
    created = (await client.post("/v1/keys", headers=reader_admin, json={
        "name": f"{t}-reader", "scopes": ["read"], "prefix": f"{t}-ward-1:"})).json()
    body = {"device": f"{t}-ward-1:x", "timestamp": NOW, "hr": 1}
    assert (await post(client, body, bearer(created["key"]))).status_code == 403


# 2. suggested_bucket over what the request may see ------------------------------------------

async def test_suggested_bucket_depends_only_on_the_keys_devices(client, make_key):
    t = tag()
    metric = f"spanm{t}"
    start = NOW - 10_001 * 60
    own = [{"device": f"{t}-ward-1:bed", "timestamp": start + i * 60, metric: i}
           for i in range(10_001)]
    await store(client, own)
    reader = bearer(await make_key("read", f"{t}-ward-1:"))

    async def suggested(headers: dict[str, str], **params: str) -> Any:
        response = await client.get("/v1/aggregates", headers=headers,
                                    params={"metric": metric, "bucket": "1m", **params})
        assert response.status_code == 422, response.text
        return response.json()["suggested_bucket"]

    assert await suggested(reader) == "5m"
    assert await suggested(reader, prefix=f"{t}-ward-1:b") == "5m"
    # One old reading of a device the key cannot see must change nothing it is told.
    old = {"device": f"{t}-secret-icu:patient-42", "timestamp": NOW - 200 * 86400, metric: 1}
    await store(client, old)
    assert await suggested(reader) == "5m"
    assert await suggested(reader, prefix=f"{t}-ward-1:b") == "5m"
    assert await suggested(client.headers, prefix=f"{t}-ward-1:") == "5m"
    assert await suggested(client.headers) == "30m"  # the unbound key sees all of it


# 3. No 500 from input -------------------------------------------------------------------------

def cursor(text: str) -> str:
    return queries.encode_cursor(text)


@pytest.mark.parametrize(("value", "order"), [
    ("0001-01-01T00:00:00", "asc"),
    ("2025-01-01T00:00:00", "desc"),
    ("9999-12-31T23:59:59.999999+00:00", "asc"),
    ("9999-12-31T23:59:59.999999+00:00", "desc"),
    ("0001-01-01T00:00:00+00:00", "desc"),
    ("0001-01-01T00:00:00+01:00", "asc"),
    ("9999-12-31T23:59:59-14:00", "asc"),
    ("nonsense", "asc"),
])
async def test_history_cursor_that_we_never_handed_out_is_422(client, device, value, order):
    await store(client, {"device": device, "timestamp": NOW, "hr": 1})
    response = await client.get(f"/v1/devices/{device}/readings",
                                params={"cursor": cursor(value), "order": order})
    assert response.status_code == 422, response.text
    assert response.json()["parameter"] == "cursor"


async def test_history_cursor_round_trip_still_pages(client, device):
    body = [{"device": device, "timestamp": NOW + i, "hr": i} for i in range(5)]
    await store(client, body)
    for order in ("asc", "desc"):
        seen, after = [], None
        while True:
            params = {"limit": "2", "order": order, **({"cursor": after} if after else {})}
            page = (await client.get(f"/v1/devices/{device}/readings", params=params)).json()
            seen += [item["metrics"]["hr"] for item in page["items"]]
            if not (after := page["next_cursor"]):
                break
        assert seen == (list(range(5)) if order == "asc" else list(range(4, -1, -1)))


@pytest.mark.parametrize("timestamp", [
    b"1" + b"0" * 400, b"-1" + b"0" * 400, b"\"0001-01-01T00:00:00+01:00\"",
    b"\"9999-12-31T23:59:59-14:00\"", b"\"0001-01-01T00:00:00Z\"",
])
async def test_huge_or_extreme_timestamp_is_422(client, device, timestamp):
    body = b'{"device": "' + device.encode() + b'", "timestamp": ' + timestamp + b', "hr": 1}'
    response = await client.post("/v1/readings", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "timestamp"


@pytest.mark.parametrize("value", [b"1" + b"0" * 400, b"-1" + b"0" * 400])
async def test_huge_metric_value_is_422(client, device, value):
    body = (b'{"device": "' + device.encode() + b'", "timestamp": ' + str(NOW).encode()
            + b', "hr": ' + value + b'}')
    response = await client.post("/v1/readings", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "hr"


@pytest.mark.parametrize("field", ["timestamp", "hr"])
async def test_float_beyond_double_range_is_400_from_the_json_decoder(client, device, field):
    fields = {"timestamp": str(NOW).encode(), "hr": b"1", field: b"1e400"}
    body = (b'{"device": "' + device.encode() + b'", "timestamp": ' + fields["timestamp"]
            + b', "hr": ' + fields["hr"] + b'}')
    response = await client.post("/v1/readings", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert "out of range" in response.json()["error"]


@pytest.fixture(scope="module")
async def fuzz_device(client) -> str:
    name = f"fuzz-{tag()}"
    await store(client, {"device": name, "timestamp": NOW, "hr": 1})
    return name


cursor_text = st.one_of(
    st.text(max_size=40),
    st.datetimes().map(lambda moment: moment.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat()),
)
raw_cursor = st.one_of(cursor_text.map(cursor), st.text(max_size=40),
                       st.binary(max_size=30).map(lambda b: base64.urlsafe_b64encode(b).decode()))


@FUZZ
@given(value=raw_cursor, order=st.sampled_from(["asc", "desc"]))
async def test_no_cursor_gives_a_server_error(client, fuzz_device, value, order):
    for path, params in ((f"/v1/devices/{fuzz_device}/readings", {"order": order}),
                         ("/v1/devices", {}), ("/v1/latest", {})):
        response = await client.get(path, params={**params, "cursor": value})
        assert response.status_code in (200, 422), (path, value, response.text)


number_text = st.one_of(
    st.text(max_size=20), st.integers().map(str), st.floats().map(str),
    st.sampled_from(["1" + "0" * 400, "1e400", "-1e400", "nan", "inf", "1_0", " 5 ", "٣",
                     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00",
                     "9999-12-31T23:59:59.999999+00:00", "0001-01-01T00:00:00"]),
)


@FUZZ
@given(value=number_text, parameter=st.sampled_from(
    ["limit", "from", "to", "bucket", "count", "offset"]))
async def test_no_number_or_time_parameter_gives_a_server_error(client, fuzz_device, value,
                                                                parameter):
    for path in (f"/v1/devices/{fuzz_device}/readings", f"/v1/devices/{fuzz_device}/aggregates",
                 "/v1/aggregates?metric=hr", "/v1/devices", "/v1/latest", "/vital-data"):
        response = await client.get(path, params={parameter: value})
        assert response.status_code in (200, 400, 422), (path, parameter, value, response.text)


json_number = st.one_of(
    st.integers(), st.integers(min_value=10**300, max_value=10**500),
    st.floats(allow_nan=False), st.just("1e400"), st.text(max_size=30),
    st.datetimes(timezones=st.timezones()).map(lambda moment: f'"{moment.isoformat()}"'),
)


@FUZZ
@given(timestamp=json_number, value=json_number)
async def test_no_number_in_a_reading_gives_a_server_error(client, fuzz_device, timestamp,
                                                           value):
    def literal(x: Any) -> bytes:
        return x.encode() if isinstance(x, str) and x[:1] in '"1' else msgspec.json.encode(x)

    body = (b'{"device": "' + fuzz_device.encode() + b'", "timestamp": ' + literal(timestamp)
            + b', "hr": ' + literal(value) + b'}')
    response = await client.post("/v1/readings", content=body, headers=JSON)
    assert response.status_code in (202, 400, 422), (body, response.text)


@hypothesis_settings(max_examples=500, deadline=None)
@given(value=raw_cursor)
def test_cursor_decoders_refuse_or_return_usable_values(value):
    try:
        name = queries.decode_name_cursor(value)
    except queries.BadCursor:
        pass
    else:
        assert name and "\x00" not in name
        name.encode()
    try:
        moment = queries.decode_time_cursor(value)
    except queries.BadCursor:
        pass
    else:
        assert moment.tzinfo is not None
        assert database.EARLIEST <= moment < database.LATEST
        moment + database.ONE_MICROSECOND


# 4. Text PostgreSQL cannot take, and the log ------------------------------------------------

NUL_REQUESTS = [
    ("GET", "/v1/devices?prefix=ward-1:%00"),
    ("GET", "/v1/devices?cursor=" + cursor("\x00")),
    ("GET", "/v1/latest?cursor=" + cursor("a\x00")),
    ("GET", "/v1/latest?device=a%00"),
    ("GET", "/vital-data?sortBy=x%00"),
    ("GET", "/v1/devices/a%00/latest"),
    ("GET", "/v1/devices/a%00/readings"),
    ("GET", "/v1/devices/a%00/aggregates"),
    ("GET", "/v1/aggregates?metric=hr%00"),
    ("GET", "/v1/aggregates?metric=hr&prefix=a%00"),
    ("DELETE", "/v1/keys/a%00"),
]


@pytest.mark.parametrize(("method", "path"), NUL_REQUESTS)
async def test_nul_in_a_parameter_is_422_with_our_message_and_no_error_log(
        client, fuzz_device, method, path, caplog):
    path = path.replace("/a%00/", f"/{fuzz_device}%00/")
    with caplog.at_level(logging.INFO):
        response = await client.request(method, path)
    # The old API's route answers its own way (400 with a message).
    assert response.status_code == (400 if path.startswith("/vital-data") else 422), response.text
    text = response.text
    assert "invalid byte sequence" not in text
    assert ("invalid cursor" if "cursor=" in path else "U+0000") in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_nul_in_history_metrics_is_422(client, fuzz_device):
    for path in (f"/v1/devices/{fuzz_device}/readings", f"/v1/devices/{fuzz_device}/aggregates"):
        response = await client.get(path, params={"metrics": "hr,\x00"})
        assert response.status_code == 422, response.text
        assert response.json()["parameter"] == "metrics"


async def test_refused_requests_log_little(client, make_key, caplog):
    bound = bearer(await make_key("ingest", f"{tag()}-ward-1:"))
    await asyncio.sleep(1.1)  # a fresh window of the rate-limited log
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        for number in range(100):
            await client.get("/v1/devices?prefix=ward-1:%00")
            await post(client, {"device": f"outside-{number}", "timestamp": NOW, "hr": 1},
                       bound)
        seconds = time.monotonic() - started
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    logged = [r for r in caplog.records if r.name.startswith("vitalstore")]
    assert len(logged) <= (seconds + 2) * (logs.LOG_PER_SECOND + 1), len(logged)
    assert sum(len(r.getMessage()) for r in logged) < 200 * len(logged)


@get("/probe-crash", **auth.requires("read"))
async def probe_crash() -> str:
    raise RuntimeError("a real bug")


async def test_a_real_server_error_is_still_logged_with_its_traceback(settings, api_headers,
                                                                      caplog):
    app = create_app(settings)
    app.register(probe_crash)
    async with AsyncTestClient(app) as probe:
        with caplog.at_level(logging.INFO):
            assert (await probe.get("/probe-crash", headers=api_headers)).status_code == 500
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info and "a real bug" in str(errors[0].exc_info[1])


# 5. No oracle about other tenants' keys; key ids in log lines -------------------------------

async def test_prefix_bound_admin_learns_nothing_about_keys_outside(client, make_key):
    t = tag()
    outside = await client.post("/v1/keys", json={"name": f"root-{t}", "scopes": ["read"]})
    assert outside.status_code == 201
    admin = bearer(await make_key("admin,read", f"{t}-ward-1:"))
    fresh = await client.post("/v1/keys", headers=admin, json={
        "name": f"fresh-{t}", "scopes": ["read"], "prefix": f"{t}-ward-1:"})
    taken = await client.post("/v1/keys", headers=admin, json={
        "name": f"root-{t}", "scopes": ["read"], "prefix": f"{t}-ward-1:"})
    assert (fresh.status_code, taken.status_code) == (201, 201)
    assert fresh.json().keys() == taken.json().keys()
    assert taken.json()["id"] != outside.json()["id"]
    # Revoking by name reaches only the key within its prefix.
    gone = await client.delete(f"/v1/keys/nothing-{t}", headers=admin)
    assert gone.status_code == 404
    assert (await client.delete(f"/v1/keys/root-{t}", headers=admin)).status_code == 204
    assert (await client.get("/v1/devices", headers=bearer(outside.json()["key"]))
            ).status_code == 200
    again = await client.delete(f"/v1/keys/root-{t}", headers=admin)
    assert (again.status_code, again.json()) == (gone.status_code,
                                                 {"error": f"no active key named 'root-{t}'"})
    # The same name within the same prefix is refused, as the admin can see it.
    doubled = await client.post("/v1/keys", headers=admin, json={
        "name": f"fresh-{t}", "scopes": ["read"], "prefix": f"{t}-ward-1:"})
    assert doubled.status_code == 422


async def test_unbound_admin_revokes_an_ambiguous_name_by_id(client, make_key):
    t = tag()
    first = (await client.post("/v1/keys", json={"name": f"twin-{t}", "scopes": ["read"]})).json()
    second = (await client.post("/v1/keys", json={
        "name": f"twin-{t}", "scopes": ["read"], "prefix": f"{t}:"})).json()
    ambiguous = await client.delete(f"/v1/keys/twin-{t}")
    assert ambiguous.status_code == 409
    assert str(first["id"]) in ambiguous.text and str(second["id"]) in ambiguous.text
    assert (await client.delete(f"/v1/keys/twin-{t}", params={"id": second["id"]})
            ).status_code == 204
    assert (await client.get("/v1/devices", headers=bearer(second["key"]))).status_code == 401
    assert (await client.get("/v1/devices", headers=bearer(first["key"]))).status_code == 200
    assert (await client.delete(f"/v1/keys/twin-{t}")).status_code == 204


async def test_log_lines_name_keys_by_an_id_that_never_repeats(client, caplog):
    t = tag()
    ids = []
    for _ in range(2):
        created = (await client.post("/v1/keys", json={"name": f"reused-{t}",
                                                       "scopes": ["ingest"]})).json()
        ids.append(created["id"])
        assert (await client.delete(f"/v1/keys/reused-{t}")).status_code == 204
        await asyncio.sleep(1.1)  # a fresh window of the rate-limited log
        with caplog.at_level(logging.WARNING, logger="vitalstore.auth"):
            await client.get("/v1/devices", headers=bearer(created["key"]))
    assert ids[0] != ids[1]
    lines = [r.getMessage() for r in caplog.records if f"reused-{t}" in r.getMessage()]
    assert any(f"#{ids[0]}" in line for line in lines) and any(f"#{ids[1]}" in line
                                                              for line in lines), lines
    listed = [i for i in (await client.get("/v1/keys")).json()["items"]
              if i["name"] == f"reused-{t}"]
    assert sorted(i["id"] for i in listed) == sorted(ids)


# 6. One credential per request ---------------------------------------------------------------

async def test_more_than_one_key_in_a_request_is_400(client, make_key):
    a, b = await make_key("read"), await make_key("read")
    for headers in ([("Authorization", f"Bearer {a}"), ("X-API-Key", b)],
                    [("X-API-Key", a), ("Authorization", f"Bearer {b}")],
                    [("X-API-Key", a), ("X-API-Key", b)],
                    [("X-API-Key", a), ("X-API-Key", a)],
                    [("Authorization", f"Bearer {a}"), ("Authorization", f"Bearer {a}")],
                    [("Authorization", f"Bearer {a}"), ("X-API-Key", a)]):
        response = await send(client, "GET", "/v1/devices", headers)
        assert response.status_code == 400, headers
        assert "one" in response.json()["error"]
    for headers in ([("Authorization", f"Bearer {a}")], [("X-API-Key", b)]):
        assert (await send(client, "GET", "/v1/devices", headers)).status_code == 200


# 7. /metrics needs a key that sees everything ------------------------------------------------

async def test_metrics_needs_an_unbound_read_or_admin_key(settings, make_key):
    cases = [("read", None, 200), ("admin", None, 200), ("read,ingest", None, 200),
             ("read", "ward-1:", 403), ("admin,read", "ward-1:", 403), ("ingest", None, 403)]
    made = [(bearer(await make_key(scopes, prefix)), status) for scopes, prefix, status in cases]
    for metrics_open in (False, True):
        app = create_app(msgspec.structs.replace(settings, metrics_open=metrics_open))
        async with AsyncTestClient(app) as probe:
            assert (await probe.get("/metrics")).status_code == (200 if metrics_open else 401)
            for (headers, status), case in zip(made, cases, strict=True):
                got = (await probe.get("/metrics", headers=headers)).status_code
                assert got == (200 if metrics_open else status), case


# 8. A request rate per key -------------------------------------------------------------------

async def test_key_over_its_rate_gets_429_and_others_are_served(settings, make_key, admin_db):
    app = create_app(msgspec.structs.replace(settings, key_rate_limit=5.0, key_rate_burst=5))
    busy, other = await make_key("read"), await make_key("read")
    busy_name = (await keys.find(admin_db, keys.digest(busy))).name
    async with AsyncTestClient(app) as probe:
        statuses = [(await probe.get("/v1/devices", headers=bearer(busy))) for _ in range(20)]
        codes = [r.status_code for r in statuses]
        assert codes[:5] == [200] * 5 and codes.count(429) >= 10, codes
        limited = next(r for r in statuses if r.status_code == 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 2
        assert "rate" in limited.json()["error"]
        for _ in range(5):
            assert (await probe.get("/v1/devices", headers=bearer(other))).status_code == 200
        await asyncio.sleep(int(limited.headers["retry-after"]))
        assert (await probe.get("/v1/devices", headers=bearer(busy))).status_code == 200
        counted = metric_samples((await probe.get("/metrics", headers=bearer(other))).text,
                                 "vitalstore_key_rate_limited_total")
        mine = [value for labels, value in counted.items() if ("key", busy_name) in labels]
        assert mine == [codes.count(429)]


async def test_no_rate_limit_by_default(client, make_key):
    key = bearer(await make_key("read"))
    responses = await asyncio.gather(*(client.get("/v1/devices", headers=key)
                                       for _ in range(200)))
    assert {r.status_code for r in responses} == {200}


async def test_unknown_keys_flood_is_bounded_by_the_lookup_slots(client, make_key):
    store = client.app.state.services.keys
    valid = bearer(await make_key("read"))
    assert (await client.get("/v1/devices", headers=valid)).status_code == 200
    flood = [asyncio.ensure_future(client.get("/v1/devices", headers=bearer(keys.generate())))
             for _ in range(300)]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert (await client.get("/v1/devices", headers=valid)).status_code == 200
    served_in = time.monotonic() - started
    assert {r.status_code for r in await asyncio.gather(*flood)} == {401}
    assert store.lookups_peak <= auth.LOOKUP_CONCURRENCY
    assert served_in < 5.0
