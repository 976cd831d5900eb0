"""The service refuses to start where a commit would not survive a crash.

`synchronous_commit = off` is set on this test module's own database only (fsync cannot be
set per database; it goes through the same check).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from litestar.testing import AsyncTestClient

from vitalstore.app import create_app
from vitalstore.database import NotDurable
from vitalstore.settings import Settings

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
async def not_durable_db(db_url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    return db_url


def test_serve_refuses_to_start_with_synchronous_commit_off(not_durable_db):
    env = {**os.environ, "VITALSTORE_DATABASE_URL": not_durable_db, "VITALSTORE_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "vitalstore.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "synchronous_commit=off" in done.stderr
    assert "acknowledged readings could be lost in a crash" in done.stderr
    assert "refuses to start" in done.stderr


async def test_the_app_itself_refuses_too(not_durable_db):
    # For an ASGI server other than `vitalstore serve`: the lifespan checks again.
    # (The test client's task group wraps the startup error.)
    with pytest.RaisesGroup(pytest.RaisesExc(NotDurable, match="synchronous_commit=off"),
                            flatten_subgroups=True):
        async with AsyncTestClient(create_app(Settings(database_url=not_durable_db))):
            pass
