"""The README's five-minute walk, run as written against a real `vitalstore serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def walk_commands() -> str:
    """The shell blocks of the README's "Five minutes with curl" section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Five minutes with curl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 5
    return "\n".join(blocks)


def test_the_readme_walk_works_as_written(server_factory, tmp_path: Path):
    server = server_factory()
    # What `make run` leaves behind: the admin key in .vitalstore/admin.key.
    made = subprocess.run([sys.executable, "-m", "vitalstore.cli", "keys", "local-admin",
                           "--file", str(tmp_path / ".vitalstore" / "admin.key")],
                          env={**os.environ, "VITALSTORE_DATABASE_URL": server.db_url},
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    script = walk_commands().replace("http://127.0.0.1:8000", server.url)
    assert server.url in script
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in ('{"accepted":1}', '{"accepted":2}', '"metrics":{"heartRateValue":{"value":72',
                     '"attributes":{"note":"walk"}', '"bucket":"5m"', '"metric":"heartRateValue"',
                     '{"items":[],"next_cursor":null}'):
        assert expected in out, (expected, out)
    assert out.rstrip().endswith("404")
