"""permessage-deflate (RFC 7692, issue 20): the offer and answer, the bytes, and a gateway using it.

Pure first (`proto.deflate`, the protocol object with ``deflate=True``, the
prepared frames of the hub), then end to end with the `websockets` client,
which offers what browsers offer (``permessage-deflate; client_max_window_bits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from core.infra.metrics import Metrics
from gateway.hub import Prepared
from gateway.transport import inflation
from proto import JSON_CODEC, MSGPACK_CODEC
from proto.deflate import UNLIMITED, Compressor, inflate, negotiate
from proto.wsframe import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, FrameError
from proto.wsprotocol import WebSocketProtocol, WSState
from tests.harness import running_gateway, token_for, until, ws_client
from tests.test_wsprotocol import close_of, raw

MAX = 1 << 16
ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def deflated(data: bytes) -> bytes:
    """``data`` as a client compresses one message (its own zlib stream, tail removed)."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# -- negotiation -------------------------------------------------------------


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; client_max_window_bits",  # Chromium, websockets
        "permessage-deflate",  # Firefox, Safari
        "permessage-deflate; client_no_context_takeover",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; client_max_window_bits=10",
        'permessage-deflate; client_max_window_bits="12"',
        "PerMessage-Deflate ;  client_max_window_bits ",
    ],
)
def test_what_browsers_and_libraries_offer_is_accepted_without_context_takeover(offer):
    agreement = negotiate([offer])
    assert agreement is not None
    assert agreement.response == ANSWER
    assert agreement.max_bytes == UNLIMITED  # the client's window is the compressor's 32 KB


def test_a_server_window_limit_is_echoed_and_caps_what_is_compressed():
    agreement = negotiate(["permessage-deflate; server_max_window_bits=10"])
    assert agreement is not None
    assert agreement.response == ANSWER + "; server_max_window_bits=10"
    assert agreement.max_bytes == 1024


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; x_unknown",
        "permessage-deflate; server_max_window_bits",  # needs a value
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=0",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; client_max_window_bits=9; client_max_window_bits=10",
        "permessage-deflate; =5",
        "permessage-deflate; client_max_window_bits=",
        "x-webkit-deflate-frame",
        "",
        ";;;",
    ],
)
def test_a_bad_offer_is_declined_not_failed(offer):
    assert negotiate([offer]) is None


def test_the_first_acceptable_offer_wins_across_headers():
    bad = "permessage-deflate; server_max_window_bits=99"
    assert negotiate([bad, "foo, permessage-deflate; server_max_window_bits=12"]) is not None
    agreement = negotiate(
        [f"{bad}, permessage-deflate; server_max_window_bits=9, permessage-deflate"]
    )
    assert agreement is not None and agreement.max_bytes == 512
    assert negotiate([]) is None


# -- compressing and inflating -----------------------------------------------


def test_each_compressed_message_inflates_on_its_own():
    compressor = Compressor(level=6, min_bytes=0)
    messages = [json.dumps({"n": i, "text": "hello " * 40}).encode() for i in range(5)]
    out = [compressor.compress(m) for m in messages]
    # No context takeover: any message inflates with a fresh decompressor, in any order.
    for m, z in reversed(list(zip(messages, out, strict=True))):
        assert inflate(z, MAX) == m
    assert out[1] != out[0] and len(out[1]) < len(messages[1]) // 3
    assert compressor.frames == 5 and compressor.bytes_in == sum(map(len, messages))
    assert compressor.bytes_out == sum(map(len, out)) and compressor.seconds > 0


def test_inflate_bounds_its_output_and_refuses_garbage():
    bomb = deflated(b"\x00" * (10 << 20))  # 10 MB of zeros, about 10 KB compressed
    assert len(bomb) < 20_000
    with pytest.raises(FrameError) as info:
        inflate(bomb, MAX)
    assert info.value.code == 1009
    assert inflate(deflated(b"a" * MAX), MAX) == b"a" * MAX  # exactly the limit is fine
    with pytest.raises(FrameError) as info:
        inflate(b"\xff\xff\xff\xff", MAX)
    assert info.value.code == 1002


# -- the protocol object -----------------------------------------------------


