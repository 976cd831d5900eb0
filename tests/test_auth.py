"""Access control: keys, scopes, prefix bounds, revocation, the key cache, CLI and admin routes."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import subprocess
import time
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from litestar import get
from litestar.exceptions import ServiceUnavailableException
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from harness import auth_headers as bearer
from support import NOW, post, run_cli
from vitalstore import auth, keys, logs
from vitalstore.app import create_app
from vitalstore.auth import effective_prefix
from vitalstore.keys import ApiKey


async def without_key(client: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A request without the client's default key (headers given here are kept)."""
    request = client.build_request(method, url, **kwargs)
    if "authorization" not in {name.lower() for name in kwargs.get("headers", {})}:
        del request.headers["authorization"]
    response: httpx.Response = await client.send(request)
    return response


async def registered(db: asyncpg.Connection, names: list[str]) -> set[str]:
    rows = await db.fetch("SELECT name FROM devices WHERE name = ANY($1::text[])", names)
    return {row["name"] for row in rows}


async def failures(client: Any, reason: str) -> float:
    """The service's own count, as `/metrics` shows it."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vitalstore_auth_failures_total" and \
                    sample.labels.get("reason") == reason:
                return float(sample.value)
    return 0.0


PROTECTED = [
    ("POST", "/v1/readings"), ("POST", "/vital-data"), ("GET", "/vital-data"),
    ("GET", "/v1/devices"), ("GET", "/v1/devices/x/latest"), ("GET", "/v1/latest"),
    ("GET", "/v1/devices/x/readings"), ("GET", "/v1/keys"), ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/x"), ("POST", "/bench/noop"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_request_without_key_is_401_with_bearer_challenge(client, method, path):
    response = await without_key(client, method, path, content=b"{}",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    # /vital-data answers in the shape of the system it replaces.
    assert "API key is required" in (body["message"] if path == "/vital-data" else body["error"])


async def test_post_without_key_stores_nothing(client, admin_db, device):
    body = msgspec.json.encode({"device": device, "timestamp": NOW, "hr": 1})
    response = await without_key(client, "POST", "/v1/readings", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 401
    assert await registered(admin_db, [device]) == set()


async def test_health_ready_and_schema_are_open(client):
    for path in ("/health", "/ready", "/schema/openapi.json"):
        assert (await without_key(client, "GET", path)).status_code == 200, path


def test_every_route_declares_its_access(settings):
    """A route added without `**requires(...)`, `**OPEN` or `**METRICS` would fall to admin."""
    app = create_app(settings)
    open_paths = set()
    checked_by_handler = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if handler.http_methods == {"OPTIONS"}:
                continue
            access = handler.opt.get(auth.ACCESS_OPT)
            assert access in ("open", "metrics", "handler", *keys.SCOPES), (route.path, access)
            if access == "open":
                open_paths.add(route.path)
            if access == "handler":
                checked_by_handler.add(route.path)
    # The dashboard's static files are open too: its data comes from the API, with a key.
    assert {p for p in open_paths if not p.startswith("/schema")} == {
        "/health", "/ready", "/ui", "/ui/{file_path:path}"}
    # Their handlers call KeyStore.authorize (tests/test_lineprotocol.py: 401 without a key).
    assert checked_by_handler == {"/api/v2/write", "/write"}


async def test_openapi_declares_the_security_scheme(client):
    schema = (await client.get("/schema/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer",
                                 "description": schemes["bearer"]["description"]}
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    either = [{"bearer": []}, {"apiKeyHeader": []}]
    assert schema["paths"]["/v1/readings"]["post"]["security"] == either
    assert schema["paths"]["/v1/devices"]["get"]["security"] == either
    assert schema["paths"]["/v1/keys"]["post"]["security"] == either
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "security" not in schema["paths"]["/ready"]["get"]


async def test_bearer_and_x_api_key_are_both_accepted(client, make_key):
    key = await make_key("read")
    for headers in ({"Authorization": f"Bearer {key}"}, {"Authorization": f"bearer {key}"},
                    {"X-API-Key": key}):
        response = await without_key(client, "GET", "/v1/devices", headers=headers)
        assert response.status_code == 200, headers


@pytest.mark.parametrize("parameter", ["api_key", "apikey", "key", "access_token", "token"])
async def test_key_in_the_url_is_never_accepted(client, make_key, parameter):
    key = await make_key("read")
    response = await without_key(client, "GET", "/v1/devices", params={parameter: key})
    assert response.status_code == 401


@pytest.mark.parametrize("value", ["Bearer vs_unknown", "Bearer " + "vs_" + "A" * 43,
                                   "Bearer " + keys.generate()[:-1] + "!", "Basic dXNlcjpwdw=="])
async def test_unknown_malformed_or_other_scheme_is_401(client, value):
    response = await without_key(client, "GET", "/v1/devices", headers={"Authorization": value})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_revoked_key_is_401_saying_so(client, make_key, admin_db):
    key = await make_key("read")
    name = (await keys.find(admin_db, keys.digest(key))).name
    assert await keys.revoke(admin_db, name)
    response = await client.get("/v1/devices", headers=bearer(key))
    assert response.status_code == 401
    assert response.json() == {"error": "API key revoked"}
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_key_without_the_scope_is_403(client, make_key, admin_db, device):
    ingest_only, read_only = await make_key("ingest"), await make_key("read")
    response = await client.get("/v1/devices", headers=bearer(ingest_only))
    assert response.status_code == 403
    assert 'error="insufficient_scope", scope="read"' in response.headers["www-authenticate"]
    body = {"device": device, "timestamp": NOW, "hr": 1}
    assert (await post(client, body, bearer(read_only))).status_code == 403
    assert (await post(client, body, bearer(read_only), "/vital-data")).status_code == 403
    assert await registered(admin_db, [device]) == set()
    for method, path in (("GET", "/v1/keys"), ("DELETE", "/v1/keys/x")):
        response = await client.request(method, path, headers=bearer(read_only))
        assert response.status_code == 403
    assert (await post(client, body, bearer(ingest_only))).status_code == 202


async def test_write_outside_the_prefix_is_403_and_nothing_is_stored(client, make_key, admin_db):
    tag = uuid.uuid4().hex[:8]
    key = await make_key("ingest", f"{tag}-ward-1:")
    inside, outside = f"{tag}-ward-1:bed-1", f"{tag}-ward-2:bed-1"
    batch = [{"device": inside, "timestamp": NOW, "hr": 60},
             {"device": outside, "timestamp": NOW, "hr": 61}]
    for path in ("/v1/readings", "/vital-data", "/bench/noop"):
        response = await post(client, batch, bearer(key), path)
        assert response.status_code == 403, path
        body = response.json()
        assert repr(outside) in (body["message"] if path == "/vital-data" else body["error"])
    ndjson = b"\n".join(msgspec.json.encode(item) for item in batch)
    response = await client.post("/v1/readings", content=ndjson, headers={
        **bearer(key), "content-type": "application/x-ndjson"})
    assert response.status_code == 403
    assert await registered(admin_db, [inside, outside]) == set()
    assert (await post(client, batch[:1], bearer(key))).status_code == 202
    assert await registered(admin_db, [inside, outside]) == {inside}


async def test_reads_outside_the_prefix_are_404_like_unknown_devices(client, make_key):
    tag = uuid.uuid4().hex[:8]
    inside, outside = f"{tag}-ward-1:bed", f"{tag}-ward-2:bed"
    assert (await post(client, [{"device": d, "timestamp": NOW, "hr": 1}
                                for d in (inside, outside)])).status_code == 202
    reader = bearer(await make_key("read", f"{tag}-ward-1:"))
    for suffix in ("latest", "readings"):
        assert (await client.get(f"/v1/devices/{inside}/{suffix}", headers=reader)
                ).status_code == 200
        hidden = await client.get(f"/v1/devices/{outside}/{suffix}", headers=reader)
        unknown = await client.get(f"/v1/devices/{tag}-ward-2:none/{suffix}", headers=reader)
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json()["error"].replace(outside, "?") == \
            unknown.json()["error"].replace(f"{tag}-ward-2:none", "?")
    export = await client.get(f"/v1/devices/{outside}/readings",
                              headers={**reader, "accept": "text/csv"})
    assert export.status_code == 404


async def test_listings_show_only_the_keys_devices(client, make_key):
    tag = uuid.uuid4().hex[:8]
    names = [f"{tag}-ward-1", f"{tag}-ward-10", f"{tag}-ward-2", f"{tag}-x"]
    assert (await post(client, [{"device": d, "timestamp": NOW, "hr": i}
                                for i, d in enumerate(names)])).status_code == 202
    reader = bearer(await make_key("read", f"{tag}-ward-1"))

    async def devices(**params: Any) -> list[str]:
        page = (await client.get("/v1/devices", params=params, headers=reader)).json()
        return [item["device"] for item in page["items"]]

    assert await devices(prefix=tag) == names[:2]  # broader request: clamped to the key
    assert await devices(prefix=f"{tag}-ward-10") == names[1:2]  # narrower: as asked
    assert await devices(prefix=f"{tag}-ward-2") == []  # disjoint
    assert set(await devices()) >= set(names[:2])
    assert all(d.startswith(f"{tag}-ward-1") for d in await devices())
    latest = (await client.get("/v1/latest", params={"device": names}, headers=reader)).json()
    assert [item["device"] for item in latest["items"]] == names[:2]
    paged = (await client.get("/v1/latest", params={"limit": 1000}, headers=reader)).json()
    assert [item["device"] for item in paged["items"]] == names[:2]
    compat = (await client.get("/vital-data", params={"count": 100}, headers=reader)).json()
    assert compat["total"] == 2
    assert sorted(r["deviceId"] for r in compat["resources"]) == names[:2]
    by_metric = (await client.get("/vital-data", params={"sortBy": "hr"}, headers=reader)).json()
    assert sorted(r["deviceId"] for r in by_metric["resources"]) == names[:2]


@given(requested=st.text("ab-1", max_size=4), bound=st.text("ab-1", max_size=4),
       device=st.text("ab-1", max_size=6))
def test_effective_prefix_lists_exactly_what_both_prefixes_allow(requested, bound, device):
    visible = effective_prefix(ApiKey("k", frozenset({"read"}), bound), requested)
    listed = visible is not None and device.startswith(visible)
    assert listed == (device.startswith(bound) and device.startswith(requested))


RUN = uuid.uuid4().hex[:6]
BOUNDS = (f"{RUN}ward-1", f"{RUN}ward-10")
_timestamps = itertools.count()


@pytest.fixture(scope="module")
async def bound_keys(make_key) -> dict[str, str]:
    """Keys bound to prefixes of which one is a prefix of the other: ward-1 covers ward-10."""
    return {bound: await make_key("ingest,read", bound) for bound in BOUNDS}


device_ids = st.builds(
    lambda stem, tail: RUN + stem + tail,
    st.sampled_from(["ward-1", "ward-10", "ward-100", "ward-2", "ward-", "war", "ward-01"]),
    st.text(alphabet="01-:b", max_size=3))


@hypothesis_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(device_ids, min_size=1, max_size=4))
async def test_prefix_bound_keys_never_read_or_write_outside(client, admin_db, bound_keys,
                                                             batch):
    ts = NOW - next(_timestamps)
    for bound, key in bound_keys.items():
        before = await registered(admin_db, batch)
        body = [{"device": d, "timestamp": ts, "v": 1} for d in batch]
        response = await post(client, body, bearer(key))
        if all(d.startswith(bound) for d in batch):
            assert response.status_code == 202
        else:
            assert response.status_code == 403
            assert await registered(admin_db, batch) == before
    # Every device now exists (written by the unbound admin key); each key sees its own only.
    assert (await post(client, [{"device": d, "timestamp": ts, "v": 2} for d in batch])
            ).status_code == 202
    for bound, key in bound_keys.items():
        for device in set(batch):
            status = (await client.get(f"/v1/devices/{device}/latest", headers=bearer(key))
                      ).status_code
            assert status == (200 if device.startswith(bound) else 404), (bound, device)
        latest = (await client.get("/v1/latest", params={"device": batch},
                                   headers=bearer(key))).json()
        assert {i["device"] for i in latest["items"]} == {d for d in batch if d.startswith(bound)}
        listed = (await client.get("/v1/devices", params={"prefix": RUN, "limit": 1000},
                                   headers=bearer(key))).json()["items"]
        expected = await admin_db.fetch(
            "SELECT name FROM devices WHERE starts_with(name, $1) AND first_seen IS NOT NULL"
            " ORDER BY name", bound)
        assert [i["device"] for i in listed] == [row["name"] for row in expected]
        compat = (await client.get("/vital-data", headers=bearer(key))).json()
        assert compat["total"] == len(expected)
        assert all(r["deviceId"].startswith(bound) for r in compat["resources"])


async def test_cached_key_costs_no_database_lookup(client, make_key):
    store = client.app.state.services.keys
    key = await make_key("read")
    before = store.lookups
    for _ in range(20):
        assert (await client.get("/health", headers=bearer(key))).status_code == 200
        assert (await client.get("/v1/devices", headers=bearer(key))).status_code == 200
    assert store.lookups - before == 1
    # Concurrent first uses of a key share one lookup.
    fresh = await make_key("read")
    before = store.lookups
    responses = await asyncio.gather(*(client.get("/v1/devices", headers=bearer(fresh))
                                       for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert store.lookups - before == 1


async def test_unknown_key_flood_costs_one_lookup(client):
    store = client.app.state.services.keys
    before = store.lookups
    unknown = keys.generate()
    for _ in range(20):
        assert (await client.get("/v1/devices", headers=bearer(unknown))).status_code == 401
    assert store.lookups - before == 1


async def test_refused_key_cache_stays_bounded(db_url, settings):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        # A lower bound than the default, so that the test need not send 10,000 keys.
        store = auth.KeyStore(pool, settings, max_refused=30)
        scope: Any = {"headers": [], "method": "GET", "path": "/", "client": ("test", 0)}
        for _ in range(100):
            with pytest.raises(Exception, match="invalid API key"):
                token = keys.generate()
                await store.verify(token, keys.digest(token), scope)
        assert store.refused_cached <= 30
        assert store.lookups == 100
    finally:
        await pool.close()


async def test_key_that_cannot_be_checked_is_503_not_401(db_url, settings):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    store = auth.KeyStore(pool, settings)
    await pool.close()  # the database is out of reach
    scope: Any = {"headers": [], "method": "GET", "path": "/", "client": ("test", 0)}
    token = keys.generate()
    with pytest.raises(ServiceUnavailableException) as raised:
        await store.verify(token, keys.digest(token), scope)
    assert raised.value.headers == {"Retry-After": "1"}


async def test_revoked_key_stops_within_the_cache_time(client, make_key, admin_db, settings):
    key = await make_key("read")
    assert (await client.get("/v1/devices", headers=bearer(key))).status_code == 200
    name = (await keys.find(admin_db, keys.digest(key))).name
    # Revoked behind the service's back, as the CLI or another process does.
    assert await keys.revoke(admin_db, name)
    revoked_at = time.monotonic()
    assert (await client.get("/v1/devices", headers=bearer(key))).status_code == 200, \
        "the key should still be cached: no database round trip per request"
    while (await client.get("/v1/devices", headers=bearer(key))).status_code == 200:
        assert time.monotonic() - revoked_at < settings.auth_cache_s + 2.0
        await asyncio.sleep(0.05)
    assert time.monotonic() - revoked_at >= settings.auth_cache_s - 1.0


async def test_revoking_over_http_stops_the_key_at_once_in_that_process(client, make_key):
    created = (await client.post("/v1/keys", json={"name": f"r-{uuid.uuid4().hex[:6]}",
                                                   "scopes": ["read"]})).json()
    assert (await client.get("/v1/devices", headers=bearer(created["key"]))).status_code == 200
    assert (await client.delete(f"/v1/keys/{created['name']}")).status_code == 204
    assert (await client.get("/v1/devices", headers=bearer(created["key"]))).status_code == 401
    assert (await client.delete(f"/v1/keys/{created['name']}")).status_code == 404


async def test_admin_routes_create_list_and_revoke(client):
    name = f"gw-{uuid.uuid4().hex[:6]}"
    response = await client.post("/v1/keys", json={"name": name, "scopes": ["ingest", "read"],
                                                   "prefix": "ward-3:"})
    assert response.status_code == 201
    created = response.json()
    assert created["name"] == name and created["scopes"] == ["ingest", "read"]
    assert created["prefix"] == "ward-3:" and keys.KEY_FORMAT.match(created["key"])
    listing = (await client.get("/v1/keys")).json()["items"]
    mine = [item for item in listing if item["name"] == name]
    assert mine == [{"id": created["id"], "name": name, "scopes": ["ingest", "read"],
                     "prefix": "ward-3:",
                     "created_at": mine[0]["created_at"], "revoked_at": None}]
    hashed = hashlib.sha256(created["key"].encode()).hexdigest()
    text = str(listing)
    assert created["key"] not in text and hashed not in text
    duplicate = await client.post("/v1/keys", json={"name": name, "scopes": ["read"],
                                                    "prefix": "ward-3:"})
    assert duplicate.status_code == 422
    for bad in ({"name": "x", "scopes": ["write"]}, {"name": "x", "scopes": []},
                {"name": "bad name", "scopes": ["read"]},
                {"name": "x", "scopes": ["read"], "prefix": ""}):
        assert (await client.post("/v1/keys", json=bad)).status_code in (400, 422), bad
    assert (await client.delete(f"/v1/keys/{name}")).status_code == 204
    listing = (await client.get("/v1/keys")).json()["items"]
    assert [i["revoked_at"] is not None for i in listing if i["name"] == name] == [True]


async def test_prefix_bound_admin_manages_only_keys_within_its_prefix(client, make_key):
    tag = uuid.uuid4().hex[:6]
    admin = bearer(await make_key("admin,read", f"{tag}-ward-1"))
    inside = await client.post("/v1/keys", headers=admin, json={
        "name": f"{tag}-in", "scopes": ["read"], "prefix": f"{tag}-ward-1:bed"})
    assert inside.status_code == 201
    for prefix in (None, f"{tag}-ward-2", tag):
        response = await client.post("/v1/keys", headers=admin, json={
            "name": f"{tag}-out", "scopes": ["read"], "prefix": prefix})
        assert response.status_code == 403, prefix
    outside = await client.post("/v1/keys", json={"name": f"{tag}-other", "scopes": ["read"]})
    assert outside.status_code == 201
    items = (await client.get("/v1/keys", headers=admin)).json()["items"]
    assert f"{tag}-in" in {i["name"] for i in items}
    assert all((i["prefix"] or "").startswith(f"{tag}-ward-1") for i in items)
    assert (await client.delete(f"/v1/keys/{tag}-other", headers=admin)).status_code == 404
    assert (await client.delete(f"/v1/keys/{tag}-in", headers=admin)).status_code == 204


async def test_database_holds_no_plaintext_key(client, db_url, make_key, admin_db):
    made = [await make_key("read"), await make_key("ingest", "ward-9:"),
            (await client.post("/v1/keys", json={"name": f"d-{uuid.uuid4().hex[:6]}",
                                                 "scopes": ["admin"]})).json()["key"]]
    dump = await asyncio.to_thread(
        subprocess.run, ["pg_dump", "--data-only", "--table=api_keys", db_url],
        capture_output=True, check=True)
    assert b"api_keys" in dump.stdout
    for key in made:
        assert key.encode() not in dump.stdout
        assert key.removeprefix("vs_").encode() not in dump.stdout
        stored = await admin_db.fetchval("SELECT key_hash FROM api_keys WHERE key_hash = $1",
                                         hashlib.sha256(key.encode()).digest())
        assert stored is not None
    whole = await asyncio.to_thread(subprocess.run, ["pg_dump", db_url], capture_output=True,
                                    check=True)
    assert not any(key.removeprefix("vs_").encode() in whole.stdout for key in made)


async def test_failed_authentication_is_counted_and_logged_without_the_key(client, caplog):
    unknown = keys.generate()
    before = await failures(client, "unknown"), await failures(client, "missing")
    await asyncio.sleep(1.1)  # a fresh window of the rate-limited failure log
    with caplog.at_level(logging.WARNING, logger="vitalstore.auth"):
        assert (await client.get("/v1/devices", headers=bearer(unknown))).status_code == 401
        assert (await without_key(client, "GET", "/v1/devices")).status_code == 401
    assert (await failures(client, "unknown"), await failures(client, "missing")) == (
        before[0] + 1, before[1] + 1)
    assert "authentication failed (unknown)" in caplog.text
    assert "authentication failed (missing)" in caplog.text
    assert unknown not in caplog.text and unknown[3:] not in caplog.text


async def test_failure_log_is_rate_limited(client, caplog):
    before = await failures(client, "unknown")
    await asyncio.sleep(1.1)
    with caplog.at_level(logging.WARNING, logger="vitalstore.auth"):
        for _ in range(40):
            await client.get("/v1/devices", headers=bearer(keys.generate()))
    assert await failures(client, "unknown") == before + 40
    lines = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(lines) <= 2 * logs.LOG_PER_SECOND


@get("/probe-metrics", **auth.METRICS)
async def probe_metrics() -> str:
    """Stands for /metrics: a route declared with `**auth.METRICS`."""
    return "ok"


@pytest.mark.parametrize("metrics_open", [False, True])
async def test_metrics_access_needs_a_read_key_unless_configured_open(settings, make_key,
                                                                      metrics_open):
    app = create_app(msgspec.structs.replace(settings, metrics_open=metrics_open))
    app.register(probe_metrics)
    reader, writer = bearer(await make_key("read")), bearer(await make_key("ingest"))
    async with AsyncTestClient(app) as probe:
        anonymous = (await probe.get("/probe-metrics")).status_code
        assert anonymous == (200 if metrics_open else 401)
        assert (await probe.get("/probe-metrics", headers=reader)).status_code == 200
        assert (await probe.get("/probe-metrics", headers=writer)
                ).status_code == (200 if metrics_open else 403)


async def test_cli_create_list_revoke(client, db_url, admin_db):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = await asyncio.to_thread(run_cli, db_url, "keys", "create", "--name", name,
                                      "--scope", "read,ingest", "--prefix", "ward-4:")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1].split()[-1]
    assert keys.KEY_FORMAT.match(key)
    assert (await client.get("/v1/devices", headers=bearer(key))).status_code == 200
    assert (await client.get("/v1/keys", headers=bearer(key))).status_code == 403

    listed = await asyncio.to_thread(run_cli, db_url, "keys", "list")
    line = next(line for line in listed.stdout.splitlines() if line.startswith(name + " "))
    assert line.split()[1:3] == ["ingest,read", "ward-4:"] and line.endswith("-")
    assert key not in listed.stdout and key[3:] not in listed.stdout
    assert hashlib.sha256(key.encode()).hexdigest()[:16] not in listed.stdout

    again = await asyncio.to_thread(run_cli, db_url, "keys", "create", "--name", name,
                                    "--scope", "read", "--prefix", "ward-4:")
    assert again.returncode != 0 and "exists" in again.stderr
    bad = await asyncio.to_thread(run_cli, db_url, "keys", "create", "--name", "z",
                                  "--scope", "write")
    assert bad.returncode != 0 and "scopes" in bad.stderr

    revoked = await asyncio.to_thread(run_cli, db_url, "keys", "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    assert not await keys.is_active(admin_db, key)
    missing = await asyncio.to_thread(run_cli, db_url, "keys", "revoke", name)
    assert missing.returncode != 0


async def test_local_admin_key_is_created_once_then_reused(client, db_url, tmp_path, admin_db):
    path = tmp_path / "dir" / "admin.key"
    first = await asyncio.to_thread(run_cli, db_url, "keys", "local-admin", "--file", str(path))
    assert first.returncode == 0, first.stderr
    key = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert key in first.stdout and "curl -H \"Authorization: Bearer" in first.stdout
    assert (await client.get("/v1/keys", headers=bearer(key))).status_code == 200
    second = await asyncio.to_thread(run_cli, db_url, "keys", "local-admin", "--file", str(path))
    assert second.returncode == 0 and path.read_text().strip() == key
    # A key that no longer works is replaced, and the old one is revoked.
    path.write_text("vs_lost\n")
    third = await asyncio.to_thread(run_cli, db_url, "keys", "local-admin", "--file", str(path))
    assert third.returncode == 0
    assert path.read_text().strip() != key
    assert not await keys.is_active(admin_db, key)
    assert await keys.is_active(admin_db, path.read_text().strip())


def test_disabled_auth_serves_without_key_and_warns(server_factory, device):
    server = server_factory(VITALSTORE_AUTH="disabled")
    body = msgspec.json.encode({"device": device, "timestamp": NOW, "hr": 1})
    assert httpx.post(server.url + "/v1/readings", content=body, timeout=10,
                      headers={"content-type": "application/json"}).status_code == 202
    assert httpx.get(server.url + f"/v1/devices/{device}/latest", timeout=10).status_code == 200
    assert "VITALSTORE_AUTH=disabled" in server.log_path.read_text()


def test_server_requires_a_key_by_default(server_factory):
    server = server_factory()
    assert httpx.get(server.url + "/v1/devices", timeout=10).status_code == 401
    assert httpx.get(server.url + "/v1/devices", headers=server.headers,
                     timeout=10).status_code == 200
    assert "VITALSTORE_AUTH=disabled" not in server.log_path.read_text()
