"""A small HTTP/1.1 keep-alive load client on raw asyncio sockets.

The fallback when wrk is not installed (slower: it shares the service's cores and runs in
one Python process), and the sequential latency probe of the benchmarks. It speaks only
what vitalstore answers: Content-Length bodies or chunked streams.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from harness import LoadResult

RequestFactory = Callable[[int], tuple[str, str, bytes]]
"""i -> (method, path, body) of the i-th request of a connection."""


def build_request(method: str, path: str, body: bytes, host: str,
                  headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        return status, await reader.readexactly(length)
    if not chunked:
        raise ValueError("response without Content-Length or chunked encoding")
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        parts.append(await reader.readexactly(size + 2))
        if size == 0:
            return status, b"".join(part[:-2] for part in parts)


class Connection:
    """One keep-alive connection for sequential requests."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.headers = headers or {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(build_request(method, path, body, f"{self.host}:{self.port}",
                                        {**self.headers, **(headers or {})}))
        return await read_response(self.reader)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.writer = self.reader = None


async def timed(conn: Connection, method: str, path: str, *, count: int, body: bytes = b"",
                headers: dict[str, str] | None = None, warmup: int = 3,
                expect: int = 200) -> list[float]:
    """Milliseconds of `count` sequential requests (after `warmup` untimed ones)."""
    samples = []
    for index in range(warmup + count):
        began = time.perf_counter()
        status, answer = await conn.request(method, path, body, headers)
        elapsed = (time.perf_counter() - began) * 1000
        if status != expect:
            raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
        if index >= warmup:
            samples.append(elapsed)
    return samples


def percentile(samples: list[float], share: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 2),
            "p99_ms": round(percentile(samples, 0.99), 2),
            "mean_ms": round(statistics.fmean(samples), 2), "n": len(samples)}


async def load(url: str, factory: RequestFactory, *, seconds: float, connections: int,
               headers: dict[str, str] | None = None) -> LoadResult:
    """Closed-loop load: `connections` connections, each sending the next request at once."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0, "read": 0}
    counter = 0

    async def one(index: int) -> None:
        nonlocal counter
        conn = Connection(url, headers)
        try:
            while time.perf_counter() < deadline:
                method, path, body = factory(counter)
                counter += 1
                began = time.perf_counter()
                try:
                    status, _ = await conn.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors["read"] += 1
                    await conn.close()
                    continue
                latencies.append((time.perf_counter() - began) * 1000)
                if not 200 <= status < 400:
                    errors["status"] += 1
        finally:
            await conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    elapsed = time.perf_counter() - began
    return LoadResult(requests=len(latencies), ok=len(latencies) - errors["status"],
                      seconds=elapsed, p50_ms=percentile(latencies, 0.5),
                      p99_ms=percentile(latencies, 0.99),
                      errors={k: v for k, v in errors.items() if v}, tool="asyncio")
