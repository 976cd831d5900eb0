"""Logs: one JSON object a line (plain text on a terminal), each carrying its request id.

Granian configures logging in its main process and in each worker from the dict config built
here (`vitalstore serve` passes it on), so its own messages come out in the same format.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from contextvars import ContextVar
from typing import Any, cast

import asyncpg
import msgspec
from litestar.types import ASGIApp, HTTPResponseStartEvent, Message, Receive, Scope, Send

from vitalstore.problems import Problem
from vitalstore.settings import Settings

# An incoming id is echoed into logs and headers: only short, plain ones are taken.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_SCOPE_KEY = "vitalstore.request_id"

# Set from `request_id_of(scope)` by the code that logs about a request. Not by a middleware:
# with any route middleware Litestar adds an exception-handling layer to every request (a
# few percent of a single-reading POST in a noisy A/B), and the handlers log nothing of their
# own.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_access = logging.getLogger("vitalstore.access")

_encoder = msgspec.json.Encoder()
# Attributes every LogRecord has; anything else passed in `extra=` goes into the JSON object.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = int(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + \
        f".{int((record.created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "pid", "request_id"?, "exception"?, ...}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode(errors="replace")


class TextFormatter(logging.Formatter):
    """`2026-01-01T10:00:00.000Z INFO vitalstore.batcher [request id] message` for terminals."""

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        text = f"{_timestamp(record)} {record.levelname:<7} {record.name}" + \
            (f" [{rid}]" if rid else "") + f" {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def use_json(settings: Settings) -> bool:
    if settings.log_format not in ("auto", "json", "text"):
        raise ValueError(f"log_format must be auto, json or text, not {settings.log_format!r}")
    if settings.log_format == "auto":
        return not sys.stderr.isatty()
    return settings.log_format == "json"


def dict_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the service (and granian's own logger)."""
    level = settings.log_level.upper()
    formatter = JsonFormatter if use_json(settings) else TextFormatter
    handler = {"class": "logging.StreamHandler", "formatter": "vitalstore",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vitalstore": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"vitalstore": handler},
        "root": {"handlers": ["vitalstore"], "level": level},
        "loggers": {
            "_granian": {"handlers": ["vitalstore"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["vitalstore"], "level": level,
                               "propagate": False},
            # Alembic's plugin set-up chatter (schema_head() at start) is not news.
            "alembic": {"level": "WARNING"},
        },
    }


def request_id_of(scope: Scope) -> str:
    """The request's id: a sane incoming `X-Request-ID`, else a new one; fixed per request."""
    state = cast("dict[str, Any]", scope)
    rid: str | None = state.get(_SCOPE_KEY)
    if rid is None:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                if _SANE_REQUEST_ID.fullmatch(value):
                    rid = value.decode()
                break
        if rid is None:
            rid = f"{random.getrandbits(64):016x}"  # unique enough, and cheap
        state[_SCOPE_KEY] = rid
    return rid


def tag_response(message: HTTPResponseStartEvent, scope: Scope) -> None:
    """For the response start: every answer, unmatched routes included, carries its request id."""
    rid = request_id_of(scope)
    message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]


# The start of an error answer's body is enough to find its message.
_REASON_BYTES = 2048


def _reason(body: bytes) -> str:
    """The message of an error answer (any of the API's error shapes), or ""."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return ""
    if not isinstance(decoded, dict):
        return ""
    found = decoded.get("error") or decoded.get("message") or decoded.get("detail")
    items = decoded.get("errors") or decoded.get("issues")
    if isinstance(items, list) and items:
        first = items[0]
        detail = f"{first.get('field')}: {first.get('message')}" if isinstance(first, dict) \
            else str(first)
        found = f"{found}: {detail}" if found else detail
    return str(found or "")[:300]


def access_log_enabled(settings: Settings) -> bool:
    return settings.access_log or settings.log_level.upper() == "DEBUG"


class AccessLogMiddleware:
    """One line per answer: method, route, status, duration, key name, client, 4xx reason.

    Installed only when the access log is on (VITALSTORE_ACCESS_LOG), so the hot path pays
    nothing otherwise. Never logs the key itself, only the name of the key that was accepted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0
        body = b""

        async def observe(message: Message) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and 400 <= status < 500 \
                    and len(body) < _REASON_BYTES:
                body += message.get("body", b"")[:_REASON_BYTES]
            await send(message)

        refusal = ""
        try:
            await self.app(scope, receive, observe)
        except Exception as exc:
            # Refusals of the key check are answered further out, by Litestar's handlers.
            status = status or getattr(exc, "status_code", 500)
            refusal = str(getattr(exc, "detail", "") or "")
            raise
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            key = scope.get("auth")
            client = scope.get("client") or ("-", 0)
            route = scope.get("path_template") or scope.get("path", "")
            entry = {"method": scope.get("method", ""), "route": route, "status": status,
                     "duration_ms": round(duration_ms, 2),
                     "key": getattr(key, "name", None), "client": client[0]}
            if 400 <= status < 500:
                entry["reason"] = refusal or _reason(body)
            request_id.set(request_id_of(scope))
            _access.info("%s %s %d %.1f ms key=%s client=%s%s", entry["method"], route, status,
                         duration_ms, entry["key"] or "-", entry["client"],
                         f" reason={entry['reason']!r}" if "reason" in entry else "",
                         extra=entry)


# Lines per second about refused requests (auth failures, writes outside a prefix, parameters
# the database refused), all together; the rest are counted and summed up in the next line.
LOG_PER_SECOND = 10


class RateLimitedLog:
    """Warnings about client errors, at most `per_second` lines a second whatever the flood."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._window = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, logger: logging.Logger, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._suppressed:
                logger.warning("%d more refused requests not logged", self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.per_second:
            self._logged += 1
            logger.warning(message, *args)
        else:
            self._suppressed += 1


client_error = RateLimitedLog(LOG_PER_SECOND)


def log_exception(exc: Exception, scope: Scope) -> None:
    """An after-exception hook: a server error is logged with its traceback, a client's is not.

    The hook sees every exception, also those a handler turns into a 4xx (a parameter
    PostgreSQL refused is the client's): those get one rate-limited warning line.
    """
    status = (exc.status if isinstance(exc, Problem)
              else getattr(exc, "status_code", 422 if isinstance(exc, asyncpg.DataError) else 500))
    request_id.set(request_id_of(scope))
    app_log = logging.getLogger("vitalstore.app")
    if status >= 500:
        app_log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"),
                      exc_info=exc)
    elif isinstance(exc, asyncpg.DataError):
        client_error(app_log, "parameter refused by the database on %s %s: %s",
                     scope.get("method"), scope.get("path"), type(exc).__name__)
