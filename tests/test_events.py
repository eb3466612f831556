"""Connection events (EVENTS_STREAM) in one process: what is recorded, in what order, what a
Redis outage and a lost node do, and the signed webhook against a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import tornado.httpserver
import tornado.web
from tornado.netutil import bind_sockets
from websockets.exceptions import ConnectionClosed

from core.infra.broker import Broker, MemoryBroker, RedisBroker
from core.infra.metrics import Metrics
from core.infra.settings import Settings, SettingsError
from gateway.events import Event, EventRecorder, Webhook, json_schema
from gateway.hooks import verify_signature
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_longpoll import Poller
from tests.test_sse import sse

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hook-secret-for-tests-0123456789abcdef"
_events = msgspec.json.Decoder(Event)  # every event read is checked against the schema's types


def decoded(raw: list[bytes]) -> list[dict[str, Any]]:
    for event in raw:
        _events.decode(event)
    return [json.loads(event) for event in raw]


async def stream(broker: Broker) -> list[dict[str, Any]]:
    return decoded([event for _, event in await broker.read_events("0", 10_000)])


async def events_until(broker: Broker, check: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def holds() -> bool:
        found[:] = await stream(broker)
        return bool(check(found))

    await until(holds)
    return found


def closed(user: str) -> Any:
    """Whether ``user``'s disconnect is among the events."""
    return lambda events: any(e["type"] == "disconnect" and e["user"] == user for e in events)


def of(events: list[dict[str, Any]], user: str) -> list[tuple[str, ...]]:
    """The (type, detail) of ``user``'s events, in order."""
    rows = []
    for e in events:
        if e["user"] == user:
            detail = e.get("channel") or e.get("reason") or e["transport"]
            rows.append((e["type"], detail) if "code" not in e else (e["type"], e["code"], detail))
    return rows


# -- one process: what is recorded -------------------------------------------------------


async def test_a_sockets_life_is_recorded_in_order_with_its_close_code():
    async with running_gateway(events_stream=True) as gw:
        broker = gw.ctx.node.broker
        async with ws_client(gw.port, token_for(gw, sub="ws-1")) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            assert (await c.request("sub", ch="room:2"))["ok"]
            assert (await c.request("unsub", ch="room:1"))["ok"]
        events = await events_until(broker, closed("ws-1"))
    assert of(events, "ws-1") == [
        ("connect", "websocket"),
        ("subscribe", "room:1"),
        ("subscribe", "room:2"),
        ("unsubscribe", "room:1"),
        ("disconnect", 1000, "normal closure"),  # no unsubscribe for room:2: the disconnect ends it
    ]
    assert not gw.ctx.node.events._items  # nothing held per connection once appended
    mine = [e for e in events if e["user"] == "ws-1"]
    assert len({e["id"] for e in mine}) == len(mine) and len({e["client"] for e in mine}) == 1
    assert all(abs(e["ts"] / 1000 - time.time()) < 60 for e in mine)


async def test_a_close_by_the_gateway_is_recorded_with_the_reason_it_sent():
    async with running_gateway(events_stream=True) as gw:
        broker = gw.ctx.node.broker
        async with ws_client(gw.port, token_for(gw, sub="ws-2")) as c:
            (session,) = gw.hub.connections
            session.transport.disconnect(4501, "moved to another plan")  # a hook's, say
            with pytest.raises(ConnectionClosed):
                await c.recv()
        events = await events_until(broker, closed("ws-2"))
    assert of(events, "ws-2")[-1] == ("disconnect", 4501, "moved to another plan")


async def test_sse_long_poll_and_shutdown_are_recorded_too():
    broker = MemoryBroker()
    async with running_gateway(broker, events_stream=True) as gw:
        recorder = gw.ctx.node.events
        assert recorder is not None
        async with sse(gw.port, token_for(gw, sub="sse-1"), ["room:1"]) as s:
            await s.next_of("reply")
        p = await Poller(gw, token_for(gw, sub="lp-1")).open()
        p.close()
        await events_until(broker, closed("sse-1"))
    events = await stream(broker)  # after the gateway closed: the long-poll session's end too
    assert of(events, "sse-1") == [
        ("connect", "sse"),
        ("subscribe", "room:1"),
        ("disconnect", 1006, "connection lost"),  # the client went away
    ]
    assert of(events, "lp-1") == [
        ("connect", "longpoll"),
        ("disconnect", 4000, "server shutting down, reconnect"),
    ]
    assert {e["node"] for e in events} == {recorder.node}
    assert await broker.lost_nodes() == [] and not broker._nodes  # it said it stopped


