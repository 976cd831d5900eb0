"""The fault suite's load client and checks.

The load client posts readings whose (device, timestamp) keys never repeat and records every
answer. After a scenario, `check_acknowledged` proves that each reading that got a 202 is in
the database exactly once with the values sent, and `check_rollups` that the rollups equal
aggregates of the raw rows.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from asyncload import Client
from vitalstore.rollups import LEVELS

DEVICES = 64
JSON = {"content-type": "application/json"}
METRICS = ("hr", "spo2")


@dataclass(slots=True)
class Answer:
    """What one request got: a status, or the transport error that ended it."""

    first: int  # reading numbers first .. first + count - 1
    count: int
    sent: float
    latency: float
    status: int | None
    error: str | None = None
    retry_after: str | None = None


@dataclass
class Load:
    """Readings numbered 0, 1, 2...: reading n belongs to device n % DEVICES at BASE + n // DEVICES.

    Timestamps are whole seconds some days back, values small integers: rollup sums stay exact.
    """

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    per_request: int = 10
    prefix: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}")
    base: int = field(default_factory=lambda: int(time.time()) - 20 * 86400)
    answers: list[Answer] = field(default_factory=list)
    timeout: float = 30.0
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def device(self, n: int) -> str:
        return f"{self.prefix}-{n % DEVICES:02d}"

    def reading(self, n: int) -> dict[str, Any]:
        return {"device": self.device(n), "timestamp": self.base + n // DEVICES,
                "hr": n % 200 + 1, "spo2": n % 7 + 90}

    def client(self) -> Client:
        return Client(self.url, self.headers, self.timeout)

    def body(self, count: int | None = None,
             patch: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[int, bytes]:
        """The next `count` readings: (number of the first, JSON body); `patch` may alter them."""
        count = count or self.per_request
        first = next(self._numbers)
        for _ in range(count - 1):
            next(self._numbers)
        readings = [self.reading(n) for n in range(first, first + count)]
        if patch is not None:
            patch(readings)
        return first, msgspec.json.encode(readings)

    async def post_once(self, client: Client, count: int | None = None,
                        patch: Callable[[list[dict[str, Any]]], None] | None = None,
                        prepared: tuple[int, bytes] | None = None) -> Answer:
        """Post the next `count` readings (or a body made beforehand by `body`)."""
        count = count or self.per_request
        first, body = prepared or self.body(count, patch)
        sent = time.monotonic()
        try:
            status, headers, text = await client.request("POST", "/v1/readings", body, JSON)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            answer = Answer(first, count, sent, time.monotonic() - sent, None,
                            type(exc).__name__)
        else:
            answer = Answer(first, count, sent, time.monotonic() - sent, status,
                            None if status == 202 else text[:200].decode(errors="replace"),
                            headers.get("retry-after"))
        self.answers.append(answer)
        return answer

    async def closed_loop(self, stop: asyncio.Event, clients: int,
                          pause_after_error: float = 0.01) -> None:
        """`clients` keep-alive connections, each posting its next request after an answer."""
        async with self.client() as client:

            async def one() -> None:
                while not stop.is_set():
                    answer = await self.post_once(client)
                    if answer.status != 202:
                        await asyncio.sleep(pause_after_error)

            await asyncio.gather(*(one() for _ in range(clients)))

    async def open_loop(self, stop: asyncio.Event, rate: float, outstanding: int = 400,
                        seconds: float | None = None) -> None:
        """Requests at `rate` a second whatever the answers (at most `outstanding` at once).

        With `seconds`, the bodies are made before the clock starts, so that the client's own
        CPU does not limit the rate.
        """
        prepared = [self.body() for _ in range(math.ceil(rate * seconds))] if seconds else []
        async with self.client() as client:
            tasks: set[asyncio.Task[Answer]] = set()
            started = time.monotonic()
            for sent in itertools.count():
                if stop.is_set():
                    break
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if seconds is not None and sent >= len(prepared):
                    break
                if len(tasks) < outstanding:
                    task = asyncio.create_task(self.post_once(
                        client, prepared=prepared[sent] if prepared else None))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    # -- summaries ------------------------------------------------------------------------

    def acknowledged(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 202]

    def statuses(self, answers: list[Answer] | None = None) -> collections.Counter[int | str]:
        """How many answers of each status (or transport error)."""
        return collections.Counter(a.status if a.status is not None else str(a.error)
                                   for a in (self.answers if answers is None else answers))

    def latencies(self, status: int) -> list[float]:
        return sorted(a.latency for a in self.answers if a.status == status)


async def stored(db: asyncpg.Connection, load: Load) -> dict[tuple[str, int, str], list[float]]:
    """Every stored value of the load's devices: (device, unix seconds, metric) -> values."""
    rows = await db.fetch(
        """SELECT d.name AS device, extract(epoch FROM r.ts)::bigint AS ts, m.name AS metric,
                  r.value
           FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id
           WHERE starts_with(d.name, $1)""", load.prefix + "-")
    found: dict[tuple[str, int, str], list[float]] = collections.defaultdict(list)
    for row in rows:
        found[(row["device"], row["ts"], row["metric"])].append(row["value"])
    return found


