"""Session, hub and node against a recording transport (no sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import jwt
import msgspec
import pytest

from core.infra.broker import BrokerUnavailable, MemoryBroker
from core.infra.identity import Identity
from core.infra.metrics import Metrics
from core.infra.settings import Settings
from core.infra.verify import Verifier
from gateway.hooks.connect import hooked
from gateway.hooks.service import Hooks
from gateway.hooks.session import HookedSession
from gateway.hub import Hub, Prepared
from gateway.node import Node
from gateway.session import Session
from proto import JSON_CODEC, MSGPACK_CODEC, CloseCode, Codec, Connection, ErrorCode, Grants
from tests.servers import UNIT


class RecordingTransport:
    """A transport that keeps what the session sent, decoded."""

    kind = "websocket"

    def __init__(self, codec: Codec = JSON_CODEC) -> None:
        self.codec = codec
        self.sent: list[dict] = []
        self.frames: list[bytes] = []
        self.closed_with: list[CloseCode] = []
        self.heartbeats: list[float] = []

    def _decode(self, raw: bytes) -> dict:
        return json.loads(raw) if self.codec is JSON_CODEC else msgspec.msgpack.decode(raw)

    def send(self, payload: bytes) -> None:
        self.sent.append(self._decode(payload))

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        self.frames.append(prepared.ws_frame(codec))
        self.sent.append(self._decode(prepared.payload(codec)))

    def disconnect(self, code: CloseCode) -> None:
        self.closed_with.append(code)

    def heartbeat(self, now: float, dead_after: float) -> None:
        self.heartbeats.append(now)

    def pushes(self) -> list[dict]:
        return [m for m in self.sent if m.get("op") == "msg"]

    def replies(self) -> list[dict]:
        return [m for m in self.sent if "ok" in m]


class RecordingBroker(MemoryBroker):
    """The memory broker, counting calls and failing on request."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.fail_subscribe: Exception | None = None
        self.fail_publish: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def subscribe(self, ch: str) -> None:
        self.calls.append(("subscribe", ch))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_subscribe is not None:
            raise self.fail_subscribe
        await super().subscribe(ch)

    async def unsubscribe(self, ch: str) -> None:
        self.calls.append(("unsubscribe", ch))
        await super().unsubscribe(ch)

    async def publish(self, ch: str, data: bytes) -> None:
        if self.fail_publish is not None:
            raise self.fail_publish
        await super().publish(ch, data)


@pytest.fixture
async def node():
    broker = RecordingBroker()
    n = Node(Hub(Metrics()), broker, Metrics())
    await n.start()
    yield n
    await n.close()


def session(node: Node, channels=("room:*",), codec: Codec = JSON_CODEC, exp=None, pub=True):
    transport = RecordingTransport(codec)
    grants = Grants.from_claims({"channels": list(channels), "pub": pub})
    s = Session(
        transport, Connection(codec, grants), Identity("alice", grants, exp), node, Metrics()
    )
    s.open()
    return s, transport


def cmd(codec: Codec, **frame) -> bytes | str:
    return json.dumps(frame) if codec is JSON_CODEC else msgspec.msgpack.encode(frame)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_subscribe_publish_receive(node):
    s, t = session(node)
    await s.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1"))
    await s.handle(cmd(JSON_CODEC, id=2, op="pub", ch="room:1", data={"hello": "world"}))
    await settle()
    assert {"id": 1, "ok": True} in t.replies() and {"id": 2, "ok": True} in t.replies()
    assert t.pushes() == [{"op": "msg", "ch": "room:1", "data": {"hello": "world"}}]


async def test_one_broker_subscription_per_channel(node):
    (a, _), (b, _) = session(node), session(node)
    await a.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1"))
    await b.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1"))
    await a.handle(cmd(JSON_CODEC, id=2, op="unsub", ch="room:1"))
    await settle()
    assert node.broker.calls == [("subscribe", "room:1")]
    b.closed()
    await settle()
    assert node.broker.calls == [("subscribe", "room:1"), ("unsubscribe", "room:1")]
    assert not node.hub.has_subscribers("room:1")


