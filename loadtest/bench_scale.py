"""`make bench-scale`: how read and write latency grow with the data.

For each size (BENCH_SCALE_SIZES readings, default 1,000,000 then 20,000,000; 4 metrics
each, so 4 and 80 million rows) a fresh scratch database gets 1,000 devices each reporting
once a second (a bedside monitor's rate) up to the current hour, loaded with INSERT ...
SELECT (the trigger fills `latest` and the rollups as ingestion would). The rate is fixed,
so a bigger size reaches further back: 1,000 s per device at 1 million, 5.6 h at 20 million.
The 1-hour history page is then a full page (1,000 readings) at every size. Then, with the
service running, sequential requests on one keep-alive connection measure p50/p99 of:

  latest      GET /v1/devices/{id}/latest
  history     GET /v1/devices/{id}/readings, the newest hour (a page of 1,000)
  aggregate   GET /v1/devices/{id}/aggregates, 30 days by the hour (skipped without the route)
  raw bucket  the same aggregate with time_bucket over the raw rows, in SQL (a reference)
  post        POST /v1/readings, one reading of 4 metrics (durable: answered after commit)

Writes loadtest/results/bench-scale.json and prints a table. Disk: see docs/performance.md
(measured bytes per reading are in the JSON). Environment: BENCH_SCALE_SIZES, BENCH_SCALE_DEVICES
(1000), BENCH_SCALE_INTERVAL_S (1), BENCH_SCALE_REQUESTS (200 per measure), BENCH_PORT,
VITALSTORE_API_KEY, BENCH_KEEP_DB.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

import asyncload
import harness
from harness import RESULTS, ScratchDatabase, Service, log
from report import scale_table

SIZES = [int(s) for s in os.environ.get("BENCH_SCALE_SIZES", "1000000,20000000").split(",")]
DEVICES = int(os.environ.get("BENCH_SCALE_DEVICES", "1000"))
INTERVAL = timedelta(seconds=float(os.environ.get("BENCH_SCALE_INTERVAL_S", "1")))
REQUESTS = int(os.environ.get("BENCH_SCALE_REQUESTS", "200"))
MONTH = timedelta(days=30)
READ_GOAL = 1.5  # every read at the largest size within 1.5 times its value at the smallest


HYPERTABLES = ("readings", "reading_attributes", "rollup_1m", "rollup_1h", "rollup_1d")


async def storage(db_url: str) -> dict[str, int]:
    """Bytes of every hypertable (with indexes), `latest`, the registry, and the database."""
    conn = await asyncpg.connect(db_url)
    try:
        sizes = {}
        for table in HYPERTABLES:
            sizes[table] = await conn.fetchval("SELECT hypertable_size($1::regclass)", table)
        for table in ("latest", "devices", "metrics"):
            sizes[table] = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)",
                                               table)
        sizes["all_tables"] = sum(sizes.values())
        sizes["database"] = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    return sizes


async def convert_all(db_url: str) -> float:
    """Every chunk of every hypertable to the columnstore, as the policy would once they are
    old (here also the newest, to read converted data); seconds taken."""
    conn = await asyncpg.connect(db_url)
    try:
        began = time.perf_counter()
        for table in HYPERTABLES:
            await conn.execute("SELECT count(compress_chunk(c, true)) FROM show_chunks($1) c",
                               table)
        elapsed = time.perf_counter() - began
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return elapsed


async def late_readings(service: Service, key: str | None, devices: list[str],
                        end: datetime, span: timedelta) -> dict[str, float]:
    """Late readings into converted chunks: 100-reading requests, each of one device, half a
    second after stored readings (new keys), sequential on one connection."""
    conn = asyncload.Client(service.url, harness.auth_headers(key))
    rng = random.Random(11)
    count = 0
    try:
        began = time.perf_counter()
        for index in range(20):
            device = devices[rng.randrange(len(devices))]
            first = end - span + timedelta(seconds=index * span.total_seconds() / 20 + 0.5)
            body = json.dumps([{"device": device, "timestamp": (first + timedelta(seconds=n))
                                .timestamp(), "heartRateValue": 70, "spo2": 97,
                                "respiratoryRate": 14, "temperature": 36.8}
                               for n in range(100)]).encode()
            status, _, answer = await conn.request("POST", "/v1/readings", body,
                                                {"Content-Type": "application/json"})
            if status != 202:
                raise RuntimeError(f"late POST: {status} {answer[:300]!r}")
            count += 100
        elapsed = time.perf_counter() - began
    finally:
        await conn.close()
    return {"readings": count, "seconds": round(elapsed, 2),
            "readings_per_s": round(count / elapsed)}


async def raw_bucket_ms(db_url: str, devices: list[str], start: datetime,
                        end: datetime) -> dict[str, float]:
    """time_bucket over one device's raw rows: what the aggregate would cost without rollups."""
    conn = await asyncpg.connect(db_url)
    try:
        ids = dict(await conn.fetch("SELECT name, id FROM devices WHERE name = ANY($1)",  # type: ignore[arg-type]
                                    devices))
        samples = []
        for index in range(min(REQUESTS, 50) + 3):
            began = time.perf_counter()
            await conn.fetch(harness.RAW_HOURLY, ids[devices[index % len(devices)]], start, end)
            if index >= 3:
                samples.append((time.perf_counter() - began) * 1000)
    finally:
        await conn.close()
    return asyncload.summary(samples)


