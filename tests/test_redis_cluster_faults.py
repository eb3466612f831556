"""Redis Cluster failures: a shard's primary failed over, a shard down, a shard full.

Found by the fault review of the fifteenth session (2026-12-03), against a
throwaway cluster of three primaries with a replica each (one per module,
never the shared Redis):

* With one shard down, a shard that lacked a script (a replica promoted by a
  failover, a node restarted, ``SCRIPT FLUSH``) could not run it: redis-py
  answers ``NOSCRIPT`` with ``SCRIPT LOAD`` on every primary, and the down one
  failed it, so publications with history, history reads and presence updates
  on the healthy shards failed too, until the down shard was back.
* A shard past ``maxmemory`` (noeviction): its publications fail and keep
  the history, as on one Redis (checked, nothing to fix).
* With one shard down (its primary and replica gone, the others serving:
  ``cluster-require-full-coverage no``), the outbox relay stopped at the first
  row for that shard: every change event of every channel waited behind it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from core.db import Database
from core.events import Events
from core.infra.backoff import Backoff
from core.infra.broker import BrokerUnavailable, RedisClusterBroker
from core.infra.history import HistoryPolicy, HistoryPublisher
from core.relay import Relay
from tests.harness import unique_prefix
from tests.servers import ThrowawayRedis, ThrowawayRedisCluster, redis_cluster_executable
from tests.test_outbox import settings_for
from tests.test_redis_pressure import memory_full


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayRedisCluster]:
    executable, problem = redis_cluster_executable()
    if executable is None:
        pytest.skip(problem)
    nodes = ThrowawayRedisCluster(tmp_path_factory.mktemp("cluster-faults"), executable, replicas=1)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


async def roles(cluster: ThrowawayRedisCluster) -> dict[int, tuple[int, ...]]:
    """Each primary's port, and the port of each replica (of any slot range) it has."""
    out: dict[int, list[int]] = {}
    for node in cluster.nodes:
        if not node.running:
            continue
        client = aioredis.Redis(port=node.port)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        if info["role"] == "master":
            out.setdefault(node.port, [])
        else:
            out.setdefault(int(info["master_port"]), []).append(node.port)
    return {port: tuple(replicas) for port, replicas in out.items()}


async def owner_of(cluster: ThrowawayRedisCluster, key: bytes) -> int:
    for node in cluster.nodes:
        if not node.running:
            continue
        client = aioredis.Redis(port=node.port)
        try:
            for start, end, primary, *_ in await client.execute_command("CLUSTER", "SLOTS"):
                if start <= key_slot(key) <= end:
                    return int(primary[1])
        finally:
            await client.aclose()
    raise AssertionError(f"no node owns {key!r}")


def by_port(cluster: ThrowawayRedisCluster, port: int) -> ThrowawayRedis:
    return next(node for node in cluster.nodes if node.port == port)


async def each_node(cluster: ThrowawayRedisCluster, *command: str) -> None:
    for node in cluster.nodes:
        if node.running:
            client = aioredis.Redis(port=node.port)
            try:
                await client.execute_command(*command)
            finally:
                await client.aclose()


async def test_with_one_shard_down_the_relay_publishes_the_other_shards_rows_in_order(
    cluster, clean_db
):
    prefix = unique_prefix()
    broker = RedisClusterBroker(cluster.url, prefix)
    # Channels on two shards: "down:*" on the one that goes, "up:*" elsewhere.
    down = next(f"d{i}" for i in range(100) if key_slot(broker._channel_key(f"d{i}")) < 5461)
    up = next(f"u{i}" for i in range(100) if key_slot(broker._channel_key(f"u{i}")) > 10923)
    victim = await owner_of(cluster, broker._channel_key(down))
    assert victim != await owner_of(cluster, broker._channel_key(up))
    replicas = (await roles(cluster))[victim]
    db = await Database.open(settings_for(clean_db, None, prefix))
    events = Events(HistoryPublisher(broker, HistoryPolicy(("*",), 100, 60)))
    relay = Relay(db.pool, events, backoff=Backoff(base=0.05, cap=0.2))
    # Rows oldest first: one for the dead shard, then two for the healthy one, then one for
    # both (it must wait: its channel on the dead shard would get it out of order otherwise),
    # then one more for the healthy one alone.
    layout = [[down], [up], [up], [down, up], [up, "u-other"]]
    try:
        await db.pool.executemany(
            "insert into outbox (channels, payload, created_at)"
            " values ($1, $2, now() - interval '1 minute')",
            [(chs, json.dumps({"n": n}).encode()) for n, chs in enumerate(layout)],
        )
        await broker.publish(up, b"{}")  # the slot map is learnt (from REDIS_URL's node)
        await each_node(cluster, "CONFIG", "SET", "cluster-require-full-coverage", "no")
        for port in (*replicas, victim):
            by_port(cluster, port).kill()
        claimed, done = await relay.round()
        entries, _ = await broker.history(up, 0, 10)
        got = [json.loads(data)["n"] for _, data in entries]
        assert got == [1, 2], f"the healthy shard's rows waited behind the dead one's: {got}"
        assert (claimed, done) == (5, 2)
        left = [r[0] for r in await db.pool.fetch("select payload from outbox order by id")]
        assert [json.loads(p)["n"] for p in left] == [0, 3, 4]
    finally:
        for port in (victim, *replicas):
            node = by_port(cluster, port)
            if not node.running:
                node.start()
        await db.close()
        await broker.close()


