"""`vitalstore serve | db upgrade | keys ...`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import logging.config
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

from vitalstore import keys, logs, telemetry
from vitalstore.database import NotDurable, alembic_config, check_durability
from vitalstore.problems import AmbiguousName, InvalidKeySpec
from vitalstore.readings import parse_time
from vitalstore.settings import Settings

# pg_advisory_lock keys: one migration at a time when replicas start at once (the first
# migrates, the others wait and find the schema at head); one first admin key.
MIGRATION_LOCK = 0x7669_7461_6C00_0002
FIRST_ADMIN_LOCK = 0x7669_7461_6C00_0003


def _alembic_upgrade(settings: Settings) -> None:
    from alembic import command

    try:
        config = alembic_config(settings.sqlalchemy_url)
    except FileNotFoundError as exc:
        raise SystemExit(f"vitalstore: {exc}; run `db upgrade` from a source checkout") from None
    command.upgrade(config, "head")


async def _ensure_database(settings: Settings) -> None:
    """Create the database named in the URL when it does not exist yet."""
    try:
        conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    name = database_name(settings.asyncpg_dsn)
    admin = await asyncpg.connect(settings.asyncpg_dsn, database="postgres", timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass  # created meanwhile by another `db upgrade` (the second is what a race gives)
    finally:
        await admin.close()


async def _upgrade(settings: Settings) -> None:
    """Create the database if needed and migrate it to head, one process at a time."""
    await _ensure_database(settings)
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        # Alembic's env.py runs an event loop of its own: off this one.
        await asyncio.to_thread(_alembic_upgrade, settings)
        await _apply_policies(settings)
    finally:
        await conn.close()  # and with the session, the lock


def database_name(dsn: str) -> str:
    """The database name of a PostgreSQL URL."""
    name = urlparse(dsn).path.lstrip("/")
    if not name or '"' in name:
        raise SystemExit(f"cannot tell the database name from {dsn!r}")
    return name


async def _apply_policies(settings: Settings) -> None:
    from vitalstore.policies import APACHE_WARNING, apply_policies, has_columnstore

    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        if not await has_columnstore(conn):
            print(f"vitalstore: warning: {APACHE_WARNING}", file=sys.stderr)
        for change in await apply_policies(conn, settings):
            print(f"policy set: {change}", file=sys.stderr)
    finally:
        await conn.close()


async def _preflight(settings: Settings) -> dict[str, str]:
    """Refuse a database where commits are not durable; what the start line reports."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        await check_durability(conn)
        row = await conn.fetchrow(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),"
            " current_setting('timescaledb.license', true)")
    finally:
        await conn.close()
    # The license setting tells the editions apart: "timescale" is the community edition.
    edition = {"timescale": "community", "apache": "Apache-2 only"}.get(row[1] or "", "unknown")
    return {"timescaledb": row[0] or "missing", "edition": edition}


def start_line(settings: Settings, database: dict[str, str]) -> tuple[str, dict[str, object]]:
    """The one INFO line the service logs at start, and its fields (no password, no key)."""
    url = urlparse(settings.asyncpg_dsn)
    fields: dict[str, object] = {
        "version": package_version("vitalstore"),
        "database": f"{url.path.lstrip('/')} on {url.hostname or 'localhost'}:{url.port or 5432}",
        "timescaledb": f"{database['timescaledb']} ({database['edition']} edition)",
        "auth": settings.auth,
        "compat_key": settings.compat_key_name or "none",
        "workers": settings.workers,
        "access_log": logs.access_log_enabled(settings),
        "address": f"http://{settings.host}:{settings.port}",
    }
    message = ("vitalstore {version} serving {address}: database {database}, TimescaleDB"
               " {timescaledb}, auth {auth}, compatibility key {compat_key}, workers {workers},"
               " access log {access_log}").format(**fields)
    return message, fields


