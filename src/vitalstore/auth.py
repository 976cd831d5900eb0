"""Access control: API keys checked per request without a database round trip once cached.

Every route declares what it needs in its decorator (`**requires("read")`, `**OPEN`,
`**METRICS`); routes that declare nothing need the `admin` scope, so a route added without a
thought is closed, not open. `AuthMiddleware` does the check and leaves the key in
`request.auth` (an `ApiKey`), whose prefix the handlers apply:

- writes: `forbid_outside_prefix(key, devices)` -> 403 before anything is stored;
- one device: `key.covers(device)` or answer 404 as for an unknown device;
- listings: `effective_prefix(key, requested_prefix)` -> the prefix to list, or None for none.

A middleware rather than Litestar guards: Litestar copies the route handler for every guard
call (9 us measured here, where a whole no-op POST takes about 70 us); the middleware's check
of a cached key costs a header scan, one SHA-256 and a dict lookup (about 2 us;
`loadtest/auth_overhead.py`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Final, cast

import asyncpg
from litestar import Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.openapi.spec import Components, Reference, SecurityRequirement, SecurityScheme
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from vitalstore import keys
from vitalstore.api.responses import error_body
from vitalstore.database import CONNECTION_ERRORS
from vitalstore.keys import KEY_FORMAT, KEY_PREFIX, SCOPES, ApiKey, Revoked
from vitalstore.logs import client_error
from vitalstore.settings import Settings
from vitalstore.telemetry import AUTH_FAILURES

log = logging.getLogger(__name__)

# What a route needs: "open", a scope, or "metrics" (a `read` or `admin` key bound to no
# prefix, unless VITALSTORE_METRICS_OPEN: the counters are fleet-wide).
ACCESS_OPT: Final = "access"
DEFAULT_ACCESS: Final = "admin"

# Refused keys are remembered too (a flood of one unknown key costs one lookup per TTL), in a
# map of bounded size (a flood of distinct keys cannot grow memory); valid keys in their own
# map, so such a flood cannot evict them.
MAX_VALID: Final = 100_000
MAX_REFUSED: Final = 10_000
# Database lookups of uncached keys at once: a flood of unknown keys leaves the rest of the
# read pool to the API.
LOOKUP_CONCURRENCY: Final = 2
LOOKUP_TIMEOUT_S: Final = 5.0

UNRESTRICTED: Final = ApiKey("auth-disabled", frozenset(SCOPES), "")

_CHALLENGE = 'Bearer realm="vitalstore"'
_INVALID = {"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'}
_MESSAGES = {
    "missing": "an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
    "scheme": "the Authorization header lacks the Bearer scheme: 'Authorization: Bearer <key>'"
              " (or 'X-API-Key: <key>')",
    "malformed": "invalid API key: a vitalstore key is 'vs_' and 43 letters, digits, '-' or '_'",
    "unknown": "invalid API key",
    "revoked": "API key revoked",
}
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")

SECURITY_SCHEMES: Final[dict[str, SecurityScheme | Reference]] = {
    "bearer": SecurityScheme(type="http", scheme="bearer",
                             description="An API key: `Authorization: Bearer vs_...`"),
    "apiKeyHeader": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header",
                                   description="The same API key in `X-API-Key`"),
}
OPENAPI_COMPONENTS: Final = Components(security_schemes=SECURITY_SCHEMES)
_SECURITY: Final[list[SecurityRequirement]] = [{"bearer": []}, {"apiKeyHeader": []}]


def requires(scope: keys.KeyScope) -> dict[str, Any]:
    """Route decorator arguments: needs a key with `scope`; declared in OpenAPI as well."""
    return {ACCESS_OPT: scope, "security": _SECURITY}


OPEN: Final[dict[str, Any]] = {ACCESS_OPT: "open"}
# Routes of the system we replace: a keyless request gets the rights of the key named by
# VITALSTORE_COMPAT_KEY_NAME, when it is set.
COMPAT_OPT: Final = "compat"
METRICS: Final[dict[str, Any]] = {ACCESS_OPT: "metrics", "security": _SECURITY}
# The handler checks the key itself (the InfluxDB routes: errors in InfluxDB's shape, and a
# 401 that says why for credentials in the URL). Only for routes that call `authorize`.
CHECKED_BY_HANDLER: Final[dict[str, Any]] = {ACCESS_OPT: "handler", "security": _SECURITY}


def effective_prefix(key: ApiKey, requested: str | None) -> str | None:
    """The device-id prefix a listing may use: the narrower of the two, or None if disjoint."""
    requested = requested or ""
    if requested.startswith(key.prefix):
        return requested
    if key.prefix.startswith(requested):
        return key.prefix
    return None


def forbid_outside_prefix(key: ApiKey, devices: Iterable[str]) -> None:
    """Raise 403 if any device lies outside the key's prefix (call before storing anything)."""
    if not key.prefix:
        return
    outside = {device for device in devices if not device.startswith(key.prefix)}
    if outside:
        AUTH_FAILURES["prefix"] += 1
        client_error(log, "write refused: key %s (prefix %r) sent %d device(s) outside its"
                     " prefix", key, key.prefix, len(outside))
        raise PermissionDeniedException(
            f"this key may write only devices whose id starts with {key.prefix!r};"
            f" {min(outside)!r} does not")


