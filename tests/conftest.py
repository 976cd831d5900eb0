"""Test fixtures: a real PostgreSQL with TimescaleDB, migrated once, a fresh database per module.

The template database is migrated with Alembic (never create_all); each test module gets a
copy of it, so tests whose writes commit through the service's own pool, other processes or a
kill -9 stay isolated without any cleanup.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from vitalstore import keys
from vitalstore.app import create_app
from vitalstore.database import alembic_config
from vitalstore.settings import Settings

ADMIN_URL = os.environ.get("VITALSTORE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[1]
# The load tools (one HTTP load client, one server launcher, one RSS sampler, one percentile)
# serve the benchmarks and the tests alike: tests import them from loadtest/.
sys.path.insert(0, str(ROOT / "loadtest"))
from harness import Service  # noqa: E402

RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _drop(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def template_db() -> AsyncIterator[str]:
    """A database migrated to head with Alembic, used only as a template."""
    from alembic import command

    name = f"vs_test_tmpl_{RUN_ID}"
    await _admin(f'CREATE DATABASE "{name}"')
    config = alembic_config(database_url(name).replace("postgresql://", "postgresql+asyncpg://"))
    # Alembic's env.py runs its own event loop: run it off this one.
    await asyncio.to_thread(command.upgrade, config, "head")
    # TimescaleDB's background workers must not hold connections to a template.
    await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    await _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    yield name
    await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    await _drop(name)


async def fresh_database(template: str) -> str:
    name = f"vs_test_{uuid.uuid4().hex[:12]}"
    for _ in range(50):
        try:
            await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            return name
        except asyncpg.ObjectInUseError:
            await asyncio.sleep(0.1)
    raise RuntimeError("template database stayed busy")


@pytest.fixture(scope="module")
async def db_url(template_db: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test module."""
    name = await fresh_database(template_db)
    yield database_url(name)
    await _drop(name)


@pytest.fixture(scope="module")
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, bench_routes=True)


@pytest.fixture(scope="module")
async def api_headers(db_url: str) -> dict[str, str]:
    """Headers with an API key of every scope, unbound, created in the module's database."""
    conn = await asyncpg.connect(db_url)
    try:
        key, _ = await keys.create(conn, f"test-admin-{uuid.uuid4().hex[:8]}", list(keys.SCOPES))
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def client(settings: Settings, api_headers: dict[str, str]
                 ) -> AsyncIterator[AsyncTestClient[Any]]:
    """The service in-process, lifespan included; requests carry `api_headers` by default."""
    async with AsyncTestClient(create_app(settings), timeout=30) as test_client:
        test_client.headers.update(api_headers)
        yield test_client


@pytest.fixture(scope="module")
async def admin_db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A module-wide connection (hypothesis tests cannot take function-scoped fixtures)."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def make_key(admin_db: asyncpg.Connection) -> Any:
    """Creates a key in the module's database; returns the key."""
    async def make(scopes: str, prefix: str | None = None) -> str:
        key, _ = await keys.create(admin_db, f"k-{uuid.uuid4().hex[:10]}",
                                   keys.parse_scopes(scopes), prefix)
        return key
    return make


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the module's database, to check what is really stored."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture
def device() -> str:
    """A device id no other test uses."""
    return f"dev-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server_factory(db_url: str, api_headers: dict[str, str]) -> Iterator[Any]:
    """Starts `vitalstore serve` on the module's database; `server.headers` carry a key.

    Its log is `server.log_path`; it is killed (SIGKILL) after the test.
    """
    servers: list[Service] = []

    def start(**env: str) -> Service:
        server = Service(db_url, env, name="server", port=free_port(), headers=dict(api_headers),
                         log_dir=ROOT / ".pytest_cache", log_level=None).start(timeout=20)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(graceful=False)


@pytest.fixture
def auth(api_headers: dict[str, str]) -> dict[str, str]:
    """A copy of `api_headers`, for a test to change."""
    return dict(api_headers)
