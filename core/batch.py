"""Write coalescing: concurrent inserts of one kind go to PostgreSQL as one statement.

Under load most of an insert's cost is per statement, not per row: a round
trip, a commit and a WAL flush. A `Batcher` sends a row at once when fewer
than ``max_inflight`` statements are running, so a lone request waits for
nothing; rows that arrive meanwhile queue up and leave together, up to
``max_batch`` per statement, when a running statement finishes.

The statement takes ``$1``, a JSON array of rows, and returns one record per
row in the same order. If a batch of several fails with a database error,
each of its rows is retried alone, so every request gets its own outcome; a
lost connection fails the whole batch (each request answers 503).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from core.infra.errors import Unavailable
from core.infra.tasks import TaskSet

__all__ = ["Batcher"]

log = logging.getLogger("core.batch")

_Pending = tuple[bytes, "asyncio.Future[asyncpg.Record]"]


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
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._queue: list[_Pending] = []
        self._inflight = 0
        self._drains = TaskSet(log)
        self.statements = 0  # for tests and metrics: statements sent

    async def submit(self, row_json: bytes) -> asyncpg.Record:
        """Insert one row (JSON object bytes); its returned record."""
        if len(self._queue) >= self._max_queued:
            raise Unavailable("too many writes queued")
        future: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
        self._queue.append((row_json, future))
        if self._inflight < self._max_inflight:
            self._inflight += 1
            self._drains.spawn(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch)
        finally:
            self._inflight -= 1

    async def _send(self, batch: list[_Pending]) -> None:
        payload = b"[" + b",".join(row for row, _ in batch) + b"]"
        self.statements += 1
        try:
            records = await self._pool.fetch(self._sql, payload.decode())
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            log.info("a batch of %d rows failed (%s); retrying each alone", len(batch), exc)
            for one in batch:
                await self._send([one])
            return
        except BaseException as exc:
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if len(records) != len(batch):
            _fail(batch, RuntimeError(f"{len(records)} rows returned for {len(batch)}"))
            return
        for (_, future), record in zip(batch, records, strict=True):
            if not future.done():  # the request may have gone away meanwhile
                future.set_result(record)


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