def test_compressed_messages_whole_and_fragmented():
    p = WebSocketProtocol(MAX, deflate=True)
    text = "héllo wörld ✓ ".encode() * 20
    z = deflated(text)
    data = raw(OP_TEXT, z, rsv=4) + raw(OP_BINARY, deflated(b"\x00\xff" * 99), rsv=4)
    # A fragmented compressed message: RSV1 on the first frame only, a ping between.
    data += raw(OP_TEXT, z[:5], fin=False, rsv=4) + raw(OP_PING, b"p")
    data += raw(OP_CONT, z[5:9], fin=False) + raw(OP_CONT, z[9:])
    data += raw(OP_TEXT, b"plain too")  # a message need not be compressed
    for cut in (len(data), 7, len(data) - 3):
        p = WebSocketProtocol(MAX, deflate=True)
        got = p.receive(data[:cut]) + p.receive(data[cut:])
        assert got == [text, b"\x00\xff" * 99, text, b"plain too"]
        assert p.failure is None and p.state is WSState.OPEN


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw(OP_PING, b"x", rsv=4), 1002),  # control frames are never compressed
        (raw(OP_TEXT, deflated(b"ab"), fin=False, rsv=4) + raw(OP_CONT, b"", rsv=4), 1002),
        (raw(OP_TEXT, deflated(b"ab"), rsv=2), 1002),  # RSV2, RSV3 stay reserved
        (raw(OP_TEXT, deflated(b"ab"), rsv=5), 1002),
        (raw(OP_TEXT, b"\xff\xfe\xfd\xfc", rsv=4), 1002),  # not deflate
        (raw(OP_TEXT, deflated(b"\xed\xa0\x80 surrogate"), rsv=4), 1007),
        (raw(OP_TEXT, deflated(b"\x00" * (MAX + 1)), rsv=4), 1009),
        (
            raw(OP_BINARY, (b := deflated(b"\x00" * (5 << 20)))[:100], fin=False, rsv=4)
            + raw(OP_CONT, b[100:]),
            1009,
        ),
    ],
)
def test_what_fails_a_compressing_connection(data, code):
    p = WebSocketProtocol(MAX, deflate=True)
    assert p.receive(raw(OP_TEXT, b"before") + data) == [b"before"]
    assert close_of(p.data_to_send()) == code
    assert p.state is WSState.CLOSED


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([OP_TEXT, OP_BINARY, OP_CONT, OP_PING]),
            st.booleans(),
            st.integers(0, 7),
            st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(deflated)),
        ),
        max_size=6,
    ),
    st.integers(1, 64),
)
def test_any_frames_on_a_compressing_connection_fail_only_with_a_close_code(frames, chop):
    """Whatever arrives, compressed or not, split anywhere: messages, or 1002/1007/1009."""
    data = b"".join(raw(op, payload, fin=fin, rsv=rsv) for op, fin, rsv, payload in frames)
    p = WebSocketProtocol(1024, deflate=True)
    for i in range(0, len(data), chop):
        for message in p.receive(data[i : i + chop]):
            assert len(message) <= 1024
    if p.failure is not None:
        assert p.failure.code in (1002, 1007, 1009)
        assert p.state is WSState.CLOSED


def test_rsv1_without_the_extension_is_a_protocol_error():
    p = WebSocketProtocol(MAX)
    assert p.receive(raw(OP_TEXT, deflated(b"ab"), rsv=4)) == []
    assert close_of(p.data_to_send()) == 1002


def test_a_client_protocol_inflates_the_servers_compressed_frames():
    compressor = Compressor(min_bytes=0)
    p = WebSocketProtocol(MAX, client=True, deflate=True)
    payload = b'{"op":"msg","data":"' + b"z" * 500 + b'"}'
    from proto.wsframe import frame

    got = p.receive(frame(compressor.compress(payload), compressed=True) * 2)
    assert got == [payload, payload]
    assert p.close(1000)[0] == 0x80 | OP_CLOSE


# -- prepared frames ---------------------------------------------------------


