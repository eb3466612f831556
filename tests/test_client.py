"""The Python client (`gateway.client`) against in-process gateways, over real sockets."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import ssl
import sys
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from core.infra.broker import RedisBroker
from gateway.client import (
    Backoff,
    Client,
    ConnectionClosed,
    Gap,
    HandshakeError,
    Join,
    Position,
    Publication,
    ReplyError,
    State,
    SubscriptionEnded,
)
from proto import CloseCode, ErrorCode
from tests.conformance.wire import accept_for
from tests.harness import ApiClient, running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT, pipe
from tests.test_core_rest import PROJECT

FAST = Backoff(base=0.05, cap=0.2)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def url(gw) -> str:
    return f"ws://127.0.0.1:{gw.port}/ws"


async def next_event(sub, timeout: float = 2 * UNIT):
    return await asyncio.wait_for(anext(sub), timeout)


def close_all(gw, code: CloseCode) -> None:
    for member in gw.hub.connections:
        member.close(code)


# -- pure pieces -----------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter_and_honours_retry_after():
    b = Backoff(base=0.5, cap=8.0)
    assert [b.delay(n, rand=lambda: 1.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.delay(3, rand=lambda: 0.0) == 0.0
    assert b.delay(0, retry_after=3.0, rand=lambda: 0.0) == 3.0
    assert b.delay(0, retry_after=60.0, rand=lambda: 0.0) == 8.0  # bounded by the cap


# -- against a gateway ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_subscribe_publish_receive_and_presence(encoding):
    async with running_gateway(presence_channels=("room:*",)) as gw:
        token = token_for(gw, extra={"info": {"name": "Alice"}})
        async with Client(url(gw), token=token, encoding=encoding, backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            joined = await next_event(sub)
            assert isinstance(joined, Join) and joined.info.user == "alice"
            await c.publish("room:1", {"text": "hello", "n": [1, 2]})
            got = await next_event(sub)
            assert got == Publication("room:1", {"text": "hello", "n": [1, 2]})
            assert sub.recovered is None and sub.position is None
            present = await c.presence("room:1")
            assert [(p.user, p.info) for p in present] == [("alice", {"name": "Alice"})]
            assert await c.presence_stats("room:1") == (1, 1)
            with pytest.raises(ReplyError) as info:
                await c.subscribe("room:1")
            assert info.value.code == ErrorCode.ALREADY_SUBSCRIBED
            await c.unsubscribe("room:1")
            with pytest.raises(StopAsyncIteration):
                await next_event(sub)
            await c.ping()
        assert c.state is State.CLOSED
        with pytest.raises(ConnectionClosed):
            await c.ping()


async def test_refusals_are_errors_and_the_connection_goes_on():
    async with running_gateway() as gw, Client(url(gw), token=token_for(gw), backoff=FAST) as c:
        with pytest.raises(ReplyError) as info:
            await c.subscribe("admin:1")
        assert info.value.code == ErrorCode.PERMISSION_DENIED and not info.value.temporary
        with pytest.raises(ReplyError) as info:
            await c.history("room:1")
        assert info.value.code == ErrorCode.NO_HISTORY
        await c.ping()


async def test_handshake_refusal_and_token_source():
    async with running_gateway() as gw:
        with pytest.raises(HandshakeError) as info:
            async with Client(url(gw), token="not-a-token", backoff=FAST):
                pass
        assert info.value.status == 401 and info.value.message

        calls = []

        async def get_token() -> str:
            calls.append(1)
            return token_for(gw)

        async with Client(url(gw), token="expired-or-bad", get_token=get_token, backoff=FAST) as c:
            await c.ping()
        assert calls == [1]


async def test_history_pages_and_subscribe_since():
    async with running_gateway(history_channels=("feed:*",)) as gw:
        for n in range(1, 6):
            await gw.ctx.node.publish("feed:1", b'{"n":%d}' % n)
        token = token_for(gw, channels=("feed:*",))
        async with Client(url(gw), token=token, backoff=FAST) as c:
            page = await c.history("feed:1", since=2, limit=2)
            assert [(p.offset, p.data) for p in page.publications] == [(3, {"n": 3}), (4, {"n": 4})]
            assert page.position is not None and page.position.offset == 5
            sub = await c.subscribe("feed:1", since=Position(offset=3, epoch=page.position.epoch))
            assert sub.recovered is True
            assert [(await next_event(sub)).data for _ in range(2)] == [{"n": 4}, {"n": 5}]
            assert sub.position == page.position


async def test_rpc_calls_the_core(clean_db):
    async with running_gateway(**clean_db) as gw:
        admin = token_for(gw, extra={"role": "admin"})
        async with Client(url(gw), token=admin, backoff=FAST) as c:
            status, headers, body = await c.rpc(
                "POST", "/api/projects", PROJECT, headers={"Idempotency-Key": "client-1"}
            )
            assert status == 201 and body["name"] == PROJECT["name"]
            assert headers["Location"] == f"/api/projects/{body['id']}"
            got = await c.rpc("GET", f"/api/projects/{body['id']}")
            assert got.status == 200 and got.body == body
            missing = await c.rpc("GET", "/api/projects/999999")
            assert missing.status == 404 and missing.body["error"]["code"] == "not_found"
            deleted = await c.rpc("DELETE", f"/api/projects/{body['id']}")
            assert deleted == (204, deleted.headers, None)


async def test_reconnect_after_shutdown_recovers_what_was_missed(redis_url):
    broker = RedisBroker(redis_url, unique_prefix())
    async with running_gateway(broker, history_channels=("feed:*",)) as gw:
        token = token_for(gw, channels=("feed:*", "room:*"))

        async def publish(n: int) -> None:
            await gw.ctx.node.publish("feed:9", b'{"n":%d}' % n)

        async with Client(url(gw), token=token, backoff=FAST) as c:
            feed = await c.subscribe("feed:9")
            room = await c.subscribe("room:9")  # no history: a reconnect is a gap
            await publish(1)
            first = await next_event(feed)
            assert first.data == {"n": 1} and first.offset == 1
            # The gateway drains: the socket closes with 4000 and reconnects
            # are refused (503) while publications go on.
            gw.ctx.status.draining = True
            close_all(gw, CloseCode.SHUTDOWN)
            await until(lambda: c.state is State.RECONNECTING)
            await publish(2)
            await publish(3)
            gw.ctx.status.draining = False
            got = [await next_event(feed) for _ in range(2)]
            assert [(e.offset, e.data) for e in got] == [(2, {"n": 2}), (3, {"n": 3})]
            assert feed.recovered is True and c.connections == 2
            await publish(4)
            assert (await next_event(feed)).data == {"n": 4}
            gap = await next_event(room)
            assert isinstance(gap, Gap) and gap.reason == "no_position"
            await c.publish("room:9", "after")
            assert (await next_event(room)).data == "after"


async def test_unrecoverable_position_is_a_gap():
    async with running_gateway(history_channels=("feed:*",), history_size=2) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with Client(url(gw), token=token, backoff=FAST) as c:
            await gw.ctx.node.publish("feed:2", b"1")
            sub = await c.subscribe("feed:2", since=Position(offset=1, epoch="gone"))
            gap = await next_event(sub)
            assert sub.recovered is False and isinstance(gap, Gap) and gap.reason == "not_recovered"
            assert gap.position == sub.position and sub.position is not None


@pytest.mark.parametrize("pushed", [True, False], ids=["gap push", "offsets jump"])
async def test_a_gap_is_repaired_from_history(monkeypatch, pushed):
    """Publications the broker link dropped: the gateway says so with a gap push when
    the link comes back, or, when nothing noticed, before the next one (its offset jumps)."""
    async with running_gateway(history_channels=("feed:*",)) as gw:
        token = token_for(gw, channels=("feed:*", "room:*"))
        async with Client(url(gw), token=token, backoff=FAST) as c:
            feed = await c.subscribe("feed:5")
            room = await c.subscribe("room:5")
            await gw.ctx.node.publish("feed:5", b"1")
            assert (await next_event(feed)).offset == 1
            # The broker link is down: history keeps publications, nobody gets them.
            monkeypatch.setattr(gw.ctx.node.broker, "_send", lambda *args: None)
            await gw.ctx.node.publish("feed:5", b"2")
            await gw.ctx.node.publish("feed:5", b"3")
            monkeypatch.undo()
            if pushed:
                for member in gw.hub.connections:
                    member.gap("feed:5")
                    member.gap("room:5")
            await gw.ctx.node.publish("feed:5", b"4")
            got = [await next_event(feed) for _ in range(3)]
            assert [(e.offset, e.data) for e in got] == [(2, 2), (3, 3), (4, 4)]
            if pushed:
                gap = await next_event(room)  # no history to repair from
                assert isinstance(gap, Gap) and gap.reason == "broker"


@pytest.mark.parametrize("missed", [False, True], ids=["from its first", "first one missed"])
async def test_a_history_begun_afresh_is_a_gap_only_when_something_was_missed(
    redis_url, missed, monkeypatch
):
    """The history is gone (expired while quiet; here deleted) and starts a new epoch. Its
    first publication follows on from the last one: no gap, no reload. A later one (the
    first did not reach this gateway) may hide a loss: a gap before it."""
    prefix = unique_prefix()
    async with running_gateway(RedisBroker(redis_url, prefix), history_channels=("feed:*",)) as gw:
        token = token_for(gw, channels=("feed:*",))
        async with Client(url(gw), token=token, backoff=FAST) as c:
            feed = await c.subscribe("feed:6")
            await gw.ctx.node.publish("feed:6", b"1")
            await gw.ctx.node.publish("feed:6", b"2")
            old = [await next_event(feed) for _ in range(2)]
            async with aioredis.from_url(redis_url) as r:
                assert await r.delete(f"{prefix}m:{{feed:6}}") == 1
            if missed:
                broker, dropped = gw.ctx.node.broker, asyncio.Event()
                monkeypatch.setattr(broker, "_handler", lambda *args: dropped.set())
                await gw.ctx.node.publish("feed:6", b"3")
                await asyncio.wait_for(dropped.wait(), 2 * UNIT)
                monkeypatch.undo()
                await gw.ctx.node.publish("feed:6", b"4")
                gap = await next_event(feed)  # reload the state as of its position: 3 and 4
                assert isinstance(gap, Gap) and gap.position is not None
                assert gap.position.epoch != old[-1].epoch and gap.position.offset == 2
            else:
                await gw.ctx.node.publish("feed:6", b"3")
                await gw.ctx.node.publish("feed:6", b"4")
                got = [await next_event(feed) for _ in range(2)]
                assert [(e.offset, e.data) for e in got] == [(1, 3), (2, 4)]
                assert got[0].epoch != old[-1].epoch
            await gw.ctx.node.publish("feed:6", b"5")
            new = await next_event(feed)
            assert isinstance(new, Publication) and (new.offset, new.data) == (3, 5)
            assert new.epoch != old[-1].epoch


async def test_token_is_refreshed_in_band_on_expiring():
    async with running_gateway(token_grace=0.2) as gw:
        fetched = asyncio.Event()

        async def get_token() -> str:
            fetched.set()
            return token_for(gw, ttl=60)

        async with Client(
            url(gw), token=token_for(gw, ttl=1), get_token=get_token, backoff=FAST
        ) as c:
            sub = await c.subscribe("room:1")
            (member,) = gw.hub.connections
            await asyncio.wait_for(fetched.wait(), 3 * UNIT)
            # Waiting out the first token's exp + grace is the point: its socket would be closed.
            await asyncio.sleep(2 * UNIT)
            assert gw.hub.connections == {member} and c.connections == 1
            await c.publish("room:1", 1)
            assert (await next_event(sub)).data == 1


async def test_a_close_code_that_must_not_reconnect_stops_the_client():
    async with running_gateway() as gw:
        async with Client(url(gw), token=token_for(gw), backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            close_all(gw, CloseCode.FORBIDDEN)
            why = await asyncio.wait_for(c.wait_closed(), 2 * UNIT)
            assert why.code == CloseCode.FORBIDDEN and not why.reconnects
            assert c.state is State.CLOSED
            with pytest.raises(ConnectionClosed):
                await next_event(sub)
            with pytest.raises(ConnectionClosed):
                await c.publish("room:1", 1)
            await until(lambda: gw.hub.connection_count() == 0)
            # Waiting out the backoff is the point: a client that reconnects would have by now.
            await asyncio.sleep(2 * FAST.cap)
            assert gw.hub.connection_count() == 0 and c.connections == 1


async def test_gateway_ended_subscription_raises_from_its_iterator():
    async with running_gateway() as gw:
        token = token_for(gw, channels=("room:*", "user:alice"))
        async with Client(url(gw), token=token, backoff=FAST) as c:
            sub = await c.subscribe("user:alice")
            await c.refresh(token_for(gw, channels=("room:*",)))
            with pytest.raises(SubscriptionEnded) as info:
                await next_event(sub)
            assert info.value.code == ErrorCode.PERMISSION_DENIED


async def test_a_slow_consumer_pauses_reading_and_catches_up():
    """With ``max_queue`` events waiting the client stops reading its socket: what it has not
    taken waits in the gateway's send buffer (the kernel's are full), not in the client, and
    all of it arrives, in order, once the consumer catches up."""
    pad = "x" * (64 * 1024)
    count = 160  # 10 MiB: more than the loopback socket buffers take while nobody reads
    async with (
        running_gateway(send_buffer_bytes=64 << 20) as gw,
        Client(url(gw), token=token_for(gw), max_queue=4) as c,
    ):
        sub = await c.subscribe("room:1")
        (member,) = gw.hub.connections
        for n in range(count):
            gw.hub.broadcast("room:1", b'{"n":%d,"pad":"%s"}' % (n, pad.encode()))
        sent = member.transport.buffered
        # The client's queue is full: it paused reading, so the gateway keeps a backlog.
        await until(lambda: sent() > 1 << 20 and not c._ws.conn.transport.is_reading())
        assert len(sub._events) < 16, "the client queued far past its bound"
        got = [(await next_event(sub)).data["n"] for _ in range(count)]
        assert got == list(range(count))
        assert sent() == 0 and c._ws.conn.transport.is_reading()
        await c.ping()


# -- examples --------------------------------------------------------------------


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_backend_worker_example_reacts_to_project_changes(clean_db):
    worker = load_example("backend_worker")
    async with running_gateway(**clean_db) as gw:
        token = token_for(gw, "worker", channels=("projects",), extra={"role": "admin"})
        task = asyncio.create_task(worker.main(url(gw), token))
        api = ApiClient(gw.port, token_for(gw, extra={"role": "admin"}))
        try:
            await until(lambda: gw.hub.subscriber_count("projects") == 1)  # the worker subscribed
            status, _, created = await api.call("POST", "/api/projects", PROJECT)
            assert status == 201

            for _ in range(100):  # the worker reacts asynchronously
                _, _, now = await api.call("GET", f"/api/projects/{created['id']}")
                if worker.TAG in now["tags"]:
                    break
                await asyncio.sleep(0.05 * UNIT)
            else:
                pytest.fail(f"the worker never tagged the project: {now}")
        finally:
            task.cancel()
            api.close()
            await asyncio.gather(task, return_exceptions=True)


async def test_chat_bot_example_answers_and_shows_presence():
    bot = load_example("chat_bot")
    async with running_gateway(presence_channels=("chat:*",)) as gw:
        task = asyncio.create_task(bot.main(url(gw), token_for(gw, "bot", channels=("chat:*",))))
        try:
            async with ws_client(gw.port, token_for(gw, "bob", channels=("chat:*",))) as bob:
                await until(lambda: gw.hub.subscriber_count("chat:lobby") == 1)
                assert (await bob.request("sub", ch="chat:lobby"))["ok"]
                await bob.request("pub", ch="chat:lobby", data={"from": "bob", "text": "!who"})
                answers = []
                async with asyncio.timeout(3 * UNIT):
                    while True:
                        msg = await bob.next_push()
                        if msg["op"] == "msg" and msg["data"].get("from") == bot.NAME:
                            answers.append(msg["data"]["text"])
                            if msg["data"]["text"].startswith("here:"):
                                break
                assert answers == ["welcome, bob", "here: bob, bot"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _proxy(
    port: int,
    *,
    drop_upgrades: bool = False,
    tls: ssl.SSLContext | None = None,
    heads: list[bytes] | None = None,
) -> asyncio.Server:
    """A proxy to the gateway on ``port``: one that drops every WebSocket upgrade (what some
    proxies do), or one that terminates TLS (``tls``); ``heads`` gets each request's head."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if heads is not None:
            heads.append(head)
        if drop_upgrades and b"upgrade: websocket" in head.lower():
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        up_writer.write(head)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)


