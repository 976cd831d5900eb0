"""Facts about the database that every layer may use: error classes, durability, schema head,
time bounds. It imports nothing of vitalstore, so every arrow points down to it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from alembic.config import Config

# Errors that mean the connection (or the server) is gone, not that the data is wrong.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # pg_terminate_backend, shutdown
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.InterfaceError,
    # A pooled connection that pg_terminate_backend left mid-protocol ("cannot switch to
    # state 11 (or 12); another operation is in progress"): gone as well, not the request's fault.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
# Errors worth retrying the same batch for (they should not happen: every phase locks in order).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
# The data itself was refused (class 22 data exception, class 23 integrity violation).
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
)

# Timestamps travel as microseconds since PostgreSQL's epoch (2000-01-01 UTC), the integer that
# asyncpg's tuple codec for timestamptz takes: no datetime object per reading on the hot path.
# It is also the oldest time a reading may have ("not before 2000": a reading years in the
# past would live in a chunk of its own).
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
EPOCH_UNIX_S = 946_684_800
# Data is never older than EPOCH (ingest refuses it), nor newer than this bound: clamping query
# times to them changes no answer and keeps the arithmetic in range.
EARLIEST = EPOCH
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
# timestamptz's resolution: the next instant after a stored timestamp.
ONE_MICROSECOND = timedelta(microseconds=1)

# The migrations sit beside the source tree (`alembic/`), not inside the package: a service
# installed from a wheel has none, and says so (`schema_head()` is None, /ready reports it).
ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


class NotDurable(RuntimeError):
    """The database would acknowledge commits that a crash can lose."""


async def check_durability(conn: asyncpg.Connection) -> None:
    """Refuse to run where a commit is not durable: a 202 must survive a crash."""
    for setting in ("fsync", "synchronous_commit"):
        if await conn.fetchval(f"SHOW {setting}") == "off":
            raise NotDurable(
                f"PostgreSQL has {setting}=off: acknowledged readings could be lost in a crash;"
                f" vitalstore refuses to start (set {setting}=on)"
            )


def alembic_config(sqlalchemy_url: str | None = None) -> Config:
    """Alembic's configuration for the migrations shipped beside this code.

    Raises FileNotFoundError when there are none (an installed wheel).
    """
    from alembic.config import Config

    if not ALEMBIC_INI.exists():
        raise FileNotFoundError(f"no migrations here: {ALEMBIC_INI} does not exist")
    config = Config(str(ALEMBIC_INI))
    if sqlalchemy_url is not None:
        config.attributes["url"] = sqlalchemy_url
    return config


def schema_head() -> str | None:
    """The newest Alembic revision shipped with this code; None without migrations."""
    from alembic.script import ScriptDirectory

    try:
        config = alembic_config()
    except FileNotFoundError:
        return None
    return ScriptDirectory.from_config(config).get_current_head()
