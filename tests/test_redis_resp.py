"""The broker's publishing link (core/infra/broker/resp.py) against a real Redis.

It replaced redis-py's pool for publications, so it must keep what the pool
gave: each command its own reply or error, a new connection after one is
lost (the batch sent once more), a bounded wait, AUTH and SELECT from the
URL, and the NOSCRIPT that makes the broker load its script again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from core.events import Events
from core.infra.broker import BrokerUnavailable, Position, RedisBroker
from core.infra.broker.resp import RespLink, link_for
from core.infra.coalesce import Coalescer
from core.infra.history import HistoryPolicy, HistoryPublisher
from tests.harness import unique_prefix


def _link(redis_url: str, **kwargs: float) -> RespLink:
    pool = aioredis.BlockingConnectionPool.from_url(redis_url)
    link = link_for(pool.connection_class, pool.connection_kwargs, kwargs.get("timeout", 5.0))
    assert link is not None
    return link


async def test_each_command_gets_its_own_reply_or_error(redis_url):
    link = _link(redis_url)
    key = f"{unique_prefix()}k"
    try:
        replies = await link.execute([("SET", key, "x"), ("INCR", key), ("GET", key), ("DEL", key)])
        assert replies[0] == b"OK" and isinstance(replies[1], ResponseError)
        assert replies[2:] == [b"x", 1]
        (missing,) = await link.execute([("EVALSHA", "0" * 40, 0)])
        assert isinstance(missing, NoScriptError)  # what makes the broker load its script
    finally:
        await link.close()


async def test_batches_in_flight_together_get_their_own_replies(redis_url):
    link = _link(redis_url)
    try:
        batches = await asyncio.gather(
            *(link.execute([("ECHO", f"{i}-{j}") for j in range(i % 5 + 1)]) for i in range(50))
        )
        for i, replies in enumerate(batches):
            assert replies == [f"{i}-{j}".encode() for j in range(i % 5 + 1)]
        assert link.connects == 1
    finally:
        await link.close()


async def test_a_connection_killed_by_redis_is_replaced_and_the_batch_sent_again(redis_url):
    link = _link(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        (client_id,) = await link.execute([("CLIENT", "ID")])
        assert await admin.client_kill_filter(_id=client_id) == 1
        assert await link.execute([("ECHO", "after")]) == [b"after"]
        assert link.connects == 2
    finally:
        await admin.aclose()
        await link.close()


async def test_a_database_from_the_url_is_selected(redis_url):
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    link = _link(f"{base}/3")
    admin = aioredis.Redis.from_url(f"{base}/3")
    key = f"{unique_prefix()}db"
    try:
        await link.execute([("SET", key, "3")])
        assert await admin.get(key) == b"3"
    finally:
        await admin.delete(key)
        await admin.aclose()
        await link.close()


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[int]:
    """A server that reads everything and never answers: a stalled Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_stalled_redis_fails_the_batch_in_time_and_the_next_gets_a_new_connection():
    async with _silent_server() as port:
        link = RespLink(("127.0.0.1", port), timeout=0.2)
        with pytest.raises(TimeoutError):
            await link.execute([("PING",)])
        with pytest.raises(TimeoutError):
            await link.execute([("PING",)])
        assert link.connects == 2  # the stalled connection was dropped
        await link.close()


async def test_an_unreachable_redis_fails_the_events_not_the_write():
    with socket_free_port() as port:
        broker = RedisBroker(f"redis://127.0.0.1:{port}/0", unique_prefix())
    publisher = HistoryPublisher(broker, HistoryPolicy(("projects*",), 10, 60))
    events = Events(publisher)
    try:
        await events.changed("projects", "created", 1, 1, b'{"id":1}')  # does not raise
        assert events.failures == 2
        outcomes = await publisher.publish_each(["a", "projects"], b"{}")
        assert all(isinstance(o, BrokerUnavailable) for o in outcomes)
    finally:
        await broker.close()


