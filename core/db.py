"""The asyncpg pool of the REST core, configured from Settings, and its breaker.

PostgreSQL out of reach (down, or behind a partition that drops packets) is
answered quickly: a query that runs out of ``DB_COMMAND_TIMEOUT`` ends then,
its connection closed at once (`_Connection`), and the first such failure
opens the database's breaker (core/infra/breaker.py): from then on REST calls
that need the database are refused at once with 503 and ``Retry-After``
(`Database.check`), readiness is red, and a probe in the background
(``DB_PROBE_TIMEOUT`` a try, a try a second) closes the breaker when
PostgreSQL answers again; the pool's connections that lived through the
outage are then replaced as they are next used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from core.infra.breaker import Breaker
from core.infra.errors import Unavailable
from core.infra.settings import Settings
from core.migrate import Conn, SchemaError, inspect, migrate

__all__ = ["Database", "check_schema", "is_outage", "one", "prepare_schema"]

log = logging.getLogger("core.db")


#: What `one` runs on: a pool, a connection, or a pool's connection proxy.
Queryable = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy


async def one(db: Queryable, sql: str, *args: Any) -> asyncpg.Record:
    """The row of a statement that always returns exactly one (aggregates, RETURNING)."""
    row = await db.fetchrow(sql, *args)
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


#: Seconds between probes of a database found unreachable.
PROBE_EVERY = 1.0

#: Failures that say PostgreSQL is out of reach (not that a query was wrong).
_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is out of reach (what opens its breaker)."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)  # "connection is closed", "... was closed in the middle"
    return isinstance(exc, _OUTAGES)


#: Background CancelRequests (`_Connection`): held so that they run to their end.
_cancels: set[asyncio.Task[None]] = set()


class _Connection(asyncpg.Connection):
    """asyncpg's connection, where a query that times out ends at its timeout.

    On a command timeout (or a cancelled query), asyncpg opens a second
    connection to send PostgreSQL a CancelRequest, and the pool's release
    waits for it, up to the command timeout again: behind a partition that
    drops packets, every request took twice ``DB_COMMAND_TIMEOUT``. Here the
    connection is closed instead (the pool opens a new one when it needs
    one) and the CancelRequest still goes, in the background and bounded, so
    that a slow query on a server that answers does not run on.
    """

    def _cancel_current_command(
        self, waiter: asyncio.Future[None], cancel_waiter: asyncio.Future[None] | None = None
    ) -> None:
        proto = self._protocol  # type: ignore[attr-defined]
        pid, secret = proto.backend_pid, proto.backend_secret
        if not waiter.done():
            waiter.set_result(None)
        # Not now: asyncpg's protocol still writes to its transport after this call.
        # Closing the connection completes `cancel_waiter` for whoever waits on it.
        self._loop.call_soon(self.terminate)  # type: ignore[attr-defined]
        task = self._loop.create_task(self._cancel_request(pid, secret))  # type: ignore[attr-defined]
        _cancels.add(task)
        task.add_done_callback(_cancels.discard)

    async def _cancel_request(self, pid: int, secret: bytes) -> None:
        from asyncpg import connect_utils

        try:
            async with asyncio.timeout(self._config.command_timeout or 10.0):  # type: ignore[attr-defined]
                await connect_utils._cancel(  # type: ignore[attr-defined]
                    loop=self._loop,  # type: ignore[attr-defined]
                    addr=self._addr,  # type: ignore[attr-defined]
                    params=self._params,  # type: ignore[attr-defined]
                    backend_pid=pid,
                    backend_secret=secret,
                )
        except Exception as exc:
            log.debug("cancel request for backend %s not delivered: %r", pid, exc)


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

    def __init__(
        self, pool: asyncpg.Pool, schema: str, url: str = "", probe_timeout: float = 2.0
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.url = url
        self.probe_timeout = probe_timeout
        #: Opened by the first outage (`failed`), closed by the probe alone.
        self.breaker = Breaker(1, PROBE_EVERY)
        #: Called once per call refused while the breaker is open (a metric).
        self.on_refused: Callable[[], None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._closing = False

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
            connection_class=_Connection,
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
        return cls(pool, schema, url, settings.db_probe_timeout)

    @property
    def reachable(self) -> bool:
        """False from the first outage until a probe reaches PostgreSQL again."""
        return self.breaker.state == "closed"

    def check(self) -> None:
        """Raise `Unavailable` (503, ``Retry-After``) at once while the breaker is open."""
        if self.breaker.state != "closed":
            if self.on_refused is not None:
                self.on_refused()
            raise Unavailable("the database is unreachable, retry later")

    def failed(self, exc: BaseException) -> None:
        """A call that needed the database failed with ``exc``: an outage opens the breaker."""
        if not is_outage(exc) or self.breaker.state != "closed" or self._closing:
            return  # open already: the probe alone decides when it closes
        self.breaker.failure(time.monotonic())
        log.warning(
            "database unreachable (%s); refusing calls that need it until it answers again",
            str(exc) or type(exc).__name__,
        )
        self._probe = asyncio.ensure_future(self._probe_until_back(time.monotonic()))

    async def _probe_until_back(self, since: float) -> None:
        while not await self._answers():
            now = time.monotonic()
            self.breaker.failure(now)  # half open: open again for PROBE_EVERY
            await asyncio.sleep(self.breaker.refuse(now) or 0.0)
            self.breaker.refuse(time.monotonic())  # open: half open, the next probe decides
        # Connections that lived through the outage may be dead (a restarted
        # server); each is replaced when it is next acquired.
        await self.pool.expire_connections()
        self.breaker.success()
        log.info("database reachable again after %.1fs; serving calls", time.monotonic() - since)

    async def _answers(self) -> bool:
        """Whether PostgreSQL accepts a new connection and answers on it within the probe timeout."""
        conn: asyncpg.Connection | None = None
        try:
            async with asyncio.timeout(self.probe_timeout):
                conn = await asyncpg.connect(self.url, timeout=self.probe_timeout)
                await conn.fetchval("select 1")
                await conn.close()
        except Exception as exc:
            log.debug("database probe failed: %r", exc)
            return False
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()  # timed out or cancelled (at shutdown) on the way
        return True

    async def close(self, grace: float = 5.0) -> None:
        self._closing = True
        if self._probe is not None:
            self._probe.cancel()
        try:
            await asyncio.wait_for(self.pool.close(), grace)
        except TimeoutError:
            log.warning("database pool did not close within %.1fs; terminating", grace)
            self.pool.terminate()

    async def healthy(self) -> bool:
        if not self.reachable:
            return False
        try:
            async with asyncio.timeout(1.0):
                await self.pool.fetchval("select 1")
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.failed(exc)
            return False
        return True