@pytest.mark.parametrize("on", [False, True])
async def test_a_session_holds_nothing_for_events_and_off_records_nothing(on):
    broker = MemoryBroker()
    async with running_gateway(broker, events_stream=on) as gw:
        assert (gw.ctx.node.events is not None) is on
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            (session,) = gw.hub.connections
            assert not hasattr(session, "__dict__")  # slots only: nothing added for events
    assert bool(await broker.read_events("0", 10)) is on


# -- the recorder alone: Redis outages, lost nodes ---------------------------------------


@dataclass(frozen=True)
class Conn:
    """A connection as the recorder sees it (a session's three attributes)."""

    client_id: str
    subject: str = "u"
    transport_kind: str = "websocket"


def recorder(broker: Broker, live: list[Conn] | None = None, **kw: Any) -> EventRecorder:
    kw.setdefault("ttl", 60.0)
    kw.setdefault("buffer", 1000)
    return EventRecorder(broker, Metrics(), lambda: live or [], maxlen=10_000, **kw)


def sample(r: EventRecorder, name: str, **labels: str) -> float:
    value = r._metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_events_wait_for_redis_in_order_and_past_the_buffer_are_dropped(throwaway_redis):
    broker = RedisBroker(throwaway_redis.url, unique_prefix(), backoff_max=0.2)
    await broker.start(lambda *_: None)
    r = recorder(broker, buffer=5)
    try:
        await r.start()
        throwaway_redis.kill()
        for i in range(7):
            r.subscribed(Conn("c"), f"room:{i}")
        assert sample(r, "gateway_events_dropped_total", target="stream") == 2
        assert sample(r, "gateway_events_queued", target="stream") == 5
        throwaway_redis.start()
        await until(lambda: not r._items, timeout=10 * UNIT)
        events = await stream(broker)
        assert [e["channel"] for e in events] == [f"room:{i}" for i in range(5)]
        assert sample(r, "gateway_events_appended_total", type="subscribe") == 5
    finally:
        await r.close()
        await broker.close()


async def test_a_lost_nodes_connections_are_reported_by_another_once_and_it_comes_back():
    broker = MemoryBroker()
    live = [Conn("c1", "alice"), Conn("c3", "carol", "sse")]
    a = recorder(broker, live, ttl=0.2, node="node-a")  # the others live long: only a is lost
    b, c = recorder(broker, node="node-b"), recorder(broker, node="node-c")
    for r in (a, b, c):
        await r.start()
    a.connected(live[0])
    a.connected(Conn("c2", "bob"))
    a.connected(live[1])
    a.disconnected(Conn("c2", "bob"), 1000)
    await until(lambda: not a._items and not a._beat)
    await asyncio.sleep(0.3)  # a says nothing more: its mark expires
    reported = await asyncio.gather(b.sweep(), c.sweep(), b.sweep())
    assert sum(reported) == 2  # c1 and c3, once each, whoever claimed them
    lost = [e for e in await stream(broker) if e.get("reason") == "node_lost"]
    assert sorted((e["client"], e["user"], e["transport"], e["code"]) for e in lost) == [
        ("c1", "alice", "websocket", 1006),
        ("c3", "carol", "sse", 1006),
    ]
    assert {e["node"] for e in lost} == {"node-a"}
    assert sum(sample(r, "gateway_events_nodes_lost_total") for r in (b, c)) == 1
    # a was only paused: its next append finds it reported lost, and it announces its
    # connections again, so a consumer learns they are still there.
    a.tick(time.monotonic() + 3600)
    await until(lambda: sample(a, "gateway_events_appended_total", type="connect") == 5)
    again = [e for e in await stream(broker) if e["type"] == "connect"][-2:]
    assert sorted(e["client"] for e in again) == ["c1", "c3"]
    for r in (a, b, c):
        await r.close()


# -- the webhook, against a real HTTP server ---------------------------------------------


class Backend:
    """An HTTP server that fails the first ``failures`` POSTs with 503, then accepts.

    While ``answering`` is clear, each POST waits for it before it is answered.
    """

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.accepted: list[dict[str, Any]] = []
        self.answering = asyncio.Event()
        self.answering.set()


