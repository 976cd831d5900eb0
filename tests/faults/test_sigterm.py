"""Scenario 4: SIGTERM under load from keep-alive clients."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from faultload import Load, check_acknowledged, check_rollups, report, stored

pytestmark = pytest.mark.slow  # a fault scenario: `pytest -m "not slow"` leaves it out

SHUTDOWN_TIMEOUT_S = 5
# `vitalstore serve` gives granian this long to stop its workers before it kills them.
KILL_TIMEOUT_S = SHUTDOWN_TIMEOUT_S + 5


async def exit_seconds(server, signalled: float) -> float:
    """Waits for the service to exit (cleanly) after the signal; how long it took."""
    exit_code = await asyncio.to_thread(server.process.wait, KILL_TIMEOUT_S + 20)
    assert exit_code == 0, server.log_path.read_text()[-2000:]
    return time.monotonic() - signalled


@pytest.mark.parametrize("to", ["main process", "process group"])
async def test_sigterm_under_load_answers_everything_buffered_then_exits(server_factory, db, to):
    server = server_factory(VITALSTORE_WORKERS="2",
                            VITALSTORE_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))
    load = Load(server.url, server.headers, per_request=20, timeout=KILL_TIMEOUT_S + 10)
    stop = asyncio.Event()
    running = asyncio.create_task(load.closed_loop(stop, clients=16))
    await asyncio.sleep(1.5)
    # As process managers do: to the main process, which stops its workers (docker), or to
    # every process at once (systemd's default KillMode).
    if to == "main process":
        os.kill(server.process.pid, signal.SIGTERM)
    else:
        server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    exited = await exit_seconds(server, signalled)
    stop.set()
    await running

    assert exited < KILL_TIMEOUT_S
    statuses = load.statuses()
    answered = [a for a in load.answers if a.status is not None]
    assert {a.status for a in answered} <= {202, 503}, statuses
    # A request that got no answer must not have been taken in: everything the service
    # buffered, it answered. (Its readings are either all stored or none: one transaction.)
    found = await stored(db, load)
    unanswered_but_stored = [
        a for a in load.answers if a.status is None
        and (load.device(a.first), load.reading(a.first)["timestamp"], "hr") in found]
    assert not unanswered_but_stored, [(a.error, a.sent - signalled)
                                       for a in unanswered_but_stored]
    in_flight = [a for a in load.answers if a.sent < signalled < a.sent + a.latency]
    acknowledged, stored_count = await check_acknowledged(db, load)
    rollup_rows = await check_rollups(db)
    report(f"SIGTERM to the {to} under load", statuses=dict(statuses),
           in_flight_at_signal=len(in_flight),
           in_flight_answered_202=sum(a.status == 202 for a in in_flight),
           exit_s=exited, readings_acknowledged=acknowledged,
           readings_stored=stored_count, rollup_rows_checked=rollup_rows)


async def test_sigterm_while_the_database_stalls_flushes_the_buffer_once_it_moves(
        server_factory, db):
    server = server_factory(VITALSTORE_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))
    load = Load(server.url, server.headers, per_request=20, timeout=KILL_TIMEOUT_S + 10)
    stop = asyncio.Event()
    running = asyncio.create_task(load.closed_loop(stop, clients=16))
    await asyncio.sleep(1.0)
    async with db.transaction():
        await db.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(0.5)  # every client now waits on the lock
        os.kill(server.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(2.0)
    released = time.monotonic()
    exited = await exit_seconds(server, signalled)
    stop.set()
    await running

    waiting = [a for a in load.answers if a.sent < signalled < a.sent + a.latency]
    assert len(waiting) == 16  # every client had a request buffered when the signal came
    assert all(a.status == 202 and a.sent + a.latency > released for a in waiting), \
        load.statuses(waiting)
    acknowledged, stored_count = await check_acknowledged(db, load)
    await check_rollups(db)
    report("SIGTERM while the database stalls", buffered_at_signal=len(waiting),
           answered_202_after_release=len(waiting), exit_s=exited,
           exit_after_release_s=time.monotonic() - released,
           readings_acknowledged=acknowledged, readings_stored=stored_count)


async def test_sigterm_while_the_database_stays_stalled_answers_503_and_exits_in_time(
        server_factory, db):
    flush_timeout_s = 2
    server = server_factory(VITALSTORE_SHUTDOWN_TIMEOUT_S="3",
                            VITALSTORE_FLUSH_TIMEOUT_S=str(flush_timeout_s))
    load = Load(server.url, server.headers, per_request=20, timeout=30)
    stop = asyncio.Event()
    running = asyncio.create_task(load.closed_loop(stop, clients=16))
    await asyncio.sleep(1.0)
    async with db.transaction():
        await db.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(0.5)
        os.kill(server.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        # The lock outlasts the flush timeout and the shutdown timeout.
        exited = await exit_seconds(server, signalled)
    stop.set()
    await running

    assert exited < 3 + 5
    waiting = [a for a in load.answers if a.sent < signalled < a.sent + a.latency]
    assert len(waiting) == 16
    # Not acknowledged, but answered: none is left to guess.
    assert all(a.status == 503 and a.retry_after for a in waiting), load.statuses(waiting)
    slowest = max(a.sent + a.latency - signalled for a in waiting)
    assert slowest < flush_timeout_s + 2
    acknowledged, stored_count = await check_acknowledged(db, load)
    await check_rollups(db)
    report("SIGTERM while the database stays stalled", buffered_at_signal=len(waiting),
           answered_503=len(waiting), last_answer_after_signal_s=slowest, exit_s=exited,
           readings_acknowledged=acknowledged, readings_stored=stored_count)