async def test_fanout_shares_one_frame_per_codec(node):
    members = [session(node) for _ in range(3)] + [session(node, codec=MSGPACK_CODEC)]
    for s, t in members:
        await s.handle(cmd(t.codec, id=1, op="sub", ch="room:9"))
    assert node.hub.broadcast("room:9", b'{"n":1}') == 4
    json_frames = [t.frames[0] for _, t in members[:3]]
    assert all(f is json_frames[0] for f in json_frames)  # the same bytes object
    assert members[3][1].pushes() == [{"op": "msg", "ch": "room:9", "data": {"n": 1}}]


async def test_unsubscribed_session_receives_nothing(node):
    s, t = session(node)
    await s.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1"))
    await s.handle(cmd(JSON_CODEC, id=2, op="unsub", ch="room:1"))
    node.hub.broadcast("room:1", b"1")
    assert t.pushes() == []


async def test_failed_broker_subscribe_rolls_back_every_joiner(node):
    node.broker.gate = asyncio.Event()
    node.broker.fail_subscribe = BrokerUnavailable("down")
    (a, ta), (b, tb) = session(node), session(node)
    first = asyncio.ensure_future(a.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1")))
    await settle()
    second = asyncio.ensure_future(b.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1")))
    await settle()
    node.broker.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), UNIT)
    for t in (ta, tb):
        (r,) = t.replies()
        assert r["ok"] is False and r["error"]["code"] == ErrorCode.UNAVAILABLE
        assert r["error"]["temporary"] is True
    assert not node.hub.has_subscribers("room:1")
    assert "room:1" not in a.conn.subscriptions
    # The next attempt, with the broker back, subscribes afresh.
    node.broker.fail_subscribe = None
    await a.handle(cmd(JSON_CODEC, id=2, op="sub", ch="room:1"))
    assert ta.replies()[-1] == {"id": 2, "ok": True}
    assert node.hub.subscriber_count("room:1") == 1


async def test_publish_to_lost_broker_is_a_temporary_error(node):
    s, t = session(node)
    node.broker.fail_publish = BrokerUnavailable("down")
    await s.handle(cmd(JSON_CODEC, id=5, op="pub", ch="room:1", data=1))
    assert t.replies()[-1]["error"]["code"] == ErrorCode.UNAVAILABLE


async def test_unexpected_exception_is_internal_and_hides_details(node, caplog):
    s, t = session(node)
    node.broker.fail_publish = RuntimeError("secret internals")
    with caplog.at_level(logging.ERROR):
        await s.handle(cmd(JSON_CODEC, id=5, op="pub", ch="room:1", data=1))
    err = t.replies()[-1]["error"]
    assert err["code"] == ErrorCode.INTERNAL and "secret" not in err["message"]
    assert "secret internals" in caplog.text  # logged for operators
    await s.handle(cmd(JSON_CODEC, id=6, op="ping"))
    assert t.replies()[-1] == {"id": 6, "ok": True}  # still serving


async def test_protocol_errors_reach_the_client(node):
    s, t = session(node, pub=False)
    await s.handle("{bad json")
    await s.handle(cmd(JSON_CODEC, id=2, op="sub", ch="user:bob"))
    await s.handle(cmd(JSON_CODEC, id=3, op="pub", ch="room:1", data=1))
    codes = [r["error"]["code"] for r in t.replies()]
    assert codes == [ErrorCode.BAD_FRAME, ErrorCode.PERMISSION_DENIED, ErrorCode.PERMISSION_DENIED]


async def test_closed_session_leaves_everything_once(node):
    s, t = session(node)
    await s.handle(cmd(JSON_CODEC, id=1, op="sub", ch="room:1"))
    await s.handle(cmd(JSON_CODEC, id=2, op="sub", ch="room:2"))
    assert node.hub.connection_count() == 1
    s.closed()
    s.closed()
    await settle()
    assert node.hub.connection_count() == 0 and node.hub.channels() == []
    await s.handle(cmd(JSON_CODEC, id=3, op="ping"))
    assert {"id": 3, "ok": True} not in t.replies()  # nothing is sent after close


async def test_expired_tokens_are_closed_by_the_sweep(node):
    (_, ta), (b, tb), (_, tc) = session(node, exp=100.0), session(node, exp=200.0), session(node)
    assert node.hub.close_expired(now=99.0) == 0
    assert node.hub.close_expired(now=150.0) == 1
    assert ta.closed_with == [CloseCode.TOKEN_EXPIRED] and tb.closed_with == []
    b.closed()  # leaves before its expiry: never swept
    assert node.hub.close_expired(now=1e9) == 0
    assert tc.closed_with == []


