"""The outbox relay with rows it cannot publish (a shard down, a row that always fails).

Found by the review of the fifteenth session's fixes (2026-12-03): the rows a
round left (and the later rows of their channels, which wait behind them)
counted against its ``BATCH``. Once ``BATCH`` of them were at the head of the
outbox (a Redis Cluster shard down for a minute of writes, or one channel
whose publication always fails and the rows of that channel behind it), every
round claimed those and nothing else: every other channel's events waited
until the failing one came back, which the relay's skip-and-wait was written
to prevent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from core.db import Database
from core.infra.backoff import Backoff
from core.relay import Relay
from tests.harness import unique_prefix
from tests.test_outbox import rows, settings_for


class _ShardDown:
    """`Events` whose publications on channels named ``down:*`` fail; the rest are kept."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []
        self.tried = 0

    async def publish(
        self, channels: Sequence[str], payload: bytes, call: str | None = None
    ) -> list[Exception]:
        self.tried += 1
        if any(ch.startswith("down:") for ch in channels):
            return [ConnectionError("shard down")]
        n = json.loads(payload)["n"]
        self.published.extend((ch, n) for ch in channels)
        return []


async def _queue(db: Database, layout: list[list[str]]) -> None:
    await db.pool.executemany(
        "insert into outbox (channels, payload, created_at)"
        " values ($1, $2, now() - interval '1 minute')",
        [(chs, json.dumps({"n": n}).encode()) for n, chs in enumerate(layout)],
    )


async def test_rows_left_at_the_head_of_the_outbox_do_not_hold_up_other_channels(clean_db):
    db = await Database.open(settings_for(clean_db, None, unique_prefix()))
    events = _ShardDown()
    relay = Relay(db.pool, events, batch=10, backoff=Backoff(base=0.01, cap=0.02))  # type: ignore[arg-type]
    # 30 rows of the dead shard's channels first (3 batches), then 3 of a healthy one.
    layout = [[f"down:{i % 4}"] for i in range(30)] + [["up:1"], ["up:1"], ["up:2"]]
    try:
        await _queue(db, layout)
        for _ in range(3):
            await relay.round()
        assert events.published == [("up:1", 30), ("up:1", 31), ("up:2", 32)], (
            "the healthy channels' rows waited behind the dead shard's"
        )
        assert await rows(db.pool) == 30
        # Each round tried the first row of each dead channel only, not all 30.
        assert events.tried <= 3 * (4 + 3)
    finally:
        await db.close()


async def test_a_row_that_always_fails_holds_up_its_channel_only_and_stays_in_order(clean_db):
    db = await Database.open(settings_for(clean_db, None, unique_prefix()))
    events = _ShardDown()
    relay = Relay(db.pool, events, batch=4, chunk=2)  # type: ignore[arg-type]
    layout = [["down:x"], ["up:a"], ["down:x", "up:b"], ["up:b"], ["up:a"]] + [["down:x"]] * 8
    layout += [["up:a"], ["up:b"]]
    try:
        await _queue(db, layout)
        for _ in range(4):
            await relay.round()
        # up:b's row 3 waits behind row 2 (which names down:x), and so does 14.
        assert events.published == [("up:a", 1), ("up:a", 4), ("up:a", 13)]
        left = [json.loads(p)["n"] for (p,) in await db.pool.fetch(
            "select payload from outbox order by id")]  # fmt: skip
        assert left == [0, 2, 3, *range(5, 13), 14]
    finally:
        await db.close()


async def test_a_row_waits_behind_one_that_waits_on_a_failing_channel(clean_db):
    db = await Database.open(settings_for(clean_db, None, unique_prefix()))
    events = _ShardDown()
    relay = Relay(db.pool, events, batch=4, chunk=1)  # type: ignore[arg-type]
    layout = [["down:x"], ["up:a"], ["down:x", "up:b"], ["up:b", "up:c"], ["up:c"], ["up:a"]]
    try:
        await _queue(db, layout)
        for _ in range(3):
            await relay.round()
        assert events.published == [("up:a", 1), ("up:a", 5)], "a row of up:c jumped its queue"
        assert await rows(db.pool) == 4
    finally:
        await db.close()


async def test_rows_waiting_behind_a_shared_channel_are_passed_over_page_by_page(clean_db):
    # Every project's row names "projects" too: one left on it holds them all, and the
    # relay reads past them (ids and channels, a page at a time) to a row of another channel.
    db = await Database.open(settings_for(clean_db, None, unique_prefix()))
    events = _ShardDown()
    relay = Relay(db.pool, events, batch=10)  # type: ignore[arg-type]
    relay.SCAN = 16
    layout = [["down:x", "projects"]] + [["projects", f"projects:{i}"] for i in range(100)]
    layout += [["users"], ["projects:7"], ["users"]]
    try:
        await _queue(db, layout)
        claimed, done = await relay.round()
        assert events.published == [("users", 101), ("users", 103)]
        assert (claimed, done) == (8 + 2, 2) and events.tried == 3  # (a first chunk of 8)
        assert await rows(db.pool) == 102
    finally:
        await db.close()


async def test_a_row_still_in_its_writers_grace_is_not_overtaken_by_a_later_row_of_its_channel(
    clean_db,
):
    # Ids follow the order writes took them (a resource's row lock orders its writes),
    # ``created_at`` the order their transactions began: a write that began first and
    # waited took the later id. Its row is past the grace while the earlier one is not.
    db = await Database.open(settings_for(clean_db, None, unique_prefix()))
    events = _ShardDown()
    relay = Relay(db.pool, events)  # type: ignore[arg-type]
    try:
        await db.pool.executemany(
            "insert into outbox (channels, payload, created_at)"
            " values ($1, $2, now() - make_interval(secs => $3))",
            [(["projects"], b'{"n": 0}', 0.5), (["projects"], b'{"n": 1}', 60.0)],
        )
        await relay.round()
        assert events.published == [], "a later row of the channel went first"
        await db.pool.execute("update outbox set created_at = now() - interval '1 minute'")
        await relay.round()
        assert events.published == [("projects", 0), ("projects", 1)]
    finally:
        await db.close()
