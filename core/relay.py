"""The outbox relay: publishes the change events their writers left behind.

Every process with a publisher runs one (`Relay.start`, `Relay.close`: with
the core). Every `EVERY` seconds it claims, in one transaction, the
outbox rows older than `GRACE` seconds (so it does not race a writer's own
publication, core/outbox.py) with ``FOR UPDATE SKIP LOCKED``, at most `BATCH`
of them, publishes them oldest first and deletes those published. Relays of
several processes share the work without waiting on each other, and a dead
process's rows are published by any other's.

A round publishes and deletes its rows `CHUNK` at a time, each chunk a
transaction of its own: a relay whose connection is lost mid-round (the
database restarted, ``pg_terminate_backend``, the process killed) has
published at most a chunk whose delete did not commit, and the history
scripts keep a channel's last 8 call ids, so those are published once. (A
round in one transaction published its 200 rows again: 6 relay connections
killed while a backlog of 1,000 drained put 1,200 duplicates in the
``projects`` history, past its ``HISTORY_SIZE`` of 100.) The price: a backlog
drains at about 2,200 rows a second instead of 3,300 (docs/performance.md).

A row the broker could not publish stays, and so does every later row that
names one of its channels (so no channel gets its events out of order, nor a
row published again after later ones); the round goes on with the rest,
reading past the rows that wait (ids and channels, `SCAN` at a time) rather
than claiming them: they do not take the places of others in its `BATCH`
(30 rows of a dead shard at the head of the outbox held every other
channel's events for good, tests/test_relay_left_rows.py). With
Redis Cluster and one shard down, the other shards' channels go on: the
round used to end at the first failure, and every channel's events waited
behind that shard's (tests/test_redis_cluster_faults.py). Failures that
answer at once (a shard's connection refused) cost little; once the failed
publications of a round have taken `FAILING` seconds (one that timed out: a
silent Redis or shard), the round ends there, so a Redis that does not answer
costs one timeout a round, not one a row. A round that left rows is followed
by the next after a backoff (core/infra/backoff.py). A full batch is
followed by the next one at once, so a backlog drains at the broker's pace.
A round stops at the first row (by id) still in its writer's grace: a write
that began first and waited (a resource's row lock, or any write on the
shared ``projects`` channel) takes the later id, so its row can be past the
grace while an earlier row of its channel is not.
An event no channel can carry (`proto.InvalidData`) is logged and deleted:
trying again would not help, and it would hold up nothing but itself.

A row the writer did publish and could not yet delete is published again;
its call id (the outbox's) makes history channels publish it once
(core/events.py says when a client may see it twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from core.events import Events
from core.infra.backoff import Backoff
from core.infra.tasks import finish
from core.migrate import Conn
from proto.publication import InvalidData

__all__ = ["Relay"]

log = logging.getLogger("core.relay")

#: The next rows, up to the first one still in its writer's grace: rows do not
#: take ids in the order their transactions began (``created_at``), so a later
#: row of a channel can be past the grace while an earlier one is not.
_CLAIM = """
with head as (
    select id, created_at < now() - make_interval(secs => $1) as old
    from outbox where id > $3 order by id limit $2
)
select id, channels, payload, outbox_call(id, created_at)
from outbox
where id in (
    select id from head
    where id < coalesce((select min(id) from head where not old), 9223372036854775807)
)
order by id
for update skip locked
"""
#: Once some rows wait: the next rows (ids and channels only, no lock), to pick those that
#: do not wait (`Relay._passing`), then claimed by id (`_CLAIM_IDS`).
_SCAN = """
select id, channels, created_at < now() - make_interval(secs => $1) as old from outbox
where id > $2
order by id
limit $3
"""
_CLAIM_IDS = """
select id, channels, payload, outbox_call(id, created_at)
from outbox where id = any($1::bigint[])
order by id
for update skip locked
"""
_DELETE = "delete from outbox where id = any($1::bigint[])"
#: Rows waiting, counted up to a bound along the primary key (no scan of the whole
#: table, which holds the dead rows of every delete until it is vacuumed).
_PENDING = "select count(*) from (select id from outbox order by id limit $1) waiting"
PENDING_COUNTED = 100_000
#: Waits after a failed round: the broker or the database is out.
BACKOFF = Backoff(base=1.0, cap=30.0)


class Relay:
    #: Seconds between rounds.
    EVERY = 1.0
    #: Seconds a row is left to its writer.
    GRACE = 2.0
    #: Rows claimed at most per round.
    BATCH = 200
    #: Rows claimed, published and deleted per transaction: no more than the history
    #: scripts' call ids kept per channel (8), so a chunk published again is published once.
    CHUNK = 8
    #: Rows read at a time (ids and channels) to pass over those that wait (`_passing`).
    SCAN = 512
    #: Seconds of failed publications after which a round ends (a publication that timed
    #: out takes 5: `PUBLISH_TIMEOUT`).
    FAILING = 4.0

    def __init__(
        self,
        pool: asyncpg.Pool,
        events: Events,
        *,
        every: float = EVERY,
        grace: float = GRACE,
        batch: int = BATCH,
        chunk: int = CHUNK,
        backoff: Backoff = BACKOFF,
        on_relayed: Callable[[int], object] | None = None,
    ) -> None:
        self._pool = pool
        self._events = events
        self.every = every
        self.grace = grace
        self.batch = batch
        self.chunk = chunk
        self.failing = self.FAILING
        self.backoff = backoff
        #: Called with the number of events published by each round that published some.
        self.on_relayed = on_relayed
        #: Outbox rows waiting after the last round (every process's): 0 when the round
        #: left nothing past the grace, else all of them, up to `PENDING_COUNTED`.
        self.pending = 0
        #: Events this relay published.
        self.relayed = 0
        self._failing_for = 0.0  # seconds of failed publications this round
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def count(self) -> int:
        """`pending` (a gauge reads it at scrape time)."""
        return self.pending

    def start(self) -> None:
        """Relay in the background until `close`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-relay")

    async def close(self, grace: float = 5.0) -> None:
        """Stop: a round under way ends first (up to ``grace`` s, `core.infra.tasks.finish`)."""
        self._stop.set()
        if self._task is not None:
            await finish(self._task, grace)
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                claimed, published = await self.round()
            except Exception as exc:  # the database, usually: try again later
                log.warning("outbox relay round failed: %s", exc)
                claimed, published = 1, 0
            if published >= self.batch:
                wait = 0.0  # a backlog, draining but for some rows left (a shard down)
            elif published < claimed:
                wait = self.backoff.delay(failures)
                failures += 1
            else:
                failures = 0
                wait = 0.0 if claimed == self.batch else self.every
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stop.wait()

    async def round(self) -> tuple[int, int]:
        """One round: (rows claimed, rows done: published, or dropped as not publishable).

        Up to `batch` rows done and `batch` rows left. Once a row is left, the
        rows that wait behind it are passed over (`_passing`), so that they do not
        take the place of others in the round.
        """
        claimed = done = sent = 0
        # Channels of the rows left this round: later rows naming one wait too.
        blocked: set[str] = set()
        after = 0  # the last id claimed or passed over: not looked at again this round
        self._failing_for = 0.0
        drained = False
        try:
            async with self._pool.acquire() as conn:
                while (
                    done < self.batch
                    and claimed - done < self.batch
                    and self._failing_for < self.failing
                ):
                    size = min(self.chunk, self.batch - done)
                    ids: list[int] | None = None
                    if blocked:
                        ids, after, drained = await self._passing(conn, size, after, blocked)
                        if not ids:
                            break
                    rows, finished, published, last = await self._chunk(
                        conn, size, after, blocked, ids
                    )
                    claimed, done, sent = claimed + rows, done + finished, sent + published
                    if ids is None:
                        after = last
                        if rows < size:
                            drained = True
                            break
                    elif drained and len(ids) < size:
                        break
                if drained and done == claimed:
                    self.pending = 0  # nothing past the grace is left (but other relays' rows)
                else:  # a backlog: count it, only now
                    self.pending = await conn.fetchval(_PENDING, PENDING_COUNTED)
        finally:
            if sent:
                self.relayed += sent
                log.info("outbox relay published %d event(s) left by their writers", sent)
                if self.on_relayed is not None:
                    self.on_relayed(sent)
        return claimed, done

    async def _passing(
        self, conn: Conn, size: int, after: int, blocked: set[str]
    ) -> tuple[list[int], int, bool]:
        """Up to ``size`` ids of the next rows past ``after`` that wait for no row left:
        (those ids, the id to go on from, whether the outbox ended). A row naming a
        ``blocked`` channel is passed over, and its channels join ``blocked``; the
        ids stop before a row naming a channel of one of them (its turn depends on
        whether they are published)."""
        ids: list[int] = []
        theirs: set[str] = set()
        while True:
            page = await conn.fetch(_SCAN, self.grace, after, self.SCAN)
            for id, channels, old in page:
                if not old:  # in its writer's grace: it and every later row wait
                    return ids, after, True
                if not blocked.isdisjoint(channels):
                    blocked.update(channels)
                elif len(ids) == size or not theirs.isdisjoint(channels):
                    return ids, after, False
                else:
                    ids.append(id)
                    theirs.update(channels)
                after = id
            if len(page) < self.SCAN:
                return ids, after, True
            if ids:
                return ids, after, False

    async def _chunk(
        self,
        conn: Conn,
        size: int,
        after: int,
        blocked: set[str],
        ids: list[int] | None = None,
    ) -> tuple[int, int, int, int]:
        """Claim, publish and delete up to ``size`` rows past id ``after`` (or those of
        ``ids``, `_passing`'s) in one transaction: (claimed, done,
        published, the last id claimed); the rows published count once their delete
        committed. A row naming a ``blocked`` channel, or that fails, stays, and its
        channels join ``blocked``."""
        sent = 0
        done: list[int] = []
        async with conn.transaction():
            if ids is None:
                rows = await conn.fetch(_CLAIM, self.grace, size, after)
            else:
                rows = await conn.fetch(_CLAIM_IDS, ids)
            for id, channels, payload, call in rows:
                after = id
                if not blocked.isdisjoint(channels):
                    blocked.update(channels)  # waits behind an earlier row of its channels
                    continue
                if self._failing_for >= self.failing:
                    continue  # the broker does not answer: the rest wait for the next round
                started = time.monotonic()
                failed = await self._events.publish(channels, payload, call)
                if any(isinstance(exc, InvalidData) for exc in failed):
                    log.error("outbox row %d dropped, not publishable: %s", id, failed[0])
                elif failed:
                    blocked.update(channels)  # the broker (or a shard of it) is out
                    self._failing_for += time.monotonic() - started
                    continue
                else:
                    sent += 1
                done.append(id)
            if done:
                await conn.execute(_DELETE, done)
        return len(rows), len(done), sent, after
