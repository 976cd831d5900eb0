"""`make bench`: vitalstore side by side with its references, in one run on one machine.

Starts the service (with its bench-only no-op routes) on a scratch database, measures each
figure next to its reference, writes loadtest/results/bench.json and prints a table:

  no-op POST            / single-reading durable POST (4 metrics)   req/s, p50, p99
  COPY ceiling          / batch POST (1,000 readings of 4 metrics)  rows/s
  no-op GET             / GET /v1/devices/{id}/latest; GET /v1/latest for 100 devices
  time_bucket over raw  / GET /v1/devices/{id}/aggregates, 30 days hourly (ms)
  naive baseline        / single-reading durable POST                req/s
  batch without rollups / batch with rollups                         rows/s
  mixed: 32 connections of single POSTs, alone and beside 4 of 1,000-reading batches
  peak RSS of the service

The load generator (wrk, else a Python asyncio client) runs on the same machine and shares
its cores with the service and PostgreSQL. Environment: BENCH_DURATION (seconds per phase,
default 10), BENCH_WORKERS (the service's worker processes, default 1), BENCH_AGG_DAYS (30),
BENCH_PORT (8600), VITALSTORE_API_KEY, BENCH_KEEP_DB=1 (keep the scratch database).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

import asyncload
import harness
from harness import METRICS, RESULTS, LoadResult, ScratchDatabase, Service, log
from report import bench_tables
from vitalstore.database import EPOCH_UNIX_S
from vitalstore.writer import Rows, init_writer_connection, write

DURATION = float(os.environ.get("BENCH_DURATION", "10"))
WARMUP = max(1.0, min(3.0, DURATION / 4))
AGG_DAYS = int(os.environ.get("BENCH_AGG_DAYS", "30"))
DEVICES_PER_THREAD = 1000
BATCH_READINGS = 1000
# 5,000 readings of 4 metrics: the rows of one full flush (VITALSTORE_FLUSH_MAX_READINGS).
COPY_BATCH_ROWS = 20_000

WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
# The mixed phase: bedside monitors (single POSTs) beside wearables uploading big batches.
MIXED_SINGLE_CONNECTIONS = 32
MIXED_BATCH_CONNECTIONS = 4

GOALS = {
    # ratio: (comparison, bound)
    "single_vs_noop": (">=", 0.5),
    "batch_vs_copy": (">=", 0.6),
    "latest_vs_noop_get": (">=", 0.35),
    "rollup_speedup": (">=", 100.0),
    "rollup_ingest_cost": ("<=", 0.35),
    "vs_naive": (">=", 5.0),
    "mixed_single_p99_ms": ("<=", 100.0),
    "mixed_batch_kept": (">=", 0.5),
}


def _reading(prefix: str, n: int, base: int) -> bytes:
    """The reading post_readings.lua sends as its n-th (the asyncio fallback's twin)."""
    return (
        f'{{"device":"{prefix}{n % DEVICES_PER_THREAD}",'
        f'"timestamp":{base + n // DEVICES_PER_THREAD},"heartRateValue":{60 + (n * 7) % 40},'
        f'"spo2":{94 + n % 6},"respiratoryRate":{12 + n % 9},'
        f'"temperature":{36.4 + (n % 12) / 10:.1f}}}'
    ).encode()


class Bench:
    def __init__(self) -> None:
        self.wrk = harness.ensure_wrk()
        self.key = ""
        self.base = int(time.time()) - 3 * 3600
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        if self.wrk is None:
            self.notes.append("wrk not available: the Python asyncio client generated the load"
                              " (it takes more CPU from the service than wrk would)")

    # -- load ----------------------------------------------------------------------------

    async def _post(self, url: str, path: str, prefix: str, per_request: int,
                    connections: int, seconds: float) -> LoadResult:
        if self.wrk is not None:
            return await asyncio.to_thread(
                harness.run_wrk, self.wrk, url, "post_readings.lua",
                [path, prefix, str(per_request), str(DEVICES_PER_THREAD), str(self.base),
                 self.key],
                seconds=seconds, connections=connections)
        headers = {"Content-Type": "application/json", **harness.auth_headers(self.key)}

        def factory(i: int) -> tuple[str, str, bytes]:
            first = i * per_request
            items = [_reading(f"{prefix}0-", first + j, self.base) for j in range(per_request)]
            body = items[0] if per_request == 1 else b"[" + b",".join(items) + b"]"
            return "POST", path, body

        return await asyncload.load(url, factory, seconds=seconds, connections=connections,
                                    headers=headers)

    async def post(self, url: str, path: str, prefix: str, per_request: int,
             connections: int) -> LoadResult:
        """Warm up (other devices), then measure for BENCH_DURATION seconds."""
        await self._post(url, path, f"warm-{prefix}", per_request, connections, WARMUP)
        result = await self._post(url, path, prefix, per_request, connections, DURATION)
        log(f"  {path} x{per_request} c{connections}: {result.rps:,.0f} req/s,"
            f" p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, errors {result.errors}")
        return result

    async def get(self, url: str, name: str, paths: list[str],
                  connections: int = 64) -> LoadResult:
        paths_file = RESULTS / f"paths-{name}.txt"
        paths_file.write_text("\n".join(paths) + "\n")

        async def run(seconds: float) -> LoadResult:
            if self.wrk is not None:
                return await asyncio.to_thread(
                    harness.run_wrk, self.wrk, url, "get_paths.lua",
                    [str(paths_file), self.key], seconds=seconds, connections=connections)
            return await asyncload.load(
                url, lambda i: ("GET", paths[i % len(paths)], b""), seconds=seconds,
                connections=connections, headers=harness.auth_headers(self.key))

        await run(WARMUP)
        result = await run(DURATION)
        paths_file.unlink()
        log(f"  GET {name} c{connections}: {result.rps:,.0f} req/s,"
            f" p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, errors {result.errors}")
        return result

    # -- phases --------------------------------------------------------------------------

    async def ingest_phases(self, service: Service) -> None:
        log("no-op POST vs single durable POST")
        noop = await self.post(service.url, "/bench/noop", "noop-", 1, 64)
        self.figures["noop_post"] = noop.as_dict()
        single = await self.post(service.url, "/v1/readings", "single-", 1, 64)
        self.figures["single_post"] = single.as_dict()
        log("batch POST (1,000 readings of 4 metrics)")
        self.figures["batch_post"] = self._batch_figure(
            await self.post(service.url, "/v1/readings", "batch-", BATCH_READINGS, 16))

    def _batch_figure(self, result: LoadResult) -> dict[str, Any]:
        rows = result.rps * BATCH_READINGS * len(METRICS)
        return {**result.as_dict(), "rows_per_s": round(rows),
                "readings_per_s": round(rows / len(METRICS))}

    async def mixed_phase(self, service: Service) -> dict[str, Any]:
        """Single POSTs alone, batches alone, then both at once (new keys, none late)."""
        log(f"mixed: {MIXED_SINGLE_CONNECTIONS} connections of single POSTs beside"
            f" {MIXED_BATCH_CONNECTIONS} of {BATCH_READINGS:,}-reading batches")
        url, path = service.url, "/v1/readings"
        await self._post(url, path, "warm-mixed-", 1, MIXED_SINGLE_CONNECTIONS, WARMUP)
        single = await self._post(url, path, "msingle-", 1, MIXED_SINGLE_CONNECTIONS, DURATION)
        batch = await self._post(url, path, "mbatch-", BATCH_READINGS, MIXED_BATCH_CONNECTIONS,
                                 DURATION)
        mixed_single, mixed_batch = await asyncio.gather(
            self._post(url, path, "mxsingle-", 1, MIXED_SINGLE_CONNECTIONS, DURATION),
            self._post(url, path, "mxbatch-", BATCH_READINGS, MIXED_BATCH_CONNECTIONS,
                       DURATION))
        figure = {"single_alone": single.as_dict(), "batch_alone": self._batch_figure(batch),
                  "single_mixed": mixed_single.as_dict(),
                  "batch_mixed": self._batch_figure(mixed_batch)}
        for name, result in (("single alone", single), ("batch alone", batch),
                             ("single mixed", mixed_single), ("batch mixed", mixed_batch)):
            log(f"  {name}: {result.rps:,.1f} req/s, p50 {result.p50_ms:.1f} ms,"
                f" p99 {result.p99_ms:.1f} ms, errors {result.errors}")
        return figure

    async def copy_ceiling(self, db_url: str, *, rollups: bool) -> dict[str, Any]:
        """Binary COPY of fresh unique rows from one asyncpg connection, triggers firing."""
        conn = await asyncpg.connect(db_url)
        try:
            await init_writer_connection(conn)
            if not rollups:
                await conn.execute("SET vitalstore.rollups = off")
            tag = "copy" if rollups else "copynr"
            devices = await harness.ensure_names(
                conn, "devices", [f"{tag}-{i}" for i in range(DEVICES_PER_THREAD)])
            metrics = await harness.ensure_names(conn, "metrics", list(METRICS))
            ticks = COPY_BATCH_ROWS // (len(devices) * len(metrics))
            base_us = (self.base - EPOCH_UNIX_S) * 1_000_000
            rows = 0
            spent = 0.0
            batches = 0
            tick = 0
            warmup = 3  # untimed batches: the first ones create chunks and warm caches
            while spent < DURATION:
                records = [(device, metric, base_us + (tick + t) * 1_000_000, 60.0 + t)
                           for t in range(ticks) for device in devices for metric in metrics]
                tick += ticks
                began = time.perf_counter()
                await conn.copy_records_to_table(
                    "readings", records=records,
                    columns=["device_id", "metric_id", "ts", "value"])
                elapsed = time.perf_counter() - began
                if warmup:
                    warmup -= 1
                    continue
                batches += 1
                rows += len(records)
                spent += elapsed
            figure = {"rows_per_s": round(rows / spent), "batch_rows": COPY_BATCH_ROWS,
                      "batches": batches, "seconds": round(spent, 2), "rollups": rollups}
            if rollups:
                kept = await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM rollup_1h WHERE device_id = $1)"
                    " OR EXISTS (SELECT FROM rollup_pending WHERE device_id = $1)", devices[0])
                if not kept:
                    self.notes.append("COPY did not fire the rollup trigger: ceiling is raw")
        finally:
            await conn.close()
        log(f"  COPY ceiling (rollups {'on' if rollups else 'off'}):"
            f" {figure['rows_per_s']:,} rows/s")
        return figure

    async def rollup_level_costs(self, db_url: str) -> dict[str, Any]:
        """What each rollup level adds to a flush, timed in the database alone.

        The trigger function is swapped, in this scratch database only, for copies of itself
        without the upserts of some levels; `write_batch` is then timed for the flush of 32
        single POSTs (32 devices) and for a full flush of batches (5,000 readings, 1,000
        devices), variants interleaved.
        """
        conn = await asyncpg.connect(db_url)
        original = await conn.fetchval(
            "SELECT pg_get_functiondef('readings_after_insert'::regproc)")
        upserts = {m.group(1): m.group(0) for m in re.finditer(
            r"INSERT INTO (rollup_\w+)\b.*?;", original, flags=re.DOTALL)}
        if not upserts:
            await conn.close()
            return {"skipped": "no rollup upserts found in readings_after_insert()"}
        levels = list(upserts)
        variants = {"none": (levels, "off")}
        for count in range(1, len(levels) + 1):
            dropped = levels[count:]
            variants["+".join(levels[:count])] = (dropped, "on")
        try:
            await init_writer_connection(conn)
            devices = await harness.ensure_names(
                conn, "devices", [f"lvl-{i}" for i in range(DEVICES_PER_THREAD)])
            metrics = await harness.ensure_names(conn, "metrics", list(METRICS))
            shapes = {"flush_32_singles": (32, 32), "flush_5000_batch": (5000, 1000)}
            tick = [0]
            base_us = (self.base - EPOCH_UNIX_S) * 1_000_000

            def flush(readings: int, spread: int) -> Rows:
                rows = Rows(readings=readings)
                for k in range(readings):
                    device = devices[(tick[0] * 37 + k) % spread]
                    ts = base_us + (tick[0] * readings + k) // spread * 1_000_000 + k % spread
                    for metric in metrics:
                        rows.device.append(device)
                        rows.metric.append(metric)
                        rows.ts.append(ts)
                        rows.value.append(70.0)
                tick[0] += 1
                return rows

            samples: dict[str, dict[str, list[float]]] = {
                v: {shape: [] for shape in shapes} for v in variants}
            for _ in range(3):  # rounds: variants interleaved, a block of calls each
                for variant, (dropped, setting) in variants.items():
                    body = original
                    for level in dropped:
                        body = body.replace(upserts[level], "")
                    await conn.execute(body)
                    await conn.execute(f"SET vitalstore.rollups = {setting}")
                    for shape, (readings, spread) in shapes.items():
                        calls = 12 if readings < 100 else 3
                        for attempt in range(calls + 1):
                            rows = flush(readings, spread)
                            began = time.perf_counter()
                            await write(conn, rows)
                            if attempt:  # the first call after the swap plans again
                                samples[variant][shape].append(
                                    (time.perf_counter() - began) * 1000)
        finally:
            await conn.execute(original)
            await conn.close()
        figure: dict[str, Any] = {}
        for variant, by_shape in samples.items():
            figure[variant] = {shape: round(statistics.median(ms), 2)
                               for shape, ms in by_shape.items()}
        log("  rollup levels, ms per flush: " + "; ".join(
            f"{v} {f['flush_32_singles']:.1f} / {f['flush_5000_batch']:.0f}"
            for v, f in figure.items()))
        return {"ms_per_flush": figure, "levels": levels}

    async def read_phases(self, service: Service, db_url: str) -> None:
        log("no-op GET vs latest")
        devices = [f"read-{i:03d}" for i in range(100)]
        items = []
        for n in range(10):
            for device in devices:
                items.append(json.dumps({"device": device, "timestamp": self.base + n,
                                         **{name: low + n for name, (low, _) in
                                            METRICS.items()}}).encode())
        body = b"[" + b",".join(items) + b"]"
        conn = asyncload.Client(service.url, harness.auth_headers(self.key))
        status, _, answer = await conn.request("POST", "/v1/readings", body,
                                               {"Content-Type": "application/json"})
        await conn.close()
        if status != 202:
            raise RuntimeError(f"seeding the read devices failed: {status} {answer[:300]!r}")
        # The ingest phases left `latest` with many dead rows and no statistics (autovacuum
        # has not reached a minute-old database; in steady state it visits a table this hot
        # every minute or so). Unanalyzed, GET /v1/latest of 100 devices was measured 11x
        # slower (a sequential scan of `latest`): read the tables as autovacuum keeps them.
        db = await asyncpg.connect(db_url)
        try:
            await db.execute("VACUUM ANALYZE devices, metrics, latest")
        finally:
            await db.close()
        self.notes.append("devices, metrics and latest were vacuumed and analyzed before the"
                          " read phases (as autovacuum keeps them in steady state)")
        self.figures["noop_get"] = (await self.get(service.url, "noop",
                                                   ["/bench/noop"])).as_dict()
        self.figures["latest_get"] = (await self.get(
            service.url, "latest", [f"/v1/devices/{d}/latest" for d in devices])).as_dict()
        query = urllib.parse.urlencode([("device", d) for d in devices])
        self.figures["latest_100_get"] = (await self.get(
            service.url, "latest-100", [f"/v1/latest?{query}"])).as_dict()

    async def aggregates_phase(self, service: Service, db_url: str) -> dict[str, Any]:
        """30 days of one device at 1 reading/s: time_bucket over raw rows vs the endpoint."""
        end = (datetime.now(UTC) - timedelta(days=31)).replace(minute=0, second=0,
                                                               microsecond=0)
        start = end - timedelta(days=AGG_DAYS)
        device = "agg-1"
        log(f"aggregates: loading {AGG_DAYS} days of one device at 1 reading/s")
        db = await asyncpg.connect(db_url)
        try:
            with harness.timer() as load_time:
                rows = await harness.load_readings(db, [device], start, end,
                                                   timedelta(seconds=1), progress="  load")
            await db.execute("VACUUM ANALYZE readings")
            await db.execute("VACUUM ANALYZE rollup_1m, rollup_1h, rollup_1d")
            device_id = await db.fetchval("SELECT id FROM devices WHERE name = $1", device)
            raw_ms = []
            buckets = 0
            for attempt in range(4):
                began = time.perf_counter()
                buckets = len(await db.fetch(harness.RAW_HOURLY, device_id, start, end))
                if attempt:  # the first run reads the table into the cache
                    raw_ms.append((time.perf_counter() - began) * 1000)
        finally:
            await db.close()
        figure: dict[str, Any] = {
            "rows": rows, "days": AGG_DAYS, "load_s": round(load_time[0], 1),
            "load_rows_per_s": round(rows / load_time[0]), "buckets": buckets,
            "raw_time_bucket_ms": round(statistics.median(raw_ms), 1),
        }
        log(f"  raw time_bucket: {figure['raw_time_bucket_ms']:,.1f} ms ({buckets} rows)")
        # A connection opened after the long load: the server may close one left idle.
        conn = asyncload.Client(service.url, harness.auth_headers(self.key))
        try:
            query = urllib.parse.urlencode({"from": start.isoformat(), "to": end.isoformat(),
                                            "bucket": "1h"})
            path = f"/v1/devices/{device}/aggregates?{query}"
            status, _, answer = await conn.request("GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status} {answer[:300]!r}")
            items = len(json.loads(answer)["items"])
            samples = await asyncload.timed(conn, "GET", path, count=20)
        finally:
            await conn.close()
        figure.update({"endpoint_items": items, "endpoint_ms": round(
            statistics.median(samples), 2), "endpoint_p99_ms": round(max(samples), 2)})
        log(f"  aggregates endpoint: {figure['endpoint_ms']:.2f} ms ({items} items)")
        return figure

    # -- report --------------------------------------------------------------------------

    def ratios(self) -> dict[str, float | None]:
        f = self.figures

        def rate(name: str, key: str = "req_per_s") -> float | None:
            value = f.get(name, {}).get(key)
            return float(value) if value else None

        def div(a: float | None, b: float | None) -> float | None:
            return round(a / b, 3) if a is not None and b else None

        with_rollups = rate("batch_post", "rows_per_s")
        without = rate("batch_post_no_rollups", "rows_per_s")
        mixed = f.get("mixed", {})
        batch_alone = mixed.get("batch_alone", {}).get("rows_per_s")
        batch_mixed = mixed.get("batch_mixed", {}).get("rows_per_s")
        mixed_p99 = mixed.get("single_mixed", {}).get("p99_ms")
        return {
            "single_vs_noop": div(rate("single_post"), rate("noop_post")),
            "batch_vs_copy": div(with_rollups, rate("copy_ceiling", "rows_per_s")),
            "latest_vs_noop_get": div(rate("latest_get"), rate("noop_get")),
            "rollup_speedup": div(rate("aggregates", "raw_time_bucket_ms"),
                                  rate("aggregates", "endpoint_ms")),
            "rollup_ingest_cost": round(1 - with_rollups / without, 3)
            if with_rollups and without else None,
            "vs_naive": div(rate("single_post"), rate("naive_post")),
            "mixed_single_p99_ms": None if mixed_p99 is None else round(mixed_p99, 1),
            "mixed_batch_kept": div(batch_mixed, batch_alone),
        }


