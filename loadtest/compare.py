"""A/B a setting or a code change under one kind of load, rounds interleaved.

    python loadtest/compare.py KIND [--rounds N] [--seconds S] VARIANT VARIANT ...

KIND is single, batch, noop, latest or latest100 (as in bench.py; profile.py takes the same).
A VARIANT is a label and environment assignments for its service, e.g.
`w1:VITALSTORE_WRITER_CONNECTIONS=1` or `old:PYTHONPATH=/tmp/old/src` (another copy of the
code: PYTHONPATH wins over the editable install). `SQL=...` is not an environment variable:
it gives the variant a scratch database of its own with that SQL applied after migrating (a
schema proposal, e.g. `ff50:SQL=ALTER TABLE latest SET (fillfactor = 50)`). Other variants
share one scratch database. Rounds alternate A B A B ..., so load from elsewhere on the
machine hits all alike. Prints the median req/s (and rows/s for batch) and p99 of each variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.parse

import asyncpg

import asyncload
import harness
from harness import RESULTS, ScratchDatabase, Service, log

LOADS = {
    # kind: (script, connections, readings per request)
    "noop": ("post_readings.lua", 64, 1),
    "single": ("post_readings.lua", 64, 1),
    "batch": ("post_readings.lua", 16, 1000),
    "latest": ("get_paths.lua", 64, 0),
    "latest100": ("get_paths.lua", 64, 0),
}


async def seed(url: str, key: str) -> list[str]:
    devices = [f"read-{i:03d}" for i in range(100)]
    body = json.dumps([{"device": d, "timestamp": int(time.time()) - 60 + n,
                        "heartRateValue": 70 + n, "spo2": 97, "respiratoryRate": 14,
                        "temperature": 36.8} for n in range(5) for d in devices]).encode()
    conn = asyncload.Client(url, harness.auth_headers(key))
    status, _, answer = await conn.request("POST", "/v1/readings", body,
                                           {"Content-Type": "application/json"})
    await conn.close()
    if status != 202:
        raise RuntimeError(f"seeding failed: {status} {answer[:200]!r}")
    return devices


def wrk_load(kind: str, key: str, devices: list[str], prefix: str, base: int
             ) -> tuple[str, list[str], int]:
    """(wrk script, its arguments, connections) of a load of `kind` (reads: of `devices`)."""
    script, connections, per_request = LOADS[kind]
    if script == "get_paths.lua":
        paths = RESULTS / f"paths-{kind}.txt"
        if kind == "latest":
            paths.write_text("".join(f"/v1/devices/{d}/latest\n" for d in devices))
        else:
            query = urllib.parse.urlencode([("device", d) for d in devices])
            paths.write_text(f"/v1/latest?{query}\n")
        return script, [str(paths), key], connections
    path = "/bench/noop" if kind == "noop" else "/v1/readings"
    return script, [path, prefix, str(per_request), "1000", str(base), key], connections


async def apply_sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(LOADS))
    parser.add_argument("variants", nargs="+", help="label:VAR=value[:VAR=value...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    wrk = harness.ensure_wrk()
    if wrk is None:
        raise SystemExit("compare.py needs wrk")
    per_request = LOADS[args.kind][2]
    db = asyncio.run(ScratchDatabase("compare").create())
    databases = [db]
    services: dict[str, Service] = {}
    results: dict[str, list[harness.LoadResult]] = {}
    try:
        key = harness.api_key(db.url)
        for spec in args.variants:
            label, *assignments = spec.split(":")
            env = {"VITALSTORE_BENCH_ROUTES": "true",
                   **dict(a.split("=", 1) for a in assignments)}
            url = db.url
            if "SQL" in env:
                own = asyncio.run(ScratchDatabase(f"compare_{label}").create())
                databases.append(own)
                asyncio.run(apply_sql(own.url, env.pop("SQL")))
                url = own.url
            services[label] = Service(url, env=env, name=f"compare-{label}").start()
            results[label] = []
        devices = [asyncio.run(seed(service.url, key)) for service in services.values()].pop()
        base = int(time.time()) - 3 * 3600
        for round_number in range(args.rounds + 1):  # round 0 warms up
            for label, service in services.items():
                script, wrk_args, connections = wrk_load(
                    args.kind, key, devices, f"{label}{round_number}-", base)
                result = harness.run_wrk(wrk, service.url, script, wrk_args,
                                         seconds=args.seconds if round_number else 2,
                                         connections=connections)
                if round_number:
                    results[label].append(result)
                    log(f"round {round_number} {label}: {result.rps:,.0f} req/s,"
                        f" p99 {result.p99_ms:.1f} ms, errors {result.errors}")
    finally:
        for service in services.values():
            service.stop()
        for database in databases:
            asyncio.run(database.drop())
    print(f"\n{args.kind}, {args.rounds} rounds of {args.seconds:g} s, median:")
    for label, runs in results.items():
        rps = statistics.median(r.rps for r in runs)
        rows = f", {rps * per_request * 4:,.0f} rows/s" if per_request > 1 else ""
        print(f"  {label:<24}{rps:>10,.0f} req/s{rows}, p50"
              f" {statistics.median(r.p50_ms for r in runs):.1f} ms, p99"
              f" {statistics.median(r.p99_ms for r in runs):.1f} ms")


if __name__ == "__main__":
    main()
