"""Shared parts of the benchmarks and load runs.

Scratch databases (created, migrated with `vitalstore db upgrade`, dropped), the service in a
subprocess with its peak RSS sampled, API keys, wrk runs with a
JSON summary, the machine description, and fast SQL loading of synthetic readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"
RESULTS = LOADTEST / "results"
WRK_SCRIPTS = LOADTEST / "wrk"
BIN = Path(sys.executable).parent
VITALSTORE = str(BIN / "vitalstore") if (BIN / "vitalstore").exists() else "vitalstore"
ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Ports this project's load runs may use (8600-8649); BENCH_PORT moves the range's start.
PORT_BASE = int(os.environ.get("BENCH_PORT", "8600"))
PORT_LIMIT = PORT_BASE + 50

# The four metrics of a synthetic reading, with a plausible (low, high) range each.
METRICS = {
    "heartRateValue": (55.0, 110.0),
    "spo2": (92.0, 100.0),
    "respiratoryRate": (10.0, 24.0),
    "temperature": (36.0, 38.5),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


# -- scratch databases -------------------------------------------------------------------


class ScratchDatabase:
    """A database named `vs_bench_<purpose>_<pid>`, migrated to head, dropped on exit."""

    def __init__(self, purpose: str) -> None:
        self.name = f"vs_bench_{purpose}_{os.getpid()}"
        self.url = database_url(self.name)

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self) -> ScratchDatabase:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await self._admin(f'CREATE DATABASE "{self.name}"')
        upgrade = await asyncio.create_subprocess_exec(
            VITALSTORE, "db", "upgrade", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "VITALSTORE_DATABASE_URL": self.url})
        output, _ = await upgrade.communicate()
        if upgrade.returncode != 0:
            raise RuntimeError(f"vitalstore db upgrade failed: {output.decode()[-2000:]}")
        return self

    async def drop(self) -> None:
        """Drop it, unless BENCH_KEEP_DB is set (to look at it afterwards)."""
        if os.environ.get("BENCH_KEEP_DB"):
            log(f"kept database {self.name} (BENCH_KEEP_DB); drop it when done")
            return
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- API keys ----------------------------------------------------------------------------


def api_key(db_url: str, env_name: str = "VITALSTORE_API_KEY") -> str:
    """The key to send: from `env_name`, else a new one of every scope made with the CLI."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    done = subprocess.run(
        [VITALSTORE, "keys", "create", "--name", f"bench-{os.getpid()}",
         "--scope", "ingest,read,admin"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "VITALSTORE_DATABASE_URL": db_url},
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"`vitalstore keys create` printed no key: {done.stderr}")
    return lines[-1].split()[-1]


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- processes ---------------------------------------------------------------------------


def free_port(exclude: Sequence[int] = ()) -> int:
    for port in range(PORT_BASE, PORT_LIMIT):
        if port in exclude:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_BASE}-{PORT_LIMIT - 1}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its children (granian's workers); 0 once gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class RssSampler(threading.Thread):
    """The RSS of a process tree every `interval` seconds, in a thread (no event loop needed).

    `samples` starts with one taken at once; `with RssSampler(pid) as rss:` samples inside.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = [rss_bytes(pid)]
        self._stop_event = threading.Event()

    @property
    def peak(self) -> int:
        return max(self.samples)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.samples.append(rss_bytes(self.pid))

    def stop(self) -> None:
        self._stop_event.set()

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Service:
    """A server in its own process group: `vitalstore serve` unless `command` is given.

    The one launcher of the benchmarks and the tests (tests/conftest.py's `server_factory`).
    """

    db_url: str
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    ready_path: str = "/ready"
    name: str = "service"
    port: int = 0
    # Sent by whoever talks to this server (an API key), kept here for them.
    headers: dict[str, str] = field(default_factory=dict)
    log_dir: Path = RESULTS
    log_level: str | None = "WARNING"  # None: the service's default (INFO)
    process: subprocess.Popen[bytes] | None = None
    sampler: RssSampler | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.port}.log"

    def start(self, timeout: float = 60) -> Service:
        self.port = self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VITALSTORE_DATABASE_URL": self.db_url,
               "VITALSTORE_PORT": str(self.port), "VITALSTORE_HOST": "127.0.0.1",
               **({"VITALSTORE_LOG_LEVEL": self.log_level} if self.log_level else {}),
               **self.env}
        command = self.command or [VITALSTORE, "serve", "--port", str(self.port)]
        command = [part.replace("{port}", str(self.port)) for part in command]
        with self.log_path.open("wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=ROOT,
                                            start_new_session=True)
        self.sampler = RssSampler(self.process.pid)
        self.sampler.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout} s: {self.log_tail()}")

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", self.ready_path)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def worker_pids(self) -> list[int]:
        """The process and its children (granian: the main process, then its workers)."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        root = psutil.Process(self.process.pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]

    @property
    def peak_rss(self) -> int:
        return self.sampler.peak if self.sampler else 0

    def signal(self, signum: int) -> None:
        """To the whole process group (start_new_session): the main process and its workers."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        os.killpg(self.process.pid, signum)

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (granian flushes and exits), SIGKILL after 40 s; at once if not graceful."""
        if self.sampler is not None:
            self.sampler.stop()
        if self.process is None or self.process.poll() is not None:
            return
        if graceful:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(40)
                return
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- wrk ---------------------------------------------------------------------------------


def ensure_wrk() -> str | None:
    """The path of wrk, installing Debian's package when missing and we may; else None."""
    found = shutil.which("wrk")
    if found or os.environ.get("BENCH_NO_INSTALL"):
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk missing: apt-get install -y wrk")
        done = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True,
                              check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True,
                           check=False)
    return shutil.which("wrk")


@dataclass
class LoadResult:
    """What a load run measured; `ok` counts 2xx answers only."""

    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    tool: str

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"req_per_s": round(self.rps, 1), "p50_ms": round(self.p50_ms, 2),
                "p99_ms": round(self.p99_ms, 2), "requests": self.requests, "ok": self.ok,
                "errors": self.errors, "seconds": round(self.seconds, 2), "tool": self.tool}


