"""API keys: generation, hashing, and the SQL of the `api_keys` table.

A key is `vs_` and 32 random bytes in URL-safe base64. Only its SHA-256 is stored: with 256
random bits there is nothing to brute-force, so a fast hash (not a password hash) is the right
tool and no server secret is needed; a dump of the database holds no usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

import asyncpg
import msgspec

from vitalstore.problems import AmbiguousName, DuplicateName, InvalidKeySpec

# What a key may do (not ASGI's `Scope`, the request's connection scope).
KeyScope = Literal["ingest", "read", "admin"]
SCOPES: Final[tuple[KeyScope, ...]] = ("ingest", "read", "admin")

KEY_PREFIX = "vs_"
# "vs_" + base64url of 32 bytes without padding: anything else is refused without a lookup.
KEY_FORMAT = re.compile(r"^vs_[A-Za-z0-9_-]{43}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ApiKey(msgspec.Struct, frozen=True):
    """What a verified key may do: its scopes, and the device ids it covers."""

    name: str
    scopes: frozenset[str]
    prefix: str = ""  # "" covers every device
    id: int = 0  # never reused, unlike a name: what log lines and rate limits go by

    def covers(self, device: str) -> bool:
        return device.startswith(self.prefix)

    def __str__(self) -> str:
        """How log lines name a key: `'ward-1-gw' #17`."""
        return f"{self.name!r} #{self.id}"


class KeyInfo(msgspec.Struct, frozen=True):
    """A stored key as listed: never the key itself, nor its hash."""

    id: int
    name: str
    scopes: list[str]
    prefix: str | None
    created_at: datetime
    revoked_at: datetime | None


class Revoked(msgspec.Struct, frozen=True):
    name: str
    id: int

    def __str__(self) -> str:
        return f"{self.name!r} #{self.id}"


def generate() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def check_spec(name: str, scopes: list[str], prefix: str | None) -> None:
    """Raise InvalidKeySpec unless a key may be created with these."""
    if not _NAME.match(name):
        raise InvalidKeySpec(
            "name: 1 to 64 of letters, digits, '_', '.', ':', '@', '-', starting with a letter"
            " or digit")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidKeySpec(f"scopes: one or more of {', '.join(SCOPES)}"
                             + (f" (not {', '.join(unknown)})" if unknown else ""))
    if prefix is not None and not (1 <= len(prefix) <= 128 and not _CONTROL.search(prefix)):
        raise InvalidKeySpec("prefix: 1 to 128 characters, no control characters")


def parse_scopes(text: str) -> list[str]:
    """`ingest,read` -> ['ingest', 'read'], in the canonical order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    return [scope for scope in SCOPES if scope in names] + sorted(names - set(SCOPES))


Executor: TypeAlias = "asyncpg.Pool | asyncpg.Connection"


async def create(db: Executor, name: str, scopes: list[str], prefix: str | None = None
                 ) -> tuple[str, KeyInfo]:
    """Store a new key; returns it (the only time it exists in clear) and its record."""
    check_spec(name, scopes, prefix)
    key = generate()
    try:
        row = await db.fetchrow(
            "INSERT INTO api_keys (name, key_hash, scopes, device_prefix)"
            " VALUES ($1, $2, $3, $4)"
            " RETURNING id, name, scopes, device_prefix, created_at, revoked_at",
            name, digest(key), [s for s in SCOPES if s in scopes], prefix)
    except asyncpg.UniqueViolationError:
        # Only keys of the very same prefix collide, so an admin bound to a prefix learns
        # nothing here about keys outside it.
        raise DuplicateName(f"name: an active key named {name!r} with this prefix exists;"
                            " revoke it first") from None
    return key, KeyInfo(*row)


async def list_all(db: Executor, *, within: str = "") -> list[KeyInfo]:
    """Every key (revoked ones too) whose prefix lies within `within`, by name."""
    rows = await db.fetch(
        "SELECT id, name, scopes, device_prefix, created_at, revoked_at FROM api_keys"
        " WHERE starts_with(coalesce(device_prefix, ''), $1)"
        " ORDER BY name, created_at",
        within)
    return [KeyInfo(*row) for row in rows]


async def revoke(db: Executor, name: str, *, within: str = "", key_id: int | None = None
                 ) -> int | None:
    """Revoke the active key of that name (within a prefix, of that id if given).

    Returns its id, or None if there is none; raises AmbiguousName if several match.
    """
    rows = await db.fetch(
        "SELECT id FROM api_keys WHERE name = $1 AND revoked_at IS NULL"
        " AND starts_with(coalesce(device_prefix, ''), $2) AND ($3::int4 IS NULL OR id = $3)"
        " ORDER BY id",
        name, within, key_id)
    if len(rows) > 1:
        raise AmbiguousName(name, [row["id"] for row in rows])
    if not rows:
        return None
    done: Any = await db.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL"
        " RETURNING id", rows[0]["id"])
    return int(done) if done is not None else None


async def find(db: Executor, key_digest: bytes) -> ApiKey | Revoked | None:
    """The key with this SHA-256, or Revoked, or None."""
    row = await db.fetchrow(
        "SELECT id, name, key_hash, scopes, device_prefix, revoked_at FROM api_keys"
        " WHERE key_hash = $1",
        key_digest)
    # The index lookup can only leak timing about a hash, which tells nothing about a key
    # (that takes a preimage); the final equality is constant-time all the same.
    if row is None or not hmac.compare_digest(row["key_hash"], key_digest):
        return None
    if row["revoked_at"] is not None:
        return Revoked(row["name"], row["id"])
    return ApiKey(row["name"], frozenset(row["scopes"]), row["device_prefix"] or "", row["id"])


async def find_active_by_name(db: Executor, name: str) -> ApiKey | None:
    """The active key of that name, or None."""
    row = await db.fetchrow(
        "SELECT name, scopes, device_prefix FROM api_keys WHERE name = $1 AND revoked_at IS NULL",
        name)
    return None if row is None else ApiKey(row["name"], frozenset(row["scopes"]),
                                           row["device_prefix"] or "")


async def is_active(db: Executor, key: str) -> bool:
    return isinstance(await find(db, digest(key)), ApiKey)
