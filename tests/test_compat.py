"""The old system's clients: a keyless way in by VITALSTORE_COMPAT_KEY_NAME, one error shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from vitalstore import keys
from vitalstore.app import create_app
from vitalstore.settings import Settings

NOW = int(time.time()) - 60
JSON = {"content-type": "application/json"}


async def keyless(service: Any, method: str, path: str, body: Any = None,
                  headers: dict[str, str] | None = None) -> httpx.Response:
    content = None if body is None else msgspec.json.encode(body)
    response: httpx.Response = await service.request(method, path, content=content,
                                                     headers={**JSON, **(headers or {})})
    return response


@pytest.fixture
async def compat_key(db_url: str) -> AsyncIterator[tuple[str, str]]:
    """A key of the ingest and read scopes bound to a prefix: (its name, the prefix)."""
    name, prefix = f"old-fleet-{uuid.uuid4().hex[:6]}", f"old-{uuid.uuid4().hex[:6]}:"
    conn = await asyncpg.connect(db_url)
    try:
        await keys.create(conn, name, ["ingest", "read"], prefix)
        yield name, prefix
    finally:
        await conn.close()


def service(settings: Settings, **changes: Any) -> AsyncTestClient[Any]:
    # No default key on this client: it is the old system's client.
    return AsyncTestClient(create_app(msgspec.structs.replace(settings, auth_cache_s=0,
                                                              **changes)), timeout=30)


async def test_keyless_old_clients_get_the_named_keys_rights(settings, compat_key, db):
    name, prefix = compat_key
    async with service(settings, compat_key_name=name) as old:
        reading = {"device": f"{prefix}bed-1", "timestamp": NOW, "heartRateValue": 72}
        stored = await keyless(old, "POST", "/vital-data", reading)
        assert stored.status_code == 202, stored.text
        assert stored.json() == {"status": "accepted"}
        # Its device prefix holds: a device outside it is refused, in the old shape.
        outside = await keyless(old, "POST", "/vital-data", {**reading, "device": "bed-1"})
        assert outside.status_code == 403
        assert outside.json()["status"] == "error"
        listed = await keyless(old, "GET", "/vital-data")
        assert listed.status_code == 200
        assert [r["deviceId"] for r in listed.json()["resources"]] == [f"{prefix}bed-1"]
        # The rest of the API stays key-only.
        for method, path in (("POST", "/v1/readings"), ("GET", "/v1/devices")):
            refused = await keyless(old, method, path, reading if method == "POST" else None)
            assert refused.status_code == 401, path
            assert "error" in refused.json()


async def test_a_named_key_that_is_missing_or_revoked_lets_nobody_in(settings, compat_key, db):
    name, prefix = compat_key
    reading = {"device": f"{prefix}bed-2", "timestamp": NOW, "hr": 60}
    async with service(settings, compat_key_name="no-such-key") as old:
        assert (await keyless(old, "POST", "/vital-data", reading)).status_code == 401
    assert await keys.revoke(db, name)
    async with service(settings, compat_key_name=name) as old:
        refused = await keyless(old, "POST", "/vital-data", reading)
        assert refused.status_code == 401
        assert refused.json()["status"] == "error"
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", reading["device"]) \
        == 0


async def test_without_the_setting_vital_data_needs_a_key(settings):
    async with service(settings) as old:
        refused = await keyless(old, "GET", "/vital-data")
        assert refused.status_code == 401
        assert refused.json() == {
            "status": "error",
            "message": "an API key is required: 'Authorization: Bearer <key>' or"
                       " 'X-API-Key: <key>'"}


async def test_vital_data_errors_all_have_the_old_shape(client, device):
    wrong_type = await client.post("/vital-data", content=b"x",
                                   headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    assert set(wrong_type.json()) == {"status", "message"}
    bad_key = await client.get("/vital-data", headers={"Authorization": "Bearer vs_nope"})
    assert bad_key.status_code == 401
    assert set(bad_key.json()) == {"status", "message"}
    bad_count = await client.get("/vital-data", params={"count": 101})
    assert bad_count.status_code == 400
    assert bad_count.json()["status"] == "error"
    # ...while the rest of the API keeps its own.
    other = await client.post("/v1/readings", content=b"x", headers={"content-type": "text/plain"})
    assert set(other.json()) == {"error"}


async def test_get_vital_data_is_documented(client):
    schema = (await client.get("/schema/openapi.json")).json()
    operation = schema["paths"]["/vital-data"]["get"]
    assert operation["description"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == {"count", "offset", "sortBy", "orderBy"}
    assert all(p.get("description") for p in parameters.values())
