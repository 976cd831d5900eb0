"""What operators see: Prometheus metrics, request ids, one JSON object per log line."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest

from support import NOW, post
from vitalstore import logs
from vitalstore.settings import Settings
from vitalstore.telemetry import SAMPLE_INTERVAL_S


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    labelled = r"\{" + re.escape(wanted) + r"\}" if labels else ""
    pattern = "^" + re.escape(name) + labelled + r" (\S+)$"
    found = re.search(pattern, metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def test_metrics_count_requests_readings_and_flushes(client, auth, device):
    before = (await client.get("/metrics", headers=auth)).text
    body = [{"device": device, "timestamp": NOW - i, "hr": 60 + i} for i in range(7)]
    assert (await post(client, body, auth)).status_code == 202
    assert (await post(client, {"device": device}, auth)).status_code == 422
    response = await client.get("/metrics", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("vitalstore_readings_accepted_total") == 7
    assert grew("vitalstore_http_requests_total", method="POST", route="/v1/readings",
                status="202") == 1
    assert grew("vitalstore_http_requests_total", method="POST", route="/v1/readings",
                status="422") == 1
    assert grew("vitalstore_flushes_total", outcome="ok") >= 1
    assert grew("vitalstore_flush_duration_seconds_count") >= 1
    assert grew("vitalstore_flush_readings_sum") >= 7
    for gauge in ("vitalstore_buffer_readings", "vitalstore_db_pool_in_use",
                  "vitalstore_db_pool_size"):
        assert re.search(rf"^{gauge} \S+$", after, re.M), gauge
    assert sample(after, "vitalstore_db_pool_size") >= 1


async def test_unmatched_routes_are_counted_under_one_label(client, auth):
    await client.get("/no/such/route/12345", headers=auth)
    metrics = (await client.get("/metrics", headers=auth)).text
    assert sample(metrics, "vitalstore_http_requests_total", method="GET", route="unmatched",
                  status="404") >= 1
    assert "/no/such/route" not in metrics


async def test_every_answer_carries_a_request_id(client, auth):
    generated = await client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{16}", generated.headers["x-request-id"])
    echoed = await client.get("/health", headers={"x-request-id": "abc-123.X:9"})
    assert echoed.headers["x-request-id"] == "abc-123.X:9"
    unmatched = await client.get("/nowhere", headers={"x-request-id": "from-client"})
    assert unmatched.status_code == 404
    assert unmatched.headers["x-request-id"] == "from-client"


@pytest.mark.parametrize("incoming", ["x" * 129, "spaces are not sane", "new\u00e9line", ""])
async def test_an_insane_request_id_is_replaced(client, incoming):
    response = await client.get("/health", headers={"x-request-id": incoming.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["x-request-id"])


async def test_metrics_of_all_workers_add_up(server_factory):
    server = server_factory(VITALSTORE_WORKERS="2", VITALSTORE_LOG_LEVEL="DEBUG")
    headers = server.headers
    requests = 40

    # A client (so a connection) each, so that the kernel spreads them over both workers.
    async def one(i: int) -> int:
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as own:
            return (await post(own, [{"device": f"mp-{i}", "timestamp": NOW, "hr": i},
                                     {"device": f"mp-{i}", "timestamp": NOW + 1, "hr": i}],
                               {})).status_code

    assert set(await asyncio.gather(*(one(i) for i in range(requests)))) == {202}
    await asyncio.sleep(SAMPLE_INTERVAL_S + 0.5)  # each worker publishes its counts that often
    scrapes = []
    for _ in range(6):
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as own:
            scrapes.append((await own.get("/metrics")).text)
    accepted = {sample(text, "vitalstore_readings_accepted_total") for text in scrapes}
    assert accepted == {2 * requests}  # whichever worker answers the scrape
    # (Both workers did take requests: the access log says which process answered.)
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    assert len({e["pid"] for e in entries if e["logger"] == "vitalstore.access"}) == 2
    pids = re.findall(r'pid="(\d+)"', "".join(scrapes))
    assert not pids  # summed over workers, not one series per process


async def test_logs_are_one_json_object_a_line_with_the_request_id(server_factory):
    server = server_factory(VITALSTORE_LOG_LEVEL="DEBUG")
    headers = server.headers
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        response = await client.post(
            "/v1/readings", content=b'{"device":"log-test","timestamp":' + str(NOW).encode()
            + b',"hr":1}', headers={"content-type": "application/json",
                                    "x-request-id": "trace-me-42"})
        assert response.status_code == 202
        assert response.headers["x-request-id"] == "trace-me-42"
    await asyncio.sleep(0.2)
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, granian's own included
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    mine = [e for e in entries if e.get("request_id") == "trace-me-42"]
    assert [e["message"].split(" ms ")[0].rsplit(" ", 1)[0] for e in mine] == [
        "POST /v1/readings 202"]
    assert any(e["logger"] == "_granian" for e in entries)


def test_text_logs_on_a_terminal_json_otherwise(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    assert logs.use_json(Settings(log_format="json"))
    assert not logs.use_json(Settings(log_format="text"))
    monkeypatch.setattr("sys.stderr", Terminal())
    assert not logs.use_json(Settings(log_format="auto"))
    record = logging.LogRecord("vitalstore.batcher", logging.ERROR, __file__, 1,
                               "flush of %d readings failed", (5,), None)
    token = logs.request_id.set("r-1")
    try:
        text = logs.TextFormatter().format(record)
        entry = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.request_id.reset(token)
    assert re.fullmatch(r"\S+Z ERROR   vitalstore.batcher \[r-1\] flush of 5 readings failed",
                        text)
    assert entry["message"] == "flush of 5 readings failed"
    assert entry["request_id"] == "r-1"
    assert entry["level"] == "ERROR"
