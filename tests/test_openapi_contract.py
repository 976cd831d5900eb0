"""schemathesis against the live service: the OpenAPI schema and the answers agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # schemathesis: `pytest -m "not slow"` leaves it out

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
SEED = 20261129
EXAMPLES_PER_OPERATION = 25


def test_live_service_keeps_its_openapi_contract(server_factory, tmp_path):
    server = server_factory()
    headers = server.headers
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{server.url}/schema/openapi.json",
        "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--seed", str(SEED), "--generation-database", "none", "--workers", "1",
        "--no-color", "--report-dir", str(tmp_path),
        *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # Every operation of the schema was exercised.
    selected, total = re.search(r"Selected: (\d+)/(\d+)", done.stdout).groups()
    tested = re.search(r"Tested: (\d+)", done.stdout).group(1)
    assert selected == total == tested, done.stdout[-3000:]
