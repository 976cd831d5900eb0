"""Mistakes answered helpfully, nothing silently lost (issue 12, items 4 to 9)."""

from __future__ import annotations

import time
import urllib.parse
import uuid
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from conftest import ROOT, free_port
from harness import Service

NOW = int(time.time()) - 60
JSON = {"content-type": "application/json"}


async def post(client: Any, body: Any, path: str = "/v1/readings",
               headers: dict[str, str] | None = None) -> httpx.Response:
    response: httpx.Response = await client.post(
        path, content=msgspec.json.encode(body), headers={**JSON, **(headers or {})})
    return response


async def stored_metrics(db: Any, device: str) -> dict[str, float]:
    rows = await db.fetch("SELECT m.name, r.value FROM readings r JOIN devices d ON d.id ="
                          " r.device_id JOIN metrics m ON m.id = r.metric_id WHERE d.name = $1",
                          device)
    return {row["name"]: row["value"] for row in rows}


async def stored_attributes(db: Any, device: str) -> list[Any]:
    rows = await db.fetch("SELECT a.attributes::text FROM reading_attributes a JOIN devices d"
                          " ON d.id = a.device_id WHERE d.name = $1", device)
    return [msgspec.json.decode(row[0]) for row in rows]


def only_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    result: dict[str, Any] = error
    return result


# Item 4: a vital sent as a string, null or boolean.

async def test_string_value_of_a_known_metric_is_stored_as_its_number(client, db, device):
    assert (await post(client, {"device": device, "timestamp": NOW - 1,
                                "heartRateValue": 70})).status_code == 202
    response = await post(client, {"device": device, "timestamp": NOW, "heartRateValue": "72"})
    assert response.status_code == 202, response.text
    latest = (await client.get(f"/v1/devices/{device}/latest")).json()
    assert latest["metrics"]["heartRateValue"]["value"] == 72
    aggregates = (await client.get(f"/v1/devices/{device}/aggregates",
                                   params={"bucket": "1d"})).json()["items"]
    assert sum(item["count"] for item in aggregates) == 2
    assert await stored_attributes(db, device) == []


@pytest.mark.parametrize(("value", "says"), [
    (None, "not null (leave the field out when there is no value)"),
    (True, "not true"),
    ("fast", "not a string"),
    ("1.2.3", "not a string"),
    ({"v": 1}, "not a JSON dict"),
])
async def test_anything_but_a_number_in_a_known_metric_is_422(client, db, device, value, says):
    assert (await post(client, {"device": device, "timestamp": NOW - 1, "spo2": 97}))\
        .status_code == 202
    error = only_error(await post(client, {"device": device, "timestamp": NOW, "spo2": value}))
    assert (error["field"], error["message"]) == ("spo2", f"is a metric: send a number, {says}")
    assert await stored_metrics(db, device) == {"spo2": 97}


async def test_strings_of_unknown_fields_stay_attributes(client, db, device):
    firmware = f"fw-{uuid.uuid4().hex[:8]}"
    body = {"device": device, "timestamp": NOW, "hr": 60, firmware: "1.2.3", "note": "72"}
    assert (await post(client, body)).status_code == 202
    assert await stored_attributes(db, device) == [{firmware: "1.2.3", "note": "72"}]


# Item 5.

async def test_reading_without_metrics_or_attributes_is_422(client, db, device):
    error = only_error(await post(client, {"device": device, "timestamp": NOW}))
    assert "at least one metric" in error["message"]
    assert await db.fetchval("SELECT count(*) FROM devices WHERE name = $1", device) == 0


# Item 6: every device that can be written is readable through every route.

@pytest.mark.parametrize("name", ["ward/3", ".", ".."])
async def test_device_ids_the_read_urls_cannot_hold_are_422(client, name):
    error = only_error(await post(client, {"device": name, "timestamp": NOW, "hr": 1}))
    assert error["field"] == "device"


@pytest.fixture(scope="module")
def server(db_url: str, api_headers: dict[str, str]) -> Any:
    """A real `vitalstore serve`: URLs travel as clients send them, not as a test transport."""
    started = Service(db_url, {}, name="server", port=free_port(), headers=dict(api_headers),
                      log_dir=ROOT / ".pytest_cache").start(timeout=20)
    yield started
    started.stop(graceful=False)


@hypothesis_settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
def test_every_device_that_can_be_written_is_readable(server, name):
    tagged = f"{uuid.uuid4().hex[:6]}{name}"
    body = {"device": tagged, "timestamp": NOW, "hr": 1}
    posted = httpx.post(server.url + "/v1/readings", json=body, headers=server.headers)
    if posted.status_code == 422:
        return  # refused at write: fine, as long as what is accepted can be read
    assert posted.status_code == 202, posted.text
    quoted = urllib.parse.quote(tagged, safe="")
    for route in ("latest", "readings", "aggregates"):
        response = httpx.get(f"{server.url}/v1/devices/{quoted}/{route}", headers=server.headers)
        assert response.status_code == 200, (route, response.text)
        assert response.json()["device" if route != "readings" else "items"]


# Item 7.

