"""What many test modules use: a recent time, posting readings, times as text, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

# An hour ago, in whole seconds: inside every retention horizon and far from the skew bound.
NOW = int(time.time()) - 3600
JSON = {"content-type": "application/json"}
# More readings than this go in several requests (the service's default VITALSTORE_MAX_ITEMS).
MAX_ITEMS = 10_000


async def post(client: Any, body: Any, headers: dict[str, str] | None = None,
               path: str = "/v1/readings") -> httpx.Response:
    """POST `body` as JSON; the answer, whatever it is."""
    response: httpx.Response = await client.post(
        path, content=msgspec.json.encode(body), headers={**JSON, **(headers or {})})
    return response


async def store(client: Any, readings: dict[str, Any] | list[dict[str, Any]]) -> None:
    """POST a reading or readings (any number), insisting on a 202 for each request."""
    if isinstance(readings, dict):
        readings = [readings]
    for start in range(0, len(readings), MAX_ITEMS):
        response = await post(client, readings[start:start + MAX_ITEMS])
        assert response.status_code == 202, response.text


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as the service writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_cli(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`vitalstore ARGS` on `db_url`, with `env` (VITALSTORE_* settings) added."""
    return subprocess.run([sys.executable, "-m", "vitalstore.cli", *args],
                          env={**os.environ, "VITALSTORE_DATABASE_URL": db_url, **env},
                          capture_output=True, text=True, timeout=120, check=False)