def run_wrk(wrk: str, url: str, script: str, args: Sequence[str], *, seconds: float,
            connections: int, threads: int = 2) -> LoadResult:
    """One wrk run; the Lua script's done() prints a `WRKJSON {...}` summary line."""
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               "--timeout", "30s", "-s", str(WRK_SCRIPTS / script), url, "--", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    summary = next((line[len("WRKJSON "):] for line in done.stdout.splitlines()
                    if line.startswith("WRKJSON ")), None)
    if done.returncode != 0 or summary is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(summary)
    errors = {k: v for k, v in data["errors"].items() if v}
    return LoadResult(requests=data["requests"], ok=data["requests"] - data["errors"]["status"],
                      seconds=data["duration_us"] / 1e6, p50_ms=data["p50_us"] / 1000,
                      p99_ms=data["p99_us"] / 1000, errors=errors, tool="wrk")


# -- the machine -------------------------------------------------------------------------


def cpu_idle_percent(seconds: float = 1.0) -> float:
    """Share of all cores idle over `seconds`: under ~90 means someone else is busy."""
    before = psutil.cpu_times()
    time.sleep(seconds)
    after = psutil.cpu_times()
    deltas = {name: getattr(after, name) - getattr(before, name) for name in after._fields}
    total = sum(deltas.values())
    return round(100 * (deltas["idle"] + deltas.get("iowait", 0)) / total, 1) if total else 0.0


async def machine(db_url: str, wrk: str | None) -> dict[str, Any]:
    """Where the figures were measured, and how busy the machine was when we started."""
    conn = await asyncpg.connect(db_url)
    try:
        database = {
            "postgresql": await conn.fetchval("SHOW server_version"),
            "timescaledb": await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"),
            "shared_buffers": await conn.fetchval("SHOW shared_buffers"),
        }
    finally:
        await conn.close()
    return {**await asyncio.to_thread(_host, wrk), **database,
            "cpu_idle_before_pct": await asyncio.to_thread(cpu_idle_percent)}


def machine_line(machine: dict[str, Any]) -> str:
    idle = machine.get("cpu_idle_before_pct")
    quiet = "quiet" if idle is not None and idle >= 90 else "**shared: other work used the CPU**"
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB,"
            f" PostgreSQL {machine['postgresql']} (shared_buffers {machine['shared_buffers']}),"
            f" TimescaleDB {machine['timescaledb']}, Python {machine['python']};"
            f" measured {machine['measured_at']} at commit {machine['commit']};"
            f" CPU idle before the run {idle}% ({quiet}).")


def _host(wrk: str | None) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    wrk_version = ""
    if wrk:
        done = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        wrk_version = (done.stdout or done.stderr).splitlines()[0].split(" Copyright")[0]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_generator": wrk_version or "python asyncio client (wrk not available)",
        "shared_cores": "load generator, service and PostgreSQL share the same cores",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "commit": commit,
        "measured_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- fast loading with SQL ---------------------------------------------------------------

_LOAD = """
    INSERT INTO readings (device_id, metric_id, ts, value)
    SELECT d.id, m.id, t,
           round((m.lo + (m.hi - m.lo) * (0.5 + 0.5 * sin(extract(epoch FROM t) / 900 + d.id)))
                 ::numeric, 1)
    FROM unnest($1::int4[]) AS d (id)
    CROSS JOIN generate_series($2::timestamptz, $3::timestamptz, $4::interval) AS t
    CROSS JOIN unnest($5::int4[], $6::float8[], $7::float8[]) AS m (id, lo, hi)
"""