@contextlib.contextmanager
def socket_free_port() -> Iterator[int]:
    """A port nothing listens on (once the block ends)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_write_s_events_go_in_one_round_trip_with_their_positions(redis_url):
    got: list[tuple[str, bytes, int | None]] = []
    broker = RedisBroker(redis_url, unique_prefix())
    await broker.start(lambda ch, data, pos: got.append((ch, data, pos and pos.offset)))
    publisher = HistoryPublisher(broker, HistoryPolicy(("projects",), 10, 60))
    try:
        await broker.subscribe("projects")
        await broker.subscribe("projects:7")
        assert broker._publishes is not None
        trips = broker._publishes.round_trips
        events = Events(publisher)
        await events.changed("projects", "updated", 7, 3, b'{"id":7}')
        assert broker._publishes.round_trips == trips + 1 and events.failures == 0
        event = b'{"type":"updated","id":7,"version":3,"data":{"id":7}}'
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(got) == [("projects", event, 1), ("projects:7", event, None)]
        entries, _ = await broker.history("projects", 0, 10)
        assert entries == [(1, event)]
    finally:
        await broker.close()


async def test_items_submitted_together_get_their_own_outcomes_queued_or_not():
    trips: list[list[int]] = []
    gate = asyncio.Event()

    async def send(items: list[int]) -> list[int | BaseException]:
        trips.append(items)
        await gate.wait()
        if 13 in items:
            raise RedisConnectionError("lost")
        return [ValueError(i) if i < 0 else i * 2 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(send, max_inflight=1, max_batch=2)
    first = asyncio.ensure_future(coalescer.submit_many([1, -2]))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(coalescer.submit_many([3, 4]))
    lost = asyncio.ensure_future(coalescer.submit_many([13]))
    gate.set()
    one, two = await first
    assert one == 2 and isinstance(two, ValueError)
    assert await queued == [6, 8]  # waited, then left with the next trip
    (failed,) = await lost
    assert isinstance(failed, RedisConnectionError)
    assert trips == [[1, -2], [3, 4], [13]]


def test_the_link_runs_on_uvloop(redis_url):
    async def main() -> list[object]:
        link = _link(redis_url)
        try:
            return await link.execute([("ECHO", uuid.uuid4().hex[:4]), ("PING",)])
        finally:
            await link.close()

    replies = uvloop.run(main())
    assert len(replies) == 2 and replies[1] == b"PONG"


async def test_a_write_s_events_survive_a_script_flush(redis_url):
    broker = RedisBroker(redis_url, unique_prefix())
    publisher = HistoryPublisher(broker, HistoryPolicy(("projects", "projects:*"), 10, 60))
    admin = aioredis.Redis.from_url(redis_url)
    try:
        first = await publisher.publish_each(["projects", "projects:1"], b"{}")
        await admin.script_flush()
        again = await publisher.publish_each(["projects", "projects:1"], b"{}")
        offsets = [p.offset for p in first if isinstance(p, Position)]
        assert [p.offset for p in again if isinstance(p, Position)] == [o + 1 for o in offsets]
        assert len(offsets) == 2
    finally:
        await admin.aclose()
        await broker.close()


async def test_a_write_s_events_fail_while_redis_is_down_and_flow_again_after(throwaway_redis):
    broker = RedisBroker(throwaway_redis.url, unique_prefix())
    publisher = HistoryPublisher(broker, HistoryPolicy(("projects", "projects:*"), 10, 60))
    events = Events(publisher)
    try:
        await events.changed("projects", "created", 1, 1, b"{}")
        assert events.failures == 0
        throwaway_redis.kill()
        await events.changed("projects", "updated", 1, 2, b"{}")  # the write is not failed
        assert events.failures == 2
        throwaway_redis.start()
        after = await publisher.publish_each(["projects", "projects:1"], b"{}")
        assert all(isinstance(p, Position) for p in after), after  # a new connection
        entries, _ = await broker.history("projects", 0, 10)
        assert entries[-1][1] == b"{}"
    finally:
        await broker.close()


async def test_a_write_s_events_on_two_history_channels_go_in_one_script_call(redis_url):
    got: list[tuple[str, bytes, int | None]] = []
    broker = RedisBroker(redis_url, unique_prefix())
    await broker.start(lambda ch, data, pos: got.append((ch, data, pos and pos.offset)))
    publisher = HistoryPublisher(broker, HistoryPolicy(("projects", "projects:*"), 10, 60))
    try:
        await broker.subscribe("projects")
        await broker.subscribe("projects:7")
        await publisher.publish_each(["projects"], b"{}")  # "projects" is one ahead
        events = Events(publisher)
        await events.changed("projects", "updated", 7, 3, b'{"id":7}')
        assert events.failures == 0
        event = b'{"type":"updated","id":7,"version":3,"data":{"id":7}}'
        for _ in range(100):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert sorted(g for g in got if g[1] == event) == [
            ("projects", event, 2),
            ("projects:7", event, 1),
        ]
        for ch, offset in (("projects", 2), ("projects:7", 1)):
            entries, position = await broker.history(ch, 0, 10)
            assert entries[-1] == (offset, event) and position is not None
            assert position.offset == offset
    finally:
        await broker.close()