@contextlib.asynccontextmanager
async def shard_down(cluster: ThrowawayRedisCluster, key: bytes) -> AsyncIterator[int]:
    """The shard of ``key`` gone (primary and replica killed), the others serving; back after."""
    victim = await owner_of(cluster, key)
    replicas = (await roles(cluster))[victim]
    await each_node(cluster, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    for port in (*replicas, victim):
        by_port(cluster, port).kill()
    try:
        yield victim
    finally:
        for port in (victim, *replicas):
            node = by_port(cluster, port)
            if not node.running:
                node.start()


async def test_with_one_shard_down_a_shard_without_the_scripts_still_runs_them(cluster):
    prefix = unique_prefix()
    broker = RedisClusterBroker(cluster.url, prefix)
    publisher = HistoryPublisher(broker, HistoryPolicy(("*",), 100, 60))
    down = next(f"d{i}" for i in range(100) if key_slot(broker._channel_key(f"d{i}")) < 5461)
    up = next(f"u{i}" for i in range(100) if key_slot(broker._channel_key(f"u{i}")) > 10923)
    try:
        await broker.publish(up, b"{}")  # the slot map is learnt (from REDIS_URL's node)
        await each_node(cluster, "SCRIPT", "FLUSH")  # as on a replica just promoted
        async with shard_down(cluster, broker._channel_key(down)):
            await publisher.publish(up, b'"after"')
            entries, _ = await broker.history(up, 0, 10)
            assert [data for _, data in entries] == [b'"after"']
    finally:
        await broker.close()


async def test_a_shard_past_maxmemory_fails_its_publications_and_keeps_their_history(cluster):
    # The single-node fix (tests/test_redis_pressure.py) on a cluster's own script: a
    # write the full shard refuses fails the publication, and the channel keeps its
    # history and epoch; channels of the other shards go on.
    prefix = unique_prefix()
    broker = RedisClusterBroker(cluster.url, prefix)
    history = (100, 300.0)
    full = next(f"f{i}" for i in range(100) if key_slot(broker._channel_key(f"f{i}")) < 5461)
    fine = next(f"g{i}" for i in range(100) if key_slot(broker._channel_key(f"g{i}")) > 10923)
    await broker.start(lambda *_: None)
    try:
        for ch in (full, fine):
            await broker.publish_history(ch, b'"first"', *history)
        _, before = await broker.history(full, 0, 10)
        async with memory_full(
            f"redis://127.0.0.1:{await owner_of(cluster, broker._channel_key(full))}"
        ):
            with pytest.raises(BrokerUnavailable, match="maxmemory"):
                await broker.publish_history(full, b'"refused"', *history)
            await broker.publish_history(fine, b'"second"', *history)
        entries, top = await broker.history(full, 0, 10)
        assert entries == [(1, b'"first"')]
        assert top is not None and before is not None and top.epoch == before.epoch
        entries, _ = await broker.history(fine, 0, 10)
        assert [data for _, data in entries] == [b'"first"', b'"second"']
        await broker.publish_history(full, b'"after"', *history)  # memory freed: on it goes
        entries, top = await broker.history(full, 0, 10)
        assert [offset for offset, _ in entries] == [1, 2] and top.epoch == before.epoch
    finally:
        await broker.close()
