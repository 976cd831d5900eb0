"""Alembic environment: async engine, URL from vitalstore's settings (VITALSTORE_DATABASE_URL)."""

import asyncio

import asyncpg
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from vitalstore.schema import metadata
from vitalstore.settings import Settings

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.attributes.get("url") or Settings.from_env().sqlalchemy_url
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def update_timescaledb(url: str) -> None:
    """Move the extension to the installed TimescaleDB (revision 0004 needs 2.28.3).

    `ALTER EXTENSION timescaledb UPDATE` must be the first statement of its session: the first
    statement of any other loads the old version's library, which then cannot be replaced. So
    it runs here, on a connection of its own, before the revisions run on theirs. Where the
    extension is already current it only says so; where it is not created yet, revision 0001
    creates it at the installed version.
    """
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await conn.execute("ALTER EXTENSION timescaledb UPDATE")
    except asyncpg.UndefinedObjectError:
        pass
    finally:
        await conn.close()


async def run_migrations_online() -> None:
    await update_timescaledb(_url())
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
