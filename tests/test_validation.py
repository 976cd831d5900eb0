"""Each validation rule of a reading: a 422 naming the item and field, nothing stored."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

NOW = int(time.time()) - 60


def reading(device: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"device": device, "timestamp": NOW, "hr": 60, **(fields or {})}


INVALID = [
    pytest.param({"device": ""}, "device", "must be 1 to 128 characters", id="empty-device"),
    pytest.param({"device": "x" * 129}, "device", "must be 1 to 128 characters", id="long-device"),
    pytest.param({"device": 42}, "device", "required, a string", id="numeric-device"),
    pytest.param({"device": "a\x00b"}, "device", "printable characters only", id="nul-in-device"),
    pytest.param({"device": "a\nb"}, "device", "printable characters only", id="newline"),
    pytest.param({"device": "a\u200bb"}, "device", "printable characters only", id="zero-width"),
    pytest.param({"device": "a\u202eb"}, "device", "printable characters only", id="rtl-override"),
    pytest.param({"timestamp": None}, "timestamp", "Unix seconds or an RFC 3339", id="null-time"),
    pytest.param({"timestamp": True}, "timestamp", "Unix seconds or an RFC 3339", id="bool-time"),
    pytest.param({"timestamp": 946684799}, "timestamp", "before 2000-01-01", id="before-2000"),
    pytest.param({"timestamp": NOW * 1000}, "timestamp", "looks like milliseconds",
                 id="milliseconds"),
    pytest.param({"timestamp": NOW + 3600}, "timestamp", "in the future", id="future"),
    pytest.param({"timestamp": "2025-06-18T10:00:00"}, "timestamp", "UTC offset",
                 id="no-offset"),
    pytest.param({"timestamp": "yesterday"}, "timestamp", "RFC 3339", id="not-a-time"),
    pytest.param({"timestamp": "9999-12-31T23:59:59Z"}, "timestamp", "in the future",
                 id="year-9999"),
    pytest.param({"timestamp": "0001-01-01T00:00:00Z"}, "timestamp", "before 2000-01-01",
                 id="year-1"),
    pytest.param({"bad name": 1}, "bad name", "metric names are", id="space-in-metric"),
    pytest.param({"x" * 65: 1}, "x" * 65, "metric names are", id="long-metric"),
    pytest.param({"hr'); drop table readings; --": 1}, "hr'); drop table readings; --",
                 "metric names are", id="sql-in-metric"),
    pytest.param({"big": 10**400}, "big", "finite", id="huge-integer"),
    pytest.param({"note": "a\u0000b"}, "", "U+0000", id="nul-in-attribute"),
]


@pytest.mark.parametrize(("fields", "field", "message"), INVALID)
async def test_invalid_reading_is_422_naming_the_field(client, db, device, fields, field,
                                                       message):
    body = [reading(device), reading(device, fields)]
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["index"] == 1
    assert error["field"] == field
    assert message in error["message"]
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1 AND"
                             " first_seen IS NOT NULL", device) == 0


async def test_missing_fields_are_each_reported(client):
    response = await client.post("/v1/readings", content=b'[{}, {"device": "a"}, 7]',
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422
    errors = [(e["index"], e["field"]) for e in response.json()["errors"]]
    assert errors == [(0, "device"), (0, "timestamp"), (1, "timestamp"), (2, "")]


async def test_at_most_100_errors_are_listed(client):
    body = [{"device": "", "timestamp": NOW}] * 500
    response = await client.post("/v1/readings", content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert len(response.json()["errors"]) == 100


@pytest.mark.parametrize("body", [b"{", b"[1,", b"NaN", b'{"hr": Infinity}', b"\xff\xfe"])
async def test_malformed_json_is_400(client, body):
    response = await client.post("/v1/readings", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


async def test_top_level_scalar_is_400(client):
    response = await client.post("/v1/readings", content=b"42",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize("timestamp", [
    NOW, NOW + 0.5, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW)),
    time.strftime("%Y-%m-%dT%H:%M:%S+02:00", time.gmtime(NOW + 7200))])
async def test_accepted_timestamp_forms(client, device, timestamp):
    response = await client.post(
        "/v1/readings", content=msgspec.json.encode(reading(device, {"timestamp": timestamp})),
        headers={"content-type": "application/json"})
    assert response.status_code == 202


async def test_negative_zero_is_stored_as_zero(client, db, device):
    body = b'{"device": "%s", "timestamp": %d, "hr": -0.0}' % (device.encode(), NOW)
    response = await client.post("/v1/readings", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202
    value = await db.fetchval("SELECT r.value::text FROM readings r JOIN devices d"
                              " ON d.id = r.device_id WHERE d.name = $1", device)
    assert value == "0"
