"""The group-commit batcher: a bounded buffer, flushes by size or time, ack after commit.

Requests hand over their rows and wait. Writer tasks, each with its own connection, take
whole requests from the queue (never splitting one), write them in one transaction, and
resolve each waiting request when that transaction commits, or fail it so it answers 503.
Several writers overlap their flushes: one collects while another waits on the database.

Two lanes: small requests (a bedside monitor's single reading) queue apart from large ones (a
wearable's 1,000-reading upload), and one writer serves the small lane only. Behind a single
FIFO, a single POST waited for whole batch flushes on every writer (measured: p99 451 ms with
4 connections posting 1,000-reading batches). The other writers take small requests first
and large ones otherwise, so small-only load keeps all writers. The buffer bound counts both
lanes together.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from vitalstore import writer
from vitalstore.database import CONNECTION_ERRORS, DATA_ERRORS, TRANSIENT_ERRORS
from vitalstore.problems import Overloaded, Rejected, Unavailable
from vitalstore.settings import Settings
from vitalstore.writer import Rows

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    rows: Rows
    future: asyncio.Future[None]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Lane:
    queue: collections.deque[_Pending] = field(default_factory=collections.deque)
    readings: int = 0  # queued, not yet taken by a writer


FlushObserver = Callable[[int, int, float, str], None]
"""Called after each flush with (requests, readings, seconds, outcome)."""


class Batcher:
    """Group commit over `settings.writer_connections` connections."""

    def __init__(
        self,
        settings: Settings,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        observe: FlushObserver | None = None,
    ) -> None:
        self._settings = settings
        self._connect = connect
        self._observe = observe
        self._small = _Lane()
        self._large = _Lane()
        self._buffered = 0  # readings queued or being flushed, not yet answered
        self._admitted = 0  # requests let in whose body is being read, not yet submitted
        self._mean_readings = 1.0  # readings per request, a moving average
        self._wakeup = asyncio.Event()
        self._closing = False
        self._available = True
        self._probe: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._connections: list[asyncpg.Connection | None] = []

    @property
    def buffered(self) -> int:
        """Readings accepted into the buffer and not yet answered."""
        return self._buffered

    @property
    def full(self) -> bool:
        return self._buffered >= self._settings.buffer_max_readings

    @property
    def available(self) -> bool:
        return self._available and not self._closing

    def _lanes_of(self, index: int) -> tuple[_Lane, ...]:
        """The lanes writer `index` serves, first choice first: the last writer only the small
        lane, so a small request never waits behind a large flush."""
        if index == self._settings.writer_connections:
            return (self._small,)
        return (self._small, self._large)

    async def start(self) -> None:
        """Open the writer connections and start the writer tasks."""
        count = self._settings.writer_connections + 1  # + the small lane's own writer
        self._connections = [None] * count
        for index in range(count):
            try:
                self._connections[index] = await self._connect()
            except Exception as exc:
                log.warning("database not reachable at start (%s); will retry", exc)
                self._set_unavailable()
        self._workers = [
            asyncio.create_task(self._run(index), name=f"writer-{index}")
            for index in range(count)
        ]

    def admit(self) -> None:
        """At a request's start, before its body is read: room for it, or raise at once.

        Counts the requests already let in whose bodies are still being read and decoded:
        checking the buffer alone lets everyone in while it is one request short of full, and
        under overload most of them were refused only once their body had been read and
        decoded (measured at 4x capacity: a third of the 503s, and the slowest of them).
        Pair with `leave()`; `submit` still has the last word.
        """
        self._check_open()
        expected = self._buffered + (self._admitted + 1) * self._mean_readings
        if expected > self._settings.buffer_max_readings:
            raise Overloaded("ingest buffer full")
        self._admitted += 1

    def leave(self) -> None:
        """The admitted request's body is read (or refused): it no longer counts as coming."""
        self._admitted -= 1

    def _check_open(self) -> None:
        """Refuse at once while shutting down or while the database is out of reach."""
        if self._closing:
            raise Unavailable("shutting down", "shutting_down")
        if not self._available:
            raise Unavailable("database unavailable")

    async def submit(self, rows: Rows) -> None:
        """Wait until `rows` are committed. Raises Overloaded, Unavailable or Rejected."""
        self._check_open()
        if self._buffered + rows.readings > self._settings.buffer_max_readings:
            raise Overloaded("ingest buffer full")
        self._mean_readings += (rows.readings - self._mean_readings) / 16
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane = self._small if rows.readings <= self._settings.small_request_readings \
            else self._large
        lane.queue.append(_Pending(rows, future))
        lane.readings += rows.readings
        self._buffered += rows.readings
        future.add_done_callback(functools.partial(self._release, rows.readings))
        self._wakeup.set()
        # Shielded: a client that goes away does not cancel its rows' flush.
        await asyncio.shield(future)

    def _release(self, readings: int, future: asyncio.Future[None]) -> None:
        self._buffered -= readings
        if not future.cancelled():
            future.exception()  # retrieved: a client that went away leaves no warning

    async def close(self) -> None:
        """Stop taking requests, flush and answer everything buffered, close connections."""
        self._closing = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout_s):
                await asyncio.gather(*self._workers, return_exceptions=True)
        except TimeoutError:
            log.error("shutdown timeout: %d readings not flushed",
                      self._small.readings + self._large.readings)
            for task in self._workers:
                task.cancel()
            self._fail_queue(Unavailable("shutting down", "shutting_down"))
        if self._probe is not None:
            self._probe.cancel()
        for conn in self._connections:
            if conn is not None and not conn.is_closed():
                try:
                    await conn.close(timeout=2)
                except Exception:
                    conn.terminate()

    # -- writers ------------------------------------------------------------------------

    async def _run(self, index: int) -> None:
        while True:
            batch = await self._next_batch(self._lanes_of(index))
            if batch is None:
                return
            try:
                conn = await self._connection(index)
                if conn is None:
                    self._fail(batch, Unavailable("database unavailable"))
                    continue
                await self._flush(index, conn, batch)
            except Exception:
                # A writer that died would leave its requests, and all later ones, waiting
                # forever: whatever went wrong, answer them and carry on.
                log.exception("writer %d failed; its requests get 503", index)
                self._fail(batch, Unavailable("database unavailable"))
            except asyncio.CancelledError:
                # Shutdown ran out of time mid-flush: not acknowledged (the client retries).
                self._fail(batch, Unavailable("shutting down", "shutting_down"))
                raise

    async def _next_batch(self, lanes: tuple[_Lane, ...]) -> list[_Pending] | None:
        """Whole requests of one lane up to the flush size, gathered for at most the flush
        interval; from the first of `lanes` that has any."""
        settings = self._settings
        interval = settings.flush_interval_ms / 1000
        while True:
            lane = next((lane for lane in lanes if lane.queue), None)
            if lane is None:
                if self._closing:  # what is left in other lanes, their writers flush
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = lane.queue[0].enqueued + interval - time.monotonic()
            if wait > 0 and lane.readings < settings.flush_max_readings \
                    and not self._closing:
                await asyncio.sleep(wait)
                if not lane.queue:
                    continue
            queue = lane.queue
            batch = [queue.popleft()]
            taken = batch[0].rows.readings
            while queue and taken + queue[0].rows.readings <= settings.flush_max_readings:
                pending = queue.popleft()
                batch.append(pending)
                taken += pending.rows.readings
            lane.readings -= taken
            if self._small.queue or self._large.queue:
                self._wakeup.set()  # another writer can start on the rest now
            return batch

    async def _connection(self, index: int) -> asyncpg.Connection | None:
        conn = self._connections[index]
        if conn is not None and not conn.is_closed():
            return conn
        try:
            conn = await self._connect()
        except Exception as exc:
            log.warning("database connection failed: %s: %s", type(exc).__name__, exc)
            self._set_unavailable()
            return None
        self._connections[index] = conn
        return conn

    async def _flush(self, index: int, conn: asyncpg.Connection, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        rows = batch[0].rows
        if len(batch) > 1:
            rows = Rows()
            for pending in batch:
                rows.extend(pending.rows)
        outcome = "ok"
        try:
            await self._write(conn, rows)
        except DATA_ERRORS as exc:
            outcome = "rejected"
            await self._isolate(index, conn, batch, exc)
        except Exception as exc:
            outcome = "failed"
            # Logged once per flush, not once per request.
            log.error("flush of %d readings failed: %s: %s", rows.readings,
                      type(exc).__name__, exc)
            self._discard(index, conn, exc)
            self._fail(batch, Unavailable("database unavailable"))
        else:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(None)
        if self._observe is not None:
            self._observe(len(batch), rows.readings, time.perf_counter() - started, outcome)

    async def _write(self, conn: asyncpg.Connection, rows: Rows) -> None:
        timeout = self._settings.flush_timeout_s
        try:
            async with asyncio.timeout(timeout):
                try:
                    await writer.write(conn, rows)
                except TRANSIENT_ERRORS:
                    await writer.write(conn, rows)
        except TimeoutError:
            raise TimeoutError(f"not committed within {timeout:g} s") from None

    async def _isolate(self, index: int, conn: asyncpg.Connection, batch: list[_Pending],
                       error: BaseException) -> None:
        """One request's bad data must not fail the others: write each request alone."""
        if len(batch) == 1:
            self._fail(batch, Rejected(_database_message(error)))
            return
        log.warning("flush refused by the database (%s); retrying its %d requests one by one",
                    error, len(batch))
        for position, pending in enumerate(batch):
            try:
                await self._write(conn, pending.rows)
            except DATA_ERRORS as exc:
                self._fail([pending], Rejected(_database_message(exc)))
            except Exception as exc:
                log.error("retry of a refused flush failed: %s: %s", type(exc).__name__, exc)
                self._discard(index, conn, exc)
                self._fail(batch[position:], Unavailable("database unavailable"))
                return
            else:
                pending.future.set_result(None)

    def _discard(self, index: int, conn: asyncpg.Connection, error: BaseException) -> None:
        """After any failure but refused data a connection is suspect (asyncpg may have left
        it mid-protocol, e.g. InternalClientError after pg_terminate_backend): drop it; the
        writer opens a new one for its next flush."""
        lost = isinstance(error, CONNECTION_ERRORS) or conn.is_closed()
        conn.terminate()
        if self._connections[index] is conn:
            self._connections[index] = None
        if lost:
            self._set_unavailable()
            # What is queued would meet the same fate one flush timeout after another (a
            # stalled database): answer it now, so no request waits more than one timeout.
            self._fail_queue(Unavailable("database unavailable"))

    def _fail(self, batch: list[_Pending], error: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _fail_queue(self, error: Exception) -> None:
        for lane in (self._small, self._large):
            batch = list(lane.queue)
            lane.queue.clear()
            lane.readings = 0
            self._fail(batch, error)

    # -- availability -------------------------------------------------------------------

    def _set_unavailable(self) -> None:
        """Refuse new requests at once until a connection succeeds again."""
        self._available = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._reconnect(), name="reconnect")

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                conn = await self._connect()
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            # Only a probe: handing it to a writer's slot would race with that writer opening
            # its own (a leaked connection, or one shared by two).
            conn.terminate()
            self._available = True
            log.info("database reachable again")
            return


def _database_message(error: BaseException) -> str:
    return f"the database refused this request's data: {error}"
