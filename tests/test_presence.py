"""Presence: who is subscribed, across processes, and dead nodes' entries vanish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from core.infra.broker import MemoryBroker, RedisBroker
from proto import ErrorCode
from tests.harness import Client, running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT

ROOMS = {"presence_channels": ("room:*",)}


@contextlib.asynccontextmanager
async def alice_and_bob_apart(redis_url: str) -> AsyncIterator[tuple[Client, Client]]:
    """Alice's socket on one gateway process, Bob's on another, both on one Redis."""
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as a,
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as b,
        ws_client(a.port, token_for(a, "alice")) as on_a,
        ws_client(b.port, token_for(b, "bob")) as on_b,
    ):
        yield on_a, on_b


def who(reply: dict) -> list[tuple[str, str]]:
    return sorted((p["user"], p["client"]) for p in reply["presence"])


async def present(client, ch: str, users: list[str]) -> bool:
    """Whether ``client`` is told that exactly ``users`` are on ``ch``."""
    return [user for user, _ in who(await client.request("presence", ch=ch))] == users


async def test_presence_lists_subscribers_and_forgets_those_who_leave():
    async with running_gateway(**ROOMS) as gw:
        async with (
            ws_client(gw.port, token_for(gw, "alice")) as a,
            ws_client(gw.port, token_for(gw, "bob")) as b,
        ):
            assert (await a.request("sub", ch="room:1"))["ok"]
            assert (await b.request("sub", ch="room:1"))["ok"]
            reply = await a.request("presence", ch="room:1")
            assert [user for user, _ in who(reply)] == ["alice", "bob"]
            assert len({client for _, client in who(reply)}) == 2
            stats = await a.request("presence_stats", ch="room:1")
            assert (stats["num_clients"], stats["num_users"]) == (2, 2)
            assert (await b.request("unsub", ch="room:1"))["ok"]
            await until(lambda: present(a, "room:1", ["alice"]))
        async with ws_client(gw.port, token_for(gw, "carol")) as c:
            await until(lambda: present(c, "room:1", []))  # the others disconnected: gone


async def test_presence_refusals():
    async with running_gateway(**ROOMS) as gw:
        async with ws_client(gw.port, token_for(gw, channels=("room:*", "feed:*"))) as c:
            assert (await c.request("presence", ch="feed:1"))["error"][
                "code"
            ] == ErrorCode.NO_PRESENCE
            denied = await c.request("presence_stats", ch="admin:1")
            assert denied["error"]["code"] == ErrorCode.PERMISSION_DENIED


async def test_presence_is_shared_across_processes(redis_url):
    async with alice_and_bob_apart(redis_url) as (on_a, on_b):
        assert (await on_a.request("sub", ch="room:9"))["ok"]
        assert (await on_b.request("sub", ch="room:9"))["ok"]
        assert [u for u, _ in who(await on_a.request("presence", ch="room:9"))] == ["alice", "bob"]
        stats = await on_b.request("presence_stats", ch="room:9")
        assert stats["num_clients"] == 2


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_entries_of_a_node_that_stops_refreshing_expire(kind, request):
    if kind == "redis":
        broker = RedisBroker(request.getfixturevalue("redis_url"), unique_prefix())
    else:
        broker = MemoryBroker()
    await broker.start(lambda *_: None)
    try:
        await broker.presence_add("room:x", {"c1": b'{"user":"u","client":"c1"}'}, 0.3)
        assert list(await broker.presence("room:x")) == ["c1"]
        await asyncio.sleep(0.5 * UNIT)  # the point: past the TTL, nobody refreshing (node died)
        assert await broker.presence("room:x") == {}
    finally:
        await broker.close()


async def big_room(broker, ch: str, n: int, users: int | None = None) -> list[int]:
    """``n`` entries on ``ch`` (of ``users`` distinct users; ``n`` by default); returns the
    list that each read of the whole list appends its size to."""
    import msgspec

    from gateway.presence import PresenceEntry

    entries = {
        f"{i:016x}": msgspec.json.encode(PresenceEntry(str(i % (users or n)), f"{i:016x}"))
        for i in range(n)
    }
    await broker.presence_add(ch, entries, 600)
    read: list[int] = []
    whole = broker.presence

    async def counted(ch: str) -> dict[str, bytes]:
        found = await whole(ch)
        read.append(len(found))
        return found

    broker.presence = counted  # type: ignore[method-assign]
    return read


async def test_presence_stats_of_a_big_room_reads_no_entry(redis_url):
    """docs/protocol.md: `presence_stats` is the cheap call for big rooms. It read and
    decoded every entry, as `presence` does: ~10 ms of Redis (shared by every gateway)
    and ~14 ms of the gateway for 5,000 entries, for a command any member may send
    RATE_SOCKET_COMMANDS times a second. Now it reads counts that Redis keeps."""
    broker = RedisBroker(redis_url, unique_prefix())
    async with running_gateway(broker, **ROOMS) as gw:
        n = 5000
        read = await big_room(broker, "room:big", n, users=4000)
        async with ws_client(gw.port, token_for(gw, "alice")) as a:
            stats = await a.request("presence_stats", ch="room:big")
            assert (stats["num_clients"], stats["num_users"]) == (n, 4000)
            assert read == [], f"presence_stats read {sum(read)} entries"
            assert len((await a.request("presence", ch="room:big"))["presence"]) == n
            assert read == [n]


async def test_a_live_node_keeps_its_entries_by_refreshing_them():
    import time

    from gateway.presence import Presence

    broker = MemoryBroker()
    await broker.start(lambda *_: None)
    presence = Presence(broker, ("room:*",), ttl=0.6)
    await presence.join("room:1", "alice", "c1")
    # The sleeps are the point: time passes past the first entry's expiry.
    await asyncio.sleep(0.4)
    presence.tick(time.monotonic())  # a third of the TTL has passed: refresh
    await asyncio.sleep(0.4)  # past the first expiry
    assert [e.client for e in await presence.who("room:1")] == ["c1"]
    presence.leave("room:1", "c1")

    async def gone() -> bool:
        return await presence.who("room:1") == []

    await until(gone)


async def test_joins_and_leaves_are_pushed_to_subscribers():
    async with running_gateway(**ROOMS) as gw:
        async with ws_client(gw.port, token_for(gw, "alice")) as a:
            assert (await a.request("sub", ch="room:2"))["ok"]
            async with ws_client(gw.port, token_for(gw, "bob")) as b:
                assert (await b.request("sub", ch="room:2"))["ok"]
                joined = await next_event(a, "join")
                assert joined["ch"] == "room:2" and joined["info"]["user"] == "bob"
            left = await next_event(a, "leave")  # bob's socket closed
            assert left["info"] == joined["info"]


async def test_joins_reach_subscribers_on_other_processes(redis_url):
    async with alice_and_bob_apart(redis_url) as (on_a, on_b):
        assert (await on_a.request("sub", ch="room:3"))["ok"]
        assert (await on_b.request("sub", ch="room:3"))["ok"]
        assert (await next_event(on_a, "join"))["info"]["user"] == "bob"
        assert (await on_b.request("unsub", ch="room:3"))["ok"]
        assert (await next_event(on_a, "leave"))["info"]["user"] == "bob"


async def next_event(client, op: str, user: str = "bob") -> dict:
    """The next ``op`` push about ``user`` (a subscriber also sees its own join)."""

    def wanted(msg: dict) -> bool:
        return msg.get("op") == op and msg["info"]["user"] == user

    for i, msg in enumerate(client.pushes):
        if wanted(msg):
            return client.pushes.pop(i)
    async with asyncio.timeout(3 * UNIT):
        while True:
            msg = await client.recv()
            if wanted(msg):
                return msg


@pytest.mark.parametrize("msgpack", [False, True])
async def test_the_tokens_info_claim_is_shown_in_presence(msgpack):
    async with running_gateway(**ROOMS) as gw:
        bob = token_for(gw, "bob", extra={"info": {"name": "Bob", "avatar": "b.png"}})
        async with ws_client(gw.port, token_for(gw, "alice"), msgpack=msgpack) as a:
            assert (await a.request("sub", ch="room:4"))["ok"]
            async with ws_client(gw.port, bob) as b:
                assert (await b.request("sub", ch="room:4"))["ok"]
                joined = await next_event(a, "join")
                assert joined["info"]["info"] == {"name": "Bob", "avatar": "b.png"}
                listed = {
                    p["user"]: p for p in (await a.request("presence", ch="room:4"))["presence"]
                }
                assert listed["bob"]["info"] == {"name": "Bob", "avatar": "b.png"}
                assert "info" not in listed["alice"]


async def test_an_oversized_or_odd_info_claim_is_refused():
    from core.infra.identity import AuthError

    async with running_gateway(**ROOMS) as gw:
        deep: dict[str, object] = {"a": []}
        for _ in range(64):
            deep = {"a": deep}
        # Shown to every subscriber in its own codec: as publications, integers within
        # [-2**63, 2**64-1] (MessagePack's) and at most 64 levels.
        for info in ({"x": "y" * 2000}, "a string", {"n": 2**70}, {"n": -(2**63) - 1}, deep):
            with pytest.raises(AuthError):
                gw.ctx.verifier.verify(token_for(gw, "eve", extra={"info": info}))


async def test_a_client_gone_while_its_join_is_on_its_way_leaves_no_entry_behind():
    """The join's entry and the leave's removal went over different pooled connections:
    the removal could land first, and the entry stayed listed until PRESENCE_TTL."""
    from gateway.presence import Presence

    class SlowAdd(MemoryBroker):
        async def presence_add(self, ch: str, entries: dict[str, bytes], ttl: float) -> None:
            await asyncio.sleep(0.05)
            await super().presence_add(ch, entries, ttl)

    presence = Presence(SlowAdd(), ("room:*",), 60.0)
    joining = asyncio.ensure_future(presence.join("room:1", "alice", "c1"))
    await asyncio.sleep(0)  # the join is under way
    presence.leave("room:1", "c1")  # the socket closed meanwhile
    await joining
    await presence.close()
    assert await presence.who("room:1") == []


async def test_a_client_gone_while_a_refresh_is_on_its_way_leaves_no_entry_behind():
    """The periodic refresh re-adds a snapshot of this process's entries, channel by
    channel: a leave meanwhile removed the entry at once (another pooled connection),
    the refresh's add landed after it, and the gone client stayed listed (and counted)
    until PRESENCE_TTL."""
    from gateway.presence import Presence

    class SlowAdd(MemoryBroker):
        slow = False

        async def presence_add(self, ch: str, entries: dict[str, bytes], ttl: float) -> None:
            if self.slow:
                await asyncio.sleep(0.05)
            await super().presence_add(ch, entries, ttl)

    broker = SlowAdd()
    presence = Presence(broker, ("room:*",), 60.0)
    await presence.join("room:1", "alice", "c1")
    await presence.join("room:1", "bob", "c2")
    broker.slow = True
    presence.tick(time.monotonic() + 30)  # a third of the TTL has passed: refresh
    await asyncio.sleep(0)  # the refresh is under way
    presence.leave("room:1", "c1")  # the socket closed meanwhile
    await presence.close()
    assert [e.client for e in await presence.who("room:1")] == ["c2"]


async def test_presence_asked_by_many_sockets_reads_redis_once_a_second(redis_url):
    """`presence` read and decoded every entry from Redis at each call: ~8 ms of Redis
    (single-threaded, shared by every gateway) and ~12 ms of the gateway for 5,000
    entries. A few members of a big room asking it in a loop kept Redis busy for the
    whole fleet. Now a process reads a channel's entries at most once a second, for
    every socket that asks, and keeps them up to date with the joins and leaves it
    makes and hears meanwhile."""
    broker = RedisBroker(redis_url, unique_prefix())
    async with running_gateway(broker, **ROOMS) as gw:
        read = await big_room(broker, "room:big", 2000)
        tokens = [token_for(gw, f"member{i}") for i in range(4)]
        async with (
            ws_client(gw.port, tokens[0]) as a,
            ws_client(gw.port, tokens[1]) as b,
            ws_client(gw.port, tokens[2]) as c,
            ws_client(gw.port, tokens[3]) as d,
        ):
            replies = []
            for _ in range(2):
                asks = [s.request("presence", ch="room:big") for s in (a, b, c, d)]
                replies += await asyncio.gather(*asks)
            assert [len(r["presence"]) for r in replies] == [2000] * 8
            # One read; two if this machine stalled past a second meanwhile.
            assert len(read) <= 2, f"{len(read)} reads of the whole room for 8 asks"
            # A join and a leave here are seen at once, without another read.
            assert (await a.request("sub", ch="room:big"))["ok"]
            listed = {p["user"] for p in (await b.request("presence", ch="room:big"))["presence"]}
            assert "member0" in listed and len(listed) == 2001
            assert (await a.request("unsub", ch="room:big"))["ok"]
            listed = {p["user"] for p in (await b.request("presence", ch="room:big"))["presence"]}
            assert "member0" not in listed and len(listed) == 2000
            assert len(read) <= 2


async def test_a_join_on_another_process_is_listed_once_its_push_arrives(redis_url):
    """The list a process keeps for a second follows the joins and leaves pushed to it."""
    async with alice_and_bob_apart(redis_url) as (on_a, on_b):
        assert (await on_a.request("sub", ch="room:5"))["ok"]
        assert [u for u, _ in who(await on_a.request("presence", ch="room:5"))] == ["alice"]
        assert (await on_b.request("sub", ch="room:5"))["ok"]
        await next_event(on_a, "join")
        assert [u for u, _ in who(await on_a.request("presence", ch="room:5"))] == ["alice", "bob"]
        assert (await on_b.request("unsub", ch="room:5"))["ok"]
        await next_event(on_a, "leave")
        assert [u for u, _ in who(await on_a.request("presence", ch="room:5"))] == ["alice"]


async def test_a_presence_reply_counts_one_command_per_hundred_entries(redis_url):
    """Sending a 1,000-entry list costs the gateway as much as a dozen other commands:
    a socket asking for it in a loop took ~14 times its share of the process. Now each
    started hundred entries beyond the first counts as one more command against
    RATE_SOCKET_COMMANDS (100 a second here): about nine such replies a second."""
    broker = RedisBroker(redis_url, unique_prefix())
    async with running_gateway(broker, **ROOMS) as gw:
        await big_room(broker, "room:big", 1000)
        async with ws_client(gw.port, token_for(gw, "alice")) as a:
            for i in range(20):
                await a.send_raw(json.dumps({"id": i + 1, "op": "presence", "ch": "room:big"}))
            replies = [await a.recv() for _ in range(20)]
            answered = [r for r in replies if r.get("ok")]
            refused = [r for r in replies if not r.get("ok")]
            assert 5 <= len(answered) <= 12, f"{len(answered)} of 20 answered"
            assert {r["error"]["code"] for r in refused} == {ErrorCode.RATE_LIMITED}
            assert all(len(r["presence"]) == 1000 for r in answered)
