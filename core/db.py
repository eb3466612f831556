"""The asyncpg pool of the REST core, configured from Settings."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from core.infra.settings import Settings
from core.migrate import Conn, SchemaError, inspect, migrate

__all__ = ["Database", "check_schema", "one", "prepare_schema"]

log = logging.getLogger("core.db")


#: What `one` runs on: a pool, a connection, or a pool's connection proxy.
Queryable = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy


async def one(db: Queryable, sql: str, *args: Any) -> asyncpg.Record:
    """The row of a statement that always returns exactly one (aggregates, RETURNING)."""
    row = await db.fetchrow(sql, *args)
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


async def _release(conn: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back: only what our queries need.

    asyncpg's default reset is a round trip per release (unlock advisory locks,
    CLOSE ALL, UNLISTEN *, RESET ALL) for session state the core never
    creates: no session locks, cursors, LISTEN or SET outside a transaction.
    A transaction left open (it never is; `transaction()` blocks close theirs)
    is still rolled back.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def check_schema(conn: Conn, schema: str) -> None:
    """Refuse (`SchemaError`) a schema this code cannot serve from; log what else is odd."""
    state = await inspect(conn, schema)
    if not state.ok:
        raise SchemaError(state.problem())
    if state.newer:
        log.info(
            "schema %s holds migration(s) %s that this release does not ship "
            "(a newer release's; starting, as migrations only expand the schema)",
            schema,
            ", ".join(state.newer),
        )
    if state.unrecorded:
        log.info(
            "schema %s: checksums of %d migration(s) not recorded yet (`python -m core migrate` "
            "records them)",
            schema,
            len(state.unrecorded),
        )


async def prepare_schema(settings: Settings) -> None:
    """What `Database.open` does to the schema, on a connection of its own."""
    if not settings.database_url:
        raise ValueError("DATABASE_URL is not set")
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        await _prepare(conn, settings.database_schema, settings.migrate_on_start)
    finally:
        await conn.close()


async def _prepare(conn: Conn, schema: str, apply: bool) -> None:
    if apply:
        applied = await migrate(conn, schema)
        if applied:
            log.info("applied %d migration(s) to schema %s", len(applied), schema)
    else:
        await check_schema(conn, schema)


class Database:
    """A started pool on ``DATABASE_URL``, with ``DATABASE_SCHEMA`` as search path."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    @classmethod
    async def open(cls, settings: Settings, *, migrate_now: bool | None = None) -> Database:
        """Open the pool, then check the schema's migrations, or apply them when
        ``migrate_now`` (by default MIGRATE_ON_START) says so.

        Raises `SchemaError` when the schema lacks a shipped migration or holds
        an edited one: this code cannot serve from it.
        """
        if not settings.database_url:
            raise ValueError("DATABASE_URL is not set")
        url, schema = settings.database_url, settings.database_schema
        pool = await asyncpg.create_pool(
            url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_connect_timeout,
            command_timeout=settings.db_command_timeout,
            statement_cache_size=settings.db_statement_cache_size,
            max_inactive_connection_lifetime=300.0,
            reset=_release,
            server_settings={
                "search_path": schema,
                "timezone": "UTC",
                "application_name": "tornado-gateway",
            },
        )
        assert pool is not None
        try:
            # On a pool connection: no extra connection (and handshake) at start.
            async with pool.acquire() as conn:
                apply = settings.migrate_on_start if migrate_now is None else migrate_now
                await _prepare(conn, schema, apply)
        except Exception:
            await cls(pool, schema).close()
            raise
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, schema)

    async def close(self, grace: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), grace)
        except TimeoutError:
            log.warning("database pool did not close within %.1fs; terminating", grace)
            self.pool.terminate()

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                await self.pool.fetchval("select 1")
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True
