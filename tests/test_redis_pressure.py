"""Redis under memory pressure and in a failover: nothing lost silently, and it heals.

Found by the fault review of the fifteenth session (2026-12-03), each against a
throwaway ``redis-server`` (never the shared one):

* Past ``maxmemory`` (``noeviction``, or a ``volatile-*`` policy with nothing left
  to evict), a publication with history met XADD's OOM refusal inside the script,
  took it for a backend's foreign entry, and started the channel again: every
  publication deleted the whole history and began a new untrusted epoch at
  offset 1 (25 publications: 25 epochs, a ``gap`` before each, one entry left),
  writing past ``maxmemory`` as it did.
* Past ``maxmemory`` Redis refuses every command queued in a MULTI, reads too:
  every ``sub`` of a history channel and every ``history`` failed (``110``).
* A failover demotes the primary without closing its connections and moves its
  name: every write on them was refused (READONLY) for good, and the gateway
  failed every publication, history read and presence update until restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from core.infra.broker import BrokerUnavailable, RedisBroker
from core.infra.coalesce import Coalescer
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT, ThrowawayRedis
from tests.stallproxy import stall_proxy

HISTORY = {"history_channels": ("room:*",), "presence_channels": ("room:*",)}


@contextlib.asynccontextmanager
async def memory_full(url: str) -> AsyncIterator[None]:
    """Redis past its ``maxmemory`` (noeviction) inside the block: every write it would
    refuse is refused; freed again after it."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set("maxmemory-policy", "noeviction")
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", str(used // 2))
        with pytest.raises(OutOfMemoryError):
            await client.set("probe", "x")
        yield
    finally:
        await client.config_set("maxmemory", "0")
        await client.aclose()


@contextlib.asynccontextmanager
async def paused(url: str) -> AsyncIterator[aioredis.Redis]:
    """Redis paused for a second (`CLIENT PAUSE 1000 ALL`) from the block's start; an
    admin client for the block."""
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        yield admin
    finally:
        await admin.aclose()


async def _drain(client, quiet: float = 0.5 * UNIT) -> list[dict]:
    """Every frame that arrives until none has for ``quiet`` seconds."""
    frames = list(client.pushes)
    client.pushes.clear()
    while True:
        try:
            frames.append(await client.recv(quiet))
        except TimeoutError:
            return frames


async def test_past_maxmemory_a_publication_with_history_fails_and_the_history_is_kept(
    throwaway_redis,
):
    broker = RedisBroker(throwaway_redis.url, unique_prefix())
    async with running_gateway(broker, **HISTORY) as gw:
        token = token_for(gw)
        async with ws_client(gw.port, token) as sub, ws_client(gw.port, token) as pub:
            assert (await sub.request("sub", ch="room:1"))["ok"]
            for i in range(3):
                assert (await pub.request("pub", ch="room:1", data=i))["ok"]
            before = [f for f in await _drain(sub) if f.get("op") == "msg"]
            epoch = before[-1]["epoch"]
            assert [f["offset"] for f in before] == [1, 2, 3]
            async with memory_full(throwaway_redis.url):
                for i in range(5):
                    reply = await pub.request("pub", ch="room:1", data=f"full {i}")
                    assert reply["error"]["code"] == 110 and reply["error"]["temporary"]
                # Nothing reached the subscriber: no new epoch, no gap.
                assert [f for f in await _drain(sub) if f.get("op") != "join"] == []
            # Once memory is freed, the channel carries on where it was.
            assert (await pub.request("pub", ch="room:1", data="after"))["ok"]
            after = [f for f in await _drain(sub) if f.get("op") in ("msg", "gap")]
            assert after == [
                {"op": "msg", "ch": "room:1", "offset": 4, "epoch": epoch, "data": "after"}
            ]
            page = await sub.request("history", ch="room:1")
            assert [p["data"] for p in page["publications"]] == [0, 1, 2, "after"]


async def test_past_maxmemory_a_publication_on_several_channels_fails_on_each(throwaway_redis):
    broker = RedisBroker(throwaway_redis.url, unique_prefix())
    await broker.start(lambda *_: None)
    try:
        history = (100, 300.0)
        for ch in ("room:1", "room:2"):
            await broker.publish_history(ch, b'"first"', *history)
        async with memory_full(throwaway_redis.url):
            outcomes = await broker.publish_many(
                [("room:1", history), ("room:2", history)], b'"full"'
            )
            assert all(isinstance(o, BrokerUnavailable) for o in outcomes), outcomes
            with pytest.raises(BrokerUnavailable, match="OOM"):
                await broker.publish_history("room:3", b'"new channel"', *history)
        for ch in ("room:1", "room:2"):
            entries, top = await broker.history(ch, 0, 10)
            assert entries == [(1, b'"first"')] and top is not None and top.offset == 1
            assert not top.epoch.startswith("~")
    finally:
        await broker.close()