async def test_expiry_notice_then_close_follow_the_hub_schedule(node):
    _, t = session(node, exp=100.0)  # hub defaults: notice 60 s before, grace 5 s after
    node.hub.close_expired(now=39.0)
    assert t.sent == []
    node.hub.close_expired(now=40.0)
    assert t.sent == [{"op": "expiring", "exp": 100}]
    node.hub.close_expired(now=104.9)
    assert t.closed_with == [] and len(t.sent) == 1  # noticed once, not yet closed
    assert node.hub.close_expired(now=105.0) == 1
    assert t.closed_with == [CloseCode.TOKEN_EXPIRED]


async def test_refresh_moves_the_schedule(node):

    verifier = Verifier(Settings(jwt_secret="s" * 40))
    s, t = session(node, exp=100.0)
    s.verify = verifier.verify

    later = int(time.time()) + 3600
    token = jwt.encode({"sub": "alice", "channels": ["room:*"], "exp": later}, "s" * 40)
    await s.handle(cmd(JSON_CODEC, id=1, op="refresh", token=token))
    assert t.replies() == [{"id": 1, "ok": True}]
    assert node.hub.close_expired(now=10_000.0) == 0  # the old deadline is gone
    assert t.closed_with == []
    assert node.hub.close_expired(now=later + 5.0) == 1


async def test_liveness_visits_every_connection_once_per_interval_round_robin(node):
    transports = [session(node)[1] for _ in range(10)]
    for tick in range(5):  # interval 5 s, one tick a second: 2 connections a tick
        assert node.hub.heartbeat(now=float(tick), interval=5.0, timeout=1.0) == 2
    assert [len(t.heartbeats) for t in transports] == [1] * 10
    node.hub.heartbeat(now=5.0, interval=5.0, timeout=1.0)
    assert sum(len(t.heartbeats) for t in transports) == 12  # the next round began


async def test_liveness_honours_the_interval_with_only_a_few_connections(node):
    transports = [session(node)[1] for _ in range(3)]
    for tick in range(25):  # interval 25 s, one tick a second, 3 connections
        node.hub.heartbeat(now=float(tick), interval=25.0, timeout=5.0)
    # Each once per interval: not once every 3 ticks.
    assert [len(t.heartbeats) for t in transports] == [1, 1, 1]


@pytest.mark.parametrize("first", ["boot", "server API"])
async def test_a_connect_hook_s_boot_and_the_server_api_subscribe_a_channel_once(node, first):
    # Both may subscribe the connection to the same channel while the other's broker
    # subscribe is under way: whichever claims it first makes it, the other stands back.
    hooks = Hooks(Settings(jwt_secret="s" * 32, hook_secret="h" * 32), Metrics())
    grants = Grants.from_claims({"channels": ["room:*"]})
    identity = hooked(Identity("alice", grants, None), "c1")
    identity.subscribe = ("projects:1", "room:2")
    transport = RecordingTransport()
    s = HookedSession(hooks, transport, Connection(JSON_CODEC, grants), identity, node, Metrics())
    s.open()
    broker = node.broker
    assert isinstance(broker, RecordingBroker)
    broker.gate = asyncio.Event()
    boot = s.boot()
    assert boot is not None
    if first == "boot":
        booting = asyncio.ensure_future(boot)
        await settle()
        assert await s.server_subscribe("projects:1") is False  # under way: not twice
        broker.gate.set()
        await booting
    else:
        api = asyncio.ensure_future(s.server_subscribe("projects:1"))
        await settle()
        booting = asyncio.ensure_future(boot)
        await settle()
        broker.gate.set()
        await booting
        assert await api is True
    told = [m["ch"] for m in transport.sent if m.get("op") == "subscribed"]
    assert sorted(told) == ["projects:1", "room:2"]  # each once
    assert s.conn.subscriptions == {"projects:1", "room:2"}
    assert broker.calls.count(("subscribe", "projects:1")) == 1
    assert node.hub.subscriber_count("projects:1") == 1
