"""Bursts of Redis commands wait for a pooled connection instead of failing, and
sockets recovering one channel at once read its history once."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from core.infra.broker import BrokerUnavailable, RedisBroker
from core.infra.history import HistoryPolicy
from core.infra.metrics import Metrics
from gateway.hub import Hub
from gateway.node import Node
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_session import session


async def test_a_burst_far_beyond_the_pool_waits_and_succeeds(redis_url):
    broker = RedisBroker(redis_url, unique_prefix(), pool_size=4, pool_timeout=10 * UNIT)
    await broker.start(lambda *_: None)
    try:
        peak = 0

        async def read(i: int) -> None:
            nonlocal peak
            await broker.history(f"room:{i}", 0, 10)
            peak = max(peak, broker.pool_usage()[0])

        await asyncio.gather(*(read(i) for i in range(500)))  # the old default pool failed past 100
        assert 1 <= peak <= 4
        assert broker.pool_usage()[1] == 4
    finally:
        await broker.close()


async def test_a_command_that_waits_past_the_pool_timeout_is_a_temporary_failure(redis_url):
    broker = RedisBroker(redis_url, unique_prefix(), pool_size=1, pool_timeout=0.2 * UNIT)
    await broker.start(lambda *_: None)
    try:
        hold = asyncio.ensure_future(broker._pub_client.blpop([f"{unique_prefix()}nothing"], 1))
        await asyncio.sleep(0.1 * UNIT)
        assert broker.pool_usage()[:2] == (1, 1)
        with pytest.raises(BrokerUnavailable):
            await broker.history("room:1", 0, 10)
        await hold
    finally:
        await broker.close()


async def test_a_storm_recovering_one_channel_reads_its_history_once(redis_url):
    class Counting(RedisBroker):
        reads = 0

        async def history(self, ch: str, after: int, limit: int):  # type: ignore[no-untyped-def]
            Counting.reads += 1
            return await super().history(ch, after, limit)

    metrics = Metrics()
    node = Node(Hub(metrics), Counting(redis_url, unique_prefix()), metrics)
    await node.start()
    try:
        for i in range(5):
            await node.broker.publish_history("projects:1", b'{"n": %d}' % i, 100, 60)
        results = await asyncio.gather(*(node.history("projects:1", 2, 100) for _ in range(200)))
        assert Counting.reads == 1
        assert all(r == results[0] for r in results) and [o for o, _ in results[0][0]] == [3, 4, 5]
        await node.history("projects:1", 2, 100)  # a later read is a new read
        assert Counting.reads == 2
    finally:
        await node.close()


async def test_a_shared_read_older_than_what_a_socket_missed_is_read_again(redis_url):
    """Found by the load tool in a reconnect storm: a socket that shares a read issued
    before it began to hold live publications must not lose what came in between."""

    class Stale(RedisBroker):
        async def history(self, ch: str, after: int, limit: int):  # type: ignore[no-untyped-def]
            result = await super().history(ch, after, limit)
            await asyncio.sleep(0.2 * UNIT)  # the answer travels while the channel moves on
            return result

    metrics = Metrics()
    node = Node(
        Hub(metrics),
        Stale(redis_url, unique_prefix()),
        metrics,
        HistoryPolicy(("feed:*",), 100, 60),
    )
    await node.start()
    try:
        first = await node.publish("feed:1", b'"one"')
        await node.publish("feed:1", b'"two"')
        await node.publish("feed:1", b'"three"')
        since = {"offset": first.offset, "epoch": first.epoch}
        (a, ta), (b, tb) = session(node, channels=("feed:*",)), session(node, channels=("feed:*",))
        a_sub = asyncio.ensure_future(
            a.handle(json.dumps({"id": 1, "op": "sub", "ch": "feed:1", "since": since}))
        )
        await asyncio.sleep(0.1 * UNIT)  # A's read has its answer (offsets 2, 3), still on its way
        await node.publish("feed:1", b'"four"')  # broadcast: A holds it, B is not there yet
        await until(lambda: node.seen("feed:1") is not None)
        await b.handle(json.dumps({"id": 1, "op": "sub", "ch": "feed:1", "since": since}))
        await a_sub
        for t in (ta, tb):
            assert [m["data"] for m in t.pushes()] == ["two", "three", "four"], t.sent
    finally:
        await node.close()


async def test_hundreds_of_sockets_subscribing_with_recovery_at_once_get_no_unavailable(redis_url):
    broker = RedisBroker(redis_url, unique_prefix(), pool_size=4)
    async with running_gateway(broker, max_connections_per_user=0) as gw:  # one token, 200 sockets
        token = token_for(gw, channels=("projects:*",))
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(ws_client(gw.port, token)) for _ in range(200)
            ]
            for i, c in enumerate(clients):
                since = {"offset": 0, "epoch": "gone"}
                await c.send_raw(
                    f'{{"id": 1, "op": "sub", "ch": "projects:{i % 20}", "since": {since}}}'.replace(
                        "'", '"'
                    )
                )
            replies = [await c.recv(10 * UNIT) for c in clients]
        assert [r for r in replies if not r["ok"]] == []
