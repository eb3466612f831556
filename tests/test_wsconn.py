"""The lean WebSocket transport at the byte level: what a client on a raw socket sees.

The `websockets` library (used by the other tests) never sends a broken
frame; these tests do, and check the close codes RFC 6455 asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest

from bench.inbound import NullSession
from core.infra.metrics import Metrics
from gateway.hub import Prepared
from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.wsclient import client_frame
from gateway.transport import wsconn
from gateway.transport.wsconn import Coalescer, WSConnection
from proto import CloseCode
from proto.codec import JSON
from proto.wsframe import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    close_frame,
    parse_header,
)
from proto.wsprotocol import MAX_CONTROL_RUN, WSState
from tests.harness import CommandTurns, running_gateway, token_for, until
from tests.servers import UNIT
from tests.test_websocket import shed_one

# -- the transport, over a raw socket -------------------------------------------


class Raw:
    """A client that writes whatever bytes a test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), 5 * UNIT)
        opcode, _, size, n = parse_header(head + b"\x00" * 8)
        if size > 2:
            n = int.from_bytes(await self.reader.readexactly(size - 2), "big")
        return opcode, await self.reader.readexactly(n)

    async def json(self) -> dict:
        opcode, payload = await self.frame()
        assert opcode == OP_TEXT, (opcode, payload)
        return json.loads(payload)

    async def close_code(self) -> int:
        while True:
            opcode, payload = await self.frame()
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big")


@contextlib.asynccontextmanager
async def raw_socket(gw, token: str) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(handshake_request(f"127.0.0.1:{gw.port}", "/ws", token))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()


def _with_first_byte(first: int, payload: bytes) -> bytes:
    """A masked frame with its FIN bit and opcode set by hand (fragments)."""
    return bytes([first]) + client_frame(payload)[1:]


@pytest.fixture
async def gw():
    async with running_gateway(max_frame_bytes=4096) as gateway:
        yield gateway


async def test_commands_split_across_reads_and_fragments_are_answered(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        frame = client_frame(b'{"op":"ping","id":1}')
        for byte in frame:  # one byte per write
            ws.send(bytes([byte]))
            await ws.writer.drain()
        assert (await ws.json()) == {"id": 1, "ok": True}
        # {"op":"ping","id":2} in three fragments: text, continuation, final continuation
        ws.send(_with_first_byte(0x01, b'{"op":'))
        ws.send(_with_first_byte(0x00, b'"ping",'))
        ws.send(_with_first_byte(0x80, b'"id":2}'))
        assert (await ws.json()) == {"id": 2, "ok": True}


async def test_ping_is_answered_with_a_pong_carrying_its_payload(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame(b"are you there", OP_PING))
        assert await ws.frame() == (0xA, b"are you there")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x81\x05hello", 1002),
        (b"\x83\x80\x00\x00\x00\x00", 1002),
        (b"\x81\xfe\x20\x00", 1009),
        (_with_first_byte(0x80, b"orphan continuation"), 1002),
    ],
)
async def test_broken_frames_close_with_the_rfc_code_and_others_live_on(gw, raw, code):
    async with raw_socket(gw, token_for(gw)) as bystander:
        async with raw_socket(gw, token_for(gw)) as ws:
            ws.send(raw)
            assert await ws.close_code() == code
        bystander.send(client_frame(b'{"op":"ping","id":7}'))
        assert (await bystander.json()) == {"id": 7, "ok": True}


async def test_a_flood_of_pings_closes_with_1008_while_another_client_is_answered(gw):
    # Empty pings are 6 bytes: one read of them used to be parsed and answered pong by
    # pong (~43,000 in 256 KiB), keeping the event loop from every other client.
    async with raw_socket(gw, token_for(gw)) as bystander:
        async with raw_socket(gw, token_for(gw)) as ws:
            ws.send(client_frame(b"", OP_PING) * 2000)  # 12 KB, one write (one read)
            assert await ws.close_code() == 1008
            await _eof_within(ws, 1.0)
        bystander.send(client_frame(b"still there?", OP_PING))
        assert await bystander.frame() == (OP_PONG, b"still there?")
        bystander.send(client_frame(b'{"op":"ping","id":7}'))
        assert (await bystander.json()) == {"id": 7, "ok": True}