def _tune_gc() -> None:
    """Cyclic GC less often, and never over the objects loaded at start.

    Every request allocates futures, dicts and coroutines; with the default threshold (700)
    collections ran several times per flush and showed as 7% of the worker's CPU and as the
    tail of the latency. Granian forks its workers from this process, so they inherit both
    the thresholds and the frozen generation (gc.freeze() before fork also spares
    copy-on-write). Measured (wrk, 64 connections, medians of 4 interleaved rounds, shared
    machine): single POST 2,129 -> 2,464 req/s, no-op POST 5,575 -> 6,498 req/s with p99
    85 -> 31 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def serve(settings: Settings) -> None:
    """Run the app under granian (app factory), `settings.workers` processes."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops, TaskImpl
    from granian.log import LogLevels

    try:
        database = asyncio.run(_preflight(settings))
    except NotDurable as exc:
        raise SystemExit(f"vitalstore: {exc}") from None
    logging.config.dictConfig(logs.dict_config(settings))
    message, fields = start_line(settings, database)
    logging.getLogger("vitalstore").info(message, extra=fields)
    # Workers rebuild the settings from the environment: pass the flags on through it.
    for field in ("host", "port", "workers"):
        os.environ[f"VITALSTORE_{field.upper()}"] = str(getattr(settings, field))
    _tune_gc()
    server = Granian(
        "vitalstore.app:create_app",
        factory=True,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        loop=Loops.uvloop,
        task_impl=TaskImpl(settings.task_impl),
        log_access=False,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=logs.dict_config(settings),
        # Requests in flight at SIGTERM are answered within a flush timeout, then the
        # lifespan flushes what is left: granian must not kill the workers before.
        workers_kill_timeout=int(max(settings.shutdown_timeout_s, settings.flush_timeout_s)) + 5,
    )
    with telemetry.multiprocess_mode():
        server.serve()


LOCAL_ADMIN = "local-admin"


def _add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys_cmd = commands.add_parser("keys", help="API keys")
    keys_commands = keys_cmd.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key; prints it once")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", required=True, help="ingest, read, admin, comma-separated")
    create.add_argument("--prefix", help="only devices whose id starts with this")
    keys_commands.add_parser("list", help="keys and their scopes (never the keys)")
    revoke = keys_commands.add_parser("revoke", help="revoke the active key of that name")
    revoke.add_argument("name")
    revoke.add_argument("--id", type=int, help="which one, when several keys have the name")
    local = keys_commands.add_parser(
        "local-admin", help=f"create (or reuse) a key named {LOCAL_ADMIN!r} kept in a file")
    local.add_argument("--file", type=Path, default=Path(".vitalstore/admin.key"))
    first = keys_commands.add_parser(
        "first-admin", help=f"when there is no key at all, create {FIRST_ADMIN!r} (all scopes)"
                            " into a file and print it once (the Docker image's first start)")
    first.add_argument("--file", type=Path, required=True)


