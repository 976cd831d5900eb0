"""What a new operator meets: the start line, the access log, keys at first start, CORS,
replicas migrating at once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
from litestar.testing import AsyncTestClient

from conftest import ADMIN_URL, ROOT, database_url, free_port
from harness import Service
from vitalstore.app import create_app
from vitalstore.database import schema_head

NOW = int(time.time()) - 60


def log_entries(server: Service) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log_path.read_text().splitlines()
            if line.strip()]

def start_server(db_url: str, headers: dict[str, str], **env: str) -> Service:
    """`vitalstore serve` at the service's own log level (INFO), log in .pytest_cache."""
    return Service(db_url, env, name="server", port=free_port(), headers=dict(headers),
                   log_dir=ROOT / ".pytest_cache", log_level=None).start(timeout=20)



def cli(db_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vitalstore.cli", *args],
                            env={**os.environ, "VITALSTORE_DATABASE_URL": db_url},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_service_says_at_start_what_it_runs_on(db_url, api_headers):
    with_password = db_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    server = start_server(with_password, api_headers, VITALSTORE_COMPAT_KEY_NAME="old-fleet")
    try:
        [start] = [e for e in log_entries(server) if e["message"].startswith("vitalstore ")]
    finally:
        server.stop(graceful=False)
    assert start["level"] == "INFO"
    name = db_url.rsplit("/", 1)[1]
    assert start["database"] == f"{name} on 127.0.0.1:5432"
    assert start["timescaledb"].endswith("(community edition)")
    assert (start["auth"], start["workers"], start["compat_key"]) == ("required", 1, "old-fleet")
    assert start["version"] in start["message"]
    assert "s3cret-pw" not in server.log_path.read_text()


def test_access_log_names_route_status_key_and_reason(db_url, api_headers):
    server = start_server(db_url, api_headers, VITALSTORE_ACCESS_LOG="true")
    key = api_headers["Authorization"].removeprefix("Bearer ")
    try:
        unknown = httpx.get(server.url + "/v1/devices/nobody/latest", headers=server.headers)
        assert unknown.status_code == 404
        wrong = httpx.get(server.url + "/v1/devices", headers={"Authorization": "Bearer abc"})
        assert wrong.status_code == 401
        time.sleep(0.3)
        entries = [e for e in log_entries(server) if e["logger"] == "vitalstore.access"]
        failures = [e for e in log_entries(server) if "authentication failed" in e["message"]]
    finally:
        server.stop(graceful=False)
    found = next(e for e in entries if e["status"] == 404)
    assert found["method"] == "GET"
    assert found["route"] == "/v1/devices/{device}/latest"
    assert found["key"].startswith("test-admin-")
    assert found["client"] == "127.0.0.1"
    assert found["reason"] == "unknown device 'nobody'"
    assert found["duration_ms"] >= 0
    refused = next(e for e in entries if e["status"] == 401)
    assert refused["key"] is None
    assert "invalid API key" in refused["reason"]
    # What was wrong with the key, never the key.
    assert "a key of 3 characters not starting with 'vs_'" in failures[0]["message"]
    assert key not in server.log_path.read_text()


def test_make_runs_key_is_printed_when_created_only(db_url, tmp_path):
    path = tmp_path / "admin.key"
    first = cli(db_url, "keys", "local-admin", "--file", str(path)).communicate(timeout=60)[0]
    key = path.read_text().strip()
    assert key in first
    again = cli(db_url, "keys", "local-admin", "--file", str(path)).communicate(timeout=60)[0]
    assert key not in again
    assert str(path) in again
    assert path.read_text().strip() == key


async def test_cors_preflight_allows_only_the_configured_origins(settings, api_headers):
    allowed, other = "https://ward.example", "https://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    browser = msgspec.structs.replace(settings, cors_origins=allowed)
    async with AsyncTestClient(create_app(browser), timeout=30) as service:
        answer = await service.options("/v1/readings", headers={"Origin": allowed, **preflight})
        assert answer.status_code == 204
        assert answer.headers["access-control-allow-origin"] == allowed
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        assert "POST" in answer.headers["access-control-allow-methods"]
        read = await service.get("/v1/devices", headers={"Origin": allowed, **api_headers})
        assert read.status_code == 200
        assert read.headers["access-control-allow-origin"] == allowed
        foreign = await service.options("/v1/readings", headers={"Origin": other, **preflight})
        assert "access-control-allow-origin" not in foreign.headers
    async with AsyncTestClient(create_app(settings), timeout=30) as service:
        answer = await service.options("/v1/readings", headers={"Origin": allowed, **preflight})
        assert "access-control-allow-origin" not in answer.headers


async def test_two_replicas_migrating_a_fresh_database_at_once(tmp_path: Path):
    name = f"vs_test_race_{uuid.uuid4().hex[:8]}"
    url = database_url(name)
    try:
        upgrades = [cli(url, "db", "upgrade") for _ in range(2)]
        outputs = [await asyncio.to_thread(p.communicate, timeout=180) for p in upgrades]
        assert [p.returncode for p in upgrades] == [0, 0], outputs
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == schema_head()
        finally:
            await conn.close()
        # Their first start: one admin key between them, printed once.
        files = [tmp_path / f"replica-{n}" / "admin.key" for n in range(2)]
        starts = [cli(url, "keys", "first-admin", "--file", str(f)) for f in files]
        said = [(await asyncio.to_thread(p.communicate, timeout=60))[0] for p in starts]
        assert [p.returncode for p in starts] == [0, 0], said
        [kept] = [f for f in files if f.exists()]
        key = kept.read_text().strip()
        assert sum(key in text for text in said) == 1
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(ADMIN_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def test_constraints_pin_every_installed_package():
    """The virtualenv holds exactly what constraints.txt says (the image installs from it)."""
    from importlib.metadata import distributions

    from conftest import ROOT

    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    normal = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in distributions()}
    installed.pop("vitalstore")
    installed.pop("setuptools", None)  # the venv's own; builds use the pinned one
    assert {name: v for name, v in installed.items() if normal.get(name) != v} == {}
    # Direct pins of pyproject.toml agree with the constraints.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in [*project["dependencies"],
                        *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        name, version = requirement.split("==")
        assert normal[name.split("[")[0].lower()] == version, requirement