async def test_without_websocket_the_client_falls_back_to_long_poll():
    async with running_gateway(longpoll_timeout=1.0) as gw:
        proxy = await _proxy(gw.port, drop_upgrades=True)
        port = proxy.sockets[0].getsockname()[1]
        try:
            async with Client(f"ws://127.0.0.1:{port}/ws", token=token_for(gw), backoff=FAST) as c:
                assert c.transport == "longpoll"
                sub = await c.subscribe("room:1")
                await c.publish("room:1", {"via": "long-poll"})
                assert await next_event(sub) == Publication("room:1", {"via": "long-poll"})
                gw.hub.broadcast("room:1", b'{"from":"the hub"}')
                assert await next_event(sub) == Publication("room:1", {"from": "the hub"})
                assert (await c.rpc("GET", "/api/nope")).status in (404, 503)
        finally:
            proxy.close()


async def test_a_resubscription_refused_for_now_is_asked_again_not_dropped():
    """Never a silently dead channel: a temporary refusal after a reconnect is retried."""
    from core.infra.broker import BrokerUnavailable, MemoryBroker

    class Flaky(MemoryBroker):
        refuse = 0

        async def subscribe(self, ch: str) -> None:
            if self.refuse:
                self.refuse -= 1
                raise BrokerUnavailable("Redis is not connected")
            await super().subscribe(ch)

    broker = Flaky()
    async with running_gateway(broker) as gw:
        async with Client(url(gw), token=token_for(gw), backoff=FAST) as c:
            room = await c.subscribe("room:1")
            broker.refuse = 2  # the next two SUBSCRIBEs fail, as in a Redis blip
            close_all(gw, CloseCode.SHUTDOWN)
            await until(lambda: c.connections == 2 and gw.hub.has_subscribers("room:1"))
            await gw.ctx.node.publish("room:1", b'"still subscribed"')
            got = await next_event(room)
            while isinstance(got, Gap):
                got = await next_event(room)
            assert got.data == "still subscribed"


