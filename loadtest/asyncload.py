"""The one HTTP/1.1 keep-alive load client (raw asyncio streams), and the one percentile.

Used by the benchmarks (the fallback when wrk is not installed, the sequential latency
probes) and by the fault suite. httpx queues requests in its own connection pool for seconds
once a few hundred are in flight, which would be measured as the server's latency; this client
opens a connection whenever none is idle, so a request's latency is the server's (and the
network's). It speaks only what vitalstore answers: Content-Length bodies or chunked streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from harness import LoadResult

RequestFactory = Callable[[int], tuple[str, str, bytes]]
"""i -> (method, path, body) of the i-th request."""
Answer = tuple[int, dict[str, str], bytes]
"""(status, headers with lower-case names, body)."""
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def percentile(samples: list[float], share: float) -> float:
    """Nearest rank: the smallest sample with at least `share` of all samples at or below it.

    The one definition for the benchmarks and the fault suite (wrk reports its own).
    """
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 2),
            "p99_ms": round(percentile(samples, 0.99), 2),
            "mean_ms": round(statistics.fmean(samples), 2), "n": len(samples)}


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        raise ValueError("response without Content-Length or chunked encoding")
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        parts.append((await reader.readexactly(size + 2))[:-2])
        if size == 0:
            return status, headers, b"".join(parts)


class Client:
    """Keep-alive connections to one server: a new one whenever none is idle."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._idle: list[_Stream] = []
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        writers, self._open, self._idle = list(self._open), set(), []
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Answer:
        """Raises OSError, EOFError, TimeoutError or IncompleteReadError on transport failure.

        Like any keep-alive client, it does not reuse a connection the server has closed, and
        retries once on a new connection a request whose reused connection was closed before
        any answer came (the server never read it; the ingest routes are idempotent anyway).
        """
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in {**self.headers, **(headers or {})}.items())
        if body or method == "POST":
            head += f"content-length: {len(body)}\r\n"
        message = (head + "\r\n").encode() + body
        while self._idle:
            stream = self._idle.pop()
            if not (stream[0].at_eof() or stream[1].is_closing()):
                try:
                    return await self._exchange(stream, message)
                except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
                    if getattr(exc, "partial", b""):
                        raise
                break
            self._drop(stream[1])
        stream = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                        self.timeout)
        self._open.add(stream[1])
        return await self._exchange(stream, message)

    async def _exchange(self, stream: _Stream, message: bytes) -> Answer:
        reader, writer = stream
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(message)
                answer = await _read_answer(reader)
        except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            self._drop(writer)
            raise
        if answer[1].get("connection", "").lower() == "close":
            self._drop(writer)
        else:
            self._idle.append(stream)
        return answer

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()


async def timed(client: Client, method: str, path: str, *, count: int, body: bytes = b"",
                headers: dict[str, str] | None = None, warmup: int = 3,
                expect: int = 200) -> list[float]:
    """Milliseconds of `count` sequential requests (after `warmup` untimed ones)."""
    samples = []
    for index in range(warmup + count):
        began = time.perf_counter()
        status, _, answer = await client.request(method, path, body, headers)
        elapsed = (time.perf_counter() - began) * 1000
        if status != expect:
            raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
        if index >= warmup:
            samples.append(elapsed)
    return samples


async def load(url: str, factory: RequestFactory, *, seconds: float, connections: int,
               headers: dict[str, str] | None = None) -> LoadResult:
    """Closed-loop load: `connections` connections, each sending the next request at once."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0, "read": 0}
    counter = 0

    async def one(client: Client) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            method, path, body = factory(counter)
            counter += 1
            began = time.perf_counter()
            try:
                status, _, _ = await client.request(method, path, body)
            except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                errors["read"] += 1
                continue
            latencies.append((time.perf_counter() - began) * 1000)
            if not 200 <= status < 400:
                errors["status"] += 1

    began = time.perf_counter()
    async with Client(url, headers) as client:
        await asyncio.gather(*(one(client) for _ in range(connections)))
    elapsed = time.perf_counter() - began
    return LoadResult(requests=len(latencies), ok=len(latencies) - errors["status"],
                      seconds=elapsed, p50_ms=percentile(latencies, 0.5),
                      p99_ms=percentile(latencies, 0.99),
                      errors={k: v for k, v in errors.items() if v}, tool="asyncio")
