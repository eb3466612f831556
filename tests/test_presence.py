"""Presence: who is subscribed, across processes, and dead nodes' entries vanish."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.infra.broker import MemoryBroker, RedisBroker
from proto import ErrorCode
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT

ROOMS = {"presence_channels": ("room:*",)}


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
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as a,
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as b,
        ws_client(a.port, token_for(a, "alice")) as on_a,
        ws_client(b.port, token_for(b, "bob")) as on_b,
    ):
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


async def test_presence_stats_of_a_big_room_reads_no_entry(redis_url):
    """docs/protocol.md: `presence_stats` is the cheap call for big rooms. It read and
    decoded every entry, as `presence` does: ~10 ms of Redis (shared by every gateway)
    and ~14 ms of the gateway for 5,000 entries, for a command any member may send
    RATE_SOCKET_COMMANDS times a second. Now it reads counts that Redis keeps."""
    import msgspec

    from gateway.presence import PresenceEntry

    broker = RedisBroker(redis_url, unique_prefix())
    async with running_gateway(broker, **ROOMS) as gw:
        n = 5000
        entries = {
            f"{i:016x}": msgspec.json.encode(PresenceEntry(str(i % 4000), f"{i:016x}"))
            for i in range(n)
        }
        await broker.presence_add("room:big", entries, 600)
        read: list[int] = []
        whole = broker.presence

        async def counted(ch: str) -> dict[str, bytes]:
            found = await whole(ch)
            read.append(len(found))
            return found

        broker.presence = counted  # type: ignore[method-assign]
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
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as a,
        running_gateway(RedisBroker(redis_url, prefix), **ROOMS) as b,
        ws_client(a.port, token_for(a, "alice")) as on_a,
        ws_client(b.port, token_for(b, "bob")) as on_b,
    ):
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
