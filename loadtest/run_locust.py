"""`make loadtest`: the locust fleet, headless, with a pass/fail verdict.

Against LOADTEST_HOST when set; otherwise starts the service on a scratch database (and makes
an API key with the CLI). Runs LOADTEST_DURATION
seconds (60) with LOADTEST_USERS users (200, spawned at LOADTEST_SPAWN_RATE, 50/s), writes
locust's HTML report and CSV stats under loadtest/results/, prints the stats per request
group, and exits non-zero when any request failed or the p99 of any group passes
LOADTEST_P99_MS (1000). Extra locust options can follow on the command line.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys

import harness
from harness import RESULTS, ScratchDatabase, Service, log

DURATION = int(os.environ.get("LOADTEST_DURATION", "60"))
USERS = int(os.environ.get("LOADTEST_USERS", "200"))
SPAWN_RATE = float(os.environ.get("LOADTEST_SPAWN_RATE", "50"))
P99_BOUND_MS = float(os.environ.get("LOADTEST_P99_MS", "1000"))


def run_locust(host: str, key: str | None) -> int:
    env = {**os.environ}
    if key:
        env["LOADTEST_API_KEY"] = key
    command = [str(harness.BIN / "locust"), "-f", str(harness.LOADTEST / "locustfile.py"),
               "--headless", "--users", str(USERS), "--spawn-rate", str(SPAWN_RATE),
               "--run-time", f"{DURATION}s", "--host", host, "--only-summary",
               "--html", str(RESULTS / "locust.html"), "--csv", str(RESULTS / "locust"),
               "--stop-timeout", "10", *sys.argv[1:]]
    log(f"locust: {USERS} users for {DURATION} s against {host}")
    return subprocess.run(command, env=env, check=False).returncode


def verdict() -> list[str]:
    """Problems found in locust's CSV stats: failures, and groups over the p99 bound."""
    problems = []
    with (RESULTS / "locust_stats.csv").open() as stats:
        rows = list(csv.DictReader(stats))
    print(f"\n{'request group':<52}{'requests':>9}{'fails':>7}{'req/s':>8}"
          f"{'p50 ms':>9}{'p99 ms':>9}")
    for row in rows:
        name = f"{row['Type']} {row['Name']}".strip() if row["Name"] != "Aggregated" \
            else "all requests"
        p99 = float(row["99%"] or 0)
        failures = int(row["Failure Count"])
        print(f"{name[:51]:<52}{row['Request Count']:>9}{failures:>7}"
              f"{float(row['Requests/s']):>8.1f}{float(row['50%'] or 0):>9.0f}{p99:>9.0f}")
        if row["Name"] == "Aggregated":
            continue
        if failures:
            problems.append(f"{name}: {failures} failed requests")
        if p99 > P99_BOUND_MS:
            problems.append(f"{name}: p99 {p99:.0f} ms over the bound of {P99_BOUND_MS:.0f} ms")
    return problems


async def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("LOADTEST_HOST")
    key = os.environ.get("LOADTEST_API_KEY")
    if host:
        code = run_locust(host.rstrip("/"), key)
    else:
        db = await ScratchDatabase("loadtest").create()
        try:
            key = key or harness.api_key(db.url, "LOADTEST_API_KEY")
            with Service(db.url, name="vitalstore-loadtest") as service:
                code = await asyncio.to_thread(run_locust, service.url, key)
                log(f"peak RSS of the service: {service.peak_rss / 2**20:.0f} MB")
        finally:
            await db.drop()
    problems = verdict()
    print(f"\nreport: {(RESULTS / 'locust.html').relative_to(harness.ROOT)},"
          f" stats: {(RESULTS / 'locust_stats.csv').relative_to(harness.ROOT)}")
    if problems or code not in (0, 1):
        for problem in problems:
            print(f"FAIL {problem}")
        if code not in (0, 1):
            print(f"FAIL locust exited with {code}")
        return 1
    print(f"PASS: no failed request, every group's p99 within {P99_BOUND_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