class _Wire:
    """A transport that keeps what is written and whether it was closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class _Commands(NullSession):
    """A session that records the commands it is given, each taking ``delay`` seconds."""

    def __init__(self, conn: WSConnection, delay: float = 0.0) -> None:
        self.conn, self.delay = conn, delay
        self.handled: list[bytes] = []
        self.most_waiting = 0

    async def handle(self, payload: bytes) -> None:
        waiting = len(self.conn._inbox or ())
        self.most_waiting = max(self.most_waiting, waiting)
        await asyncio.sleep(self.delay)
        self.handled.append(payload)


def _with_session(
    delay: float = 0.0, kind: type[_Commands] = _Commands
) -> tuple[WSConnection, _Wire, _Commands]:
    """A connection on a recording wire, its session a ``kind``, opened."""
    sessions: list[_Commands] = []

    def make(conn: WSConnection) -> _Commands:
        sessions.append(kind(conn, delay))
        return sessions[0]

    conn = WSConnection(b"", JSON, make, Metrics(), 1 << 20, Coalescer())  # type: ignore[arg-type]
    wire = _Wire()
    conn.connection_made(wire)  # type: ignore[arg-type]
    return conn, wire, sessions[0]


async def test_a_read_of_many_commands_waits_unparsed_not_in_an_unbounded_inbox():
    # One 256 KiB read of tiny frames was parsed whole (~80 ms with the loop held), and
    # every message queued: ~32,000 of them, 1.4 MB, past MAX_INBOX.
    conn, wire, session = _with_session(delay=0.001)
    sent = [b"%d" % i for i in range(2000)]
    conn.data_received(b"".join(client_frame(m) for m in sent))
    assert len(conn._inbox or ()) <= wsconn.MAX_INBOX and conn._protocol.held
    assert not wire.reading  # the rest waits in the socket, for the client to be told
    await until(lambda: len(session.handled) == len(sent), timeout=20)
    assert session.handled == sent  # all of them, in order
    assert session.most_waiting <= wsconn.MAX_INBOX
    assert wire.reading and not conn._protocol.held


async def test_one_event_loop_turn_parses_at_most_frames_per_turn_frames():
    conn, wire, session = _with_session()
    pieces = 4 * wsconn.FRAMES_PER_TURN  # one message in one-byte fragments
    data = _with_first_byte(0x01, b"a") + _with_first_byte(0x00, b"b") * (pieces - 2)
    conn.data_received(data + _with_first_byte(0x80, b"c"))
    assert conn._protocol.held and not wire.reading and session.handled == []
    turns = 0
    while not session.handled:
        turns += 1  # other callbacks (other sockets) run between these turns
        await asyncio.sleep(0)
    assert session.handled == [b"a" + b"b" * (pieces - 2) + b"c"]
    assert turns >= 3 and wire.reading


async def test_a_socket_lost_before_its_shedding_is_not_counted_as_departed_forever():
    conn, _, _ = _with_session()
    conn.shed("test")  # leaving the hub waits for the next loop turn
    conn.connection_lost(None)
    await asyncio.sleep(0)
    assert not conn._coalescer.departed
    conn, _, _ = _with_session()
    conn.shed("test")
    await asyncio.sleep(0)
    assert conn._coalescer.departed == {conn}
    conn.connection_lost(None)
    assert not conn._coalescer.departed


class _Instant(_Commands):
    """A session whose commands never wait (a frame that is not JSON, a refused ``pub``,
    an ``unsub`` of a channel not held: each reply is written at once)."""

    async def handle(self, payload: bytes) -> None:
        self.handled.append(payload)


class _Yielding(_Commands):
    """A session where one command in four waits once (a ``pub``, say), the others not."""

    async def handle(self, payload: bytes) -> None:
        if len(self.handled) % 4 == 0:
            await asyncio.sleep(0)
        self.handled.append(payload)


async def test_commands_that_never_wait_do_not_run_a_whole_read_in_one_turn():
    # The inbox was refilled from the held frames inside the command task: a task
    # whose commands never wait parsed and ran all of a read in one loop turn.
    conn, _, session = _with_session(kind=_Instant)
    n = 40 * wsconn.FRAMES_PER_TURN
    conn.data_received(client_frame(b"x") * n)
    most = 0
    for _ in range(10_000):
        if len(session.handled) >= n:
            break
        before = len(session.handled)
        await asyncio.sleep(0)  # one turn of the loop: other sockets run here
        most = max(most, len(session.handled) - before)
    assert len(session.handled) == n
    assert most <= wsconn.FRAMES_PER_TURN + wsconn.MAX_INBOX, most


async def test_a_socket_has_at_most_one_parse_of_held_frames_scheduled(monkeypatch):
    # Each parse stopped by the frame budget scheduled another, and an emptied inbox
    # one more: the chains added up, each parsing FRAMES_PER_TURN frames a turn.
    conn, _, session = _with_session(kind=_Yielding)
    unit = client_frame(b"", OP_PING) * 200 + client_frame(b"x")  # runs under MAX_CONTROL_RUN
    loop = asyncio.get_running_loop()
    scheduled: list[int] = []
    call_soon = loop.call_soon

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(callback, "__func__", None) is WSConnection._parse_held:
            scheduled.append(1)
        return call_soon(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon", counting)
    conn.data_received(unit * 600)
    pending = []
    for _ in range(1000):
        if len(session.handled) >= 600 and not conn._protocol.held:
            break
        scheduled.clear()
        await asyncio.sleep(0)
        pending.append(len(scheduled))
    monkeypatch.undo()
    assert len(session.handled) == 600
    assert max(pending) <= 1, pending


async def test_a_read_of_frames_that_are_not_json_is_spread_over_turns(monkeypatch):
    # A frame that is not JSON fails at once and its error reply waits for nothing.
    # With no rate limit (by default one closes such a client: tests/test_limits.py),
    # all of a read's are answered. Counted: commands per loop turn.
    turns = CommandTurns(monkeypatch)
    async with (
        running_gateway(rate_socket_commands=None) as gw,
        raw_socket(gw, token_for(gw)) as ws,
    ):
        n = 36_000  # one 252 KB write of 7-byte frames

        async def drain() -> None:
            while await ws.reader.read(1 << 20):
                pass

        reader = asyncio.create_task(drain())
        ws.send(client_frame(b"x") * n)
        most = await turns.most_per_turn(lambda: turns.calls >= n)
        reader.cancel()
        assert turns.calls == n
        assert most <= wsconn.FRAMES_PER_TURN + wsconn.MAX_INBOX, most


async def test_thousands_of_commands_in_one_write_are_all_answered_in_order():
    async with running_gateway(rate_socket_commands=None) as gateway:
        async with raw_socket(gateway, token_for(gateway)) as ws:
            n = 5000
            ws.send(b"".join(client_frame(b'{"op":"ping","id":%d}' % i) for i in range(n)))
            for i in range(n):
                assert (await ws.json()) == {"id": i, "ok": True}
            ws.send(client_frame(b"after", OP_PING))
            assert await ws.frame() == (OP_PONG, b"after")


async def test_pongs_to_the_heartbeat_and_pings_after_a_pause_start_a_new_control_run():
    conn = WSConnection(b"", JSON, lambda c: None, Metrics(), 1 << 20, Coalescer())  # type: ignore
    wire = conn.transport = _Wire()
    pong = client_frame(b"", 0xA)
    for _ in range(3):  # each heartbeat ping of ours starts a new run
        conn.heartbeat(time.monotonic(), 100.0)
        conn.data_received(pong * (MAX_CONTROL_RUN - 1))
    assert wire.written.count(wsconn._PING) == 3
    for _ in range(3):  # so does a pause of the client's (its own keep-alive pings)
        conn._last_seen -= wsconn.CONTROL_QUIET
        conn.data_received(client_frame(b"", OP_PING) * (MAX_CONTROL_RUN - 1))
    assert conn._protocol.state is WSState.OPEN and not wire.closed
    conn.data_received(pong * 2)  # neither: past the run
    assert conn._protocol.close_code == 1008 and wire.closed
    assert wire.written[-1].startswith(b"\x88") and wire.written[-1][2:4] == b"\x03\xf0"
    if conn._timer is not None:
        conn._timer.cancel()


async def test_client_close_is_echoed_and_the_connection_leaves_the_hub(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        await asyncio.sleep(0.05)
        assert gw.hub.connection_count() == 1
        ws.send(client_frame((1000).to_bytes(2, "big") + b"bye", OP_CLOSE))
        assert await ws.close_code() == 1000
    for _ in range(100):
        if gw.hub.connection_count() == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.hub.connection_count() == 0


async def _status(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    body = await reader.readexactly(length)
    writer.close()
    return int(head[9:12]), body


async def test_requests_that_are_not_upgrades_get_json_errors(gw):
    token = token_for(gw)
    host = f"127.0.0.1:{gw.port}"
    plain = f"GET /ws HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    status, body = await _status(gw.port, plain)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    old = handshake_request(host, "/ws", token).replace(b"Version: 13", b"Version: 8")
    status, body = await _status(gw.port, old)
    assert status == 426


async def test_a_full_process_refuses_new_sockets_with_503():
    async with running_gateway(max_connections=2) as gw:
        async with raw_socket(gw, token_for(gw)), raw_socket(gw, token_for(gw)):
            request = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
            status, body = await _status(gw.port, request)
            assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"
        for _ in range(100):  # once one leaves, a new one gets in
            if gw.hub.connection_count() < 2:
                break
            await asyncio.sleep(0.02)
        async with raw_socket(gw, token_for(gw)) as ws:
            ws.send(client_frame(b'{"op":"ping","id":1}'))
            assert (await ws.json()) == {"id": 1, "ok": True}


async def test_a_shed_socket_counts_against_max_connections_until_its_tcp_connection_ends():
    # A shed slow consumer leaves the hub at once but holds its file descriptor (and its
    # backlog) while it reads on, a minute at most: counting only hub members let a
    # client that gets itself shed and reconnects hold descriptors past MAX_CONNECTIONS.
    settings = {"max_connections": 2, "send_buffer_total_bytes": 2 << 20}
    async with running_gateway(**settings) as gw:
        request = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        async with raw_socket(gw, token_for(gw)) as slow:
            slow.send(client_frame(b'{"op":"sub","ch":"room:big","id":1}'))
            assert (await slow.json())["ok"]
            await shed_one(gw, "room:big")  # it reads nothing meanwhile
            await until(lambda: gw.hub.connection_count() == 0)
            async with raw_socket(gw, token_for(gw)):
                status, body = await _status(gw.port, request)
                assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"
        await until(lambda: not gw.ctx.coalescer.departed)  # the slow one's connection ended
        async with raw_socket(gw, token_for(gw)) as ws:
            ws.send(client_frame(b'{"op":"ping","id":1}'))
            assert (await ws.json()) == {"id": 1, "ok": True}


async def test_publications_queued_in_one_iteration_go_out_in_order(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame(b'{"op":"sub","ch":"room:1","id":1}'))
        assert (await ws.json())["ok"]
        for i in range(200):  # more than one write's worth, all in one loop iteration
            gw.hub.broadcast("room:1", b"%d" % i)
        seen = [(await ws.json())["data"] for _ in range(200)]
        assert seen == list(range(200))


async def test_a_close_code_no_endpoint_may_send_is_answered_with_1002(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame((1006).to_bytes(2, "big"), OP_CLOSE))  # reserved for "no close frame"
        assert await ws.close_code() == 1002


def test_close_reasons_are_cut_without_splitting_a_character():
    frame = close_frame(4000, "é" * 100)  # 200 bytes of UTF-8
    reason = frame[4:]
    assert len(reason) <= 123 and reason.decode() == "é" * 61


async def _eof_within(ws: Raw, seconds: float) -> None:
    """The server closed the TCP connection within ``seconds`` (what is left unread is skipped)."""
    async with asyncio.timeout(seconds):
        while await ws.reader.read(65536):
            pass


async def test_invalid_utf8_fails_with_1007_and_the_tcp_connection_is_closed_at_once(gw):
    async with raw_socket(gw, token_for(gw)) as bystander:
        bystander.send(client_frame(b'{"op":"sub","ch":"room:u","id":1}'))
        assert (await bystander.json())["ok"]
        async with raw_socket(gw, token_for(gw)) as ws:
            ws.send(client_frame(b'{"op":"ping","id":"\xed\xa0\x80"}'))
            assert await ws.close_code() == 1007
            await _eof_within(ws, 1.0)  # CLOSE_TIMEOUT is 5 s: not waited for
        gw.hub.broadcast("room:u", b"1")
        assert (await bystander.json())["data"] == 1


async def test_commands_before_a_violation_in_the_same_write_are_answered_first(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(
            client_frame(b'{"op":"ping","id":1}')
            + client_frame(b'{"op":"ping","id":2}')
            + b"\x83\x80abcd"
        )
        assert (await ws.json()) == {"id": 1, "ok": True}
        assert (await ws.json()) == {"id": 2, "ok": True}
        assert await ws.close_code() == 1002
        await _eof_within(ws, 1.0)


async def test_a_peers_close_with_1005_is_refused_and_a_valid_one_ends_the_tcp_connection(gw):
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame((1005).to_bytes(2, "big"), OP_CLOSE))
        assert await ws.close_code() == 1002
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame((3123).to_bytes(2, "big") + "motivo ✓".encode(), OP_CLOSE))
        assert await ws.close_code() == 3123
        await _eof_within(ws, 1.0)
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame((1000).to_bytes(2, "big") + b"\xff", OP_CLOSE))
        assert await ws.close_code() == 1007


async def test_commands_before_the_peers_close_in_the_same_write_are_answered_first(
    gw, monkeypatch
):
    # Reading stops while the command before the close frame runs; the gateway's FIN
    # follows its answers. The client's own FIN then ends the connection: it does not
    # hold its place in the hub (and a shutdown) until CLOSE_TIMEOUT.
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 60 * UNIT)
    async with raw_socket(gw, token_for(gw)) as ws:
        ws.send(
            client_frame(b'{"op":"ping","id":1}')
            + client_frame((1000).to_bytes(2, "big"), OP_CLOSE)
        )
        assert (await ws.json()) == {"id": 1, "ok": True}
        assert await ws.close_code() == 1000
        await _eof_within(ws, 1.0)
    await until(lambda: gw.hub.connection_count() == 0, timeout=10 * UNIT)


async def test_a_peer_gone_as_the_close_frame_goes_out_is_let_go_at_once(gw, monkeypatch):
    # The client's FIN is in before the gateway's close frame goes out; its kernel
    # answers the frame with a reset. Nothing sent can reach it any more, though the
    # kernel still counts those bytes as unacknowledged: it is let go then, not a
    # CLOSE_TIMEOUT later (a shutdown closing it waited that long for it).
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 60 * UNIT)
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.setblocking(False)
    await loop.sock_sendall(sock, handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw)))
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5 * UNIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    await until(lambda: gw.hub.connection_count() == 1)
    (member,) = gw.hub.connections
    sock.close()  # the FIN reaches the gateway's kernel before the loop reads it
    member.close(CloseCode.SHUTDOWN)
    await until(lambda: gw.hub.connection_count() == 0, timeout=10 * UNIT)


async def test_a_frame_sent_before_the_clients_close_does_not_end_the_tcp_connection(gw):
    # Once the gateway's close frame is out, a frame the client sent before seeing it (a
    # ping, a command in flight) is ignored: the gateway waits for the client's close frame.
    async with raw_socket(gw, token_for(gw)) as ws:
        await until(lambda: gw.hub.connection_count() == 1)
        (member,) = gw.hub.connections
        member.close(CloseCode.SHUTDOWN)
        assert await ws.close_code() == CloseCode.SHUTDOWN
        ws.send(client_frame(b"still here", OP_PING) + client_frame(b'{"op":"ping","id":1}'))
        await ws.writer.drain()
        eof = asyncio.ensure_future(ws.reader.read(65536))
        done, _ = await asyncio.wait({eof}, timeout=0.5 * UNIT)
        assert not done, "the gateway closed the TCP connection before the client's close"
        ws.send(client_frame((1000).to_bytes(2, "big"), OP_CLOSE))
        await ws.writer.drain()
        assert await asyncio.wait_for(eof, 2 * UNIT) == b""  # no pong, no reply: then the end


async def test_a_slow_consumer_whose_backlog_all_reached_its_kernel_reads_it_to_the_close(
    monkeypatch,
):
    # Everything queued, the close frame too, is in the client's kernel while the client
    # still reads through it: a reset would throw that away (the client would see 1006).
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.3 * UNIT)  # far less than the reading takes
    settings = {"send_buffer_bytes": 64 << 20, "send_buffer_total_bytes": 2 << 20}
    async with running_gateway(**settings) as gw, raw_socket(gw, token_for(gw)) as ws:
        ws.send(client_frame(b'{"op":"sub","ch":"room:big","id":1}'))
        assert (await ws.json())["ok"]
        await shed_one(gw, "room:big")  # it reads nothing meanwhile
        started, n = asyncio.get_running_loop().time(), 0
        while (frame := await ws.frame())[0] != OP_CLOSE:  # no reset, no EOF before the close
            n += 1
            await asyncio.sleep(0.02 * UNIT)  # a slow reader, but a reader
        took = asyncio.get_running_loop().time() - started
        assert int.from_bytes(frame[1][:2], "big") == CloseCode.SLOW_CONSUMER, n
        assert took > 2 * wsconn.CLOSE_TIMEOUT, "the reading must outlast the close timeout"


class _Backlog:
    """A socket as the send budget sees it, recording what the budget did to it."""

    def __init__(self, size: int, closing: bool = False) -> None:
        self.size, self.closing, self.ended = size, closing, ""

    def buffered(self) -> int:
        return 0 if self.ended == "dropped" else self.size

    def shed(self, why: str) -> None:
        self.ended, self.closing = "shed", True

    def abort(self) -> None:
        self.ended, self.closing = "dropped", True


def test_the_send_budget_ends_the_largest_backlogs_first_open_or_closing():
    # Closing sockets (shed earlier, their peers reading nothing) hold most of the budget; a
    # reader a moment behind must not be shed for it: that would free nothing.
    coalescer = Coalescer(budget=100)
    big, old_big, old_small, reader = (
        _Backlog(70), _Backlog(60, closing=True), _Backlog(50, closing=True), _Backlog(5),
    )  # fmt: skip
    coalescer._backlogged.update([big, old_big, old_small, reader])
    assert coalescer.check_budget(0.0) == 1
    assert (big.ended, old_big.ended, old_small.ended, reader.ended) == ("shed", "dropped", "", "")
    assert coalescer.buffered == 185
    big.size = 0  # its peer read on; the rest fit
    assert coalescer.check_budget(0.2) == 0 and reader.ended == ""


class _Stalled:
    """A transport whose peer reads nothing, holding what it is given as the event loop's does.

    uvloop's (like asyncio's since 3.12) keeps a reference to every object
    written until its last byte is sent, a partly sent one whole; nothing
    here is ever sent.
    """

    def __init__(self) -> None:
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.held.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.held.extend(data)

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.held))


async def test_backlogs_fed_the_same_publications_hold_them_once_not_once_per_socket():
    # Publications reaching a loop that lags come several at a time; each socket's were
    # joined into one write, its own copy: 300 stalled sockets held 300 copies of what the
    # send budget, summing each socket's unsent bytes, took for shared frames.
    coalescer, metrics = Coalescer(budget=1 << 30), Metrics()
    conns = []
    for _ in range(50):
        conn = WSConnection(b"", JSON, lambda c: None, metrics, 1 << 20, coalescer)  # type: ignore
        conn.transport = _Stalled()
        conns.append(conn)

    def held() -> int:  # distinct objects: a frame shared by many backlogs is held once
        return sum(
            len(obj) for obj in {id(obj): obj for c in conns for obj in c.transport.held}.values()
        )

    async def publish(n: int) -> int:
        batch = [Prepared("room:1", b'"%s"' % (b"x" * 4096)) for _ in range(n)]
        for prepared in batch:
            for conn in conns:
                conn.deliver(prepared, JSON)
        await asyncio.sleep(0)  # the coalescer's flush, at the end of this iteration
        return sum(len(p.ws_frame(JSON)) for p in batch)

    await publish(4)  # sockets with no backlog yet: one joined write each, as before
    first, queued = held(), sum(c.buffered() for c in conns)
    assert first == queued > 0  # joined: each socket's own copy
    published = sum([await publish(4) for _ in range(9)])
    assert sum(c.buffered() for c in conns) - queued == 50 * published  # what the budget counts
    assert held() - first == published  # what memory holds: each frame once