async def check_acknowledged(db: asyncpg.Connection, load: Load) -> tuple[int, int]:
    """Every acknowledged reading is stored exactly once with its values.

    Returns (readings acknowledged, readings stored) of the load's devices.
    """
    found = await stored(db, load)
    missing: list[tuple[str, int, str]] = []
    acknowledged = 0
    for answer in load.acknowledged():
        for n in range(answer.first, answer.first + answer.count):
            acknowledged += 1
            reading = load.reading(n)
            for metric in METRICS:
                key = (reading["device"], reading["timestamp"], metric)
                if found.get(key) != [float(reading[metric])]:
                    missing.append(key)
    assert not missing, f"{len(missing)} acknowledged values missing or wrong: {missing[:5]}"
    duplicated = [key for key, values in found.items() if len(values) > 1]
    assert not duplicated, f"stored more than once: {duplicated[:5]}"
    return acknowledged, len({key[:2] for key in found})


async def check_rollups(db: asyncpg.Connection) -> int:
    """rollup_1m/1h/1d equal count/sum/min/max over time_bucket of the raw rows (whole db).

    Returns the number of rollup rows compared.
    """
    compared = 0
    for level in LEVELS:
        table, seconds = level.table, int(level.width.total_seconds())
        raw = f"""SELECT device_id, metric_id,
                         time_bucket(INTERVAL '{seconds} seconds', ts) AS bucket,
                         count(*) AS count, sum(value) AS sum, min(value) AS min,
                         max(value) AS max
                  FROM readings GROUP BY 1, 2, 3"""
        # The level as reads see it: its rows and the deltas not yet folded into it.
        kept = f"""SELECT device_id, metric_id, time_bucket(INTERVAL '{seconds} seconds', bucket),
                          sum(count)::int8, sum(sum), min(min), max(max)
                   FROM (SELECT * FROM {table} UNION ALL SELECT * FROM rollup_pending) AS u
                   GROUP BY 1, 2, 3"""
        differ = await db.fetch(f"({raw} EXCEPT {kept}) UNION ALL ({kept} EXCEPT {raw}) LIMIT 5")
        assert not differ, f"{table} differs from the raw rows: {[dict(r) for r in differ]}"
        compared += await db.fetchval(f"SELECT count(*) FROM {table}")
    return compared


async def metric(url: str, headers: dict[str, str], name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        text = (await client.get("/metrics")).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def report(name: str, **figures: Any) -> None:
    """A line of figures in the test output (`pytest -s` or -rA shows it)."""
    parts = [f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in figures.items()]
    print(f"\n[fault] {name}: " + " ".join(parts))