async def test_past_maxmemory_clients_still_subscribe_and_recover_from_history(throwaway_redis):
    broker = RedisBroker(throwaway_redis.url, unique_prefix())
    async with running_gateway(broker, **HISTORY) as gw:
        token = token_for(gw)
        async with ws_client(gw.port, token) as pub:
            for i in range(3):
                position = await pub.request("pub", ch="room:1", data=i)
                assert position["ok"]
        first = (await broker.history("room:1", 0, 1))[1]
        assert first is not None
        async with memory_full(throwaway_redis.url), ws_client(gw.port, token) as back:
            reply = await back.request(
                "sub", ch="room:1", since={"offset": 1, "epoch": first.epoch}
            )
            assert reply["ok"] and reply["recovered"] is True, reply
            missed = [f for f in await _drain(back) if f.get("op") == "msg"]
            assert [f["data"] for f in missed] == [1, 2]
            page = await back.request("history", ch="room:1")
            assert page["ok"] and [p["offset"] for p in page["publications"]] == [1, 2, 3]
            assert (await back.request("sub", ch="room:2"))["ok"]


async def test_commands_refused_past_maxmemory_make_no_line_each(throwaway_redis, caplog):
    broker = RedisBroker(throwaway_redis.url, unique_prefix())
    async with running_gateway(broker, **HISTORY, rate_socket_publish=None) as gw:
        async with ws_client(gw.port, token_for(gw)) as pub:
            assert (await pub.request("pub", ch="room:1", data=0))["ok"]
            async with memory_full(throwaway_redis.url):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="gateway.session"):
                    for i in range(50):
                        reply = await pub.request("pub", ch="room:1", data=i)
                        assert reply["error"]["code"] == 110
                lines = [r for r in caplog.records if r.name == "gateway.session"]
                assert len(lines) <= 2, [r.getMessage() for r in lines]


# -- failover ------------------------------------------------------------------


async def _fail_over(primary: ThrowawayRedis, replica: ThrowawayRedis) -> None:
    """What ElastiCache does: the replica is promoted and the old primary made its
    replica, its clients' connections left open (the proxy then moves the name)."""
    new = aioredis.Redis.from_url(replica.url)
    old = aioredis.Redis.from_url(primary.url)
    try:
        await new.execute_command("REPLICAOF", "NO", "ONE")
        await old.execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
    finally:
        await new.aclose()
        await old.aclose()


async def _in_sync(replica: ThrowawayRedis) -> bool:
    client = aioredis.Redis.from_url(replica.url)
    try:
        info = await client.info("replication")
    finally:
        await client.aclose()
    return info.get("master_link_status") == "up"


@pytest.fixture
def redis_pair(tmp_path: Path, throwaway_redis: ThrowawayRedis):
    """``throwaway_redis`` as the primary, and a replica of it."""
    replica = ThrowawayRedis(
        tmp_path / "replica",
        executable=throwaway_redis.executable,
        args=["--replicaof", "127.0.0.1", str(throwaway_redis.port)],
    )
    with replica:
        yield throwaway_redis, replica