# The same readings with realistic noise (bench-scale's columnstore figures): integer vitals
# on a slow wave with +-1 jitter, temperature (the narrow range) to 0.1 with a little jitter.
_LOAD_NOISY = """
    INSERT INTO readings (device_id, metric_id, ts, value)
    SELECT d.id, m.id, t,
           CASE WHEN m.hi - m.lo > 5
                THEN round(m.lo + (m.hi - m.lo) * (0.5 + 0.4 * sin(extract(epoch FROM t) / 900
                                                                  + d.id))
                           + floor(random() * 3) - 1)
                ELSE round((m.lo + (m.hi - m.lo) * (0.5 + 0.4 * sin(extract(epoch FROM t) / 3600
                                                                   + d.id))
                            + (random() - 0.5) * 0.2)::numeric, 1) END
    FROM unnest($1::int4[]) AS d (id)
    CROSS JOIN generate_series($2::timestamptz, $3::timestamptz, $4::interval) AS t
    CROSS JOIN unnest($5::int4[], $6::float8[], $7::float8[]) AS m (id, lo, hi)
"""
# A text attribute now and then: one reading in 300 of each device.
_LOAD_ATTRIBUTES = """
    INSERT INTO reading_attributes (device_id, ts, attributes)
    SELECT d.id, t, jsonb_build_object('signalQuality', (ARRAY['good', 'fair', 'poor'])[
               1 + (extract(epoch FROM t)::int8 / 300 + d.id) % 3])
    FROM unnest($1::int4[]) AS d (id)
    CROSS JOIN generate_series($2::timestamptz, $3::timestamptz, $4::interval) AS t
    WHERE (extract(epoch FROM t)::int8 / $5::int8 + d.id) % 300 = 0
"""

_US = timedelta(microseconds=1)
# The hourly aggregate of one device's raw rows in [$2, $3): what the aggregates route would
# cost without rollups (the reference of its figures).
RAW_HOURLY = """
    SELECT metric_id, time_bucket(INTERVAL '1 hour', ts) AS start, count(*), sum(value),
           min(value), max(value), avg(value)
    FROM readings WHERE device_id = $1 AND ts >= $2 AND ts < $3
    GROUP BY 1, 2 ORDER BY 1, 2"""


async def ensure_names(conn: asyncpg.Connection, table: str, names: Sequence[str]) -> list[int]:
    """Ids of device or metric names, created when missing, in the order given."""
    await conn.execute(
        f"INSERT INTO {table} (name) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING",
        list(names))
    rows = await conn.fetch(f"SELECT name, id FROM {table} WHERE name = ANY($1::text[])",
                            list(names))
    ids = dict(rows)  # type: ignore[arg-type]
    return [ids[name] for name in names]


async def load_readings(conn: asyncpg.Connection, devices: Sequence[str], start: datetime,
                        end: datetime, step: timedelta, rows_per_statement: int = 1_000_000,
                        progress: str = "", noisy: bool = False) -> int:
    """Readings of every device every `step` in [start, end), four metrics each, by SQL.

    INSERT ... SELECT fires the readings trigger like ingestion does, so `latest` and the
    rollups are filled as if the readings had been posted (and folded); statements are cut by
    time so each transition table stays around `rows_per_statement` rows.
    """
    device_ids = await ensure_names(conn, "devices", devices)
    metric_ids = await ensure_names(conn, "metrics", list(METRICS))
    lows = [low for low, _ in METRICS.values()]
    highs = [high for _, high in METRICS.values()]
    rows_per_step = len(devices) * len(METRICS)
    slice_width = step * max(1, rows_per_statement // rows_per_step)
    last = start + step * ((end - start - _US) // step)
    inserted = 0
    begin = time.monotonic()
    cursor = start
    while cursor < end:
        until = min(cursor + slice_width, end)
        status = await conn.execute(_LOAD_NOISY if noisy else _LOAD, device_ids, cursor,
                                    until - _US, step, metric_ids, lows, highs)
        if noisy:
            await conn.execute(_LOAD_ATTRIBUTES, device_ids, cursor, until - _US, step,
                               max(1, int(step.total_seconds())))
        inserted += int(status.split()[-1])
        # Into the rollup levels now, as a running service would within a second.
        await conn.execute("SELECT fold_rollups()")
        cursor = until
        if progress:
            rate = inserted / max(time.monotonic() - begin, 1e-6)
            log(f"{progress}: {inserted:,} rows"
                f" ({100 * (cursor - start) / (end - start):.0f}%, {rate:,.0f} rows/s)")
    # The registry: oldest and newest reading of each device, as ingestion would keep them.
    await conn.execute(
        "UPDATE devices SET first_seen = least(first_seen, $2), last_seen = greatest(last_seen, $3)"
        " WHERE id = ANY($1::int4[])",
        device_ids, start, last)
    return inserted


def write_report(name: str, report: dict[str, Any], tables: str) -> None:
    """loadtest/results/NAME (JSON), and its tables on the terminal."""
    out = RESULTS / name
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{tables}\n\n{machine_line(report['machine'])}\n\nwritten: {out.relative_to(ROOT)}")


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """`with timer() as t:` ... then `t[0]` is the elapsed seconds."""
    elapsed: list[float] = [0.0]
    began = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - began