async def test_reading_older_than_the_raw_retention_is_422(client, db, device):
    error = only_error(await post(client, {"device": device, "timestamp": 1750240800, "hr": 1}))
    assert error["field"] == "timestamp"
    assert "older than the raw retention horizon" in error["message"]
    assert "VITALSTORE_RETENTION_RAW=90d" in error["message"]
    ninety_days_ago = NOW - 89 * 86400
    assert (await post(client, {"device": device, "timestamp": ninety_days_ago, "hr": 1}))\
        .status_code == 202


async def test_with_retention_forever_old_readings_are_kept(settings, api_headers, device):
    from litestar.testing import AsyncTestClient

    from vitalstore.app import create_app

    forever = msgspec.structs.replace(settings, retention_raw="forever")
    async with AsyncTestClient(create_app(forever), timeout=30) as service:
        service.headers.update(api_headers)
        response = await post(service, {"device": device, "timestamp": 1750240800, "hr": 1})
        assert response.status_code == 202, response.text


# Item 8: queries.

async def test_from_after_to_is_422(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 1})
    for path, extra in ((f"/v1/devices/{device}/readings", {}),
                        (f"/v1/devices/{device}/aggregates", {}),
                        ("/v1/aggregates", {"metric": "hr"})):
        response = await client.get(path, params={"from": NOW, "to": NOW - 10, **extra})
        assert response.status_code == 422, path
        assert response.json() == {"error": "from: must not be after to", "parameter": "from"}


async def test_query_time_in_milliseconds_gets_the_hint(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 1})
    response = await client.get(f"/v1/devices/{device}/readings",
                                params={"from": "1796150000000"})
    assert response.status_code == 422
    assert "looks like milliseconds" in response.json()["error"]


async def test_unencoded_plus_in_a_time_says_to_encode_it(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 1})
    response = await client.get(f"/v1/devices/{device}/readings?from=2025-06-18T10:00:00+00:00")
    assert response.status_code == 422
    assert "encode it as %2B" in response.json()["error"]
    fine = await client.get(f"/v1/devices/{device}/readings?from=2025-06-18T10:00:00%2B00:00")
    assert fine.status_code == 200


async def test_repeated_metrics_parameter_takes_them_all(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 60, "spo2": 97, "rr": 12})
    history = await client.get(f"/v1/devices/{device}/readings?metrics=spo2&metrics=hr")
    assert history.json()["items"][0]["metrics"] == {"hr": 60, "spo2": 97}
    aggregates = await client.get(f"/v1/devices/{device}/aggregates?metrics=spo2&metrics=hr")
    assert {item["metric"] for item in aggregates.json()["items"]} == {"hr", "spo2"}


async def test_bulk_latest_names_the_devices_not_found(client, device):
    await post(client, {"device": device, "timestamp": NOW, "hr": 60})
    response = await client.get("/v1/latest", params={"device": [device, "nobody-here"]})
    assert [item["device"] for item in response.json()["items"]] == [device]
    assert response.json()["not_found"] == ["nobody-here"]


async def test_cursor_of_a_descending_page_needs_the_same_order(client, device):
    await post(client, [{"device": device, "timestamp": NOW - n, "hr": n} for n in range(3)])
    first = (await client.get(f"/v1/devices/{device}/readings",
                              params={"order": "desc", "limit": 1})).json()
    cursor = first["next_cursor"]
    again = await client.get(f"/v1/devices/{device}/readings", params={"cursor": cursor})
    assert again.status_code == 422
    assert "order=desc" in again.json()["error"]
    second = await client.get(f"/v1/devices/{device}/readings",
                              params={"cursor": cursor, "order": "desc", "limit": 1})
    assert [item["metrics"]["hr"] for item in second.json()["items"]] == [1]


# Item 9: bodies and headers.

@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
@pytest.mark.parametrize("body", [b"", b" \n"])
async def test_empty_body_is_400_saying_so(client, body, content_type):
    response = await client.post("/v1/readings", content=body,
                                 headers={"content-type": content_type})
    assert response.status_code == 400
    assert response.json()["error"].startswith("the body is empty")


async def test_ndjson_sent_as_json_hints_at_the_content_type(client, device):
    lines = b"\n".join(msgspec.json.encode({"device": device, "timestamp": NOW - n, "hr": n})
                       for n in range(2))
    response = await client.post("/v1/readings", content=lines, headers=JSON)
    assert response.status_code == 400
    assert "trailing characters" in response.json()["error"]
    assert "application/x-ndjson" in response.json()["error"]


async def test_authorization_without_bearer_says_the_scheme_is_missing(client, api_headers):
    key = api_headers["Authorization"].removeprefix("Bearer ")
    request = client.build_request("GET", "/v1/devices")
    request.headers["authorization"] = key
    response = await client.send(request)
    assert response.status_code == 401
    assert "lacks the Bearer scheme" in response.json()["error"]


async def test_key_body_with_the_cli_spelling_hints_at_scopes(client):
    response = await client.post("/v1/keys", json={"name": "x", "scope": "ingest,read"})
    assert response.status_code == 400
    assert '"scopes", a list' in response.json()["error"]