def goals(ratios: dict[str, float | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (op, bound) in GOALS.items():
        value = ratios.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"goal": f"{op} {bound:g}", "value": value, "met": met}
    return out


async def main() -> None:
    bench = Bench()
    RESULTS.mkdir(parents=True, exist_ok=True)
    db = await ScratchDatabase("bench").create()
    services: list[Service] = []
    try:
        bench.key = harness.api_key(db.url)
        machine = await harness.machine(db.url, bench.wrk)
        machine["duration_s_per_phase"] = DURATION
        machine["service_workers"] = WORKERS
        env = {"VITALSTORE_BENCH_ROUTES": "true", "VITALSTORE_WORKERS": str(WORKERS)}
        log(f"database {db.name}; phases of {DURATION:g} s; {WORKERS} worker(s); load generator"
            f" {machine['load_generator']}")

        service = Service(db.url, env=env, name="vitalstore").start()
        services.append(service)
        await bench.ingest_phases(service)
        bench.figures["mixed"] = await bench.mixed_phase(service)
        log("COPY ceiling, one asyncpg connection")
        bench.figures["copy_ceiling"] = await bench.copy_ceiling(db.url, rollups=True)
        bench.figures["copy_ceiling_no_rollups"] = await bench.copy_ceiling(db.url,
                                                                            rollups=False)
        log("rollup levels: write_batch with 0..3 levels, in the database alone")
        bench.figures["rollup_levels"] = await bench.rollup_level_costs(db.url)
        await bench.read_phases(service, db.url)
        service.stop()

        log("batch POST with rollup maintenance off (VITALSTORE_ROLLUPS=false)")
        no_rollups = Service(db.url, env={**env, "VITALSTORE_ROLLUPS": "false"},
                             name="vitalstore-no-rollups").start()
        services.append(no_rollups)
        bench.figures["batch_post_no_rollups"] = bench._batch_figure(
            await bench.post(no_rollups.url, "/v1/readings", "batchnr-", BATCH_READINGS, 16))
        no_rollups.stop()

        log("naive baseline: FastAPI + SQLAlchemy async ORM on uvicorn")
        naive = Service(db.url, env={"NAIVE_DATABASE_URL": db.url}, name="naive",
                        ready_path="/health", command=[
                            sys.executable, "-m", "uvicorn", "naive_app:app", "--app-dir",
                            str(harness.LOADTEST), "--host", "127.0.0.1", "--port", "{port}",
                            "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                            "--log-level", "warning"]).start()
        services.append(naive)
        bench.figures["naive_post"] = (await bench.post(naive.url, "/v1/readings", "naive-", 1,
                                                        64)).as_dict()
        naive.stop()

        reads = Service(db.url, env=env, name="vitalstore").start()
        services.append(reads)
        bench.figures["aggregates"] = await bench.aggregates_phase(reads, db.url)
        reads.stop()

        bench.figures["peak_rss_mb"] = {
            "service": round(max(service.peak_rss, reads.peak_rss) / 2**20, 1),
            "service_no_rollups": round(no_rollups.peak_rss / 2**20, 1),
            "naive": round(naive.peak_rss / 2**20, 1),
        }
        machine["cpu_idle_after_pct"] = harness.cpu_idle_percent()
        if min(machine["cpu_idle_before_pct"], machine["cpu_idle_after_pct"]) < 90:
            bench.notes.append(
                "the machine was not idle around the run (see cpu_idle_*_pct): other work"
                " shared the CPU, so absolute figures are low; ratios hold better")
    finally:
        for service in services:
            service.stop()
        await db.drop()

    ratios = bench.ratios()
    report = {"machine": machine, "figures": bench.figures, "ratios": ratios,
              "goals": goals(ratios), "notes": bench.notes}
    harness.write_report("bench.json", report, bench_tables(report))


if __name__ == "__main__":
    asyncio.run(main())