class _Receive(tornado.web.RequestHandler):
    def initialize(self, backend: Backend) -> None:
        self.backend = backend

    async def post(self) -> None:
        backend = self.backend
        backend.posts.append((dict(self.request.headers), self.request.body))
        await backend.answering.wait()
        if len(backend.posts) <= backend.failures:
            self.set_status(503)
            return
        backend.accepted.append(json.loads(self.request.body))
        self.set_status(204)


@contextlib.asynccontextmanager
async def backend_server(failures: int = 0) -> AsyncIterator[tuple[Backend, str]]:
    backend = Backend(failures)
    app = tornado.web.Application([(r"/events", _Receive, {"backend": backend})])
    server = tornado.httpserver.HTTPServer(app)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        yield backend, f"http://127.0.0.1:{sockets[0].getsockname()[1]}/events"
    finally:
        server.stop()
        await server.close_all_connections()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """The backend's check (docs/events.md), with the helper the package ships."""
    timestamp, signature = headers.get("X-Gateway-Timestamp"), headers.get("X-Gateway-Signature")
    return verify_signature(SECRET, timestamp, body, signature, max_age=300)


async def test_the_webhook_gets_signed_batches_retried_after_failures():
    async with backend_server(failures=2) as (backend, url):
        hook = Webhook(url, SECRET, Metrics(), batch=3, retries=3)
        r = recorder(MemoryBroker(), webhook=hook)
        await r.start()
        for i in range(7):
            r.subscribed(Conn("c"), f"room:{i}")
        await until(lambda: sum(len(b["events"]) for b in backend.accepted) == 7)
        await r.close()
    assert all(verify(headers, body) for headers, body in backend.posts)
    assert backend.posts[0][1] == backend.posts[1][1] == backend.posts[2][1]  # the same, again
    assert [len(b["events"]) for b in backend.accepted] == [3, 3, 1]
    channels = [e["channel"] for b in backend.accepted for e in b["events"]]
    assert channels == [f"room:{i}" for i in range(7)]
    metrics = hook._metrics.registry
    assert metrics.get_sample_value("gateway_events_webhook_deliveries_total") == 3
    failures = {"kind": "status_5xx"}
    assert metrics.get_sample_value("gateway_events_webhook_failures_total", failures) == 2
    tampered = backend.posts[-1][1].replace(b"room:6", b"room:7")
    assert not verify(backend.posts[-1][0], tampered)


async def test_the_webhooks_queue_is_bounded_and_a_batch_that_keeps_failing_is_dropped():
    async with backend_server(failures=1000) as (backend, url):
        metrics = Metrics()
        hook = Webhook(url, SECRET, metrics, batch=2, queue=3, retries=1)
        await hook.start()
        hook.offer([b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":4}', b'{"n":5}'])
        value = metrics.registry.get_sample_value
        assert value("gateway_events_dropped_total", {"target": "webhook"}) == 2
        assert value("gateway_events_queued", {"target": "webhook"}) == 3
        queued = {"target": "webhook"}
        await until(lambda: value("gateway_events_queued", queued) == 0, timeout=10 * UNIT)
        await hook.close()
    assert len(backend.posts) == 4  # two batches, each tried twice (one retry), then dropped
    assert value("gateway_events_dropped_total", {"target": "webhook"}) == 5
    assert backend.accepted == []


async def test_subscribe_churn_leaves_the_webhooks_queue_room_for_connects_and_disconnects():
    async with backend_server() as (backend, url):
        backend.answering.clear()  # the backend takes its time: the queue fills
        hook = Webhook(url, SECRET, Metrics(), batch=2, queue=8)
        r = recorder(MemoryBroker(), webhook=hook)
        await r.start()
        mallory = Conn("m", "mallory")
        for i in range(20):
            r.subscribed(mallory, f"room:{i}")
            r.unsubscribed(mallory, f"room:{i}")
        await until(lambda: backend.posts)
        bob = Conn("b", "bob")
        r.connected(bob)
        r.disconnected(bob, 1000)
        await until(lambda: sample(r, "gateway_events_appended_total", type="disconnect") == 1)
        value = hook._metrics.registry.get_sample_value
        assert value("gateway_events_queued", {"target": "webhook"}) == 8
        assert value("gateway_events_dropped_total", {"target": "webhook"}) == 40 - 6
        backend.answering.set()
        await until(lambda: value("gateway_events_queued", {"target": "webhook"}) == 0)
        await r.close()
    delivered = [e for b in backend.accepted for e in b["events"]]
    assert [(e["user"], e["type"]) for e in delivered[-2:]] == [
        ("bob", "connect"),
        ("bob", "disconnect"),
    ]
    assert len(delivered) == 6 + 2  # 3/4 of the queue for mallory's churn, the rest kept


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 100000000000", b"Transfer-Encoding: chunked"],
    ids=["huge-content-length", "endless-chunks"],
)
async def test_the_webhook_reads_no_more_than_a_small_cap_of_an_endless_answer(
    framing: bytes,
) -> None:
    sent = 0
    connections = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent, connections
        connections += 1
        chunked = framing.startswith(b"Transfer")
        chunk = b"x" * (1 << 20)
        if chunked:
            chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:  # kept alive: answer each POST the same way
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % framing)
                while True:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/events"
    metrics = Metrics()
    hook = Webhook(url, SECRET, metrics, batch=1, retries=0, timeout=2 * UNIT)
    await hook.start()
    value = metrics.registry.get_sample_value
    try:
        hook.offer([b'{"n":1}', b'{"n":2}'])
        await until(lambda: value("gateway_events_queued", {"target": "webhook"}) == 0)
    finally:
        await hook.close(0.1)
        server.close()
    assert sent < 16 << 20, f"the gateway took in {sent >> 20} MiB of the answers"
    assert value("gateway_events_webhook_deliveries_total") == 2  # a 2xx delivers
    assert connections == 2  # the half-read connection was closed, not used again


