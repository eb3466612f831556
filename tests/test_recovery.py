"""History and recovery: after a reconnect, exactly what was missed, or a plain 'no'."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from core.infra.broker import Position, RedisBroker
from gateway.client import Backoff, Client, Gap, Publication
from gateway.recovery import MAX_PAGE_BYTES, MAX_RECOVERY_BYTES
from proto import ErrorCode
from tests.harness import SECRET, running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT, ThrowawayRedis, free_port
from tests.stallproxy import stall_proxy
from tests.test_processes import mint, processes  # noqa: F401  (fixture)

FEED = {"history_channels": ("feed:*",), "history_size": 50}


async def publish(gw, ch: str, *values: int) -> None:
    for v in values:
        await gw.ctx.node.publish(ch, b'{"n":%d}' % v)


def feed_client(gw) -> Client:
    """The Python client on ``gw``, allowed ``feed:*``, reconnecting at once."""
    url = f"ws://127.0.0.1:{gw.port}/ws"
    return Client(
        url, token=token_for(gw, channels=("feed:*",)), backoff=Backoff(base=0.05, cap=0.2)
    )


async def test_sub_reports_the_position_and_pushes_carry_offsets():
    async with (
        running_gateway(**FEED) as gw,
        ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c,
    ):
        await publish(gw, "feed:1", 1, 2)
        reply = await c.request("sub", ch="feed:1")
        assert reply["ok"] and reply["offset"] == 2 and reply["epoch"] and "recovered" not in reply
        await publish(gw, "feed:1", 3)
        push = await c.next_push()
        assert push == {"op": "msg", "ch": "feed:1", "offset": 3, "epoch": reply["epoch"],
                        "data": {"n": 3}}  # fmt: skip


async def test_reconnect_with_since_recovers_exactly_what_was_missed():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with ws_client(gw.port, token) as c:
            first = await c.request("sub", ch="feed:2")
            assert "epoch" not in first  # nothing published yet: no position
            await publish(gw, "feed:2", 1, 2)
            seen = [await c.next_push() for _ in range(2)]
        await publish(gw, "feed:2", 3, 4, 5)  # while the client is away
        async with ws_client(gw.port, token) as c:
            since = {"offset": seen[-1]["offset"], "epoch": seen[-1]["epoch"]}
            reply = await c.request("sub", ch="feed:2", since=since)
            assert reply["recovered"] is True and reply["offset"] == 5
            await publish(gw, "feed:2", 6)
            got = [await c.next_push() for _ in range(4)]
        assert [m["data"]["n"] for m in got] == [3, 4, 5, 6]
        assert [m["offset"] for m in got] == [3, 4, 5, 6]


@pytest.mark.parametrize("case", ["gap", "epoch", "ahead"])
async def test_unrecoverable_gaps_say_recovered_false(case):
    async with running_gateway(history_channels=("feed:*",), history_size=3) as gw:
        token = token_for(gw, channels=("feed:*",))
        await publish(gw, "feed:3", *range(1, 9))  # only 6, 7, 8 are kept
        async with ws_client(gw.port, token) as c:
            epoch = (await c.request("sub", ch="feed:3"))["epoch"]
        since = {"gap": {"offset": 2, "epoch": epoch}, "epoch": {"offset": 7, "epoch": "other"},
                 "ahead": {"offset": 99, "epoch": epoch}}[case]  # fmt: skip
        async with ws_client(gw.port, token) as c:
            reply = await c.request("sub", ch="feed:3", since=since)
            assert reply["ok"] and reply["recovered"] is False and reply["offset"] == 8
            await publish(gw, "feed:3", 9)
            push = await c.next_push()  # live goes on from the current position
            assert push["offset"] == 9 and c.pushes == []


async def test_more_missed_than_this_gateway_reads_is_not_recovered():
    """A publisher keeps more history (10) than this gateway reads (HISTORY_SIZE 3): a
    client that missed 7 got the first 3, ``recovered: true``, and never the other 4."""
    async with running_gateway(history_channels=("feed:*",), history_size=3) as gw:
        broker = gw.ctx.node.broker
        for n in range(1, 9):
            first = await broker.publish_history("feed:6", b'{"n":%d}' % n, 10, 300)
            if n == 1:
                since = {"offset": first.offset, "epoch": first.epoch}
        async with ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c:
            reply = await c.request("sub", ch="feed:6", since=since)
            assert reply["recovered"] is False and reply["offset"] == 8
            assert (await c.request("ping"))["ok"] and c.pushes == []


@pytest.mark.parametrize("where", ["first", "last"])
async def test_an_unpublishable_entry_among_the_missed_does_not_defeat_recovery(where):
    """An entry left out as not publishable (its live publication was too) is read all the
    same: a read that began or ended with one still covers what was missed."""
    async with running_gateway(history_channels=("feed:*",), history_size=10) as gw:
        broker = gw.ctx.node.broker
        first = await broker.publish_history("feed:7", b'{"n":1}', 10, 300)
        bodies = [b"{broken", b'{"n":2}'] if where == "first" else [b'{"n":2}', b"{broken"]
        for body in bodies:
            await broker.publish_history("feed:7", body, 10, 300)
        since = {"offset": first.offset, "epoch": first.epoch}
        async with ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c:
            reply = await c.request("sub", ch="feed:7", since=since)
            assert reply["recovered"] is True and reply["offset"] == 3, reply
            assert (await c.next_push())["data"] == {"n": 2}


async def test_nothing_missed_is_recovered_with_nothing_to_send():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        await publish(gw, "feed:4", 1)
        async with ws_client(gw.port, token) as c:
            epoch = (await c.request("sub", ch="feed:4"))["epoch"]
        async with ws_client(gw.port, token) as c:
            reply = await c.request("sub", ch="feed:4", since={"offset": 1, "epoch": epoch})
            assert reply["recovered"] is True
            assert (await c.request("ping"))["ok"] and c.pushes == []


async def test_killed_node_client_resumes_on_another_with_every_message_once(
    processes,  # noqa: F811
    redis_url,
    data_dir,
    database_url,
    core_schema,
):
    prefix = unique_prefix()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET,
           "HISTORY_CHANNELS": "feed:*", "HISTORY_SIZE": "1000",
           "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema}  # fmt: skip
    a, b = processes.together(2, **env)
    token = mint(data_dir, "--channels", "feed:*")
    publisher = RedisBroker(redis_url, prefix)  # a backend publishing with history
    await publisher.start(lambda *_: None)
    total = 400
    published = asyncio.Event()

    async def publish_steadily() -> None:
        for n in range(1, total + 1):
            await publisher.publish_history("feed:live", b'{"n":%d}' % n, 1000, 300)
            if n % 20 == 0:
                await asyncio.sleep(0.01)
        published.set()

    received: list[int] = []
    offsets: list[int] = []
    try:
        async with ws_client(a.port, token) as c:
            assert (await c.request("sub", ch="feed:live"))["ok"]
            epoch = None
            task = asyncio.ensure_future(publish_steadily())
            try:
                while len(received) < 100:
                    push = await c.next_push(timeout=5 * UNIT)
                    received.append(push["data"]["n"])
                    offsets.append(push["offset"])
                    epoch = push["epoch"]
                a.proc.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
                with pytest.raises(ConnectionClosed):
                    while True:
                        push = await c.next_push(timeout=5 * UNIT)
                        received.append(push["data"]["n"])
                        offsets.append(push["offset"])
            except BaseException:
                task.cancel()
                raise
        async with ws_client(b.port, token) as c:
            since = {"offset": offsets[-1], "epoch": epoch}
            reply = await c.request("sub", ch="feed:live", since=since)
            assert reply["recovered"] is True
            async with asyncio.timeout(20 * UNIT):
                while not received or received[-1] != total:
                    push = await c.next_push(timeout=5 * UNIT)
                    received.append(push["data"]["n"])
            await task
    finally:
        await publisher.close()
    assert received == list(range(1, total + 1))  # every message exactly once, in order


@pytest.mark.parametrize("msgpack", [False, True])
async def test_history_pages_through_kept_publications(msgpack):
    async with running_gateway(**FEED) as gw:
        await publish(gw, "feed:5", *range(1, 8))
        async with ws_client(gw.port, token_for(gw, channels=("feed:*",)), msgpack=msgpack) as c:
            page = await c.request("history", ch="feed:5", since=2, limit=3)
            assert page["ok"] and page["offset"] == 7
            assert page["publications"] == [
                {"offset": 3, "data": {"n": 3}},
                {"offset": 4, "data": {"n": 4}},
                {"offset": 5, "data": {"n": 5}},
            ]
            rest = await c.request("history", ch="feed:5", since=5)
            assert [p["offset"] for p in rest["publications"]] == [6, 7]


async def test_history_refusals():
    async with running_gateway(**FEED) as gw:
        async with ws_client(gw.port, token_for(gw, channels=("feed:*", "room:*"))) as c:
            no = await c.request("history", ch="room:1")
            assert no["error"]["code"] == ErrorCode.NO_HISTORY
            denied = await c.request("history", ch="feed-other")
            assert denied["error"]["code"] == ErrorCode.PERMISSION_DENIED
            bad = await c.request("history", ch="feed:1", limit=1000)
            assert bad["error"]["code"] == ErrorCode.BAD_FRAME


async def test_python_publisher_reaches_sockets_with_offsets(redis_url):
    from gateway.publisher import Publisher

    prefix = unique_prefix()
    async with (
        running_gateway(
            RedisBroker(redis_url, prefix), redis_url=redis_url, redis_prefix=prefix, **FEED
        ) as gw,  # fmt: skip
        ws_client(gw.port, token_for(gw, channels=("feed:*", "room:*"))) as c,
        Publisher(redis_url, prefix, history_channels=("feed:*",), history_size=50) as pub,
    ):
        assert (await c.request("sub", ch="feed:9"))["ok"]
        assert (await c.request("sub", ch="room:9"))["ok"]
        position = await pub.publish("feed:9", {"status": "paid"})
        assert position is not None and position.offset == 1
        assert await pub.publish("room:9", b'{"plain":true}') is None
        first, second = await c.next_push(), await c.next_push()
    assert first == {"op": "msg", "ch": "feed:9", "offset": 1, "epoch": position.epoch,
                     "data": {"status": "paid"}}  # fmt: skip
    assert second == {"op": "msg", "ch": "room:9", "data": {"plain": True}}


async def test_redis_restart_mid_stream_tells_clients_and_starts_a_new_epoch(throwaway_redis):
    prefix = unique_prefix()
    broker = RedisBroker(throwaway_redis.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    async with (
        running_gateway(broker, **FEED) as gw,
        ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c,
    ):
        assert (await c.request("sub", ch="feed:x"))["ok"]
        await publish(gw, "feed:x", 1, 2, 3)
        before = [await c.next_push() for _ in range(3)]
        epoch = before[-1]["epoch"]
        throwaway_redis.kill()
        # Sockets stay up; publishing fails plainly and temporarily.
        async with asyncio.timeout(5 * UNIT):
            while True:
                reply = await c.request("pub", ch="feed:x", data={"n": 0})
                if not reply["ok"]:
                    break
                await asyncio.sleep(0.05)
        assert reply["error"]["code"] == ErrorCode.UNAVAILABLE and reply["error"]["temporary"]
        throwaway_redis.start()
        gap = None
        async with asyncio.timeout(10 * UNIT):
            while gap is None:
                msg = await c.recv(timeout=10 * UNIT)
                if msg.get("op") == "gap":
                    gap = msg
        assert gap == {"op": "gap", "ch": "feed:x"}
        await publish(gw, "feed:x", 4)
        after = await c.recv(timeout=2 * UNIT)  # told once: the new epoch is no second gap
        assert after["data"] == {"n": 4} and after["offset"] == 1 and after["epoch"] != epoch
        page = await c.request("history", ch="feed:x", since=3)
        assert page["epoch"] != epoch  # the client sees its old position is gone: reload


async def test_a_redis_restarted_from_an_older_snapshot_loses_nothing_silently(throwaway_redis):
    """Publications acknowledged after Redis's last snapshot are gone once it restarts from it.

    The channel's history then ends before what the client last saw, under the
    same epoch: the next publications would reuse those offsets, and a client
    would take them for repeats. The client is told instead, and gets every
    later publication.
    """
    broker = RedisBroker(
        throwaway_redis.url, unique_prefix(), backoff_initial=0.02, backoff_max=0.2
    )
    async with (
        running_gateway(broker, **FEED) as gw,
        feed_client(gw) as client,
    ):
        sub = await client.subscribe("feed:x")
        await publish(gw, "feed:x", 1, 2)
        async with aioredis.from_url(throwaway_redis.url) as r:
            await r.save()
        await publish(gw, "feed:x", 3, 4)
        seen = [await asyncio.wait_for(anext(sub), 2 * UNIT) for _ in range(4)]
        assert [(e.offset, e.data) for e in seen] == [(1, {"n": 1}), (2, {"n": 2}),
                                                      (3, {"n": 3}), (4, {"n": 4})]  # fmt: skip
        throwaway_redis.kill()
        throwaway_redis.start()  # from the snapshot: 3 and 4 are gone
        gap = await asyncio.wait_for(anext(sub), 10 * UNIT)
        assert isinstance(gap, Gap) and gap.position is not None
        assert gap.position.epoch != seen[-1].epoch
        await publish(gw, "feed:x", 5)
        after = await asyncio.wait_for(anext(sub), 2 * UNIT)
        assert isinstance(after, Publication) and after.data == {"n": 5}
        assert after.epoch != seen[-1].epoch


async def test_a_replica_promoted_without_the_last_publications_starts_a_new_epoch(tmp_path):
    """A failover: the replica had publications 1 and 2, the primary had acknowledged 3 and 4."""
    primary = ThrowawayRedis(tmp_path / "primary").start()
    replica = ThrowawayRedis(
        tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(primary.port))
    )
    replica.start()
    old = RedisBroker(primary.url, "gw:")
    new = RedisBroker(replica.url, "gw:")
    try:
        first = [await old.publish_history("feed:x", b"%d" % n, 50, 60) for n in (1, 2)]
        async with aioredis.from_url(primary.url) as r:
            assert await r.execute_command("WAIT", 1, int(5000 * UNIT)) == 1
        async with aioredis.from_url(replica.url) as r:
            await r.execute_command("REPLICAOF", "NO", "ONE")  # promoted, without what follows
        lost = [await old.publish_history("feed:x", b"%d" % n, 50, 60) for n in (3, 4)]
        assert {p.epoch for p in first + lost} == {first[0].epoch}
        entries, top = await new.history("feed:x", 2, 10)
        assert top is not None and top.epoch != first[0].epoch and entries == []
        after = await new.publish_history("feed:x", b"5", 50, 60)
        assert after.epoch == top.epoch and after.offset == 1
        entries, again = await new.history("feed:x", 0, 10)  # the new epoch holds from now on
        assert again == after and entries == [(1, b"5")]
    finally:
        await old.close()
        await new.close()
        replica.stop()
        primary.stop()


@pytest.mark.parametrize("each", [False, True], ids=["one channel", "several at once"])
async def test_a_publication_whose_answer_was_lost_is_not_published_twice(throwaway_redis, each):
    """The link to Redis is lost after the script ran and before its answer came: the
    broker sends the batch once more on a new connection. It ran twice: the same data
    at two offsets, in history and live, which no client can tell from two publications."""
    prefix = unique_prefix()
    channels = ["feed:x", "feed:x:1"] if each else ["feed:x"]
    direct = RedisBroker(throwaway_redis.url, prefix)
    live: list[tuple[str, bytes, Position | None]] = []
    async with stall_proxy(("127.0.0.1", throwaway_redis.port)) as proxy:
        via = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0", prefix, health_interval=0)
        try:
            await direct.start(lambda ch, data, at: live.append((ch, data, at)))
            for ch in channels:
                await direct.subscribe(ch)
            await via.start(lambda *_: None)

            async def publish(data: bytes) -> list[Position | Exception | None]:
                if each:
                    return await via.publish_many([(ch, (50, 60)) for ch in channels], data)
                return [await via.publish_history(channels[0], data, 50, 60)]

            first = await publish(b"1")
            proxy.lose()  # the next answer, the second publication's, is lost with its link
            second = await publish(b"2")
            await until(lambda: len(live) >= 2 * len(channels))
            await asyncio.sleep(0.2 * UNIT)  # a repeat would have come by now
            for ch, one, two in zip(channels, first, second, strict=True):
                assert isinstance(one, Position) and isinstance(two, Position), (one, two)
                assert two == Position(2, one.epoch)
                entries, top = await direct.history(ch, 0, 50)
                assert entries == [(1, b"1"), (2, b"2")] and top == two
            assert sorted((ch, data) for ch, data, _ in live) == sorted(
                (ch, data) for ch in channels for data in (b"1", b"2")
            )
        finally:
            await via.close()
            await direct.close()


async def test_a_new_epoch_that_arrives_while_the_link_is_down_comes_after_a_gap():
    """A promoted shard's first publication can come before the broker link counts as up
    (its resubscription is confirmed, the others' are not yet), on a channel quiet until
    then, or after an earlier blip of the link: a gap first, each time, once per outage."""
    async with (
        running_gateway(**FEED) as gw,
        ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c,
    ):
        assert (await c.request("sub", ch="feed:q"))["ok"]
        node = gw.ctx.node
        for outage, epoch in enumerate(("E1", "E2")):
            node._on_state(False)
            node._on_publication("feed:q", b'{"n":1}', Position(1, epoch))
            node._on_publication("feed:q", b'{"n":2}', Position(2, epoch))
            frames = [await c.recv(timeout=2 * UNIT) for _ in range(3)]
            assert [f["op"] for f in frames] == ["gap", "msg", "msg"], outage
            node._on_state(True)
            assert await c.recv(timeout=2 * UNIT) == {"op": "gap", "ch": "feed:q"}


async def test_a_recovering_subscriber_shares_no_read_issued_before_its_subscription(monkeypatch):
    """Another client, not subscribed, asked for the same page just before: a publication
    made between that read and the subscription reached neither; the subscriber reads again."""
    token_ok = {"channels": ("feed:*",)}
    async with (
        running_gateway(**FEED) as gw,
        ws_client(gw.port, token_for(gw, **token_ok)) as browsing,
        ws_client(gw.port, token_for(gw, **token_ok)) as c,
    ):
        node = gw.ctx.node
        await node.publish("feed:s", b'{"n":1}')
        at = await node.publish("feed:s", b'{"n":2}')
        assert at is not None
        real, release = node.broker.history, asyncio.Event()

        async def read_then_wait(ch: str, after: int, limit: int):
            result = await real(ch, after, limit)
            await release.wait()
            return result

        monkeypatch.setattr(node.broker, "history", read_then_wait)
        page = asyncio.ensure_future(
            browsing.request("history", ch="feed:s", since=2, limit=FEED["history_size"])
        )
        await until(lambda: any(key[0] == "feed:s" for key in node._reading))
        await publish(gw, "feed:s", 3)  # read already, and nobody here subscribed yet
        since = {"offset": at.offset, "epoch": at.epoch}
        sub = asyncio.ensure_future(c.request("sub", ch="feed:s", since=since, timeout=5 * UNIT))
        await asyncio.sleep(0.2 * UNIT)  # it subscribes, then asks for the page too
        release.set()
        assert (await page)["publications"] == []
        assert (await sub)["recovered"] is True
        await publish(gw, "feed:s", 4)
        assert [(await c.next_push())["data"] for _ in range(2)] == [{"n": 3}, {"n": 4}]


async def test_each_break_while_the_link_is_down_comes_after_a_gap():
    """On a Redis Cluster one shard can drop and come back, twice, while another is down
    (the broker counts as down throughout): each time, a gap before the next publication."""
    async with (
        running_gateway(**FEED) as gw,
        ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c,
    ):
        node = gw.ctx.node
        real, dropping = node.broker._handler, [False]
        node.broker._handler = lambda ch, d, p: None if dropping[0] else real(ch, d, p)
        assert (await c.request("sub", ch="feed:q"))["ok"]
        await publish(gw, "feed:q", 1)
        assert (await c.recv())["offset"] == 1
        node._on_state(False)  # another shard is lost
        for dropped, after in (((2, 3), 4), ((5, 6), 7)):  # this shard drops and is back, twice
            dropping[0] = True
            await publish(gw, "feed:q", *dropped)
            await asyncio.sleep(0.05 * UNIT)  # delivered (to no one)
            dropping[0] = False
            await publish(gw, "feed:q", after)
            frames = [await c.recv(), await c.recv()]
            assert [(f["op"], f.get("offset")) for f in frames] == [("gap", None), ("msg", after)]


async def test_a_link_held_through_a_failover_is_told_of_a_loss_behind_the_new_epoch(tmp_path):
    """A manual failover keeps the gateway's link (its Redis becomes a replica and goes on
    passing publications); the new primary acknowledges 5 and dies before the replica has
    it; the replica is promoted back. The link never dropped, and the next publication is
    the first of a new epoch: the client is told instead of moving on."""
    a = ThrowawayRedis(tmp_path / "a").start()
    b = ThrowawayRedis(tmp_path / "b", args=("--replicaof", "127.0.0.1", str(a.port))).start()
    prefix = unique_prefix()
    broker = RedisBroker(a.url, prefix, backoff_initial=0.02, backoff_max=0.2)
    on_b = RedisBroker(b.url, prefix)
    ra, rb = aioredis.from_url(a.url), aioredis.from_url(b.url)

    async def following() -> bool:
        return (await ra.info("replication")).get("master_link_status") == "up"

    try:
        async with (
            running_gateway(broker, **FEED) as gw,
            feed_client(gw) as client,
        ):
            sub = await client.subscribe("feed:x")
            await publish(gw, "feed:x", 1, 2)
            assert await ra.execute_command("WAIT", 1, int(5000 * UNIT)) == 1
            await rb.execute_command("REPLICAOF", "NO", "ONE")  # b takes over
            await ra.execute_command("REPLICAOF", "127.0.0.1", b.port)  # a follows, link held
            await until(following)
            got = [await asyncio.wait_for(anext(sub), 3 * UNIT) for _ in range(2)]
            # b cannot tell whether it had everything: a new epoch, the client told.
            await on_b.publish_history("feed:x", b'{"n":3}', 50, 60)
            told = await asyncio.wait_for(anext(sub), 3 * UNIT)
            assert isinstance(told, Gap) and told.position is not None
            assert told.position.epoch != got[-1].epoch
            await on_b.publish_history("feed:x", b'{"n":4}', 50, 60)
            got.append(await asyncio.wait_for(anext(sub), 3 * UNIT))
            assert isinstance(got[-1], Publication) and got[-1].data == {"n": 4}
            await ra.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a loses b
            await on_b.publish_history("feed:x", b'{"n":5}', 50, 60)  # acknowledged, then lost
            b.kill()
            await ra.execute_command("REPLICAOF", "NO", "ONE")  # a promoted; its clients stay
            assert broker.reconnects == 0
            await publish(gw, "feed:x", 6)
            gap = await asyncio.wait_for(anext(sub), 3 * UNIT)
            assert isinstance(gap, Gap) and gap.position is not None
            assert gap.position.epoch != got[-1].epoch
    finally:
        await on_b.close()
        await ra.aclose()
        await rb.aclose()
        b.stop()
        a.stop()


async def test_publications_on_channels_nobody_here_holds_leave_nothing_behind():
    """Not even in the window where the last member left and UNSUBSCRIBE is under way."""
    async with running_gateway(**FEED) as gw:
        node = gw.ctx.node
        for i in range(50):
            node._on_publication(f"feed:gone{i}", b'{"n":1}', Position(1, "e"))
        assert [ch for ch in (f"feed:gone{i}" for i in range(50)) if node.seen(ch)] == []


async def test_killed_node_long_poll_client_resumes_on_another_with_every_message_once(
    processes,  # noqa: F811
    redis_url,
    data_dir,
    database_url,
    core_schema,
):
    from tests.harness import ApiClient

    prefix = unique_prefix()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET,
           "HISTORY_CHANNELS": "feed:*", "HISTORY_SIZE": "1000", "LONGPOLL_TIMEOUT": "1",
           "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema}  # fmt: skip
    a, b = processes.together(2, **env)
    token = mint(data_dir, "--channels", "feed:*")
    publisher = RedisBroker(redis_url, prefix)
    await publisher.start(lambda *_: None)
    total = 300

    async def publish_steadily() -> None:
        for n in range(1, total + 1):
            await publisher.publish_history("feed:lp", b'{"n":%d}' % n, 1000, 300)
            if n % 10 == 0:
                await asyncio.sleep(0.01)

    async def session(port: int, frame: dict) -> tuple[ApiClient, str]:
        api = ApiClient(port, token)
        status, _, made = await api.call("POST", "/lp", raw=b"")
        assert status == 201
        assert (await api.call("POST", f"/lp/{made['session']}", [frame]))[0] == 202
        return api, made["session"]

    received: list[int] = []
    last: tuple[int, str] | None = None
    task = None
    api, sid = await session(a.port, {"id": 1, "op": "sub", "ch": "feed:lp"})
    try:
        cursor = 0
        task = asyncio.ensure_future(publish_steadily())
        while len(received) < 80:
            _, _, body = await api.call("GET", f"/lp/{sid}?cursor={cursor}")
            cursor = body["cursor"]
            for m in body["messages"]:
                if m.get("op") == "msg":
                    received.append(m["data"]["n"])
                    last = (m["offset"], m["epoch"])
        a.proc.send_signal(signal.SIGKILL)
        api.close()
        assert last is not None
        since = {"offset": last[0], "epoch": last[1]}
        api, sid = await session(b.port, {"id": 1, "op": "sub", "ch": "feed:lp", "since": since})
        cursor, recovered = 0, None
        async with asyncio.timeout(30 * UNIT):
            while not received or received[-1] != total:
                _, _, body = await api.call("GET", f"/lp/{sid}?cursor={cursor}")
                cursor = body["cursor"]
                for m in body["messages"]:
                    if m.get("id") == 1:
                        recovered = m["recovered"]
                    elif m.get("op") == "msg":
                        received.append(m["data"]["n"])
        await task
    finally:
        if task is not None and not task.done():
            task.cancel()
        api.close()
        await publisher.close()
    assert recovered is True
    assert received == list(range(1, total + 1))  # every message exactly once, in order


#: A publication of 60 KB on ``feed:big`` (`big_feed`).
BIG = b'{"s":"%s"}' % (b"x" * 60_000)


@contextlib.asynccontextmanager
async def big_feed(redis_url: str, monkeypatch, published: int):
    """A gateway on Redis whose ``feed:big`` holds the last 100 of ``published`` `BIG`
    publications, a client allowed ``feed:*``, the last position, and a list whose one
    item counts the bytes of entries Redis sends for history reads from then on."""
    prefix = unique_prefix()
    async with (
        running_gateway(
            RedisBroker(redis_url, prefix),
            redis_url=redis_url,
            redis_prefix=prefix,
            history_channels=("feed:*",),
            history_size=100,
        ) as gw,  # fmt: skip
        ws_client(gw.port, token_for(gw, channels=("feed:*",)), max_size=None) as c,
    ):
        node = gw.ctx.node
        for _ in range(published):
            at = await node.publish("feed:big", BIG)
        read, real = [0], node.broker.history

        async def counted(ch: str, after: int, limit: int):
            entries, top = await real(ch, after, limit)
            read[0] += sum(len(data) for _, data in entries)
            return entries, top

        monkeypatch.setattr(node.broker, "history", counted)
        yield c, at, read


async def test_a_sub_that_cannot_recover_reads_no_entries(redis_url, monkeypatch):
    """A ``since`` of another epoch, or missing more than history holds, answers
    ``recovered: false`` without Redis sending the entries: each such ``sub`` (100 bytes)
    had Redis send the whole history (here 100 entries of 60 KB, 6 MB) to be thrown away.
    One that can recover still reads them."""
    async with big_feed(redis_url, monkeypatch, 120) as (c, at, read):  # 21-120 kept
        for since in (
            {"offset": 50, "epoch": "bogus"},  # another epoch
            {"offset": 1, "epoch": at.epoch},  # more missed than is kept
            {"offset": at.offset + 5, "epoch": at.epoch},  # ahead
        ):
            for _ in range(3):
                reply = await c.request("sub", ch="feed:big", since=since)
                assert reply["ok"] and reply["recovered"] is False and reply["offset"] == 120
                assert (await c.request("unsub", ch="feed:big"))["ok"]
        assert read[0] == 0  # before: 30.6 MB over the 9
        since = {"offset": at.offset - 2, "epoch": at.epoch}
        reply = await c.request("sub", ch="feed:big", since=since)
        assert reply["recovered"] is True and read[0] == 2 * len(BIG)
        assert [(await c.next_push())["offset"] for _ in range(2)] == [119, 120]


async def test_history_of_large_publications_comes_in_pages_that_keep_the_socket(
    redis_url, monkeypatch
):
    """One user's large publications (here 100 of 60 KB) made a ``history`` page of the
    channel 6 MB in one frame, past ``SEND_BUFFER_BYTES``: every client that asked was
    closed as a slow consumer (4001) behind it, and Redis sent all 100 for each ask. Now a
    page carries at most ``MAX_PAGE_BYTES``, Redis sends little more, and the client pages on."""
    async with big_feed(redis_url, monkeypatch, 100) as (c, at, read):
        got: list[int] = []
        while not got or got[-1] < at.offset:
            page = await c.request("history", ch="feed:big", since=got[-1] if got else 0)
            assert page["ok"] and page["offset"] == at.offset, page
            assert 0 < len(page["publications"]) <= MAX_PAGE_BYTES // len(BIG)
            got += [p["offset"] for p in page["publications"]]
        assert got == list(range(1, 101))
        assert read[0] < 1.1 * 100 * len(BIG)  # before: 100 entries for each ask
        assert (await c.request("ping"))["ok"]


async def test_a_large_recovery_leaves_the_rest_to_history_and_keeps_the_socket(
    redis_url, monkeypatch
):
    """A ``sub`` that recovered 99 publications of 60 KB sent them all at once, past
    ``SEND_BUFFER_BYTES``: the client read every one, then was closed as a slow consumer
    (4001). Now a socket gets `MAX_RECOVERY_BYTES` of them, then a ``gap``: it pages the
    rest from ``history``, and stays."""
    async with big_feed(redis_url, monkeypatch, 100) as (c, at, _):
        reply = await c.request("sub", ch="feed:big", since={"offset": 1, "epoch": at.epoch})
        assert reply["ok"] and reply["recovered"] is True and reply["offset"] == at.offset
        got: list[int] = []
        while (push := await c.recv())["op"] == "msg":
            got.append(push["offset"])
        assert push == {"op": "gap", "ch": "feed:big"}
        assert got == list(range(2, 2 + MAX_RECOVERY_BYTES // len(BIG)))
        while got[-1] < at.offset:
            page = await c.request("history", ch="feed:big", since=got[-1])
            got += [p["offset"] for p in page["publications"]]
        assert got == list(range(2, 101))
        assert (await c.request("ping"))["ok"]


async def test_the_python_client_recovers_a_large_backlog_whole_on_one_connection(redis_url):
    prefix = unique_prefix()
    async with running_gateway(
        RedisBroker(redis_url, prefix), redis_url=redis_url, redis_prefix=prefix,
        history_channels=("feed:*",), history_size=100,
    ) as gw:  # fmt: skip
        node = gw.ctx.node
        first = await node.publish("feed:big", BIG)
        for _ in range(99):
            await node.publish("feed:big", BIG)
        token = token_for(gw, channels=("feed:*",))
        url = f"ws://127.0.0.1:{gw.port}/ws"
        async with Client(url, token=token, backoff=Backoff(base=0.05, cap=0.2)) as c:
            sub = await c.subscribe("feed:big", since=first)
            got = []
            while len(got) < 99:
                event = await asyncio.wait_for(anext(sub), 5 * UNIT)
                assert isinstance(event, Publication), event  # no Gap reaches the application
                got.append(event.offset)
            assert got == list(range(2, 101))
            live = await node.publish("feed:big", b'{"n":1}')
            event = await asyncio.wait_for(anext(sub), 5 * UNIT)
            assert isinstance(event, Publication) and event.offset == live.offset
            assert c.connections == 1  # before: closed with 4001 once the backlog was sent


async def test_an_http_publication_sent_again_with_its_idempotency_key_is_published_once():
    """A backend whose ``POST /api/publish`` lost its answer (the gateway killed or drained
    before it answered, a proxy's timeout) sends it again. Without a key it was published
    twice, at two offsets: every subscriber got it twice and could not tell (bench.chaos:
    2,000 such duplicates in three kills). With the same ``Idempotency-Key`` it is
    published once; another caller's same key is its own."""
    from tornado.httpclient import AsyncHTTPClient

    async with running_gateway(history_channels=("feed:*",)) as gw:
        http = AsyncHTTPClient(force_instance=True)

        async def post(sub: str, key: str, n: int) -> tuple[int, dict]:
            r = await http.fetch(
                f"http://127.0.0.1:{gw.port}/api/publish", method="POST", raise_error=False,
                headers={"Authorization": f"Bearer {token_for(gw, sub, channels=('feed:*',))}",
                         "Idempotency-Key": key},
                body=b'{"ch": "feed:9", "data": {"n": %d}}' % n,
            )  # fmt: skip
            return r.code, json.loads(r.body)

        try:
            async with ws_client(gw.port, token_for(gw, channels=("feed:*",))) as c:
                assert (await c.request("sub", ch="feed:9"))["ok"]
                assert await post("alice", "order-7", 1) == (200, {"ok": True})
                assert await post("alice", "order-7", 1) == (200, {"ok": True})  # the retry
                assert (await post("bob", "order-7", 2))[0] == 200
                assert (await post("alice", "order-8", 3))[0] == 200
                # A key used again for other data publishes it: nothing is dropped.
                assert (await post("alice", "order-8", 4))[0] == 200
                assert (await c.request("ping"))["ok"]
                got = [(m["data"]["n"], m["offset"]) for m in c.pushes]
                assert got == [(1, 1), (2, 2), (3, 3), (4, 4)]
            status, body = await post("alice", "k" * 256, 5)
            assert status == 422
            assert body["error"]["details"][0]["path"] == "header.Idempotency-Key"
        finally:
            http.close()
