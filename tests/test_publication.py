"""Poison publications: data no codec or client can carry never silences anyone.

One definition of publishable data (proto/publication.py) is enforced where
data enters; what comes from Redis unchecked is dropped and counted; and a
publication that cannot be encoded for one codec costs nobody else.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import msgspec
import pytest
import redis.asyncio as aioredis

from core.infra.broker import MemoryBroker
from core.infra.metrics import Metrics
from gateway.hub import Hub, Prepared
from gateway.node import Node
from proto import JSON_CODEC, MSGPACK_CODEC, ErrorCode, InvalidData
from proto.publication import MAX_DEPTH, check_json, from_broker, from_msgpack
from tests.harness import SECRET, unique_prefix, ws_client
from tests.servers import UNIT
from tests.test_processes import GatewayProcess, mint, start_together
from tests.test_session import cmd, session, settle

DEEP = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
#: JSON texts that parse somewhere but that not every codec or client can carry.
POISON_JSON = {
    "surrogate bytes": b'{"s": "\xed\xa0\x80"}',
    "invalid byte": b'"\xff"',
    "2**64": b'{"n": 18446744073709551616}',
    "-2**63-1": b"[-9223372036854775809]",
    "1e400": b'{"n": 1e400}',
    "4400 digits": b"1" * 4400,
    "too deep": DEEP,
    "very deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("name", sorted(POISON_JSON))
def test_check_json_refuses_what_a_codec_cannot_carry(name):
    with pytest.raises(InvalidData):
        check_json(POISON_JSON[name])


def test_check_json_keeps_the_publishers_bytes():
    assert (
        check_json(b' {"a": [1, 2.5, "\xc3\xa9", null]}\n') == b'{"a": [1, 2.5, "\xc3\xa9", null]}'
    )
    assert check_json(b"18446744073709551615") == b"18446744073709551615"  # 2**64 - 1 fits
    assert check_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    with pytest.raises(InvalidData, match="over 10 bytes"):
        check_json(b'"0123456789"', max_bytes=10)


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), msgspec.msgpack.Ext(1, b"x"), {1: "int key"}, [[[]]] * 2],
    ids=["nan", "inf", "ext", "int key", "ok"],
)
def test_from_msgpack(value):
    data = msgspec.msgpack.encode(value)
    if value == [[[]]] * 2:
        assert from_msgpack(data) == b"[[[]],[[]]]"
        return
    with pytest.raises(InvalidData):
        from_msgpack(data)


def test_msgpack_bin_becomes_base64_and_depth_is_bounded():
    assert from_msgpack(msgspec.msgpack.encode({"b": b"\x00\xff"})) == b'{"b":"AP8="}'
    with pytest.raises(InvalidData, match="deeper"):
        from_msgpack(b"\x91" * (MAX_DEPTH + 1) + b"\xc0")
    with pytest.raises(InvalidData, match="MessagePack"):
        from_msgpack(b"\xa3\xed\xa0\x80")  # a str that is not UTF-8


def test_from_broker_wraps_text_and_drops_broken_json():
    assert from_broker(b'  {"a": 1} ') == (b'{"a": 1}', True)
    assert from_broker(b"hello") == (b'"hello"', False)
    assert from_broker(b"") == (b'""', False)
    for poison in (*POISON_JSON.values(), b'{"a": tru}', b"\xffhello"):
        with pytest.raises(InvalidData):
            from_broker(poison)


# -- session, node and hub, no sockets ------------------------------------------


@pytest.fixture
async def node():
    n = Node(Hub(Metrics()), MemoryBroker(), Metrics())
    await n.start()
    yield n
    await n.close()


async def test_poison_pub_is_refused_with_an_error_reply_in_both_codecs(node):
    (j, jt), (m, mt) = session(node), session(node, codec=MSGPACK_CODEC)
    for s in (j, m):
        await s.handle(cmd(s.codec, id=1, op="sub", ch="room:1"))
    attacker, at = session(node)
    for i, raw in enumerate(POISON_JSON.values(), start=1):
        frame = b'{"id": %d, "op": "pub", "ch": "room:1", "data": %s}' % (i, raw)
        await attacker.handle(frame)
    await settle()
    codes = [r["error"]["code"] for r in at.replies()]
    # Every poison is refused, each with a reply; permanent errors, never "retry".
    assert len(codes) == len(POISON_JSON)
    assert set(codes) <= {ErrorCode.INVALID_DATA, ErrorCode.BAD_FRAME, ErrorCode.PAYLOAD_TOO_LARGE}
    assert not any(r["error"]["temporary"] for r in at.replies())
    m_attacker, mat = session(node, codec=MSGPACK_CODEC)
    for i, value in enumerate([float("nan"), msgspec.msgpack.Ext(5, b"x"), {"k": {1: 2}}], 1):
        await m_attacker.handle(
            msgspec.msgpack.encode({"id": i, "op": "pub", "ch": "room:1", "data": value})
        )
    assert [r["error"]["code"] for r in mat.replies()] == [ErrorCode.INVALID_DATA] * 3
    await attacker.handle(cmd(JSON_CODEC, id=99, op="pub", ch="room:1", data={"ok": 1}))
    await settle()
    assert jt.pushes() == mt.pushes() == [{"op": "msg", "ch": "room:1", "data": {"ok": 1}}]


async def test_poison_from_the_broker_is_dropped_and_counted(node):
    (j, jt), (m, mt) = session(node), session(node, codec=MSGPACK_CODEC)
    for s in (j, m):
        await s.handle(cmd(s.codec, id=1, op="sub", ch="room:1"))
    for raw in POISON_JSON.values():
        node._on_publication("room:1", raw, None)  # what a backend's plain PUBLISH delivers
    node._on_publication("room:1", b'{"after": true}', None)
    assert jt.pushes() == mt.pushes() == [{"op": "msg", "ch": "room:1", "data": {"after": True}}]
    dropped = node._metrics.dropped_publications.labels("live")._value.get()
    assert dropped == len(POISON_JSON)


def test_an_encoding_that_fails_costs_only_its_own_codec():
    metrics = Metrics()
    hub = Hub(metrics)

    class Member:
        transport_kind = "websocket"

        def __init__(self, codec):
            self.codec, self.got = codec, []

        def deliver(self, prepared: Prepared) -> None:
            self.got.append(prepared.payload(self.codec))

    members = [Member(MSGPACK_CODEC), Member(JSON_CODEC), Member(MSGPACK_CODEC), Member(JSON_CODEC)]
    for member in members:
        hub.add("room:1", member)
    # Unchecked data (2**64) that JSON carries and MessagePack cannot.
    assert hub.broadcast("room:1", b"18446744073709551616") == 2
    assert [len(m.got) for m in members] == [0, 1, 0, 1]
    assert metrics.encode_failures.labels("gw.v1.msgpack")._value.get() == 1


# -- real processes ---------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_poison_from_another_process_or_redis_silences_no_one(
    tmp_path, data_dir, redis_url, database_url, core_schema
):
    """The attack of issue 12: an ordinary account publishes poison on its own
    channel through process B, and a backend PUBLISHes it straight into Redis;
    process A's msgpack and JSON subscribers keep receiving everything else."""
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": (prefix := unique_prefix()),
        "JWT_SECRET": SECRET,
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": core_schema,
    }
    a, b = start_together(*(GatewayProcess(tmp_path, data_dir, **env) for _ in range(2)))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        token = mint(data_dir, "--pub", "yes")
        async with (
            ws_client(a.port, token, msgpack=True) as victim_mp,
            ws_client(a.port, token) as victim_json,
            ws_client(b.port, token) as attacker,
            ws_client(b.port, token, msgpack=True) as attacker_mp,
        ):
            for c in (victim_mp, victim_json, attacker):
                assert (await c.request("sub", ch="room:1"))["ok"]
            for raw in POISON_JSON.values():
                if len(raw) > 65536:
                    continue  # over the frame limit: the attacker's own 1009
                frame = b'{"id": 7, "op": "pub", "ch": "room:1", "data": %s}' % raw
                await attacker.send_raw(frame)  # a binary frame: the bytes as they are
                reply = await attacker.recv(5 * UNIT)
                assert reply["ok"] is False and reply["error"]["temporary"] is False, reply
            reply = await attacker_mp.request("pub", ch="room:1", data=float("nan"))
            assert reply["error"]["code"] == ErrorCode.INVALID_DATA
            for raw in (*POISON_JSON.values(), b"\x1ejunk", b"\x1e1 e"):
                await redis.publish(f"{prefix}room:1", raw)
            status, body = await asyncio.to_thread(
                _post, b.port, token, b'{"ch": "room:1", "data": {"n": 1e400}}'
            )
            assert status == 422 and json.loads(body)["error"]["details"][0]["path"] == "$.data"
            # Every process still delivers, on every channel, to every codec.
            assert (await attacker.request("pub", ch="room:1", data={"after": 1}))["ok"]
            for victim in (victim_mp, victim_json):
                assert await victim.next_push() == {
                    "op": "msg",
                    "ch": "room:1",
                    "data": {"after": 1},
                }
            async with ws_client(a.port, token) as late:
                assert (await late.request("sub", ch="room:2"))["ok"]
                await redis.publish(f"{prefix}room:2", b'"still here"')
                assert (await late.next_push())["data"] == "still here"
        for gp in (a, b):
            status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{gp.port}/readyz")
            assert status == 200
        _, metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{a.port}/metrics")
        text = metrics.decode()
        assert "gateway_broker_connected 1.0" in text
        assert 'gateway_broker_faults_total{kind="malformed"} 2.0' in text
        assert (
            f'gateway_publications_dropped_total{{source="live"}} {float(len(POISON_JSON))}' in text
        )
        assert "Traceback" not in a.output() + b.output()
    finally:
        await redis.aclose()
        for gp in (a, b):
            gp.stop(signal.SIGKILL)