def test_a_publication_is_compressed_once_per_codec_for_every_socket():
    compressor = Compressor(min_bytes=100)
    wide = negotiate(["permessage-deflate"])
    narrow = negotiate(["permessage-deflate; server_max_window_bits=8"])
    assert wide is not None and narrow is not None
    data = json.dumps({"items": [{"id": i, "name": "widget", "price": 9.5} for i in range(40)]})
    prepared = Prepared("room:1", data.encode())
    first = prepared.ws_frame_deflated(JSON_CODEC, compressor, wide.max_bytes)
    assert prepared.ws_frame_deflated(JSON_CODEC, compressor, wide.max_bytes) is first  # shared
    assert first[0] == 0xC1  # FIN, RSV1, text
    assert len(first) < len(prepared.ws_frame(JSON_CODEC)) // 3
    assert prepared.ws_frame_deflated(MSGPACK_CODEC, compressor, wide.max_bytes)[0] == 0xC2
    assert compressor.frames == 2  # once per codec, not per socket
    # Too long for a 256-byte window: the plain frame, the one other sockets share.
    plain = prepared.ws_frame(JSON_CODEC)
    assert prepared.ws_frame_deflated(JSON_CODEC, compressor, narrow.max_bytes) is plain
    prepared.settle()
    assert compressor.delivered == 3
    assert compressor.delivered_bytes < compressor.delivered_plain // 3
    short = Prepared("room:1", b'{"a":1}')
    assert short.ws_frame_deflated(JSON_CODEC, compressor, wide.max_bytes) is short.ws_frame(
        JSON_CODEC
    )
    short.settle()
    assert compressor.frames == 2 and compressor.delivered == 3


# -- end to end --------------------------------------------------------------

BIG = {"items": [{"id": i, "symbol": "ACME", "price": 101.25, "side": "buy"} for i in range(30)]}


async def test_a_compressing_and_a_plain_client_get_the_same_publications():
    async with running_gateway(compression=True, compression_min_bytes=64) as gw:
        token = token_for(gw)
        async with (
            ws_client(gw.port, token, compression="deflate") as zipped,
            ws_client(gw.port, token) as plain,
        ):
            (ext,) = zipped.ws.protocol.extensions
            assert ext.remote_no_context_takeover and ext.local_no_context_takeover
            assert plain.ws.protocol.extensions == []
            assert zipped.ws.response.headers["Sec-WebSocket-Extensions"] == ANSWER
            for client in (zipped, plain):
                assert (await client.request("sub", ch="room:z"))["ok"]
            # The websockets client compresses what it sends: a compressed publish.
            reply = await zipped.request("pub", ch="room:z", data=BIG)
            assert reply["ok"], reply
            for client in (zipped, plain):
                assert (await client.next_push())["data"] == BIG
            gw.hub.broadcast("room:z", json.dumps(BIG).encode())
            for client in (zipped, plain):
                assert (await client.next_push())["data"] == BIG
            compressor = gw.ctx.compressor
            assert compressor is not None
            assert compressor.delivered == 2  # the compressing client, twice
            assert compressor.delivered_bytes < compressor.delivered_plain / 3
            # A reply long enough is compressed too, by the same compressor (here,
            # an error reply: room:z keeps no presence).
            frames = compressor.frames
            reply = await zipped.request("presence", ch="room:z")
            assert reply["error"]["code"] == 116 and len(json.dumps(reply)) > 64, reply
            assert compressor.frames == frames + 1


async def test_compression_off_declines_every_offer():
    async with running_gateway() as gw:
        assert gw.ctx.compressor is None
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            assert c.ws.protocol.extensions == []
            assert "Sec-WebSocket-Extensions" not in c.ws.response.headers
            assert (await c.request("ping"))["ok"]


async def test_a_decompression_bomb_closes_with_1009_and_the_gateway_goes_on():
    async with running_gateway(compression=True, max_frame_bytes=MAX) as gw:
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            # 64 MB of spaces in a few KB: over the frame limit only once inflated.
            bomb = b'{"id":1,"op":"ping"}' + b" " * (64 << 20)
            with pytest.raises(ConnectionClosed) as info:
                await c.ws.send(bomb.decode())
                await c.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            assert (await c.request("ping"))["ok"]
        await until(lambda: gw.hub.connection_count() == 0)