async def test_after_a_failover_the_gateway_reconnects_and_tells_subscribers_of_the_gap(
    redis_pair,
):
    primary, replica = redis_pair
    await until(lambda: _in_sync(replica), 10 * UNIT)
    async with stall_proxy(("127.0.0.1", primary.port)) as name:
        prefix = unique_prefix()
        broker = RedisBroker(f"redis://127.0.0.1:{name.port}/0", prefix)
        async with running_gateway(broker, **HISTORY) as gw:
            token = token_for(gw)
            async with ws_client(gw.port, token) as sub, ws_client(gw.port, token) as pub:
                assert (await sub.request("sub", ch="room:1"))["ok"]
                assert (await sub.request("sub", ch="room:2"))["ok"]
                for i in range(3):
                    assert (await pub.request("pub", ch="room:1", data=i))["ok"]
                await _drain(sub)
                await _fail_over(primary, replica)
                name.target = ("127.0.0.1", replica.port)
                # Publications go on at once, on the new primary.
                assert (await pub.request("pub", ch="room:1", data="moved"))["ok"]
                # The subscriber is told of a gap (its link moved; the new primary may
                # lack what the old one acknowledged last): what it missed is in history.
                frames = []
                while {"op": "gap", "ch": "room:1"} not in frames:
                    frames.append(await sub.recv(5 * UNIT))
                await until(lambda: _in_sync(primary), 10 * UNIT)
                for ch in ("room:1", "room:2"):
                    assert (await pub.request("pub", ch=ch, data="after"))["ok"]
                frames += await _drain(sub, UNIT)
                live = [(f["ch"], f["data"]) for f in frames if f.get("op") == "msg"]
                assert live[-2:] == [("room:1", "after"), ("room:2", "after")]
                page = await sub.request("history", ch="room:1")
                assert page["epoch"].startswith("~")
                assert [p["data"] for p in page["publications"]] == ["moved", "after"]
                assert (await sub.request("presence", ch="room:1"))["ok"]
                # The subscriber link moved too: the new primary counts it.
                new = aioredis.Redis.from_url(replica.url)
                try:
                    numsub = dict(await new.pubsub_numsub(f"{prefix}room:1"))
                finally:
                    await new.aclose()
                assert list(numsub.values()) == [1]
                assert await gw.ctx.node.reconcile() == 0


async def test_after_a_failover_publications_through_redis_py_move_too(redis_pair):
    """With TLS (``rediss://``, ElastiCache's in-transit encryption) publications go in
    redis-py pipelines, whose READONLY replies are no errors to its retry."""
    primary, replica = redis_pair
    await until(lambda: _in_sync(replica), 10 * UNIT)
    async with stall_proxy(("127.0.0.1", primary.port)) as name:
        broker = RedisBroker(f"redis://127.0.0.1:{name.port}/0", unique_prefix())
        broker._link = None  # as for a TLS URL (core/infra/broker/resp.py speaks no TLS)
        broker._publishes = Coalescer(broker._pipeline, max_batch=256, max_inflight=2)
        await broker.start(lambda *_: None)
        try:
            history = (100, 300.0)
            await broker.publish_history("room:1", b'"before"', *history)
            await _fail_over(primary, replica)
            name.target = ("127.0.0.1", replica.port)
            outcomes = await broker.publish_many(
                [("room:1", history), ("room:2", None), ("room:3", history)], b'"moved"'
            )
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes
            entries, top = await broker.history("room:1", 0, 10)
            assert entries == [(1, b'"moved"')] and top is not None and top.epoch[0] == "~"
        finally:
            await broker.close()


async def test_a_reconciliation_caught_by_a_lost_link_keeps_the_channel_delivered(tmp_path):
    """The node's reconciliation (every 30 s) found a channel missing on the server while
    the subscriber link was being lost (`CLIENT PAUSE` past the link's `PING`: its
    subscriptions are gone until the reconnect) and resubscribed it on the link that was
    down: refused, and the broker forgot the channel, so the reconnect left it out
    ("32 channels resubscribed" instead of 33, bench.chaos) and its members got nothing,
    without a `gap`, until the next reconciliation. Now the channel stays held and the
    reconnect subscribes it again."""
    redis = ThrowawayRedis(tmp_path / "redis").start()
    broker = RedisBroker(redis.url, unique_prefix(), backoff_initial=0.02, backoff_max=0.2)
    try:
        async with running_gateway(broker, **HISTORY) as gw:
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("sub", ch="room:1"))["ok"]
                redis.stop()
                await until(lambda: not broker.connected)
                with pytest.raises(BrokerUnavailable):
                    await broker.resubscribe("room:1")  # the reconciliation's step
                redis.start()
                await until(lambda: broker.connected)
                await gw.ctx.node.publish("room:1", b'{"n":1}')
                frames = await _drain(c)
                assert {"op": "gap", "ch": "room:1"} in frames
                assert [f["data"] for f in frames if f.get("op") == "msg"] == [{"n": 1}]
    finally:
        redis.stop()


