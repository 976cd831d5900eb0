"""Reads: device registry pages, bulk latest, history pages and exports, the old API."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import msgspec

from support import store

BASE = int(time.time()) - 86400


async def all_pages(client: Any, url: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = (await client.get(url, params={**params, **({"cursor": cursor} if cursor
                                                           else {})})).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_history_pages_cover_the_range_exactly_once(client, device):
    await store(client, [{"device": device, "timestamp": BASE + i, "hr": i, "rr": i % 3}
                        for i in range(250)])
    items = await all_pages(client, f"/v1/devices/{device}/readings", limit=40)
    assert [i["metrics"]["hr"] for i in items] == [float(i) for i in range(250)]
    backwards = await all_pages(client, f"/v1/devices/{device}/readings", limit=33,
                                order="desc")
    assert backwards == items[::-1]


async def test_pages_stay_exact_while_data_arrives(client, device):
    await store(client, [{"device": device, "timestamp": BASE + 2 * i, "hr": i}
                        for i in range(100)])
    first = (await client.get(f"/v1/devices/{device}/readings", params={"limit": 50})).json()
    # New readings arrive in the part already read and in the part still to come.
    await store(client, [{"device": device, "timestamp": BASE + 1, "hr": -1},
                        {"device": device, "timestamp": BASE + 151, "hr": -2}])
    rest = await all_pages(client, f"/v1/devices/{device}/readings", limit=50,
                           cursor=first["next_cursor"])
    seen = [i["timestamp"] for i in first["items"] + rest]
    assert len(seen) == len(set(seen)) == 101  # nothing repeated, the later arrival included
    assert seen == sorted(seen)


async def test_history_range_is_half_open_and_filters_metrics(client, device):
    await store(client, [{"device": device, "timestamp": BASE + i, "hr": i, "spo2": 90 + i}
                        for i in range(10)])
    await store(client, {"device": device, "timestamp": BASE + 5.5, "note": "attribute only"})
    items = (await client.get(f"/v1/devices/{device}/readings", params={
        "from": BASE + 2, "to": BASE + 6, "metrics": "spo2"})).json()["items"]
    assert [i["metrics"] for i in items] == [{"spo2": 92.0}, {"spo2": 93.0}, {"spo2": 94.0},
                                             {"spo2": 95.0}]
    everything = (await client.get(f"/v1/devices/{device}/readings", params={
        "from": BASE + 5, "to": BASE + 6})).json()["items"]
    assert [i["attributes"] for i in everything] == [{}, {"note": "attribute only"}]


async def test_ndjson_export_streams_the_whole_range(client, device):
    await store(client, [{"device": device, "timestamp": BASE + i, "hr": i} for i in range(2500)])
    response = await client.get(f"/v1/devices/{device}/readings",
                                headers={"accept": "application/x-ndjson"})
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [msgspec.json.decode(line) for line in response.content.splitlines()]
    assert [line["metrics"]["hr"] for line in lines] == [float(i) for i in range(2500)]


async def test_csv_export_has_a_header_and_a_row_per_reading(client, device):
    await store(client, [{"device": device, "timestamp": BASE, "hr": 60, "spo2": 97},
                        {"device": device, "timestamp": BASE + 1, "hr": 61, "pos": "supine"}])
    response = await client.get(f"/v1/devices/{device}/readings", params={"from": BASE},
                                headers={"accept": "text/csv"})
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["timestamp", "hr", "spo2", "attributes"]
    assert rows[1][1:] == ["60.0", "97.0", ""]
    assert rows[2][1:] == ["61.0", "", '{"pos":"supine"}']


async def test_unknown_device_is_404(client):
    assert (await client.get("/v1/devices/nobody-here/latest")).status_code == 404
    assert (await client.get("/v1/devices/nobody-here/readings")).status_code == 404


async def test_device_list_by_prefix_and_cursor(client, device):
    names = [f"{device}-{i:02d}" for i in range(25)]
    await store(client, [{"device": n, "timestamp": BASE, "hr": 1} for n in names])
    listed = await all_pages(client, "/v1/devices", prefix=f"{device}-", limit=10)
    assert [i["device"] for i in listed] == names


async def test_bulk_latest_by_ids_skips_unknown(client, device):
    await store(client, [{"device": f"{device}-a", "timestamp": BASE, "hr": 1},
                        {"device": f"{device}-b", "timestamp": BASE, "hr": 2}])
    response = await client.get("/v1/latest", params={
        "device": [f"{device}-a", f"{device}-b", f"{device}-nope"]})
    items = response.json()["items"]
    assert [(i["device"], i["metrics"]["hr"]["value"]) for i in items] == [
        (f"{device}-a", 1.0), (f"{device}-b", 2.0)]


async def test_bad_query_parameters_are_422(client, device):
    await store(client, {"device": device, "timestamp": BASE, "hr": 1})
    for params in ({"from": "soon"}, {"limit": "0"}, {"order": "sideways"},
                   {"cursor": "!!!"}):
        response = await client.get(f"/v1/devices/{device}/readings", params=params)
        assert response.status_code == 422, params


async def test_compat_post_and_get(client, device):
    response = await client.post("/vital-data", content=msgspec.json.encode(
        [{"device": f"{device}-x", "timestamp": BASE, "heartRateValue": 50},
         {"device": f"{device}-y", "timestamp": BASE + 5, "heartRateValue": 90}]),
        headers={"content-type": "application/json"})
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    bad = await client.post("/vital-data", content=b'{"device": ""}',
                            headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["status"] == "error"
    assert bad.json()["message"] == "Invalid payload"
    assert bad.json()["issues"]

    page = (await client.get("/vital-data", params={
        "sortBy": "heartRateValue", "orderBy": "desc", "count": 100})).json()
    assert page["total"] >= 2
    ours = [r for r in page["resources"] if r["deviceId"].startswith(device)]
    assert [(r["deviceId"], r["heartRateValue"], r["lastUpdated"]) for r in ours] == [
        (f"{device}-y", 90.0, BASE + 5), (f"{device}-x", 50.0, BASE)]
    assert (await client.get("/vital-data", params={"count": 101})).status_code == 400