async def _pings_answered(c, n: int, pad: int) -> tuple[int, int | None]:
    """Send ``n`` pings padded to ``pad`` bytes at once: (answered, close code or None)."""
    for i in range(n):
        await c.ws.send(f'{{"id":{i},"op":"ping"}}' + " " * pad)
    answered = 0
    with contextlib.suppress(ConnectionClosed):
        while answered < n:
            assert (await c.recv())["ok"]
            answered += 1
    rcvd = c.ws.protocol.close_rcvd
    return answered, None if rcvd is None else rcvd.code


async def test_a_socket_inflates_within_its_allowance_then_is_closed_with_1008():
    # Before, 86 bytes on the wire made the gateway inflate and parse 64 KiB, as
    # often as a client liked: one client at 200 KiB/s kept a core ~80% busy.
    async with running_gateway(
        compression=True, max_frame_bytes=MAX, rate_socket_commands=None
    ) as gw:
        assert gw.ctx.settings.compression_inflate_rate == 256 << 10  # the default
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            answered, code = await _pings_answered(c, 200, MAX - 100)
        assert code == 1008
        assert 4 <= answered <= 8  # 4 frames of MAX_FRAME_BYTES at once, then 256 KiB/s
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            assert (await c.request("ping"))["ok"]  # the others' allowances are their own


async def test_a_client_that_waits_for_its_allowance_is_never_closed():
    async with running_gateway(
        compression=True, max_frame_bytes=MAX, compression_inflate_rate=MAX * 4
    ) as gw:
        async with ws_client(gw.port, token_for(gw), compression="deflate") as c:
            for _ in range(3):
                assert await _pings_answered(c, 4, MAX - 100) == (4, None)
                await asyncio.sleep(1.1)  # full again after a second


def test_the_allowance_refills_at_its_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(inflation.time, "monotonic", lambda: now[0])
    budget = inflation.InflateBudget(inflation.InflateLimits.of(1000, 3000))
    message = deflated(b"x" * 1000)
    for _ in range(3):
        assert budget(message, MAX) == b"x" * 1000
    with pytest.raises(FrameError) as info:
        budget(message, MAX)
    assert info.value.code == 1008
    now[0] += 0.5  # 500 bytes more
    assert budget(deflated(b"y" * 500), MAX) == b"y" * 500
    with pytest.raises(FrameError):
        budget(deflated(b"z"), MAX)
    now[0] += 10  # never more than the burst
    for _ in range(3):
        budget(message, MAX)
    with pytest.raises(FrameError):
        budget(message, MAX)


def test_metrics_export_the_compressors_counts():
    from prometheus_client import generate_latest

    metrics = Metrics()
    compressor = Compressor(min_bytes=0)
    compressor.compress(b"abc" * 100)
    metrics.watch_compression(compressor)
    text = generate_latest(metrics.registry).decode()
    assert "gateway_compressed_frames_total 1.0" in text
    assert 'gateway_compression_payload_bytes_total{stage="before"} 300.0' in text
    assert "gateway_compressed_delivery_bytes_total" in text


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_the_python_client_compresses_both_ways_with_large_messages(encoding):
    from gateway.client import Client
    from tests.test_client import FAST, next_event, url

    big = {"blob": "b" * (2 << 20), "n": list(range(1000))}  # far over a 32 KB window
    up = {"blob": "u" * (600 << 10)}
    limits = {"max_frame_bytes": 1 << 20, "max_publish_bytes": 1 << 20,
              "max_publication_bytes": 4 << 20, "send_buffer_bytes": 16 << 20}  # fmt: skip
    async with running_gateway(compression=True, **limits) as gw:
        async with Client(url(gw), token=token_for(gw), encoding=encoding, backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            await c.publish("room:1", up)  # compressed by the client, inflated by the gateway
            assert (await next_event(sub)).data == up
            await gw.ctx.node.publish("room:1", json.dumps(big).encode())
            assert (await next_event(sub)).data == big
        compressor = gw.ctx.compressor
        assert compressor is not None and compressor.delivered == 2
        assert compressor.delivered_bytes < compressor.delivered_plain / 100
        # compression=False offers nothing: the same gateway sends plain frames.
        async with Client(url(gw), token=token_for(gw), compression=False, backoff=FAST) as c:
            sub = await c.subscribe("room:1")
            await c.publish("room:1", up)
            assert (await next_event(sub)).data == up
        assert compressor.delivered == 2