def _post(port: int, token: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=body,
        headers={"Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _no_call(req: object) -> object:
    raise AssertionError("the core was called with data no codec can carry")


async def test_every_frame_gets_a_reply_however_deep_or_whatever_it_carries(node):
    s, t = session(node)
    deep = b"[" * 5000 + b"]" * 5000
    await s.handle(deep)  # not even an object: too deep to decode
    await s.handle(b'{"id": 2, "op": "pub", "ch": "room:1", "data": %s}' % deep)
    m, mt = session(node, codec=MSGPACK_CODEC)
    m.dispatch = _no_call  # a core that must never be reached
    ext = msgspec.msgpack.Ext(3, b"\x00")
    await m.handle(
        msgspec.msgpack.encode(
            {"id": 3, "op": "rpc", "method": "POST", "path": "/api/x", "body": ext}
        )
    )
    await m.handle(b"\x91" * 5000 + b"\xc0")
    replies = t.replies() + mt.replies()
    assert [(r["id"], r["error"]["code"]) for r in replies] == [
        (None, ErrorCode.BAD_FRAME),
        (None, ErrorCode.BAD_FRAME),  # the id is inside what cannot be decoded
        (3, ErrorCode.INVALID_DATA),  # permanent: a client does not retry it forever
        (None, ErrorCode.BAD_FRAME),
    ]
    assert not any(r["error"]["temporary"] for r in replies)