class AmbiguousCredentials(Exception):
    """More than one `Authorization` or `X-API-Key` header."""


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key from `Authorization: Bearer` (or `Token`, as Influx clients send it) or
    `X-API-Key` (never from the URL).

    Raises AmbiguousCredentials when the request carries more than one of those headers
    (equal or not), or one holding a list (`a, b`: how proxies join repeated headers; no key
    has a comma): a proxy in front may check another one than the service would read.
    """
    found = [(name, value) for name, value in headers if name in _CREDENTIAL_HEADERS]
    if len(found) > 1 or (found and b"," in found[0][1]):
        raise AmbiguousCredentials
    for name, value in found:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() in (b"bearer", b"token") and token.strip():
                return token.strip().decode("latin-1")
        elif value.strip():
            return value.strip().decode("latin-1")
    return None


def _has_authorization(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name == b"authorization" for name, _ in headers)


def _remember(cache: collections.OrderedDict[bytes, Any], digest: bytes, value: Any,
              expires: float, limit: int) -> None:
    cache[digest] = (expires, value)
    cache.move_to_end(digest)
    # One TTL for all, so entries expire in insertion order: the expired ones are in front.
    now = time.monotonic()
    while cache and (len(cache) > limit or next(iter(cache.values()))[0] <= now):
        cache.popitem(last=False)


class KeyRateLimit:
    """A token bucket per key (by id) in this process: `rate` requests a second, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, when)

    def wait_s(self, key_id: int) -> float:
        """0 if the key may make a request now (and takes a token), else seconds to wait."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self._buckets) >= MAX_VALID and key_id not in self._buckets:
            self._forget_idle(now)
        if tokens >= 1:
            self._buckets[key_id] = (tokens - 1, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        # A bucket that has filled up again is the same as none: memory stays bounded.
        full_after = self.burst / self.rate
        for key_id in [k for k, (_, then) in self._buckets.items() if now - then >= full_after]:
            del self._buckets[key_id]


class KeyStore:
    """Verifies keys: a cache of verified (and refused) keys for `auth_cache_s` seconds."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, *,
                 max_refused: int = MAX_REFUSED,
                 rate_limited: collections.Counter[tuple[str, int]] | None = None) -> None:
        self._pool = pool
        # 429s by key (name, id): the app's Telemetry publishes them.
        self.rate_limited = collections.Counter() if rate_limited is None else rate_limited
        self._max_refused = max_refused
        self._ttl = settings.auth_cache_s
        self.required = settings.auth == "required"
        self.metrics_open = settings.metrics_open
        self._valid: collections.OrderedDict[bytes, tuple[float, ApiKey]] = (
            collections.OrderedDict())
        self._refused: collections.OrderedDict[bytes, tuple[float, Revoked | None]] = (
            collections.OrderedDict())
        self._inflight: dict[bytes, asyncio.Task[ApiKey | Revoked | None]] = {}
        self._lookup_slots = asyncio.Semaphore(LOOKUP_CONCURRENCY)
        self._rate_limit = (KeyRateLimit(settings.key_rate_limit, settings.key_rate_burst)
                            if settings.key_rate_limit > 0 else None)
        self.lookups = 0  # database lookups made, for tests and metrics
        self.lookups_peak = 0  # most lookups at once (at most LOOKUP_CONCURRENCY)
        self._lookups_running = 0
        self.compat_key_name = settings.compat_key_name
        self._compat: tuple[float, ApiKey | None] = (-1.0, None)
        if not self.required:
            # Logged at every start, on purpose: it must not be left on by accident.
            log.warning("VITALSTORE_AUTH=disabled: every request is served without an API key;"
                        " for local experiments only")

    async def authorize(self, scope: HTTPScope, access: str, compat: bool = False) -> ApiKey:
        """The request's key if it may do `access`; raises 400, 401, 403 or 429 otherwise.

        `compat`: a keyless request gets the compatibility key's rights, if there is one.
        """
        if not self.required or (access == "metrics" and self.metrics_open):
            return UNRESTRICTED
        try:
            token = bearer_token(scope["headers"])
        except AmbiguousCredentials:
            AUTH_FAILURES["ambiguous"] += 1
            client_error(log, "authentication refused (ambiguous): several credential headers,"
                         " %s %s", scope["method"], scope["path"])
            raise ClientException(
                "send one API key, in one 'Authorization: Bearer' or one 'X-API-Key' header"
            ) from None
        if token is None:
            if _has_authorization(scope["headers"]):
                raise self._refuse(scope, "scheme", detail="Authorization without Bearer")
            if not (compat and self.compat_key_name):
                raise self._refuse(scope, "missing")
            key = await self._compat_key(scope)
        else:
            digest = keys.digest(token)
            # The hot path: a cached key, no await (a nested coroutine cost about 1 us here).
            cached = self._valid.get(digest)
            if cached is not None and cached[0] > time.monotonic():
                key = cached[1]
            else:
                key = await self.verify(token, digest, scope)
        if self._rate_limit is not None:
            self._limit_rate(key, self._rate_limit)
        if access == "metrics":
            self._check_metrics_access(key, scope)
        elif access not in key.scopes:
            raise self._lacks_scope(key, access, scope)
        return key

    def _lacks_scope(self, key: ApiKey, needed: str, scope: HTTPScope
                     ) -> PermissionDeniedException:
        AUTH_FAILURES["scope"] += 1
        client_error(log, "access refused: key %s lacks scope %r for %s %s",
                     key, needed, scope["method"], scope["path"])
        return PermissionDeniedException(
            f"this key lacks the {needed!r} scope",
            headers={"WWW-Authenticate": _CHALLENGE + f', error="insufficient_scope",'
                     f' scope="{needed}"'})

    def _check_metrics_access(self, key: ApiKey, scope: HTTPScope) -> None:
        """The counters are fleet-wide: a key bound to a prefix must not read them."""
        if "read" not in key.scopes and "admin" not in key.scopes:
            raise self._lacks_scope(key, "read", scope)
        if key.prefix:
            AUTH_FAILURES["prefix"] += 1
            client_error(log, "access refused: key %s (prefix %r) asked for %s",
                         key, key.prefix, scope["path"])
            raise PermissionDeniedException(
                "metrics are fleet-wide: they need a 'read' or 'admin' key bound to no prefix")

    def _limit_rate(self, key: ApiKey, limit: KeyRateLimit) -> None:
        wait = limit.wait_s(key.id)
        if wait:
            self.rate_limited[key.name, key.id] += 1
            retry_after = max(1, math.ceil(wait))
            client_error(log, "rate limit: key %s over %g requests/s", key, limit.rate)
            raise TooManyRequestsException(
                f"over this key's rate limit of {limit.rate:g} requests a second (bursts of"
                f" {limit.burst}); retry after {retry_after} s",
                headers={"Retry-After": str(retry_after)})

    async def verify(self, token: str, digest: bytes, scope: HTTPScope) -> ApiKey:
        """The key (not found in the cache of verified keys) if it is valid; else 401."""
        now = time.monotonic()
        if not KEY_FORMAT.match(token):
            # What was wrong, never the key itself.
            shape = ("starting with 'vs_'" if token.startswith(KEY_PREFIX)
                     else "not starting with 'vs_'")
            raise self._refuse(scope, "malformed",
                               detail=f"a key of {len(token)} characters {shape}"
                                      " (keys are 'vs_' and 43 characters)")
        refused = self._refused.get(digest)
        if refused is not None and refused[0] > now:
            raise self._refuse(scope, "revoked" if refused[1] else "unknown", digest, refused[1])
        found = await self._lookup(digest)
        if isinstance(found, ApiKey):
            if self._ttl > 0:
                _remember(self._valid, digest, found, now + self._ttl, MAX_VALID)
            return found
        if self._ttl > 0:
            _remember(self._refused, digest, found, now + self._ttl, self._max_refused)
        raise self._refuse(scope, "revoked" if found else "unknown", digest, found)

    async def _compat_key(self, scope: HTTPScope) -> ApiKey:
        """The key named by VITALSTORE_COMPAT_KEY_NAME, checked like any other key."""
        expires, key = self._compat
        if expires <= time.monotonic():
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    key = await keys.find_active_by_name(self._pool, self.compat_key_name)
            except CONNECTION_ERRORS as exc:
                log.warning("cannot verify the compatibility key: %s", type(exc).__name__)
                raise ServiceUnavailableException(
                    "cannot verify the API key: database unavailable",
                    headers={"Retry-After": "1"}) from None
            self._compat = (time.monotonic() + self._ttl, key)
        if key is None:
            raise self._refuse(scope, "missing", detail=(
                f"no key, and VITALSTORE_COMPAT_KEY_NAME={self.compat_key_name!r} names no"
                " active key"))
        return key

    @property
    def refused_cached(self) -> int:
        return len(self._refused)

    def forget(self, key_id: int) -> None:
        """Drop a key from this process's cache at once (it was revoked here)."""
        for digest in [d for d, (_, key) in self._valid.items() if key.id == key_id]:
            del self._valid[digest]

    async def _lookup(self, digest: bytes) -> ApiKey | Revoked | None:
        # Concurrent requests with the same uncached key share one lookup.
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._lookup_done(digest, done))
        return await asyncio.shield(task)

    def _lookup_done(self, digest: bytes, task: asyncio.Task[ApiKey | Revoked | None]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter went away

    async def _fetch(self, digest: bytes) -> ApiKey | Revoked | None:
        async with self._lookup_slots:
            self.lookups += 1
            self._lookups_running += 1
            self.lookups_peak = max(self.lookups_peak, self._lookups_running)
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    return await keys.find(self._pool, digest)
            except CONNECTION_ERRORS as exc:
                log.warning("cannot verify an API key: %s", type(exc).__name__)
                raise ServiceUnavailableException(
                    "cannot verify the API key: database unavailable",
                    headers={"Retry-After": "1"}) from None
            finally:
                self._lookups_running -= 1

    def _refuse(self, scope: HTTPScope, reason: str, digest: bytes = b"",
                revoked: Revoked | None = None, detail: str = "") -> NotAuthorizedException:
        AUTH_FAILURES["malformed" if reason == "scheme" else reason] += 1
        # Never the key: the name and id of a revoked one, else a fingerprint of its hash.
        who = detail or (f"key {revoked}" if revoked
                         else f"key sha256:{digest.hex()[:12]}" if digest else "no key")
        client = scope.get("client") or ("?", 0)
        client_error(log, "authentication failed (%s): %s, %s %s from %s", reason, who,
                     scope["method"], scope["path"], client[0])
        return NotAuthorizedException(
            _MESSAGES[reason],
            headers={"WWW-Authenticate": _CHALLENGE} if reason == "missing" else _INVALID)


class AuthMiddleware:
    """Checks the key of every request to a route not declared open, before its handler."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        opt = scope["route_handler"].opt
        access = opt.get(ACCESS_OPT, DEFAULT_ACCESS)
        http = cast("HTTPScope", scope)  # the service has no websocket routes
        # OPTIONS only lists methods, and CORS preflights never carry a key.
        if access not in ("open", "handler") and http["method"] != "OPTIONS":
            store: KeyStore = scope["litestar_app"].state.services.keys
            scope["auth"] = await store.authorize(http, access, COMPAT_OPT in opt)
        await self.app(scope, receive, send)


def _error_response(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response(error_body(request.url.path, exc.detail), status_code=exc.status_code,
                    headers=exc.headers)


# The API's error shape (`{"error": ...}`, or the old one under /vital-data) for what the
# middleware and Litestar's router raise.
# 400 by class, not by status: a ValidationException (a ClientException too) keeps its own
# handler, which explains what was wrong with the body.
EXCEPTION_HANDLERS: Final[dict[Any, Any]] = {
    ClientException: _error_response,
    **{status: _error_response for status in (401, 403, 404, 405, 429, 503)}}