async def measure(service: Service, key: str, devices: list[str], end: datetime
                  ) -> dict[str, Any]:
    conn = asyncload.Client(service.url, harness.auth_headers(key))
    rng = random.Random(7)
    picks = [rng.choice(devices) for _ in range(REQUESTS)]
    out: dict[str, Any] = {}
    try:
        async def series(name: str, path_of: Any, method: str = "GET",
                         body_of: Any = None, expect: int = 200,
                         headers: dict[str, str] | None = None) -> None:
            samples: list[float] = []
            for index, device in enumerate(picks):
                body = body_of(index, device) if body_of else b""
                samples += await asyncload.timed(
                    conn, method, path_of(device), body=body, count=1,
                    warmup=3 if index == 0 else 0, expect=expect,
                    headers={"Content-Type": "application/json"} if body else headers)
            out[name] = asyncload.summary(samples)

        await series("latest", lambda d: f"/v1/devices/{d}/latest")
        hour = urllib.parse.urlencode({"from": (end - timedelta(hours=1)).isoformat(),
                                       "to": end.isoformat()})
        await series("history_1h", lambda d: f"/v1/devices/{d}/readings?{hour}")
        _, _, page = await conn.request("GET", f"/v1/devices/{picks[0]}/readings?{hour}")
        out["history_1h"]["items"] = len(json.loads(page)["items"])
        month = urllib.parse.urlencode({"from": (end - MONTH).isoformat(),
                                        "to": end.isoformat(), "bucket": "1h"})
        await series("aggregate_30d", lambda d: f"/v1/devices/{d}/aggregates?{month}")
        _, _, answer = await conn.request("GET", f"/v1/devices/{picks[0]}/aggregates?{month}")
        out["aggregate_30d"]["items"] = len(json.loads(answer)["items"])
        now = int(time.time())

        def reading(index: int, device: str) -> bytes:
            return json.dumps({"device": device, "timestamp": now - index % 60,
                               "heartRateValue": 70 + index % 20, "spo2": 97,
                               "respiratoryRate": 14, "temperature": 36.8}).encode()

        everything = urllib.parse.urlencode({"to": end.isoformat()})
        await series("export_ndjson", lambda d: f"/v1/devices/{d}/readings?{everything}",
                     headers={"Accept": "application/x-ndjson"})
        await series("post", lambda d: "/v1/readings", "POST", reading, 202)
    finally:
        await conn.close()
    return out


