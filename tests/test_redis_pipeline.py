"""Publications made at once share one Redis pipeline, and each still gets its own outcome."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from core.infra.broker import UNTRUSTED_EPOCH, Position, RedisBroker
from core.infra.coalesce import Coalescer
from tests.harness import unique_prefix, until


async def test_concurrent_publications_with_history_each_get_their_own_offset(redis_url):
    got: list[tuple[str, bytes, int | None]] = []
    broker = RedisBroker(redis_url, unique_prefix())
    await broker.start(lambda ch, data, pos: got.append((ch, data, pos and pos.offset)))
    try:
        for ch in ("a", "b"):
            await broker.subscribe(ch)
        positions = await asyncio.gather(*(
            broker.publish_history(ch, b'{"n":%d}' % i, 1000, 60)
            for i in range(100) for ch in ("a", "b")
        ))  # fmt: skip
        for start in (0, 1):
            assert sorted(p.offset for p in positions[start::2]) == list(range(1, 101))
            assert len({p.epoch for p in positions[start::2]}) == 1
        assert broker._publishes is not None and broker._publishes.round_trips < 200
        await until(lambda: len(got) == 200)
        received = {(ch, offset): data for ch, data, offset in got}
        for i, (ch, position) in enumerate(zip(("a", "b") * 100, positions, strict=True)):
            assert received[ch, position.offset] == b'{"n":%d}' % (i // 2)  # each its own
        entries, _ = await broker.history("b", 0, 1000)
        assert [offset for offset, _ in entries] == list(range(1, 101))
    finally:
        await broker.close()


async def test_publishing_with_history_survives_a_script_flush(redis_url):
    broker = RedisBroker(redis_url, unique_prefix())
    await broker.start(lambda *_: None)
    try:
        first = await broker.publish_history("room", b"1", 10, 60)
        admin = aioredis.Redis.from_url(redis_url)
        await admin.script_flush()
        await admin.aclose()
        again = await asyncio.gather(
            *(broker.publish_history("room", b"2", 10, 60) for _ in range(3))
        )
        assert sorted(p.offset for p in again) == [
            first.offset + 1,
            first.offset + 2,
            first.offset + 3,
        ]
    finally:
        await broker.close()


async def test_reading_history_survives_a_script_flush(redis_url):
    broker = RedisBroker(redis_url, unique_prefix())
    try:
        first = await broker.publish_history("room", b"1", 10, 60)
        async with aioredis.Redis.from_url(redis_url) as admin:
            await admin.script_flush()
        assert await broker.history("room", 0, 10) == ([(1, b"1")], first)
    finally:
        await broker.close()


@pytest.mark.parametrize("has_id", [True, False], ids=["replication id", "none"])
async def test_a_redis_without_a_replication_id_is_warned_about(
    redis_url, monkeypatch, caplog, has_id
):
    """A compatible server without ``master_replid``: failovers would go unnoticed; say so once."""
    broker = RedisBroker(redis_url, unique_prefix())
    client = broker.command_client
    assert client is not None
    real = client.info

    async def info(section: str | None = None, *args: object, **kwargs: object) -> dict:
        reply = await real(section, *args, **kwargs)
        return reply if has_id else {k: v for k, v in reply.items() if k != "master_replid"}

    monkeypatch.setattr(client, "info", info)
    try:
        with caplog.at_level(logging.WARNING, "core.infra.broker"):
            await broker.start(lambda *_: None)
        warned = [r for r in caplog.records if "no master_replid" in r.getMessage()]
        assert len(warned) == (0 if has_id else 1)
    finally:
        await broker.close()


async def test_an_item_that_fails_fails_alone_and_a_failed_trip_fails_its_batch():
    trips: list[list[int]] = []

    async def send(items: list[int]) -> list[int | BaseException]:
        trips.append(items)
        await asyncio.sleep(0)
        if 13 in items:
            raise ConnectionError("lost")
        return [ValueError(i) if i < 0 else i * 2 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(send, max_inflight=1)
    results = await asyncio.gather(
        *(coalescer.submit(i) for i in (1, 2, -3, 4)), return_exceptions=True
    )
    assert results[:2] == [2, 4] and isinstance(results[2], ValueError) and results[3] == 8
    assert trips == [[1], [2, -3, 4]]  # the first left alone at once, the rest together
    lost = await asyncio.gather(*map(coalescer.submit, (5, 6, 13)), return_exceptions=True)
    assert lost[0] == 10 and all(isinstance(r, ConnectionError) for r in lost[1:])
    assert await coalescer.submit(7) == 14  # and the next trip goes


async def test_a_backends_own_stream_entries_are_dropped_and_start_the_history_again(redis_url):
    """A backend XADDs to a channel's history stream itself: an entry without field
    ``d``, and one with an id of Redis's choosing (``*``), past every offset. Reads
    leave them out (counted as malformed), and the next publication, which could not
    follow them, starts an untrusted epoch rather than failing until the stream expires."""
    faults: list[str] = []
    broker = RedisBroker(redis_url, unique_prefix())
    broker.on_fault = faults.append
    try:
        first = await broker.publish_history("feed", b"1", 10, 60)
        stream = broker._history_keys("feed")[0]
        async with aioredis.Redis.from_url(redis_url) as backend:
            await backend.xadd(stream, {"data": "2"}, id="1-2")
            assert await broker.history("feed", 0, 10) == ([(1, b"1")], first)
            assert faults == ["malformed"]
            await backend.xadd(stream, {"d": "3"})  # id: now in milliseconds
        assert await broker.history("feed", 0, 10) == ([(1, b"1")], first)
        again = await broker.publish_history("feed", b"4", 10, 60)
        assert again.offset == 1 and again.epoch.startswith(UNTRUSTED_EPOCH)
        assert await broker.history("feed", 0, 10) == ([(1, b"4")], again)
        both = await broker.publish_many([("feed", (10, 60)), ("other", (10, 60))], b"5")
        assert isinstance(both[1], Position)
        assert both == [Position(2, again.epoch), Position(1, both[1].epoch)]
        async with aioredis.Redis.from_url(redis_url) as backend:
            await backend.delete(stream)
            await backend.set(stream, "not a stream")
        (then, _) = await broker.publish_many([("feed", (10, 60)), ("other", (10, 60))], b"6")
        assert isinstance(then, Position) and then.offset == 1 and then.epoch != again.epoch
        assert then.epoch.startswith(UNTRUSTED_EPOCH)
    finally:
        await broker.close()


async def test_a_backends_entry_beside_a_publication_is_no_second_one_at_its_offset(redis_url):
    """An entry a backend adds at an offset a publication holds (id ``1-2`` beside the
    script's ``1-1``) would be delivered twice at that offset on recovery."""
    broker = RedisBroker(redis_url, unique_prefix())
    try:
        first = await broker.publish_history("feed", b"1", 10, 60)
        async with aioredis.Redis.from_url(redis_url) as backend:
            await backend.xadd(broker._history_keys("feed")[0], {"d": "9"}, id="1-2")
        second = await broker.publish_history("feed", b"2", 10, 60)
        assert await broker.history("feed", 0, 10) == ([(1, b"1"), (2, b"2")], second)
        assert second.epoch == first.epoch
    finally:
        await broker.close()
