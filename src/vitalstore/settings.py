"""Settings: one frozen struct built from VITALSTORE_* environment variables and passed in."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import msgspec

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/vitalstore"

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta | None:
    """Parse `90s`, `15m`, `12h`, `90d`, `2w` or `forever` (None)."""
    if text.strip().lower() in ("forever", "never", "none"):
        return None
    match = _DURATION.match(text.lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 90d or forever)")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the service can be told; field `x` is read from `VITALSTORE_X`."""

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1

    # Ingest limits.
    buffer_max_readings: int = 100_000
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 10_000
    body_timeout_s: float = 30.0
    max_future_skew_s: float = 300.0

    # Group commit: a flush starts when this many readings wait, or this long after the first.
    flush_max_readings: int = 5_000
    flush_interval_ms: float = 2.0
    # Flushes run concurrently on up to this many connections, plus one that flushes small
    # requests only (at most this many readings), so they never wait behind a large flush.
    writer_connections: int = 2
    small_request_readings: int = 100
    read_pool_size: int = 4
    # Seconds a flush may take before its requests get 503 (the transaction is abandoned).
    flush_timeout_s: float = 10.0
    # Graceful shutdown: seconds granted to flush what is buffered.
    shutdown_timeout_s: float = 20.0

    chunk_interval: str = "1d"

    # Benchmark-only switches: the no-op routes, and rollup maintenance.
    bench_routes: bool = False
    rollups: bool = True

    # Chunks wholly older than this go to the columnstore (TimescaleDB's policy); "never": not.
    columnstore_after: str = "1d"
    # Retention per table: a duration or "forever" (TimescaleDB's policies).
    retention_raw: str = "90d"
    retention_1m: str = "365d"
    retention_1h: str = "forever"
    retention_1d: str = "forever"
    # Apache-only TimescaleDB (no policy jobs): how often the service applies retention itself.
    maintenance_interval_s: float = 3600.0
    # Seconds between folds of the pending rollup deltas into the levels (answers are exact
    # either way; the fold keeps the pending table small).
    rollup_fold_interval_s: float = 1.0

    # Access control: "required" or "disabled" (local experiments only; warned at each start).
    auth: Literal["required", "disabled"] = "required"
    # Seconds a verified (or refused) key is trusted without asking the database: a revoked
    # key keeps working for at most this long.
    auth_cache_s: float = 5.0
    # /metrics without a key (for scrapers on a trusted network).
    metrics_open: bool = False
    # Requests a second per key in each process (0: no limit), and the burst allowed at once
    # (0: one second's worth).
    key_rate_limit: float = 0.0
    key_rate_burst: int = 0

    # InfluxDB line protocol: the tag that holds the device id.
    lp_device_tag: str = "device"

    # MQTT: off unless a URL is given (mqtt://[user:password@]host:port).
    mqtt_url: str = ""
    mqtt_topics: str = "vitals/+/readings"  # comma-separated; the `+` level is the device id
    mqtt_group: str = "vitalstore"  # shared subscription group: $share/<group>/<topic>
    mqtt_client_id: str = ""  # default: vitalstore-<host name>-<port>[-<worker>]
    mqtt_dead_letter: str = "vitals-errors/{device}"
    # Messages the broker may send before acknowledgements (MQTT 5 receive maximum): what
    # one process holds at most; unacknowledged messages stop the flow.
    mqtt_receive_maximum: int = 200
    mqtt_session_expiry_s: int = 86_400
    # Clients of the system we replace send no key: a keyless /vital-data request gets the
    # rights of the key of this name ("" lets none in).
    compat_key_name: str = ""

    # granian's task implementation for the ASGI callables.
    task_impl: Literal["asyncio", "rust"] = "asyncio"

    log_format: str = "auto"  # auto | json | text
    log_level: str = "INFO"
    # One line per answer (also at log level DEBUG).
    access_log: bool = False
    # Browser clients: origins allowed by CORS, comma-separated ("" allows none, "*" any).
    cors_origins: str = ""

    def __post_init__(self) -> None:
        for name in ("chunk_interval", "columnstore_after", "retention_raw", "retention_1m",
                     "retention_1h", "retention_1d"):
            parse_duration(getattr(self, name))
        if self.key_rate_limit < 0 or self.key_rate_burst < 0:
            raise ValueError("key_rate_limit and key_rate_burst must not be negative")
        if self.buffer_max_readings < self.max_items:
            raise ValueError("buffer_max_readings must be at least max_items")

    @property
    def asyncpg_dsn(self) -> str:
        """The URL in the form asyncpg takes (no SQLAlchemy driver suffix)."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def sqlalchemy_url(self) -> str:
        """The URL in the form SQLAlchemy's async engine takes."""
        return self.asyncpg_dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from `VITALSTORE_*` variables; `overrides` (e.g. command-line flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            raw = environ.get(f"VITALSTORE_{field.name.upper()}")
            if raw is not None:
                values[field.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc}") from exc