async def test_a_server_sending_invalid_utf8_is_failed_with_1007_like_the_gateway_would():
    """`websockets` checks what the server sends by RFC 6455's rules, and the client reports its
    failure's code as it would the gateway's."""
    from gateway.client.transport import open_websocket
    from proto.wsprotocol import WebSocketProtocol

    heard: list[int | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))  # fmt: skip
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_for(key.decode()).encode() + b"\r\n\r\n"
                     b"\x81\x02ok\x81\x03\xed\xa0\x80")  # fmt: skip
        server = WebSocketProtocol(1 << 16)  # reads the client's masked close frame
        while not server.close_code and (data := await reader.read(4096)):
            server.receive(data)
        heard.append(server.close_code)
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    got: list[bytes | str] = []
    try:
        ws = await open_websocket(f"ws://127.0.0.1:{port}/ws", token=None, subprotocols=(),
                                  on_message=got.append)  # fmt: skip
        closed = await asyncio.wait_for(ws.closed, 5 * UNIT)
    finally:
        listener.close()
    assert got == ["ok"] and closed.code == 1007
    await until(lambda: heard)  # the server read the client's close frame
    assert heard == [1007]


# -- what a user of the client notices -------------------------------------------


async def test_the_client_reconnects_when_its_gateway_restarts_on_the_same_port():
    async with running_gateway(drain_seconds=0) as first:
        port = first.port
        c = Client(f"ws://127.0.0.1:{port}/ws", token=token_for(first), backoff=FAST)
        await c.connect()
        sub = await c.subscribe("room:1")
    try:
        await until(lambda: c.state is State.RECONNECTING)
        # Waiting through refused attempts is the point: the client must keep trying.
        await asyncio.sleep(3 * FAST.cap)
        assert c.state is State.RECONNECTING
        async with running_gateway(port=port) as second:
            await until(lambda: second.hub.has_subscribers("room:1"))
            gap = await next_event(sub)  # a channel without history: what was missed is lost
            assert isinstance(gap, Gap) and gap.reason == "no_position"
            await second.ctx.node.publish("room:1", b'"from the new process"')
            assert (await next_event(sub)).data == "from the new process"
            assert c.state is State.OPEN and c.connections == 2
    finally:
        await c.close()


