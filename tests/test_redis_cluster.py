"""The Redis broker against a real Redis Cluster: sharded pub/sub across three primaries.

The cluster (tests/servers.py `ThrowawayRedisCluster`) is three private
``redis-server`` processes joined by ``redis-cli --cluster create``, shared
with the contract suite (tests/test_broker_contract.py runs every broker
contract against `RedisClusterBroker` too). Without a ``redis-server`` >= 7
those tests are skipped and ``-ra`` says why; the tests here that need no
server run regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator, Sequence

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from core.infra.broker import UNTRUSTED_EPOCH, RedisBroker, RedisClusterBroker, make_broker
from core.infra.broker.cluster import SPUBLISH_WITH_HISTORY
from core.infra.broker.redis import PUBLISH_WITH_HISTORY
from core.infra.ratelimit import RedisRateLimiter
from core.infra.settings import Settings
from gateway.publisher import Publisher
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT, ThrowawayRedisCluster
from tests.test_broker_contract import Inbox, redis_cluster  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _collect_what_redis_py_leaves():
    """Collect here the sockets redis-py's cluster client leaves unclosed when a node dies.

    Its pipelines can drop a connection to a killed node without closing it;
    collected later, the socket's ResourceWarning would fail whichever test
    happened to run then (seen in test_redis_pool, after this module).
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# -- no server needed ------------------------------------------------------------


def test_redis_cluster_setting_picks_the_cluster_broker():
    settings = Settings.from_env(
        {"REDIS_URL": "redis://127.0.0.1:7000/0", "REDIS_CLUSTER": "yes", "REDIS_PREFIX": "p:"}
    )
    broker = make_broker(settings)
    assert isinstance(broker, RedisClusterBroker)
    assert "Redis Cluster" in broker.description
    plain = make_broker(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:7000/0"}))
    assert type(plain) is RedisBroker  # the default path is the single-node broker


@pytest.mark.parametrize("ch", ["room:1", "a{b}c", "{x}", "}", "}x{y}", "é:1", "__control"])
def test_a_channel_its_history_and_presence_share_one_slot(ch):
    broker = RedisClusterBroker("redis://127.0.0.1:7000/0", "gw:")
    key = broker._channel_key(ch)
    assert broker._channel_of(key) == ch
    keys = [*broker._history_keys(ch), *broker._presence_keys(ch)]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(key)}
    assert len(set(keys)) == 5


def test_the_usual_names_are_the_single_node_keys_with_the_channel_tagged():
    broker, single = RedisClusterBroker("redis://h:1/0", "gw:"), RedisBroker("redis://h:1/0", "gw:")
    assert broker._channel_key("room:1") == b"gw:{room:1}"
    assert broker._history_keys("room:1") == single._history_keys("room:1")
    assert broker._presence_keys("room:1") == single._presence_keys("room:1")
    assert broker._channel_of(b"gw:room:1") is None and broker._channel_of(b"other:{x}") is None


def test_the_cluster_history_script_differs_only_by_spublish():
    assert SPUBLISH_WITH_HISTORY.replace("SPUBLISH", "PUBLISH") == PUBLISH_WITH_HISTORY
    assert "'PUBLISH'" not in SPUBLISH_WITH_HISTORY


# -- against the cluster ---------------------------------------------------------


