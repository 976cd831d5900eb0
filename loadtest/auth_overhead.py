"""What access control costs per request. Prints figures; asserts nothing.

1. In process: one check of a cached key by the middleware's KeyStore (header scan, SHA-256,
   dict lookup, scope), against what a Litestar guard would cost before doing any work (Litestar
   copies the route handler for every guard call).
2. With `--wrk`: the no-op POST (`/bench/noop`, one reading) under granian and wrk, with
   VITALSTORE_AUTH=required (sending a key) and =disabled, alternating runs.

    .venv/bin/python loadtest/auth_overhead.py [--wrk] [--port 8400] [--seconds 10]

VITALSTORE_DATABASE_URL names a database at head (`vitalstore db upgrade`); a key is created
for the run and revoked at its end. On a shared machine, say so next to the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from vitalstore import keys
from vitalstore.app import create_app
from vitalstore.auth import KeyStore
from vitalstore.settings import Settings

CALLS = 200_000


async def per_call(settings: Settings, key: str) -> float:
    """Microseconds per KeyStore.authorize of a cached key."""
    pool = await asyncpg.create_pool(settings.asyncpg_dsn, min_size=1, max_size=2)
    try:
        store = KeyStore(pool, settings)
        scope: Any = {
            "method": "POST", "path": "/bench/noop", "client": ("127.0.0.1", 5000),
            "headers": [(b"host", b"127.0.0.1:8400"), (b"user-agent", b"wrk"),
                        (b"content-type", b"application/json"), (b"content-length", b"80"),
                        (b"authorization", f"Bearer {key}".encode())],
        }
        await store.authorize(scope, "ingest")
        start = time.perf_counter()
        for _ in range(CALLS):
            await store.authorize(scope, "ingest")
        return (time.perf_counter() - start) / CALLS * 1e6
    finally:
        await pool.close()


def guard_copy_cost(settings: Settings) -> float:
    """Microseconds Litestar spends copying the route handler for one guard call."""
    app = create_app(msgspec.structs.replace(settings, bench_routes=True))
    handler = next(h for route in app.routes if route.path == "/bench/noop"
                   for h in getattr(route, "route_handlers", []) if "POST" in h.http_methods)
    return timeit.timeit(lambda: copy.copy(handler), number=50_000) / 50_000 * 1e6


def wrk_noop(settings: Settings, key: str, auth: str, port: int, seconds: int) -> float:
    """Requests per second of the no-op POST with VITALSTORE_AUTH=`auth`."""
    env = {**os.environ, "VITALSTORE_DATABASE_URL": settings.database_url,
           "VITALSTORE_PORT": str(port), "VITALSTORE_BENCH_ROUTES": "true",
           "VITALSTORE_AUTH": auth}
    server = subprocess.Popen([sys.executable, "-m", "vitalstore.cli", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        reading = (f'{{"device": "bench-auth", "timestamp": {int(time.time()) - 60},'
                   f' "hr": 72, "spo2": 98, "sys": 120, "dia": 80}}')
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(f"wrk.method = 'POST'\nwrk.body = '{reading}'\n"
                         "wrk.headers['Content-Type'] = 'application/json'\n"
                         f"wrk.headers['Authorization'] = 'Bearer {key}'\n")
        try:
            out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", script.name,
                                  url + "/bench/noop"], capture_output=True, text=True,
                                 check=True).stdout
        finally:
            Path(script.name).unlink()
        non_2xx = [line for line in out.splitlines() if "Non-2xx" in line]
        if non_2xx:
            raise SystemExit(f"no-op POST failed: {non_2xx[0]}")
        return float(next(line for line in out.splitlines()
                          if line.startswith("Requests/sec")).split()[1])
    finally:
        server.terminate()
        server.wait(30)


async def with_key(settings: Settings, create: bool, key: str = "") -> str:
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        if create:
            key, _ = await keys.create(conn, f"bench-auth-{uuid.uuid4().hex[:6]}", ["ingest"])
        else:
            found = await keys.find(conn, keys.digest(key))
            if isinstance(found, keys.ApiKey):
                await keys.revoke(conn, found.name)
        return key
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrk", action="store_true", help="also the end-to-end no-op POST")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    settings = Settings.from_env()
    key = asyncio.run(with_key(settings, create=True))
    try:
        print(f"cached key check (KeyStore.authorize): {asyncio.run(per_call(settings, key)):.2f}"
              " us per request")
        print(f"Litestar guard call, handler copy alone: {guard_copy_cost(settings):.2f}"
              " us per request")
        if args.wrk:
            for auth in ("required", "disabled", "required", "disabled"):
                rate = wrk_noop(settings, key, auth, args.port, args.seconds)
                print(f"no-op POST, VITALSTORE_AUTH={auth:8}: {rate:8.0f} req/s"
                      " (wrk -t2 -c64, one granian worker)")
    finally:
        asyncio.run(with_key(settings, create=False, key=key))


if __name__ == "__main__":
    main()