async def test_close_codes_reconnect_or_stop_the_client_as_proto_says():
    async with running_gateway() as gw:
        calls = []

        async def get_token() -> str:
            calls.append(1)
            return token_for(gw)

        async with Client(url(gw), token=token_for(gw), get_token=get_token, backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            again = (CloseCode.SHUTDOWN, CloseCode.SLOW_CONSUMER, CloseCode.TOKEN_EXPIRED)
            for n, code in enumerate(again, start=2):
                close_all(gw, code)
                await until(lambda n=n: c.connections == n and gw.hub.has_subscribers("room:1"))
            assert calls == [1]  # 4002: a fresh token before reconnecting
            await c.publish("room:1", "still here")
            events = [await next_event(sub) for _ in range(len(again) + 1)]
            assert [getattr(e, "reason", None) for e in events[:-1]] == ["no_position"] * 3
            assert events[-1].data == "still here"

        for code in (CloseCode.SESSION_REVOKED, CloseCode.RATE_LIMITED):
            async with Client(url(gw), token=token_for(gw), backoff=FAST) as c:
                sub = await c.subscribe("room:1")
                close_all(gw, code)
                why = await asyncio.wait_for(c.wait_closed(), 2 * UNIT)
                assert why.code == code and not why.reconnects and c.state is State.CLOSED
                with pytest.raises(ConnectionClosed) as info:
                    await next_event(sub)
                assert info.value.code == code


async def test_a_frame_over_the_gateways_limit_is_1009_and_stops_the_client():
    async with running_gateway() as gw, Client(url(gw), token=token_for(gw), backoff=FAST) as c:
        with pytest.raises(ConnectionClosed) as info:
            await c.publish("room:1", "x" * (gw.settings.max_frame_bytes + 1))
        assert info.value.code == CloseCode.MESSAGE_TOO_BIG
        why = await asyncio.wait_for(c.wait_closed(), 2 * UNIT)
        assert why.code == CloseCode.MESSAGE_TOO_BIG and c.state is State.CLOSED


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_large_messages_both_ways_and_over_max_size(encoding):
    big = {"blob": "b" * (2 << 20), "n": list(range(1000))}  # far over websockets' 1 MiB default
    up = {"blob": "u" * (600 << 10)}  # sent in one masked frame, through the write buffer
    limits = {"max_frame_bytes": 1 << 20, "max_publish_bytes": 1 << 20,
              "max_publication_bytes": 4 << 20, "send_buffer_bytes": 16 << 20}  # fmt: skip
    async with running_gateway(**limits) as gw:
        async with Client(url(gw), token=token_for(gw), encoding=encoding, backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            await c.publish("room:1", up)
            assert (await next_event(sub)).data == up
            await gw.ctx.node.publish("room:1", msgspec.json.encode(big))
            assert (await next_event(sub, 5 * UNIT)).data == big
        small = Client(url(gw), token=token_for(gw), encoding=encoding, max_size=1 << 20)
        async with small:
            await small.subscribe("room:1")
            await gw.ctx.node.publish("room:1", msgspec.json.encode(big))
            why = await asyncio.wait_for(small.wait_closed(), 5 * UNIT)
            assert why.code == CloseCode.MESSAGE_TOO_BIG and small.state is State.CLOSED


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and a client one
    that trusts it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cadata=pem.decode())


async def test_wss_with_an_ssl_context_and_the_token_in_a_header(tmp_path):
    server_tls, client_tls = _tls_contexts(tmp_path)
    heads: list[bytes] = []
    async with running_gateway() as gw:
        proxy = await _proxy(gw.port, tls=server_tls, heads=heads)
        wss = f"wss://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/ws"
        token = token_for(gw)
        try:
            async with Client(wss, token=token, ssl=client_tls, encoding="msgpack") as c:
                sub = await c.subscribe("room:1")
                await c.publish("room:1", {"over": "tls"})
                assert (await next_event(sub)).data == {"over": "tls"}
            request_line, _, headers = heads[0].partition(b"\r\n")
            assert token.encode() not in request_line
            assert f"\r\nAuthorization: Bearer {token}\r\n".encode() in b"\r\n" + headers
            # The default context does not trust a self-signed certificate: never connected.
            with pytest.raises(TimeoutError):
                async with Client(wss, token=token, open_timeout=0.5 * UNIT, backoff=FAST):
                    pass
        finally:
            proxy.close()


async def test_a_repair_cut_short_by_a_reconnect_loses_nothing_silently():
    # A connect hook's channel after a reconnect is repaired from history, the live
    # pushes held. When that connection closes too before the history answers, `_run`
    # cancels the repair: releasing the held pushes then moved the position past the
    # missed ones with no Gap, and the next reconnect recovered from there.
    from gateway.client.subscription import Subscription
    from proto import Subscribed

    c = Client("ws://127.0.0.1:9/ws", token="t")
    asked = asyncio.Event()

    async def never(make, on_ok=None):  # type: ignore[no-untyped-def]
        asked.set()
        await asyncio.get_running_loop().create_future()  # the history answer never comes

    c._request = never  # type: ignore[method-assign]
    sub = Subscription("user:ada", Position(offset=5, epoch="e"), max_queue=100,
                       pause=lambda s: None, resume=lambda s: None, unsubscribe=c.unsubscribe)  # fmt: skip
    sub.confirmed = True
    c._subs["user:ada"] = sub
    c._server_subscribed(Subscribed("user:ada", 9, "e"))  # 6..9 came while it was away
    await asyncio.wait_for(asked.wait(), 1)
    sub.publication(Publication("user:ada", {"n": 10}, 10, "e"))  # live, held
    for task in list(c._tasks):  # what `_run` does when this connection closes too
        task.cancel()
    await asyncio.sleep(0.01)
    assert sub.position == Position(offset=5, epoch="e")  # the next connection recovers 6..
    assert not sub._events  # nothing delivered out of order, nothing lost silently


async def test_a_socket_closed_during_the_resubscription_is_reconnected_at_once(monkeypatch):
    # The socket closed while the client waited for its resubscriptions' replies (a
    # reconnect storm, a gateway going down again): `_run` was inside `_resubscribe`, so
    # no one failed the commands in flight and the client sat OPEN on a closed socket,
    # receiving nothing, until `request_timeout` (10 s) ran out.
    async with running_gateway(history_channels=("feed:*",)) as gw:
        node = gw.ctx.node
        real, armed = node.subscribe, [False]

        async def closing_first(ch: str, member) -> None:  # type: ignore[no-untyped-def]
            if armed[0]:
                armed[0] = False
                member.close(CloseCode.SHUTDOWN)  # closed before it answers
            await real(ch, member)

        monkeypatch.setattr(node, "subscribe", closing_first)
        token = token_for(gw, channels=("feed:*",))
        async with Client(url(gw), token=token, backoff=FAST, request_timeout=10.0) as c:
            feed = await c.subscribe("feed:1")
            await node.publish("feed:1", b'{"n":1}')
            assert (await next_event(feed)).data == {"n": 1}
            armed[0] = True
            close_all(gw, CloseCode.SHUTDOWN)
            await until(lambda: c.connections == 3 and gw.hub.has_subscribers("feed:1"), 3 * UNIT)
            await node.publish("feed:1", b'{"n":2}')
            got = await next_event(feed)
            assert isinstance(got, Publication) and got.data == {"n": 2}
