"""What access control costs per request. Prints figures; asserts nothing.

In process: one check of a cached key by the middleware's KeyStore (header scan, SHA-256,
dict lookup, scope), against what a Litestar guard would cost before doing any work (Litestar
copies the route handler for every guard call). End to end, the no-op POST with and without
keys is an A/B of compare.py:

    python loadtest/auth_overhead.py
    python loadtest/compare.py noop on:VITALSTORE_AUTH=required off:VITALSTORE_AUTH=disabled

VITALSTORE_DATABASE_URL names a database at head (`vitalstore db upgrade`); a key is created
for the run and revoked at its end. On a shared machine, say so next to the figures.
"""

from __future__ import annotations

import asyncio
import copy
import time
import timeit
import uuid
from typing import Any

import asyncpg
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
    settings = Settings.from_env()
    key = asyncio.run(with_key(settings, create=True))
    try:
        print(f"cached key check (KeyStore.authorize): {asyncio.run(per_call(settings, key)):.2f}"
              " us per request")
        print(f"Litestar guard call, handler copy alone: {guard_copy_cost(settings):.2f}"
              " us per request")
    finally:
        asyncio.run(with_key(settings, create=False, key=key))


if __name__ == "__main__":
    main()