@contextlib.asynccontextmanager
async def cluster_broker(
    cluster: ThrowawayRedisCluster, prefix: str, channels: Sequence[str] = ()
) -> AsyncIterator[tuple[RedisClusterBroker, Inbox]]:
    """A started broker subscribed to ``channels``."""
    broker = RedisClusterBroker(cluster.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    inbox = Inbox()
    await broker.start(inbox, inbox.state)
    try:
        assert broker.connected
        for ch in channels:
            await broker.subscribe(ch)
        yield broker, inbox
    finally:
        await broker.close()


async def each_delivers(broker: RedisClusterBroker, inbox: Inbox, channels: list[str]) -> None:
    """Publish once on every channel; each publication arrives, once."""
    for i, ch in enumerate(channels):
        await broker.publish(ch, b"%d" % i)
    items = await inbox.wait_for(len(channels))
    assert sorted(items) == sorted((ch, b"%d" % i) for i, ch in enumerate(channels))


@contextlib.asynccontextmanager
async def node_client(port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        yield client
    finally:
        await client.aclose()


async def shard_channels(cluster: ThrowawayRedisCluster, prefix: str) -> dict[int, set[bytes]]:
    """What each node (by port) reports as its subscribed shard channels under ``prefix``."""
    held = {}
    for port in cluster.ports:
        async with node_client(port) as client:
            held[port] = set(await client.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}*"))
    return held


async def owner_port(cluster: ThrowawayRedisCluster, key: bytes) -> int:
    async with node_client(cluster.ports[0]) as client:
        for start, end, primary, *_ in await client.execute_command("CLUSTER", "SLOTS"):
            if start <= key_slot(key) <= end:
                return int(primary[1])
    raise AssertionError(f"no node owns {key!r}")


async def test_channels_spread_over_shards_with_one_connection_each(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    channels = [f"room:{i}" for i in range(48)]
    async with cluster_broker(redis_cluster, prefix, channels) as (broker, inbox):
        held = await shard_channels(redis_cluster, prefix)
        keys = {f"{prefix}{{{ch}}}".encode() for ch in channels}
        assert set().union(*held.values()) == keys | {f"{prefix}{{__control}}".encode()}
        for port, on_node in held.items():
            for key in on_node:
                assert await owner_port(redis_cluster, key) == port  # where its slot lives
        assert sum(1 for on_node in held.values() if on_node & keys) >= 2  # spread
        links = broker.shard_links()  # one connection per shard holding channels
        assert {int(name.rsplit(":", 1)[1]) for name in links} == {p for p, k in held.items() if k}
        assert set().union(*links.values()) == {*channels, "__control"}
        await each_delivers(broker, inbox, channels)

        for ch in channels:
            await broker.unsubscribe(ch)
        assert set().union(*(await shard_channels(redis_cluster, prefix)).values()) == {
            f"{prefix}{{__control}}".encode()
        }
        assert list(broker.shard_links().values()) == [{"__control"}]  # idle shards let go


async def test_backend_spublish_reaches_the_broker(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    async with cluster_broker(redis_cluster, prefix, ["room:1"]) as (_, inbox):
        client = RedisCluster.from_url(redis_cluster.url)
        try:
            assert await client.spublish(f"{prefix}{{room:1}}", '{"any":"json"}') == 1
        finally:
            await client.aclose()
        assert await inbox.wait_for(1) == [("room:1", b'{"any":"json"}')]


@pytest.mark.parametrize("ch", ["feed:1", "}x{y}", "a{b}c"])
async def test_history_and_presence_run_on_the_channels_shard(redis_cluster, ch):  # noqa: F811
    async with cluster_broker(redis_cluster, unique_prefix(), [ch]) as (broker, inbox):
        first = await broker.publish_history(ch, b"1", 10, 60)
        assert await inbox.wait_for(1) == [(ch, b"1")] and inbox.positions == [first]
        assert (await broker.history(ch, 0, 10)) == ([(1, b"1")], first)
        await broker.presence_add(ch, {"c1": b'{"user":"u"}'}, 10)
        assert await broker.presence(ch) == {"c1": b'{"user":"u"}'}
        assert await broker.presence_stats(ch) == (1, 1)
        await broker.presence_remove(ch, ["c1"])
        assert await broker.presence(ch) == {}
        assert await broker.presence_stats(ch) == (0, 0)


async def test_a_backends_own_stream_entries_are_dropped_on_its_shard(redis_cluster):  # noqa: F811
    """As with one Redis (test_redis_pipeline.py): a backend's own XADDs are left out of
    reads, and the next publication starts the history again rather than failing."""
    async with cluster_broker(redis_cluster, unique_prefix(), ["feed:1"]) as (broker, _):
        first = await broker.publish_history("feed:1", b"1", 10, 60)
        client = RedisCluster.from_url(redis_cluster.url)
        try:
            stream, meta = broker._history_keys("feed:1")
            await client.hincrby(meta, "o", 1)  # offset 2: a backend's, without field d
            await client.xadd(stream, {"x": "y", "data": "2"}, id="2-1")
            entries, top = await broker.history("feed:1", 0, 10)
            assert entries == [(1, b"1")] and top is not None
            assert (top.offset, top.epoch) == (2, first.epoch)
            await client.xadd(stream, {"x": "y", "d": "3"})
        finally:
            await client.aclose()
        again = await broker.publish_history("feed:1", b"4", 10, 60)
        assert again.offset == 1 and again.epoch.startswith(UNTRUSTED_EPOCH)
        assert await broker.history("feed:1", 0, 10) == ([(1, b"4")], again)


async def test_history_written_by_another_redis_starts_a_new_epoch_on_its_shard(redis_cluster):  # noqa: F811
    """As after a failover: the history's replication id is not its shard's."""
    async with cluster_broker(redis_cluster, unique_prefix(), ["feed:1"]) as (broker, _):
        first = await broker.publish_history("feed:1", b"1", 10, 60)
        client = RedisCluster.from_url(redis_cluster.url)
        try:
            await client.hset(broker._history_keys("feed:1")[1], "r", "0" * 40)
        finally:
            await client.aclose()
        entries, top = await broker.history("feed:1", 0, 10)
        assert top is not None and top.epoch != first.epoch and (top.offset, entries) == (0, [])
        again = await broker.publish_history("feed:1", b"2", 10, 60)
        assert (again.offset, again.epoch) == (1, top.epoch)
        assert await broker.history("feed:1", 0, 10) == ([(1, b"2")], again)


async def kill_subscribers(port: int) -> int:
    """CLIENT KILL every pub/sub connection on one node: the broker's link to that shard."""
    async with node_client(port) as client:
        return int(await client.client_kill_filter(_type="pubsub"))


async def test_a_shard_link_killed_resubscribes_and_publications_resume(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    channels = [f"room:{i}" for i in range(12)]
    async with cluster_broker(redis_cluster, prefix, channels) as (broker, inbox):
        victim = await owner_port(redis_cluster, broker._channel_key("room:0"))
        assert await kill_subscribers(victim) == 1
        await inbox.wait_state(False)
        await inbox.wait_state(True, timeout=5 * UNIT)
        assert inbox.states == [True, False, True] and broker.reconnects == 1
        await each_delivers(broker, inbox, channels)


async def test_a_moved_slot_takes_its_subscription_along(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    async with cluster_broker(redis_cluster, prefix, ["room:moving"]) as (broker, inbox):
        key = broker._channel_key("room:moving")
        source = await owner_port(redis_cluster, key)
        target = next(p for p in redis_cluster.ports if p != source)
        seen = len(inbox.states)
        await move_slot(redis_cluster, key_slot(key), source, target)
        try:
            await inbox.wait_state(False, since=seen)  # the shard dropped the channel: a gap
            await inbox.wait_state(True, timeout=5 * UNIT)
            assert "room:moving" in broker.shard_links()[f"127.0.0.1:{target}"]
            await broker.publish("room:moving", b"1")
            assert await inbox.wait_for(1) == [("room:moving", b"1")]
        finally:
            await move_slot(redis_cluster, key_slot(key), target, source)


async def move_slot(cluster: ThrowawayRedisCluster, slot: int, source: int, target: int) -> None:
    """Give an empty slot to another primary, telling every node (no keys to MIGRATE)."""
    ids = {}
    for port in cluster.ports:
        async with node_client(port) as client:
            ids[port] = (await client.execute_command("CLUSTER", "MYID")).decode()
    async with node_client(target) as client:
        await client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    async with node_client(source) as client:
        await client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    for port in (target, source, *(p for p in cluster.ports if p not in (source, target))):
        async with node_client(port) as client:
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


async def test_a_publication_reaches_a_socket_through_the_gateway(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    broker = RedisClusterBroker(redis_cluster.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    async with running_gateway(broker) as gw, ws_client(gw.port, token_for(gw)) as c:
        assert (await c.request("sub", ch="room:1"))["ok"]
        assert (await c.request("pub", ch="room:1", data={"via": "socket"}))["ok"]
        assert (await c.next_push())["data"] == {"via": "socket"}
        backend = RedisCluster.from_url(redis_cluster.url)
        try:
            await backend.spublish(f"{prefix}{{room:1}}", '{"via":"backend"}')
            assert (await c.next_push())["data"] == {"via": "backend"}

            # The shard's link is lost and back: the socket is told it may have a gap.
            await kill_subscribers(await owner_port(redis_cluster, broker._channel_key("room:1")))
            async with asyncio.timeout(5 * UNIT):
                while (msg := await c.recv(timeout=5 * UNIT)).get("op") != "gap":
                    pass
            assert msg == {"op": "gap", "ch": "room:1"}
            await backend.spublish(f"{prefix}{{room:1}}", '{"after":"gap"}')
            assert (await c.next_push())["data"] == {"after": "gap"}
        finally:
            await backend.aclose()


async def test_a_shard_s_outage_is_a_gap_on_its_channels_only(redis_cluster):  # noqa: F811
    # A gap went to every subscription when one shard's link came back: every client of
    # every shard reloaded or read history at once, for one shard's outage.
    prefix = unique_prefix()
    broker = RedisClusterBroker(redis_cluster.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    async with running_gateway(broker) as gw, ws_client(gw.port, token_for(gw)) as c:
        victim = await owner_port(redis_cluster, broker._channel_key("room:1"))
        for i in range(2, 200):  # a channel on another shard
            other = f"room:{i}"
            if await owner_port(redis_cluster, broker._channel_key(other)) != victim:
                break
        for ch in ("room:1", other):
            assert (await c.request("sub", ch=ch))["ok"]
        await kill_subscribers(victim)
        async with asyncio.timeout(5 * UNIT):
            while (msg := await c.recv(timeout=5 * UNIT)).get("op") != "gap":
                pass
        assert msg == {"op": "gap", "ch": "room:1"}
        await until(lambda: broker.connected)
        for ch in (other, "room:1"):  # no gap on the healthy shard's channel: its publication
            assert (await c.request("pub", ch=ch, data={"on": ch}))["ok"]
            assert await c.recv() == {"op": "msg", "ch": ch, "data": {"on": ch}}
        assert c.pushes == []  # nothing else came meanwhile: no gap for the other channel


async def test_rate_limits_are_shared_through_the_cluster(redis_cluster):  # noqa: F811
    prefix = unique_prefix() + "rl:"
    one = RedisRateLimiter(redis_cluster.url, prefix, cluster=True)
    two = RedisRateLimiter(redis_cluster.url, prefix, cluster=True)
    try:
        keys = [f"connect-ip:10.0.0.{i}" for i in range(8)]  # several slots, several shards
        for key in keys:
            assert (await one.hit(key, 2, 60)).allowed
            assert (await two.hit(key, 2, 60)).allowed
            assert not (await one.hit(key, 2, 60)).allowed  # the third hit, from either process
        assert not one.degraded and not two.degraded
    finally:
        await one.close()
        await two.close()


async def test_the_backend_publisher_reaches_cluster_subscribers(redis_cluster):  # noqa: F811
    prefix = unique_prefix()
    async with cluster_broker(redis_cluster, prefix, ["orders:7"]) as (_, inbox):
        async with Publisher(redis_cluster.url, prefix, history_channels=(), cluster=True) as pub:
            await pub.publish("orders:7", {"status": "paid"})
        assert await inbox.wait_for(1) == [("orders:7", b'{"status":"paid"}')]
