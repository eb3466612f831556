"""Write coalescing: concurrent inserts of one kind go to PostgreSQL as one statement.

Under load most of an insert's cost is per statement, not per row: a round
trip, a commit and a WAL flush. A `Batcher` hands its rows to a
`core.infra.coalesce.Coalescer`: a row is sent at once when fewer than
``max_inflight`` statements are running, so a lone request waits for
nothing; rows that arrive meanwhile queue up and leave together, up to
``max_batch`` per statement, when a running statement finishes.

The statement takes ``$1``, a JSON array of rows, and returns one record per
row in the same order. If a batch of several fails with a database error,
each of its rows is retried alone, so every request gets its own outcome; a
lost connection fails the whole batch (each request answers 503).
"""

from __future__ import annotations

import logging

import asyncpg

from core.infra.coalesce import Coalescer

__all__ = ["Batcher"]

log = logging.getLogger("core.batch")


class Batcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sql: str,
        *,
        max_batch: int = 64,
        max_inflight: int = 4,
        max_queued: int = 10_000,
    ) -> None:
        self._pool = pool
        self._sql = sql
        self._rows: Coalescer[bytes, asyncpg.Record] = Coalescer(
            self._send,
            max_batch=max_batch,
            max_inflight=max_inflight,
            max_queued=max_queued,
            what="writes",
        )
        self.statements = 0  # for tests and metrics: statements sent

    async def submit(self, row_json: bytes) -> asyncpg.Record:
        """Insert one row (JSON object bytes); its returned record."""
        return await self._rows.submit(row_json)

    async def _send(self, rows: list[bytes]) -> list[asyncpg.Record | BaseException]:
        try:
            records = await self._fetch(rows)
        except asyncpg.PostgresError as exc:
            if len(rows) == 1:
                return [exc]
            log.info("a batch of %d rows failed (%s); retrying each alone", len(rows), exc)
            return [outcome for row in rows for outcome in await self._send([row])]
        return list(records)

    async def _fetch(self, rows: list[bytes]) -> list[asyncpg.Record]:
        self.statements += 1
        records: list[asyncpg.Record] = await self._pool.fetch(
            self._sql, (b"[" + b",".join(rows) + b"]").decode()
        )
        return records
