"""Sockets dropping many channels at once: batched UNSUBSCRIBEs, nobody stalled, nothing leaked."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from core.infra.broker import RedisBroker
from core.infra.history import HistoryPolicy
from core.infra.metrics import Metrics
from gateway.hub import Hub
from gateway.node import UNSUBSCRIBE_BATCH, Node
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_session import session, settle

SOCKETS = 60
CHANNELS = 50


async def _unsubscribe_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_unsubscribe", {}).get("calls", 0))


async def test_a_storm_of_closing_sockets_sends_few_unsubscribes_and_leaks_no_channel(
    throwaway_redis,
):
    """60 sockets drop 50 channels each, 3,000 channels in all, at once."""
    prefix = unique_prefix()
    redis = aioredis.Redis.from_url(throwaway_redis.url)
    try:
        async with running_gateway(RedisBroker(throwaway_redis.url, prefix)) as gw:
            token = token_for(gw, channels=("room:*",))
            own = [[f"room:{i}:{j}" for j in range(CHANNELS)] for i in range(SOCKETS)]
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(ws_client(gw.port, token))
                    for _ in range(SOCKETS)
                ]
                for c, channels in zip(clients, own, strict=True):
                    for ch in channels:
                        await c.send_raw(f'{{"id": 1, "op": "sub", "ch": "{ch}"}}')
                for c in clients:
                    for _ in range(CHANNELS):
                        assert (await c.recv(10 * UNIT))["ok"]
                keys = [f"{prefix}{ch}" for channels in own for ch in channels]
                assert all(n == 1 for _, n in await redis.pubsub_numsub(*keys))
                before = await _unsubscribe_calls(redis)
                async with ws_client(gw.port, token) as bystander:
                    pings = 0

                    async def keep_pinging() -> None:
                        nonlocal pings
                        while True:  # served all through the storm
                            reply = await bystander.request("ping", timeout=5 * UNIT)
                            assert reply["ok"], reply
                            pings += 1
                            # Under RATE_SOCKET_COMMANDS (100 a second): a storm that
                            # lasts more than a second must not get the pinger limited.
                            await asyncio.sleep(0.02)

                    pinger = asyncio.ensure_future(keep_pinging())
                    await asyncio.gather(*(c.ws.close() for c in clients))

                    async def unsubscribed() -> bool:
                        return not any(n for _, n in await redis.pubsub_numsub(*keys))

                    await until(unsubscribed, 10 * UNIT)
                    assert not pinger.done(), pinger  # no ping went unanswered
                    pinger.cancel()
                    assert pings > 0
            sent = await _unsubscribe_calls(redis) - before
            # 3,000 channels: batched, not one command per channel.
            assert 1 <= sent <= 3000 // 256 + 5, sent
            assert gw.hub.channels() == []
    finally:
        await redis.aclose()


async def test_a_channel_joined_again_before_its_batch_is_sent_keeps_delivering(redis_url):
    metrics = Metrics()
    node = Node(Hub(metrics), RedisBroker(redis_url, unique_prefix()), metrics)
    await node.start()
    try:
        (a, _), (b, tb) = session(node), session(node)
        await a.handle('{"id": 1, "op": "sub", "ch": "room:1"}')
        await a.handle('{"id": 2, "op": "unsub", "ch": "room:1"}')
        # In the same loop iteration, before the batched UNSUBSCRIBE goes out:
        await b.handle('{"id": 1, "op": "sub", "ch": "room:1"}')
        for _ in range(5):
            await settle()
        await node.publish("room:1", b'{"still": "subscribed"}')
        await until(tb.pushes)
        assert tb.pushes() == [{"op": "msg", "ch": "room:1", "data": {"still": "subscribed"}}]
    finally:
        await node.close()


async def test_unsubscribes_go_out_in_batches(redis_url):
    """The node side: one broker call per `UNSUBSCRIBE_BATCH` channels."""
    metrics = Metrics()

    class Counting(RedisBroker):
        batches: list[int] = []

        async def unsubscribe_many(self, channels: list[str]) -> None:
            self.batches.append(len(channels))
            await super().unsubscribe_many(channels)

    node = Node(Hub(metrics), Counting(redis_url, unique_prefix()), metrics)
    await node.start()
    try:
        s, _ = session(node, channels=("c:*",))
        s.conn.max_subscriptions = 1000
        for i in range(600):
            await s.handle(f'{{"id": {i}, "op": "sub", "ch": "c:{i}"}}')
        s.closed()
        await until(lambda: sum(Counting.batches) == 600)
        assert Counting.batches == [
            UNSUBSCRIBE_BATCH,
            UNSUBSCRIBE_BATCH,
            600 - 2 * UNSUBSCRIBE_BATCH,
        ]
    finally:
        await node.close()


async def test_reconciliation_repairs_a_channel_redis_no_longer_delivers(redis_url):
    prefix = unique_prefix()
    metrics = Metrics()
    node = Node(Hub(metrics), RedisBroker(redis_url, prefix), metrics)
    await node.start()
    try:
        s, t = session(node)
        await s.handle('{"id": 1, "op": "sub", "ch": "room:1"}')
        assert await node.reconcile() == 0  # nothing to repair
        # The broker believes it holds room:1, but Redis lost the subscription.
        await node.broker._pubsub.unsubscribe(f"{prefix}room:1".encode())
        redis = aioredis.Redis.from_url(redis_url)
        try:
            await until(lambda: _numsub(redis, f"{prefix}room:1", 0))
            assert await node.reconcile() == 1
            assert metrics.subscription_repairs._value.get() == 1
            await until(lambda: _numsub(redis, f"{prefix}room:1", 1))
            await redis.publish(f"{prefix}room:1", b'"delivered again"')
            await until(t.pushes)
            # Told first that what was published while it was lost never came.
            ops = [m["op"] for m in t.sent if "op" in m]
            assert ops == ["gap", "msg"], t.sent
        finally:
            await redis.aclose()
    finally:
        await node.close()


async def test_a_reconciled_history_channel_tells_its_gap_once(redis_url):
    prefix = unique_prefix()
    metrics = Metrics()
    history = HistoryPolicy(("feed:*",), 10, 60.0)
    node = Node(Hub(metrics), RedisBroker(redis_url, prefix), metrics, history=history)
    await node.start()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        s, t = session(node, channels=("feed:*",))
        await s.handle('{"id": 1, "op": "sub", "ch": "feed:1"}')
        await node.publish("feed:1", b'{"n":1}')
        await until(t.pushes)
        await node.broker._pubsub.unsubscribe(f"{prefix}feed:1".encode())
        await until(lambda: _numsub(redis, f"{prefix}feed:1", 0))
        await node.publish("feed:1", b'{"n":2}')  # never delivered: the gap
        assert await node.reconcile() == 1
        await until(lambda: _numsub(redis, f"{prefix}feed:1", 1))
        await node.publish("feed:1", b'{"n":3}')
        await until(lambda: len(t.pushes()) == 2)
        assert [m["op"] for m in t.sent if "op" in m] == ["msg", "gap", "msg"], t.sent
    finally:
        await redis.aclose()
        await node.close()


async def _numsub(redis: aioredis.Redis, key: str, n: int) -> bool:
    return (await redis.pubsub_numsub(key))[0][1] == n
