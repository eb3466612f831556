"""One contract suite, run against every Broker: memory always, Redis and Redis Cluster really."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from core.infra.broker import (
    Broker,
    BrokerUnavailable,
    EventBatch,
    MemoryBroker,
    Position,
    RedisBroker,
    RedisClusterBroker,
)
from tests.harness import unique_prefix
from tests.servers import (
    UNIT,
    ThrowawayRedisCluster,
    redis_cluster_executable,
    shared_redis_cluster,
)


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.positions: list[Position | None] = []
        self.states: list[bool] = []
        self._changed = asyncio.Event()

    def __call__(self, ch: str, data: bytes, position: Position | None = None) -> None:
        self.items.append((ch, data))
        self.positions.append(position)
        self._changed.set()

    def state(self, up: bool) -> None:
        self.states.append(up)
        self._changed.set()

    async def wait_state(
        self, up: bool, timeout: float = 2 * UNIT, since: int | None = None
    ) -> None:
        """Return once the broker last reported the link ``up`` (or down); with ``since``,
        once it reported it after its first ``since`` reports (a drop and the recovery may
        both come before the caller looks)."""
        async with asyncio.timeout(timeout):
            while not self._reported(up, since):
                self._changed.clear()
                await self._changed.wait()

    def _reported(self, up: bool, since: int | None) -> bool:
        if since is not None:
            return up in self.states[since:]
        return bool(self.states) and self.states[-1] is up

    async def wait_for(self, n: int, timeout: float = 2 * UNIT) -> list[tuple[str, bytes]]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.items

    async def quiet(self, seconds: float = 0.1 * UNIT) -> list[tuple[str, bytes]]:
        await asyncio.sleep(seconds)
        return self.items


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayRedisCluster]:
    """Three private redis-server >= 7 cluster primaries for the session (skipped, saying
    why, when no such binary exists); tests/test_redis_cluster.py shares it."""
    executable, problem = redis_cluster_executable()
    if executable is None:
        pytest.skip(problem)
    with shared_redis_cluster(tmp_path_factory.mktemp("redis-cluster"), executable) as cluster:
        yield cluster


@pytest.fixture(params=["memory", "redis", "cluster"])
def broker_factory(request):
    """Makes brokers that share one backend (one process for memory)."""
    if request.param == "memory":
        shared = MemoryBroker()
        return lambda: shared, True
    prefix = unique_prefix()
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
        return lambda: RedisClusterBroker(url, prefix), False
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBroker(url, prefix), False


@pytest.fixture
async def started(broker_factory):
    make, single = broker_factory
    brokers: list[tuple[Broker, Inbox]] = []

    async def start() -> tuple[Broker, Inbox]:
        broker, inbox = make(), Inbox()
        await broker.start(inbox, inbox.state)
        brokers.append((broker, inbox))
        return broker, inbox

    start.single_process = single  # type: ignore[attr-defined]
    yield start
    for broker, _ in brokers:
        if isinstance(broker, RedisBroker):  # the event stream has no expiry: leave none behind
            await broker._pub_client.delete(broker._events_keys()[0])
        await broker.close()


async def test_start_reports_connected(started):
    broker, inbox = await started()
    assert broker.connected and inbox.states[-1] is True
    assert "password" not in broker.description


async def test_subscribed_channel_receives_in_order(started):
    broker, inbox = await started()
    await broker.subscribe("room:1")
    for i in range(50):
        await broker.publish("room:1", json.dumps({"i": i}).encode())
    items = await inbox.wait_for(50)
    assert [json.loads(d)["i"] for _, d in items] == list(range(50))
    assert {ch for ch, _ in items} == {"room:1"}


async def test_data_arrives_byte_for_byte(started):
    broker, inbox = await started()
    await broker.subscribe("room:1")
    payload = '{"b": [1, 2.50],  "é": "\\u00e9"}'.encode()
    await broker.publish("room:1", payload)
    assert (await inbox.wait_for(1))[0] == ("room:1", payload)


async def test_unsubscribed_and_other_channels_deliver_nothing(started):
    broker, inbox = await started()
    await broker.subscribe("room:1")
    await broker.publish("room:2", b"1")
    await broker.unsubscribe("room:1")
    await broker.publish("room:1", b"2")
    assert await inbox.quiet() == []


async def test_subscribe_twice_and_unsubscribe_unknown_are_harmless(started):
    broker, inbox = await started()
    await broker.subscribe("room:1")
    await broker.subscribe("room:1")
    await broker.unsubscribe("never")
    await broker.publish("room:1", b"1")
    assert await inbox.wait_for(1) == [("room:1", b"1")]
    assert await inbox.quiet() == [("room:1", b"1")]  # delivered once


async def test_publish_without_subscribers_succeeds(started):
    """No subscriber anywhere: the publication is dropped (not kept for a later subscriber,
    not delivered to another channel's) and the broker goes on."""
    broker, inbox = await started()
    await broker.subscribe("room:1")  # a subscriber, of another channel
    await broker.publish("nobody:here", b'"dropped"')
    assert broker.connected
    await broker.subscribe("nobody:here")
    await broker.publish("nobody:here", b'"after"')
    assert await inbox.wait_for(1) == [("nobody:here", b'"after"')]
    assert await inbox.quiet() == [("nobody:here", b'"after"')]


async def test_publications_cross_brokers(started):
    a, inbox_a = await started()
    b, inbox_b = await started()
    await b.subscribe("room:x")
    await a.publish("room:x", b'"hello"')
    assert await inbox_b.wait_for(1) == [("room:x", b'"hello"')]
    if not started.single_process:
        assert await inbox_a.quiet() == []  # a never subscribed


async def test_closed_broker_refuses_and_stops_delivering(started):
    broker, _ = await started()
    await broker.subscribe("room:1")
    await broker.close()
    assert not broker.connected
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("room:2")


async def test_plain_redis_publish_reaches_the_broker(redis_url):
    prefix = unique_prefix()
    broker, inbox = RedisBroker(redis_url, prefix), Inbox()
    await broker.start(inbox)
    try:
        await broker.subscribe("room:1")
        client = aioredis.Redis.from_url(redis_url)
        try:
            assert await client.publish(f"{prefix}room:1", '{"any":"json"}') == 1
        finally:
            await client.aclose()
        assert await inbox.wait_for(1) == [("room:1", b'{"any":"json"}')]
    finally:
        await broker.close()


@pytest.mark.parametrize("kind", [RedisBroker, RedisClusterBroker])
async def test_unreachable_redis_fails_clearly(kind):
    broker, inbox = kind("redis://127.0.0.1:1/0", backoff_max=0.1), Inbox()
    await broker.start(inbox, inbox.state, wait=0.2)
    try:
        assert not broker.connected
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("room:1")
        with pytest.raises(BrokerUnavailable):
            await broker.publish("room:1", b"1")
        with pytest.raises(BrokerUnavailable):
            await broker.append_events("node", EventBatch([b"{}"]), 60, 1000)
    finally:
        await broker.close()


async def test_redis_restart_reconnects_and_resubscribes(throwaway_redis):
    prefix = unique_prefix()
    broker = RedisBroker(throwaway_redis.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    inbox = Inbox()
    await broker.start(inbox, inbox.state)
    try:
        await broker.subscribe("room:1")
        await broker.subscribe("room:2")
        throwaway_redis.kill()
        await inbox.wait_state(False)
        assert not broker.connected
        with pytest.raises(BrokerUnavailable):
            await broker.publish("room:1", b"lost")
        throwaway_redis.start()
        await inbox.wait_state(True, timeout=5 * UNIT)
        assert broker.connected
        client = aioredis.Redis.from_url(throwaway_redis.url)
        try:
            for ch in ("room:1", "room:2"):
                assert await client.publish(f"{prefix}{ch}", b"1") == 1, ch
        finally:
            await client.aclose()
        assert sorted(await inbox.wait_for(2)) == [("room:1", b"1"), ("room:2", b"1")]
        assert inbox.states[:3] == [True, False, True]
        assert broker.reconnects == 1
    finally:
        await broker.close()


# -- history ------------------------------------------------------------------------


async def test_history_offsets_are_assigned_in_order_with_one_epoch(started):
    broker, inbox = await started()
    await broker.subscribe("feed:1")
    positions = [await broker.publish_history("feed:1", b'{"n":%d}' % i, 10, 60) for i in range(3)]
    assert [p.offset for p in positions] == [1, 2, 3]
    assert len({p.epoch for p in positions}) == 1
    await inbox.wait_for(3)
    assert inbox.positions == positions  # subscribers see the same positions
    await broker.publish("feed:1", b'"plain"')
    await inbox.wait_for(4)
    assert inbox.positions[-1] is None  # a plain publication has none


async def test_history_returns_what_came_after_an_offset(started):
    broker, _ = await started()
    for i in range(1, 6):
        await broker.publish_history("feed:2", b"%d" % i, 10, 60)
    entries, top = await broker.history("feed:2", 2, 100)
    assert entries == [(3, b"3"), (4, b"4"), (5, b"5")] and top is not None and top.offset == 5
    entries, _ = await broker.history("feed:2", 0, 2)
    assert entries == [(1, b"1"), (2, b"2")]
    entries, _ = await broker.history("feed:2", 5, 10)
    assert entries == []


async def test_history_keeps_the_last_size_publications(started):
    broker, _ = await started()
    for i in range(1, 8):
        await broker.publish_history("feed:3", b"%d" % i, 3, 60)
    entries, top = await broker.history("feed:3", 0, 100)
    assert [o for o, _ in entries] == [5, 6, 7] and top is not None and top.offset == 7


async def test_a_publication_made_again_with_its_call_id_is_published_once(started):
    """An outbox row's events, published by their writer and again by a relay (core/relay.py)."""
    broker, inbox = await started()
    await broker.subscribe("feed:6")
    first = await broker.publish_history("feed:6", b"1", 10, 60, call="o1.7")
    second = await broker.publish_history("feed:6", b"2", 10, 60, call="o2.7")
    assert await broker.publish_history("feed:6", b"1", 10, 60, call="o1.7") == first
    (again,) = await broker.publish_many([("feed:6", (10, 60.0))], b"2", "o2.7")
    assert again == second
    other = await broker.publish_history("feed:8", b"1", 10, 60, call="o1.7")
    assert other.offset == 1  # another channel had not seen it
    entries, _ = await broker.history("feed:6", 0, 10)
    assert entries == [(1, b"1"), (2, b"2")]
    await broker.publish_history("feed:6", b"3", 10, 60)  # without one: each call is new
    await broker.publish_history("feed:6", b"3", 10, 60)
    await inbox.wait_for(4)
    assert [p.offset for p in inbox.positions] == [1, 2, 3, 4]


async def test_a_channel_keeps_its_last_8_call_ids(started):
    """A relay that lost its transaction publishes its last chunk of 8 rows again (core/relay.py):
    each is published once. (Redis kept 7: the 8th sent again was published again, and pushed
    out the next, so all 8 were twice.)"""
    broker, _ = await started()
    for channels in (["feed:9"], ["feed:10", "feed:11"]):  # one script, and the one for several
        for _ in range(2):
            for i in range(1, 9):
                await broker.publish_many(
                    [(ch, (100, 60.0)) for ch in channels], b"%d" % i, f"o{i}.9"
                )
        for ch in channels:
            entries, _ = await broker.history(ch, 0, 100)
            assert [data for _, data in entries] == [b"%d" % i for i in range(1, 9)], ch


async def test_a_channel_without_history_has_no_position(started):
    broker, _ = await started()
    assert await broker.history("never:published", 0, 10) == ([], None)


async def test_expiring_sets_are_shared_and_forget_what_expired(started):
    one, _ = await started()
    other = one if started.single_process else (await started())[0]
    await one.expiring_add("nodes", "a", 1000.0)
    await one.expiring_add("nodes", "b", 2000.0)
    await other.expiring_add("nodes", "a", 3000.0)  # again: moved, not doubled
    assert await other.expiring_members("nodes", 500.0) == {"a": 3000.0, "b": 2000.0}
    assert await one.expiring_members("nodes", 2500.0) == {"a": 3000.0}
    # What expired is gone for good, whatever `now` a later reader passes.
    assert await other.expiring_members("nodes", 0.0) == {"a": 3000.0}
    await other.expiring_remove("nodes", "a")
    await other.expiring_remove("nodes", "never-there")
    assert await one.expiring_members("nodes", 0.0) == {}
    assert await one.expiring_members("other-key", 0.0) == {}
    await one.expiring_add_many("many", {"a": 1000.0, "b": 2000.0})  # one round trip
    await other.expiring_add_many("many", {"a": 3000.0})
    await other.expiring_add_many("many", {})
    assert await other.expiring_members("many", 1500.0) == {"a": 3000.0, "b": 2000.0}
    # A range read from an ``until`` on: only those kept that long, with nothing forgotten.
    assert await one.expiring_members_from("many", 2000.0) == {"a": 3000.0, "b": 2000.0}
    assert await other.expiring_members_from("many", 2000.5) == {"a": 3000.0}
    assert await one.expiring_members_from("many", 3000.5) == {}
    assert await one.expiring_members_from("other-key", 0.0) == {}


async def test_a_reader_whose_clock_runs_ahead_takes_nothing_from_the_others(started):
    """A gateway an hour fast read the block list (and the revoked sessions) with its own
    ``now``, and Redis forgot for everyone what had not expired for them: a user blocked for
    600 s through a gateway with a true clock was taken back by it 60 s later."""
    one, _ = await started()
    other = one if started.single_process else (await started())[0]
    now = time.time()
    await one.expiring_add("blocked", "alice", now + 600)
    assert await other.expiring_members("blocked", now + 3600) == {}  # expired for the fast one
    assert await one.expiring_members("blocked", time.time()) == {"alice": now + 600}


async def test_presence_counts_clients_and_users_through_joins_leaves_and_expiry(started):
    one, _ = await started()
    other = one if started.single_process else (await started())[0]

    def entry(user: str, client: str) -> bytes:
        return f'{{"user":"{user}","client":"{client}"}}'.encode()

    await one.presence_add("room:1", {"a1": entry("ann", "a1"), "a2": entry("ann", "a2")}, 60)
    await other.presence_add("room:1", {"b1": entry("bob", "b1")}, 60)
    await one.presence_add("room:1", {"a1": entry("ann", "a1")}, 60)  # a refresh: no change
    assert await other.presence_stats("room:1") == (3, 2)
    await one.presence_remove("room:1", ["a1", "never-there"])
    assert await other.presence_stats("room:1") == (2, 2)
    await other.presence_remove("room:1", ["a1"])  # twice: counted once
    assert await one.presence_stats("room:1") == (2, 2)
    await one.presence_add("room:1", {"a2": entry("cat", "a2")}, 60)  # another user now
    assert await other.presence_stats("room:1") == (2, 2)
    await other.presence_remove("room:1", ["b1"])
    assert await one.presence_stats("room:1") == (1, 1)
    # A node that stops refreshing (died): its entries leave the counts as they expire.
    await other.presence_add("room:1", {"d1": entry("dan", "d1"), "c2": entry("cat", "c2")}, 0.2)
    assert await one.presence_stats("room:1") == (3, 2)
    await asyncio.sleep(0.3 * UNIT)
    assert await one.presence_stats("room:1") == (1, 1)
    assert list(await other.presence("room:1")) == ["a2"]
    assert await one.presence_stats("room:2") == (0, 0)


async def test_history_lost_with_redis_starts_a_new_epoch(throwaway_redis):
    broker = RedisBroker(
        throwaway_redis.url, unique_prefix(), backoff_initial=0.02, backoff_max=0.2
    )
    inbox = Inbox()
    await broker.start(inbox, inbox.state)
    try:
        first = await broker.publish_history("feed:4", b"1", 10, 60)
        throwaway_redis.kill()  # no persistence: the history is gone
        await inbox.wait_state(False)
        throwaway_redis.start()
        await inbox.wait_state(True, timeout=5 * UNIT)
        again = await broker.publish_history("feed:4", b"2", 10, 60)
        assert again.offset == 1 and again.epoch != first.epoch
        assert (await broker.history("feed:4", 0, 10))[0] == [(1, b"2")]
    finally:
        await broker.close()


# -- connection events (docs/events.md) ---------------------------------------------


def _event(n: int) -> bytes:
    return b'{"type":"connect","n":%d}' % n


async def test_appended_events_read_back_in_order_with_increasing_ids(started):
    broker, _ = await started()
    node = unique_prefix()
    assert await broker.append_events(node, EventBatch([_event(1), _event(2)]), 60, 1000)
    assert not await broker.append_events(node, EventBatch([_event(3)]), 60, 1000)
    entries = await broker.read_events("0", 100)
    mine = [event for _, event in entries if event in {_event(1), _event(2), _event(3)}]
    assert mine == [_event(1), _event(2), _event(3)]
    ids = [tuple(map(int, id.split("-"))) for id, _ in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    after = await broker.read_events(entries[-2][0], 100)
    assert after == entries[-1:]
    assert await broker.read_events(entries[-1][0], 100) == []
    await broker.forget_node(node)


async def test_the_stream_keeps_about_maxlen_events_and_always_the_last(started):
    broker, _ = await started()
    node = unique_prefix()
    await broker.append_events(node, EventBatch([_event(i) for i in range(300)]), 60, 10)
    kept = [event for _, event in await broker.read_events("0", 1000)]
    # Redis trims whole nodes of its radix tree (MAXLEN ~): about, never fewer.
    assert 10 <= len(kept) <= 200
    assert kept[-10:] == [_event(i) for i in range(290, 300)]
    await broker.forget_node(node)


async def test_a_lost_nodes_live_connections_are_reported_once_whoever_claims(started):
    a, _ = await started()
    b, _ = await started()
    node = unique_prefix()
    opened = {"c1": b'{"type":"disconnect","client":"c1"}', "c2": b'{"type":"disconnect"}'}
    opened["c3"] = b'{"type":"disconnect","client":"c3"}'
    await a.append_events(node, EventBatch([_event(1)], opened), 0.2, 1000)
    await a.append_events(node, EventBatch(closed=["c2"]), 0.2, 1000)
    await asyncio.sleep(0.3)
    assert node in await b.lost_nodes()
    claims = await asyncio.gather(*(x.claim_node(node, 1000, 100) for x in (a, b, a, b)))
    reported = [event for events, _ in claims for event in events]
    assert sorted(json.loads(e)["client"] for e in reported) == ["c1", "c3"]
    assert [done for _, done in claims].count(True) == 1
    ts = {json.loads(e)["ts"] for e in reported}
    assert len(ts) == 1 and abs(ts.pop() / 1000 - time.time()) < 5
    stream = [event for _, event in await a.read_events("0", 1000)]
    assert sorted(stream[-2:]) == sorted(reported)
    assert node not in await b.lost_nodes()
    assert await b.claim_node(node, 1000, 100) == ([], False)
    # Once claimed, the node's next call finds it unmarked (it was reported lost).
    assert await a.append_events(node, EventBatch(), 60, 1000)
    await a.forget_node(node)


async def test_a_lost_node_is_claimed_in_parts_of_limit(started):
    broker, _ = await started()
    node = unique_prefix()
    opened = {f"c{i}": b'{"client":"c%d"}' % i for i in range(5)}
    await broker.append_events(node, EventBatch([], opened), 0.1, 1000)
    await asyncio.sleep(0.2)
    parts = [await broker.claim_node(node, 1000, 2) for _ in range(3)]
    assert [(len(events), done) for events, done in parts] == [(2, False), (2, False), (1, True)]
    clients = {json.loads(e)["client"] for events, _ in parts for e in events}
    assert clients == set(opened)


async def test_a_node_that_comes_back_in_time_or_stops_cleanly_is_not_claimed(started):
    broker, _ = await started()
    node, gone = unique_prefix(), unique_prefix()
    live = EventBatch([], {"c1": b'{"client":"c1"}'})
    await broker.append_events(node, live, 0.1, 1000)
    await broker.append_events(gone, live, 0.1, 1000)
    await asyncio.sleep(0.2)
    assert not await broker.append_events(node, EventBatch(), 60, 1000)  # back: still marked
    await broker.forget_node(gone)
    assert {node, gone}.isdisjoint(await broker.lost_nodes())
    assert await broker.claim_node(node, 1000, 10) == ([], False)
    assert await broker.claim_node(gone, 1000, 10) == ([], False)
    await broker.forget_node(node)