async def _keys_command(settings: Settings, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        if args.keys_command == "create":
            key, info = await keys.create(conn, args.name, keys.parse_scopes(args.scope),
                                          args.prefix)
            bound = f"devices starting with {info.prefix!r}" if info.prefix else "all devices"
            print(f"created key {info.name!r}: {','.join(info.scopes)} on {bound}."
                  " It is shown only this once:")
            print(key)
        elif args.keys_command == "list":
            _print_keys(await keys.list_all(conn))
        elif args.keys_command == "revoke":
            revoked = await keys.revoke(conn, args.name, key_id=args.id)
            if revoked is None:
                raise SystemExit(f"vitalstore: no active key named {args.name!r}")
            print(f"revoked key {args.name!r} #{revoked}; running servers refuse it within"
                  f" {settings.auth_cache_s:g} s")
    except (InvalidKeySpec, AmbiguousName) as exc:
        raise SystemExit(f"vitalstore: {exc}") from None
    finally:
        await conn.close()


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _print_keys(infos: list[keys.KeyInfo]) -> None:
    rows = [("NAME", "SCOPES", "PREFIX", "ID", "CREATED (UTC)", "REVOKED")]
    for info in infos:
        rows.append((info.name, ",".join(info.scopes), info.prefix or "*", str(info.id),
                     _utc(info.created_at), _utc(info.revoked_at) if info.revoked_at else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


async def _ensure_local_admin(settings: Settings, current: str) -> str:
    """`current` if it is an active key, else a new admin key named LOCAL_ADMIN."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        if current and await keys.is_active(conn, current):
            return current
        async with conn.transaction():
            # The file held the only copy of the old key: without it that key is of no use.
            for info in await keys.list_all(conn):
                if info.name == LOCAL_ADMIN and info.prefix is None and not info.revoked_at:
                    await keys.revoke(conn, LOCAL_ADMIN, key_id=info.id)
            key, _ = await keys.create(conn, LOCAL_ADMIN, list(keys.SCOPES))
            return key
    finally:
        await conn.close()


def _local_admin(settings: Settings, path: Path) -> None:
    """For `make run`: the key kept in `path` if it still works, else a new one stored there."""
    current = path.read_text().strip() if path.exists() else ""
    key = asyncio.run(_ensure_local_admin(settings, current))
    if key != current:
        _keep_key(path, key)
        # Shown this once; afterwards only where it is kept (a terminal's scrollback and CI
        # logs are no place for a key printed at every start).
        print(f"created the local admin key (all scopes), kept in {path}:")
        print(f"  {key}")
    else:
        print(f"local admin key (all scopes): in {path}")
    print(f'  curl -H "Authorization: Bearer $(cat {path})"'
          f" http://{settings.host}:{settings.port}/v1/devices")


FIRST_ADMIN = "admin"


def _keep_key(path: Path, key: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # also when an older file was there
    path.write_text(key + "\n")


async def _first_admin(settings: Settings, path: Path) -> bool:
    """An admin key if the database has no key at all: printed this once, kept in `path`.

    Under an advisory lock, so replicas starting at once create one key between them. The file
    is written before the key commits: a key never exists that no file holds.
    """
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", FIRST_ADMIN_LOCK)
            if await conn.fetchval("SELECT count(*) FROM api_keys") == 0:
                key, _ = await keys.create(conn, FIRST_ADMIN, list(keys.SCOPES))
                _keep_key(path, key)
                print(f"created the first admin key {FIRST_ADMIN!r} (all scopes), kept in"
                      f" {path}; it is shown only this once:\n  {key}", flush=True)
                return True
    finally:
        await conn.close()
    return False


def _first_admin_command(settings: Settings, path: Path) -> None:
    if asyncio.run(_first_admin(settings, path)):
        return
    where = f"the first admin key is in {path}" if path.exists() else (
        "create one with `vitalstore keys create --name N --scope ingest,read,admin`")
    print(f"API keys exist, none created ({where})", flush=True)


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vitalstore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="serve the HTTP API")
    serve_cmd.add_argument("--host", help="bind address (VITALSTORE_HOST)")
    serve_cmd.add_argument("--port", type=int, help="port (VITALSTORE_PORT)")
    serve_cmd.add_argument("--workers", type=int, help="processes (VITALSTORE_WORKERS)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "upgrade", help="create the database if needed, migrate to head, set the policies")
    _add_keys_commands(commands)

    rollups_cmd = commands.add_parser("rollups", help="rollup tables")
    rollups_commands = rollups_cmd.add_subparsers(dest="rollups_command", required=True)
    rebuild_cmd = rollups_commands.add_parser(
        "rebuild", help="recompute the rollups of the whole UTC days holding [from, to)")
    rebuild_cmd.add_argument("--from", dest="start", required=True, type=_time,
                             help="RFC 3339 or Unix seconds")
    rebuild_cmd.add_argument("--to", dest="end", required=True, type=_time,
                             help="RFC 3339 or Unix seconds (exclusive)")
    rebuild_cmd.add_argument("--device", help="only this device id")

    maintenance = commands.add_parser("maintenance", help="columnstore and retention policies")
    maintenance_commands = maintenance.add_subparsers(dest="maintenance_command", required=True)
    maintenance_commands.add_parser("run", help="run every vitalstore policy job once, now")

    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers")}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        raise SystemExit(f"vitalstore: {exc}") from None

    if args.command == "serve":
        serve(settings)
    elif args.command == "db" and args.db_command == "upgrade":
        asyncio.run(_upgrade(settings))
        print("database at head", file=sys.stderr)
    elif args.command == "keys" and args.keys_command == "local-admin":
        _local_admin(settings, args.file)
    elif args.command == "keys" and args.keys_command == "first-admin":
        _first_admin_command(settings, args.file)
    elif args.command == "keys":
        asyncio.run(_keys_command(settings, args))
    elif args.command == "rollups":
        from vitalstore.rebuild import rebuild_command

        print(asyncio.run(rebuild_command(settings, args.start, args.end, args.device)),
              file=sys.stderr)
    elif args.command == "maintenance":
        from vitalstore.policies import maintenance_command

        report, ok = asyncio.run(maintenance_command(settings))
        print(report, file=sys.stderr)
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
