"""`make profile`: where the service's CPU goes under one kind of load (py-spy).

    python loadtest/profile.py [single|batch|noop|latest|latest100] [seconds]

Starts the service on a scratch database, drives it with wrk as `make bench` does, records
the service's Python stacks with py-spy (all processes, GIL-holding or not) and prints the
share of samples by layer and the hottest functions. Also measures how the CPU of the whole
machine split between the service, PostgreSQL and wrk during the run. Writes
loadtest/results/profile-<kind>.txt (collapsed stacks, for flamegraph tools) and .svg.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import psutil

import harness
from compare import LOADS, seed, wrk_load
from harness import RESULTS, ScratchDatabase, Service, log

# Where a frame's file lives says which layer the time belongs to; first match wins.
LAYERS = [
    ("vitalstore", "(vitalstore/"),
    ("asyncpg", "(asyncpg/"),
    ("litestar", "(litestar/"),
    ("msgspec", "(msgspec/"),
    ("granian", "(granian/"),
    ("asyncio/uvloop", "(asyncio/"),
    ("asyncio/uvloop", "(uvloop/"),
]


def cpu_by_group(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes."""
    totals = {}
    for group, members in pids.items():
        seconds = 0.0
        for pid in members:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            seconds += times.user + times.system
        totals[group] = seconds
    return totals


async def backend_pids(db_url: str, database: str) -> list[int]:
    """The PostgreSQL backends serving this database (the service's connections)."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1"
                                " AND pid <> pg_backend_pid()", database)
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


def summarize(collapsed: Path, top: int = 25) -> str:
    """Share of samples per layer (innermost known frame) and the hottest leaf functions."""
    layers: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        layer = "other"
        for frame in reversed(frames):
            layer = next((name for name, marker in LAYERS if marker in frame), "")
            if layer:
                break
        layers[layer or "other"] += count
        leaves[frames[-1]] += count
        for frame in set(frames):
            if "(vitalstore/" in frame:
                inclusive[frame] += count
    out = [f"{total} samples", "", "by layer (innermost known frame):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in layers.most_common()]
    out += ["", "hottest leaf functions:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaves.most_common(top)]
    out += ["", "vitalstore functions, inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "single"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 15
    py_spy = shutil.which("py-spy") or str(harness.BIN / "py-spy")
    wrk = harness.ensure_wrk()
    if wrk is None or kind not in LOADS:
        raise SystemExit(f"profile.py needs wrk and a kind of load: {', '.join(LOADS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    db = asyncio.run(ScratchDatabase("profile").create())
    try:
        key = harness.api_key(db.url)
        with Service(db.url, env={"VITALSTORE_BENCH_ROUTES": "true"},
                     name="profile") as service:
            devices = asyncio.run(seed(service.url, key))
            script, args, connections = wrk_load(kind, key, devices, "p-",
                                                 int(time.time()) - 3 * 3600)
            harness.run_wrk(wrk, service.url, script, args, seconds=3,
                            connections=connections)  # warm up
            stem = RESULTS / f"profile-{kind}"
            groups = {"service": service.worker_pids(),
                      "postgres backends": asyncio.run(backend_pids(db.url, db.name))}
            before = cpu_by_group(groups)
            wall = time.monotonic()
            result: dict[str, harness.LoadResult] = {}
            load = threading.Thread(target=lambda: result.setdefault("r", harness.run_wrk(
                wrk, service.url, script, args, seconds=seconds, connections=connections)))
            load.start()
            time.sleep(0.5)
            pid = str(service.worker_pids()[0])
            for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
                subprocess.run([py_spy, "record", "--pid", pid, "--subprocesses", "--rate",
                                "200", "--duration", str(int(seconds / 2) - 1), "--format",
                                fmt, "--output", str(stem) + suffix, "--nonblocking"],
                               check=True, capture_output=True)
            load.join()
            wall = time.monotonic() - wall
            after = cpu_by_group(groups)
            total_cpu = (psutil.cpu_count() or 1) * wall
            split = {g: (after[g] - before[g]) / total_cpu for g in groups}
            loaded = result["r"]
    finally:
        asyncio.run(db.drop())
    report = summarize(Path(str(stem) + ".txt"))
    header = (f"profile of {kind} load: {loaded.rps:,.0f} req/s, p50 {loaded.p50_ms:.1f} ms,"
              f" p99 {loaded.p99_ms:.1f} ms\nmachine CPU share: " + ", ".join(
                  f"{g} {100 * v:.0f}%" for g, v in split.items())
              + f", rest (wrk, others, idle) {100 * (1 - sum(split.values())):.0f}%")
    print(header + "\n\n" + report)
    Path(str(stem) + "-summary.txt").write_text(header + "\n\n" + report + "\n")
    log(f"written: {stem}.txt, .svg, -summary.txt")


if __name__ == "__main__":
    main()
