"""The transactional outbox, writer's side: a change event commits with its write.

A write that produces change events stores them in the ``outbox`` table
(core/migrations/0007_outbox.sql) by the same statement (`with_events`: one
round trip, one transaction), so a committed write always has its events
somewhere. After the commit the writer publishes them at once (the fast
path, core/events.py) and hands the rows' ids to `Outbox.published`, which
deletes them in batches: one ``DELETE ... WHERE id = ANY($1)`` every `TICK`
seconds or every `BATCH` ids. A row the writer could not publish (the broker
was down) or never got to (the process died) stays, and a relay publishes it
(core/relay.py).

Rows are written only when there is a publisher: with none, nothing would
drain them (`core.events.Events.queues`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from core.infra.tasks import finish

__all__ = ["Outbox", "with_events"]

log = logging.getLogger("core.outbox")

#: What a delete may fail with: the database's errors, and asyncpg's own on a connection
#: the database's loss left mid-operation (``InternalClientError``, which is neither):
#: the ids are kept, and a relay publishes their rows again if they are never deleted.
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError)  # fmt: skip


def with_events(write: str, resource: str, kind: str, *, queue: bool) -> str:
    """``write`` with a change event queued in the outbox for each row it returns.

    ``write`` is one statement (not a ``WITH``) returning ``id, version, body``
    (``body``: the resource's JSON text, null for a deletion). The result
    returns the same, in ``id`` order, and two more columns: ``event``, the
    outbox row's id, and ``call``, the id its publications carry
    (core/migrations/0007_outbox.sql); both null when not ``queue`` (no
    publisher: nothing is queued). ``resource`` and ``kind`` are the code's
    own constants, never input.
    """
    if not queue:
        return f"""
with written as ({write})
select id, version, body, null::bigint as event, null::text as call from written order by id
"""
    return f"""
with written as ({write}),
events as (select id, nextval('outbox_id_seq') as event from written),
queued as (
    insert into outbox (id, channels, payload, created_at)
    select e.event, array['{resource}', '{resource}:' || w.id],
           change_event('{kind}', w.id, w.version, w.body), now()
    from written w join events e using (id)
)
select w.id, w.version, w.body, e.event, outbox_call(e.event, now()) as call
from written w join events e using (id)
order by w.id
"""


class Outbox:
    """Deletes the rows whose events the writer published, in batches.

    The buffer of ids is bounded (`LIMIT`): while PostgreSQL does not take the
    deletes, ids past it are let go, and the relay publishes those rows again
    (`dropped` counts them; on history channels the call id makes that a no-op).
    """

    #: Seconds between deletes while ids wait.
    TICK = 0.05
    #: Ids that make a delete go at once.
    BATCH = 128
    #: Ids held at most (a delete failed: they wait for the next).
    LIMIT = 4096

    def __init__(
        self, pool: asyncpg.Pool, *, tick: float = TICK, batch: int = BATCH, limit: int = LIMIT
    ) -> None:
        self._pool = pool
        self.tick = tick
        self.batch = batch
        self.limit = limit
        self._ids: list[int] = []
        self._waiting = asyncio.Event()  # ids are held
        self._full = asyncio.Event()  # a batch of them
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Rows deleted, the statements that did, and ids let go because the buffer was full.
        self.deleted = 0
        self.flushes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._ids)

    def published(self, id: int) -> None:
        """The events of row ``id`` were published: delete it soon."""
        if len(self._ids) >= self.limit:
            self.dropped += 1
            return
        self._ids.append(id)
        self._waiting.set()
        if len(self._ids) >= self.batch:
            self._full.set()
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    async def _run(self) -> None:
        while not self._closing:
            await self._waiting.wait()
            if len(self._ids) < self.batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick):
                        await self._full.wait()
            self._waiting.clear()
            self._full.clear()
            try:
                await self.flush()
            except _DATABASE_ERRORS as exc:
                log.warning("outbox rows not deleted (kept for the next try): %s", exc)
                self._waiting.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick):
                        await self._full.wait()  # or close

    async def flush(self) -> None:
        """Delete the rows of every id held now (those of a failed delete are kept)."""
        ids, self._ids = self._ids, []
        if not ids:
            return
        self.flushes += 1
        try:
            await self._pool.execute("delete from outbox where id = any($1::bigint[])", ids)
        except BaseException:
            room = self.limit - len(self._ids)
            self.dropped += max(0, len(ids) - room)
            self._ids[:0] = ids[:room]
            raise
        self.deleted += len(ids)

    async def close(self, grace: float = 5.0) -> None:
        """Stop, deleting what is held (the pool must still be open).

        A delete under way is waited for, up to ``grace`` s, not cancelled
        (`core.infra.tasks.finish`).
        """
        self._closing = True
        self._waiting.set()
        self._full.set()
        if self._task is not None:
            await finish(self._task, grace)
            self._task = None
        try:
            await self.flush()
        except _DATABASE_ERRORS as exc:
            log.warning("outbox rows not deleted at shutdown (a relay publishes them): %s", exc)