# -- settings and documents --------------------------------------------------------------


def test_a_webhook_needs_the_stream_and_a_secret():
    with pytest.raises(SettingsError, match="EVENTS_STREAM"):
        Settings.from_env({"EVENTS_WEBHOOK_URL": "http://backend/events", "HOOK_SECRET": "s"})
    with pytest.raises(SettingsError, match="HOOK_SECRET"):
        Settings.from_env({"EVENTS_WEBHOOK_URL": "http://backend/events", "EVENTS_STREAM": "1"})
    env = {"EVENTS_WEBHOOK_URL": "http://b/e", "EVENTS_STREAM": "on", "HOOK_SECRET": "s" * 31}
    with pytest.raises(SettingsError, match="32 characters"):
        Settings.from_env(env)
    env["HOOK_SECRET"] = SECRET
    assert Settings.from_env(env).events_webhook_url == "http://b/e"


def test_the_documented_schema_is_the_one_the_code_generates():
    doc = (ROOT / "docs" / "events.md").read_text()
    assert json.dumps(json_schema(), indent=2) in doc


# -- the example consumer ----------------------------------------------------------------


async def test_the_example_consumer_follows_who_is_online_and_takes_over_a_dead_consumer(
    redis_url,
):
    from tests.test_client import load_example

    example = load_example("events_consumer")
    prefix = unique_prefix()
    stream = prefix + "events"
    r = aioredis.Redis.from_url(redis_url)
    online = example.Online()

    async def consume_until(check, consumer: str, **kw: Any) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            example.consume(r, stream, online, consumer, stop=stop, block_ms=50, **kw)
        )
        try:
            await until(check)
        finally:
            stop.set()
            await task

    try:
        async with running_gateway(
            redis_url=redis_url, redis_prefix=prefix, events_stream=True
        ) as gw:
            # Before any consumer exists: nothing is lost while the backend is down.
            async with ws_client(gw.port, token_for(gw, sub="bob")):
                pass
            async with ws_client(gw.port, token_for(gw, sub="alice")):
                await consume_until(lambda: "alice" in online.connections, "worker-1")
                assert "bob" not in online.connections  # came and went, both events handled

            # A consumer that dies after reading, before acknowledging:
            async def all_four() -> bool:  # bob's connect and disconnect, alice's
                return int(await r.xlen(stream)) >= 4

            await until(all_four)
            dead = await r.xreadgroup(example.GROUP, "worker-dead", {stream: ">"}, count=100)
            assert dead and dead[0][1]  # alice's disconnect, read and never acknowledged
            await consume_until(
                lambda: "alice" not in online.connections, "worker-2", claim_idle_ms=0
            )
            pending = await r.xpending(stream, example.GROUP)
            assert pending["pending"] == 0
    finally:
        await r.delete(stream)
        await r.aclose()