async def one_size(size: int, key_env: str | None) -> dict[str, Any]:
    step = INTERVAL
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - step * (size // DEVICES)
    devices = [f"scale-{i:04d}" for i in range(DEVICES)]
    db = await ScratchDatabase("scale").create()
    try:
        conn = await asyncpg.connect(db.url)
        try:
            log(f"{size:,} readings: {DEVICES} devices, one reading every"
                f" {step.total_seconds():g} s for {(end - start).total_seconds() / 3600:.1f} h")
            with harness.timer() as load_time:
                rows = await harness.load_readings(conn, devices, start, end, step,
                                                   progress=f"  load {size:,}", noisy=True)
            with harness.timer() as vacuum_time:
                await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
        figure: dict[str, Any] = {
            "readings": rows // len(harness.METRICS), "rows": rows,
            "interval_s": step.total_seconds(), "span_h": round(
                (end - start).total_seconds() / 3600, 2), "load_s": round(load_time[0], 1),
            "load_rows_per_s": round(rows / load_time[0]),
            "vacuum_analyze_s": round(vacuum_time[0], 1), "bytes": await storage(db.url)}
        figure["bytes_per_reading"] = round(figure["bytes"]["database"] / figure["readings"])
        key = key_env or harness.api_key(db.url)
        with Service(db.url, name="vitalstore-scale") as service:
            figure["latency_ms"] = await measure(service, key, devices, end)
        figure["latency_ms"]["raw_time_bucket_30d"] = await raw_bucket_ms(
            db.url, devices[:50], end - MONTH, end)
        # The same, every chunk converted to the columnstore (the service stopped: with single
        # POSTs going on beside the conversion, two runs ended with the converting connection
        # terminated; not understood yet).
        seconds = await convert_all(db.url)
        converted_bytes = await storage(db.url)
        figure["columnstore"] = {
            "convert_s": round(seconds, 1), "values_per_s": round(rows / seconds),
            "bytes": converted_bytes,
            "bytes_per_value_rows": round(figure["bytes"]["all_tables"] / rows, 2),
            "bytes_per_value": round(converted_bytes["all_tables"] / rows, 2),
        }
        with Service(db.url, name="vitalstore-scale") as service:
            figure["latency_ms_converted"] = await measure(service, key, devices, end)
            figure["columnstore"]["late_readings"] = await late_readings(
                service, key, devices, end, end - start)
        log(f"  {size:,}: " + ", ".join(
            f"{name} p50 {v['p50_ms']:.2f} ms" for name, v in figure["latency_ms"].items()
            if "p50_ms" in v))
    finally:
        await db.drop()
    return figure


async def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("VITALSTORE_API_KEY")
    figures: dict[str, Any] = {}
    probe = await ScratchDatabase("scale_probe").create()
    try:
        machine = await harness.machine(probe.url, None)
    finally:
        await probe.drop()
    machine.pop("load_generator")
    machine["client"] = "sequential requests on one keep-alive connection (asyncio)"
    for size in SIZES:
        figures[str(size)] = await one_size(size, key)
    first, last = str(SIZES[0]), str(SIZES[-1])
    growth: dict[str, float] = {}
    for name in ("latest", "history_1h", "aggregate_30d", "raw_time_bucket_30d", "post"):
        a = figures[first]["latency_ms"].get(name, {}).get("p50_ms")
        b = figures[last]["latency_ms"].get(name, {}).get("p50_ms")
        if a and b:
            growth[name] = round(b / a, 2)
    reads = [growth[n] for n in ("latest", "history_1h", "aggregate_30d") if n in growth]
    report = {"machine": machine, "sizes": figures, "growth": growth,
              "goal": {"reads_within": READ_GOAL,
                       "met": all(g <= READ_GOAL for g in reads) if reads else None}}
    harness.write_report("bench-scale.json", report, scale_table(report))


if __name__ == "__main__":
    asyncio.run(main())