async def test_a_reconciliation_whose_subscribe_goes_unanswered_keeps_the_channel(tmp_path):
    """The same race a moment later: the link was up when the reconciliation resubscribed,
    and its `SUBSCRIBE` went unanswered (`CLIENT PAUSE`, then the link lost). The failed
    subscription forgot the channel, so the link's reconnect left it out, silently."""
    redis = ThrowawayRedis(tmp_path / "redis").start()
    broker = RedisBroker(
        redis.url, unique_prefix(), backoff_initial=0.02, backoff_max=0.2, subscribe_timeout=0.3
    )
    try:
        async with running_gateway(broker, **HISTORY) as gw:
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("sub", ch="room:1"))["ok"]
                async with paused(redis.url) as admin:
                    with pytest.raises(BrokerUnavailable):
                        await broker.resubscribe("room:1")  # the reconciliation's step
                    await asyncio.sleep(1.0)  # the pause ends
                    # The link is lost (a failover, a proxy's reset): it reconnects.
                    await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                await until(lambda: broker.connected)
                await asyncio.sleep(0.3)
                await gw.ctx.node.publish("room:1", b'{"n":1}')
                frames = await _drain(c)
                assert [f["data"] for f in frames if f.get("op") == "msg"] == [{"n": 1}]
    finally:
        redis.stop()


async def test_a_channel_left_during_an_unanswered_resubscription_is_not_held_on(tmp_path):
    """The reconciliation's `SUBSCRIBE` goes unanswered (`CLIENT PAUSE`) and the channel's
    last member leaves meanwhile: its `UNSUBSCRIBE` follows on the link. The failed
    resubscription took the channel back, so the broker held a channel Redis (after
    the pause: SUBSCRIBE, then UNSUBSCRIBE) did not: the next member's `sub` was answered
    without a `SUBSCRIBE` and got nothing, and the reconciliation, which counts every
    process's subscribers (another gateway held it), never repaired it."""
    redis = ThrowawayRedis(tmp_path / "redis").start()
    prefix = unique_prefix()
    broker = RedisBroker(
        redis.url, prefix, backoff_initial=0.02, backoff_max=0.2, subscribe_timeout=0.3
    )
    other = aioredis.Redis.from_url(redis.url)  # another gateway, holding the channel
    elsewhere = other.pubsub()
    try:
        await elsewhere.subscribe(f"{prefix}room:1")
        async with running_gateway(broker, **HISTORY) as gw:
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("sub", ch="room:1"))["ok"]
                async with paused(redis.url):
                    step = asyncio.create_task(broker.resubscribe("room:1"))
                    await asyncio.sleep(0.1)
                    assert (await c.request("unsub", ch="room:1"))["ok"]  # the last one
                    with pytest.raises(BrokerUnavailable):
                        await step
                    await asyncio.sleep(1.0)  # the pause ends: SUBSCRIBE, UNSUBSCRIBE
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("sub", ch="room:1"))["ok"]
                assert await gw.ctx.node.reconcile() == 0
                await gw.ctx.node.publish("room:1", b'{"n":1}')
                frames = await _drain(c)
                assert [f["data"] for f in frames if f.get("op") == "msg"] == [{"n": 1}]
    finally:
        await elsewhere.aclose()
        await other.aclose()
        redis.stop()


async def test_a_channel_left_while_its_resubscription_met_a_lost_link_is_not_subscribed_again(
    tmp_path,
):
    """The same, with the link lost while the resubscription waited: the channel was taken
    back though nobody here was on it any more, and the reconnect subscribed it, so Redis
    sent this gateway every publication of a channel it had no member on."""
    redis = ThrowawayRedis(tmp_path / "redis").start()
    prefix = unique_prefix()
    broker = RedisBroker(
        redis.url, prefix, backoff_initial=0.02, backoff_max=0.2,
        health_interval=0.2, health_timeout=0.3,
    )  # fmt: skip
    try:
        async with running_gateway(broker, **HISTORY) as gw:
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("sub", ch="room:1"))["ok"]
                async with paused(redis.url) as admin:
                    step = asyncio.create_task(broker.resubscribe("room:1"))
                    await asyncio.sleep(0.1)
                    assert (await c.request("unsub", ch="room:1"))["ok"]  # the last one
                    with pytest.raises(BrokerUnavailable):
                        await step  # the link's PING went unanswered: lost
                    await until(lambda: broker.connected)  # once the pause ends
                    await asyncio.sleep(0.2)
                    assert await admin.pubsub_numsub(f"{prefix}room:1") == [
                        (f"{prefix}room:1".encode(), 0)
                    ]
    finally:
        redis.stop()
