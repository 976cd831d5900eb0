"""Telemetry (Prometheus): requests, accepted readings, flushes, buffer depth, 503s, database pool.

With several granian workers, each is its own process with its own counters, and a scrape
reaches whichever worker the kernel hands the connection to. So `vitalstore serve` runs
prometheus-client's multiprocess mode: it points `PROMETHEUS_MULTIPROC_DIR` at a fresh
directory before the workers fork, each worker writes its values to memory-mapped files there,
and `GET /metrics` in any worker adds up the files of all of them. Without that variable (the
app built in-process, as tests do) a registry of the process's own serves instead.

Gauges (buffer depth, pool in use) are set by a sampler once a second in each worker and
summed over live workers. Per-request counts are kept in plain ints and published by the same
sampler (and by a scrape, for the worker answering it): another worker's counts may be up to a
second old. Per-flush and per-503 figures go to the prometheus values at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from litestar.types import HTTPResponseStartEvent, Scope
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL_S = 1.0
# Label values come from clients for unmatched routes: keep the label sets bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Pool(Protocol):
    """What is read of an asyncpg pool."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


_PREFIX = "vitalstore-metrics-"


def _remove_orphans() -> None:
    """Directories of servers that were killed (kill -9 runs no clean-up)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_PREFIX}*-*")):
        pid = os.path.basename(path)[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def multiprocess_mode() -> Iterator[None]:
    """For `vitalstore serve`, before the workers fork: a clean directory for their values.

    A directory named by the operator is emptied of old values (stale files would add to the
    new counts); otherwise a temporary one is made and removed at exit.
    """
    given = multiprocess_dir()
    if given is None:
        _remove_orphans()
    directory = given or tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    for old in glob.glob(os.path.join(directory, "*.db")):
        os.remove(old)
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client chooses its value store at import; choose again now that it is set.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if given is None:
            shutil.rmtree(directory, ignore_errors=True)


# Requests refused by access control, by reason: ambiguous (400: several credentials), missing,
# malformed, unknown or revoked key (401); scope or prefix (403). Counted where no Telemetry
# object is at hand (the auth middleware) and moved into the process's Telemetry by `publish`,
# like the other hot-path counts.
AUTH_FAILURES: collections.Counter[str] = collections.Counter()


class Telemetry:
    """The service's Prometheus metric objects; one per process (per app in tests)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess and values.ValueClass is values.MutexValue:
            # prometheus-client picks its value store when first imported.
            raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported")
        # Multiprocess mode collects from the files; a registry would only double-register.
        self.registry = None if self.multiprocess else CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "vitalstore_http_requests", "HTTP requests answered, by method, route and status",
            ["method", "route", "status"], registry=registry)
        self.readings_accepted = Counter(
            "vitalstore_readings_accepted", "Readings acknowledged (202) after their commit",
            registry=registry)
        self.unavailable = Counter(
            "vitalstore_unavailable", "503 answers of the ingest routes, by cause",
            ["cause"], registry=registry)
        self.flushes = Counter(
            "vitalstore_flushes", "Group-commit flushes by outcome (ok, rejected, failed)",
            ["outcome"], registry=registry)
        self.flush_seconds = Histogram(
            "vitalstore_flush_duration_seconds", "Time from a flush's start to its commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.flush_readings = Histogram(
            "vitalstore_flush_readings", "Readings written per flush",
            buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 50000), registry=registry)
        self.flush_requests = Histogram(
            "vitalstore_flush_requests", "Requests answered per flush",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=registry)
        self.buffer_readings = Gauge(
            "vitalstore_buffer_readings", "Readings buffered and not yet answered",
            multiprocess_mode="livesum", registry=registry)
        self.pool_in_use = Gauge(
            "vitalstore_db_pool_in_use", "Read-pool connections in use",
            multiprocess_mode="livesum", registry=registry)
        self.pool_size = Gauge(
            "vitalstore_db_pool_size", "Read-pool connections open",
            multiprocess_mode="livesum", registry=registry)
        self.auth_failures = Counter(
            "vitalstore_auth_failures", "Requests refused by access control, by reason:"
            " ambiguous (400: several credentials), missing, malformed, unknown or revoked key"
            " (401); scope or prefix (403)",
            ["reason"], registry=registry)
        self.key_rate_limited = Counter(
            "vitalstore_key_rate_limited", "Requests refused (429) by the per-key rate limit,"
            " by key name and id", ["key", "key_id"], registry=registry)
        # The hot path adds to plain ints; publish() moves them to the (memory-mapped, in
        # multiprocess mode: ~2 us an increment) prometheus values once a second.
        self._answers: collections.Counter[tuple[str, str, int]] = collections.Counter()
        # 429s of the per-key rate limit by key (name, id), counted by the KeyStore.
        self.rate_limited: collections.Counter[tuple[str, int]] = collections.Counter()
        self._accepted = 0

    def accepted(self, readings: int) -> None:
        """Readings acknowledged (202)."""
        self._accepted += readings

    def count_response(self, message: HTTPResponseStartEvent, scope: Scope) -> None:
        """One count per answer (at its start), unmatched routes included."""
        method: str = scope.get("method", "")  # type: ignore[assignment]
        self._answers[method, scope.get("path_template", ""), message["status"]] += 1

    def publish(self) -> None:
        """Moves the counts of the hot path into the prometheus values."""
        answers, self._answers = self._answers, collections.Counter()
        for (method, route, status), count in answers.items():
            self.http_requests.labels(method if method in _METHODS else "other",
                                      route or "unmatched", str(status)).inc(count)
        for reason, count in AUTH_FAILURES.items():
            self.auth_failures.labels(reason).inc(count)
        AUTH_FAILURES.clear()
        for (name, key_id), count in self.rate_limited.items():
            self.key_rate_limited.labels(name, str(key_id)).inc(count)
        self.rate_limited.clear()  # in place: the KeyStore holds this very Counter
        accepted, self._accepted = self._accepted, 0
        if accepted:
            self.readings_accepted.inc(accepted)

    def observe_flush(self, requests: int, readings: int, seconds: float, outcome: str) -> None:
        """The Batcher's per-flush callback."""
        self.flushes.labels(outcome).inc()
        self.flush_seconds.observe(seconds)
        self.flush_readings.observe(readings)
        self.flush_requests.observe(requests)

    def sample(self, buffered: int, pool: Pool | None) -> None:
        self.publish()
        self.buffer_readings.set(buffered)
        if pool is not None:
            size = pool.get_size()
            self.pool_size.set(size)
            self.pool_in_use.set(size - pool.get_idle_size())

    @contextlib.asynccontextmanager
    async def sampler(self, buffered: Callable[[], int], pool: Pool) -> AsyncIterator[None]:
        """Samples the gauges every second while the app runs."""

        async def run() -> None:
            while True:
                self.sample(buffered(), pool)
                await asyncio.sleep(SAMPLE_INTERVAL_S)

        task = asyncio.create_task(run(), name="metrics-sampler")
        try:
            yield
        finally:
            task.cancel()
            self.publish()
            if self.multiprocess:
                # This worker's gauges no longer count once it is gone.
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
