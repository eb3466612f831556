"""Connections that end while their peer has not read what it was sent.

A peer that reads nothing (a zero window) and ends its side (its FIN, its close
frame, or ``Connection: close``) used to leave what it had not read either to
its connection, held for good, or to an orphan socket that the kernel kept
probing it with for minutes, outside every count. Now such a connection
sends its FIN behind those bytes and is kept until the peer has taken them,
under the rule for a closing socket (`CLOSE_TIMEOUT` rounds) or for an HTTP
answer (``WRITE_TIMEOUT``), and reset when the peer does not read. Raw
sockets with small receive buffers, so that what the peer reads is the
test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.wsclient import client_frame
from gateway.transport import wsconn
from proto.wsframe import OP_CLOSE, close_payload
from tests.harness import KeptAliveClient, running_gateway, token_for
from tests.servers import UNIT
from tests.test_write_timeout import (
    BUNDLE,
    _answer,
    _asking,
    _client,
    _get,
    _reset,
    _reset_within,
    _timeouts,
)
from tests.test_wsconn import Raw

_CHUNK = json.dumps("z" * 60_000).encode()


@contextlib.asynccontextmanager
async def _socket(gw, rcvbuf: int = 4096) -> AsyncIterator[tuple[Raw, socket.socket]]:
    """A subscriber of ``room:big`` on a raw socket whose receive buffer is ``rcvbuf``."""
    sock = _client(rcvbuf)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw)))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    ws = Raw(reader, writer)
    ws.send(client_frame(b'{"op":"sub","ch":"room:big","id":1}'))
    assert (await ws.json())["ok"]
    try:
        yield ws, sock
    finally:
        writer.close()


async def _fill(gw, conn: wsconn.WSConnection, process_too: bool) -> None:
    """Publish on ``room:big`` until the kernel holds frames the peer has not read (and, with
    ``process_too``, until the process holds some as well)."""
    for _ in range(200):
        gw.hub.broadcast("room:big", _CHUNK)
        await asyncio.sleep(0.01)
        if conn.buffered() if process_too else wsconn._unsent(conn.transport):
            return
    raise AssertionError("the peer's window never closed")


@pytest.mark.parametrize("backlog", ["kernel", "process"])
async def test_a_socket_whose_peer_half_closes_and_reads_nothing_is_reset(monkeypatch, backlog):
    # Its FIN, no close frame, and frames it never reads. Before: with a backlog in the
    # process the transport waited for good to send it (the send budget's shedding did
    # nothing to a closing transport, and the heartbeat no longer visits a shed socket:
    # ~1 MB and a descriptor held forever); with the backlog in the kernel only, the
    # socket was closed at once and the kernel kept probing the peer with ~1 MB for minutes.
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.2 * UNIT)
    async with running_gateway() as gw:
        async with _socket(gw) as (_, sock):
            conn = next(iter(gw.hub.connections)).transport
            await _fill(gw, conn, backlog == "process")
            sock.shutdown(socket.SHUT_WR)
            for _ in range(40):  # more for it, whatever it is: shed as a slow consumer
                gw.hub.broadcast("room:big", _CHUNK)
                await asyncio.sleep(0.005)
            assert await _reset_within(sock, 3 * wsconn.CLOSE_TIMEOUT + 1.0 * UNIT)
            assert conn.transport is None and not gw.ctx.coalescer.departed


async def test_a_socket_whose_peer_sends_its_close_and_reads_nothing_is_reset(monkeypatch):
    # The peer's close frame is answered with ours; then the connection used to be closed at
    # once, leaving the frames it had not read (~1 MB here) to an orphan socket for minutes.
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.2 * UNIT)
    async with running_gateway() as gw:
        async with _socket(gw) as (ws, sock):
            conn = next(iter(gw.hub.connections)).transport
            await _fill(gw, conn, False)
            ws.send(client_frame(close_payload(1000, ""), OP_CLOSE))
            assert await _reset_within(sock, 3 * wsconn.CLOSE_TIMEOUT + 1.0 * UNIT)
            assert conn.transport is None


async def test_a_client_with_no_token_that_asks_to_close_and_reads_nothing_is_reset():
    # "Connection: close" on a 1.4 MB file, nothing read: Tornado closed the connection as
    # soon as the kernel had taken the answer, and the kernel kept the orphan (1.4 MB, no
    # descriptor, no count) for minutes.
    timeout = 0.5 * UNIT
    request = _get("/docs/static/swagger-ui-bundle.js").replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
    )
    async with (
        running_gateway(write_timeout=timeout) as gw,
        _asking(gw.port, 4096, request) as sock,
    ):
        await asyncio.sleep(timeout / 2)
        assert not _reset(sock)
        assert await _reset_within(sock, 3 * timeout + 1.0 * UNIT)
        assert _timeouts(gw) == 1
        assert gw.server is not None and gw.server.lingering == 0


async def test_a_slow_reader_that_asked_to_close_gets_the_whole_file_then_its_end():
    timeout = 0.2 * UNIT
    bundle = BUNDLE.read_bytes()
    request = _get("/docs/static/swagger-ui-bundle.js").replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
    )
    async with (
        running_gateway(write_timeout=timeout) as gw,
        _asking(gw.port, 64 * 1024, request) as sock,
    ):
        assert gw.server is not None
        data, lingered = b"", False
        while True:
            await asyncio.sleep(0.02)  # about 64 KiB per 0.02 s: slower than the server
            lingered = lingered or gw.server.lingering == 1
            try:
                chunk = sock.recv(64 * 1024)
            except BlockingIOError:
                continue
            if not chunk:
                break  # the FIN, behind the whole answer
            data += chunk
        assert data.endswith(bundle) and lingered
        assert _timeouts(gw) == 0
        await asyncio.sleep(1.0 * UNIT)  # the listener's next round closes what it kept
        assert gw.server.lingering == 0


async def test_a_kept_alive_rest_client_that_asks_to_close_and_reads_nothing_is_reset(clean_db):
    # The same off Tornado (core/fastrest.py): the transport closed once the kernel had it all.
    timeout = 0.5 * UNIT
    async with running_gateway(**clean_db, write_timeout=timeout) as gw:
        token = token_for(gw, "alice", extra={"role": "admin"})
        big = {
            "name": "\x01" * 200,
            "description": "\x01" * 5000,
            "owner_email": "ada@example.com",
            "budget": 1,
            "starts_on": "2026-01-01",
            "milestones": [{"title": "\x01" * 200, "due": "2026-06-01"}] * 50,
        }
        ada = KeptAliveClient(gw.port, token)
        try:
            for _ in range(3):  # ~96 KB each
                status, _, body = await ada.call("POST", "/api/projects", big)
                assert status == 201, body
        finally:
            ada.close()
        async with _asking(gw.port, 4096, _get("/api/projects?limit=1", token)) as sock:
            status, _ = await _answer(sock)  # read by Tornado; the connection is then adopted
            assert status == 200 and gw.server is not None and gw.server.adopted == 1
            last = _get("/api/projects?limit=3", token).replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
            )
            await asyncio.get_running_loop().sock_sendall(sock, last)
            await asyncio.sleep(timeout / 2)
            assert not _reset(sock)
            assert await _reset_within(sock, 3 * timeout + 1.0 * UNIT)
            assert _timeouts(gw) == 1
