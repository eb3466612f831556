"""``WRITE_TIMEOUT``: an HTTP answer whose client stops taking it does not hold its connection.

A client (with no token, or an ordinary account's) asks for something larger
than the kernel's buffers and then reads nothing, or a few bytes at a time:
before, its connection, a file descriptor and up to the answer's bytes were
held for as long as the client liked, outside every connection count. Now,
once the process holds bytes the socket would not take, the client must take
`WRITE_PROGRESS` bytes within each ``WRITE_TIMEOUT`` (or all that is left),
or the connection is reset. A slow reader that keeps reading is served whole.
Raw sockets with small receive buffers, so that what the client reads is the
test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

from openapi_ui_bundles import swagger_ui

from bench.answers import LARGE_PROJECT
from core.infra.listener import WRITE_PROGRESS
from tests.harness import ApiClient, KeptAliveClient, running_gateway, token_for, until
from tests.servers import UNIT

BUNDLE = Path(swagger_ui.static_path) / "swagger-ui-bundle.js"  # ~1.4 MB, for anyone
_TCP_CLOSE = 7  # tcpi_state of a connection the peer reset


def _client(rcvbuf: int) -> socket.socket:
    """A non-blocking TCP socket whose receive buffer is ``rcvbuf`` (no autotuning)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def _asking(port: int, rcvbuf: int, requests: bytes) -> AsyncIterator[socket.socket]:
    """A connection with a receive buffer of ``rcvbuf`` that has sent ``requests``."""
    sock = _client(rcvbuf)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, requests)
        yield sock
    finally:
        sock.close()


def _get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def _reset(sock: socket.socket) -> bool:
    """Whether the server reset ``sock`` (read without reading a byte: TCP_INFO's state)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return struct.unpack("B", info[:1])[0] == _TCP_CLOSE


async def _reset_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _reset(sock):
            return True
        await asyncio.sleep(0.02)
    return _reset(sock)


async def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """Read one whole answer (status, body) off ``sock`` (and drop what came behind it)."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        data += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5 * UNIT)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])  # fmt: skip
    while len(body) < length:
        body += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5 * UNIT)
    return int(head.split()[1]), body[:length]


def _timeouts(gw: object) -> float:
    registry = gw.ctx.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("gateway_write_timeouts_total") or 0.0


#: Pipelined requests for the bundle: more than the kernel's send buffer (up to 4 MB) holds.
PIPELINED = 4


async def test_a_client_with_no_token_that_reads_nothing_of_large_files_is_reset():
    timeout = 0.5 * UNIT
    async with (
        running_gateway(write_timeout=timeout) as gw,
        _asking(gw.port, 4096, _get("/docs/static/swagger-ui-bundle.js") * PIPELINED) as sock,
    ):
        await asyncio.sleep(timeout / 2)
        assert not _reset(sock)  # it is served while it could take bytes
        assert await _reset_within(sock, 3 * timeout + 1.0 * UNIT)
        assert _timeouts(gw) == 1
        # Everyone else is served as before.
        anyone = ApiClient(gw.port, None)
        try:
            assert (await anyone.call("GET", "/healthz"))[0] == 200
        finally:
            anyone.close()


async def test_an_answer_left_unread_in_the_kernel_is_reset_at_the_header_timeout():
    # One bundle fits the kernel's send buffer: the process holds nothing, and the
    # connection waits for its next request. Closed at HEADER_TIMEOUT as ever, but with a
    # reset: a plain close left the kernel probing the client with ~1.4 MB for minutes.
    header_timeout = 0.5 * UNIT
    async with (
        running_gateway(header_timeout=header_timeout) as gw,
        _asking(gw.port, 4096, _get("/docs/static/swagger-ui-bundle.js")) as sock,
    ):
        assert await _reset_within(sock, 3 * header_timeout + 1.0 * UNIT)
        assert _timeouts(gw) == 0  # not a write timeout: the idle one


async def test_a_slow_reader_that_keeps_reading_gets_every_file_whole():
    timeout = 0.2 * UNIT
    bundle = BUNDLE.read_bytes()
    async with (
        running_gateway(write_timeout=timeout) as gw,
        _asking(gw.port, 64 * 1024, _get("/docs/static/swagger-ui-bundle.js") * PIPELINED) as sock,
    ):
        assert gw.server is not None
        data = b""
        stalled = 0  # reads during which the process held bytes it could not send
        while data.count(bundle) < PIPELINED:
            # About WRITE_PROGRESS per 0.02 s: slower than the server, but on the move.
            await asyncio.sleep(0.02)
            stalled += bool(gw.server._stalled)
            try:
                chunk = sock.recv(WRITE_PROGRESS)
            except BlockingIOError:
                continue
            assert chunk, f"closed after {len(data)} bytes"
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == PIPELINED
        assert stalled * 0.02 > 2 * timeout  # the answers did wait on it for several deadlines
        assert _timeouts(gw) == 0


async def _large_projects(gw: object, count: int = 100) -> str:
    """Create ``count`` large projects (a page of 100 is ~9.6 MB); an admin's token."""
    token = token_for(gw, "alice", extra={"role": "admin"})  # type: ignore[arg-type]
    ada = KeptAliveClient(gw.port, token)  # type: ignore[attr-defined]
    try:
        for _ in range(count):
            status, _, body = await ada.call("POST", "/api/projects", LARGE_PROJECT)
            assert status == 201, body
    finally:
        ada.close()
    return token


async def test_a_kept_alive_rest_client_that_stops_reading_a_large_page_is_reset(clean_db):
    timeout = 0.5 * UNIT
    async with running_gateway(**clean_db, write_timeout=timeout) as gw:
        token = await _large_projects(gw)
        loop = asyncio.get_running_loop()
        async with _asking(gw.port, 4096, _get("/api/projects?limit=1", token)) as sock:
            status, body = await _answer(sock)  # read by Tornado; the connection is then adopted
            assert status == 200 and len(json.loads(body)["items"]) == 1
            assert gw.server is not None and gw.server.adopted == 1
            await loop.sock_sendall(sock, _get("/api/projects?limit=100", token))  # ~9.6 MB
            await asyncio.sleep(timeout / 2)
            assert not _reset(sock)
            assert await _reset_within(sock, 3 * timeout + 1.0 * UNIT)
            assert _timeouts(gw) == 1
            assert gw.server.adopted == 0


def _answers_buffered(gw: object) -> float:
    registry = gw.ctx.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("gateway_answer_buffered_bytes") or 0.0


async def test_slow_readers_of_large_answers_are_reset_the_largest_first_past_the_budget(
    clean_db,
):
    # An ordinary account (any reader of the projects) asks a ~9.6 MB page on several
    # connections and takes none of it, within WRITE_TIMEOUT's leave for a slow reader:
    # each held ~6.6 MB in the process for as long as it liked, 40 of them 313 MB.
    # ANSWER_BUFFER_TOTAL_BYTES bounds them all: past it the largest are reset.
    budget = 16 << 20
    async with running_gateway(
        **clean_db, write_timeout=60 * UNIT, answer_buffer_total_bytes=budget
    ) as gw:
        await _large_projects(gw)
        reader = token_for(gw, "bob")
        assert gw.server is not None
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            socks = []
            for kept_alive in (False, True, False, True, False, True):
                first = "/api/projects?limit=1" if kept_alive else "/api/projects?limit=100"
                sock = await stack.enter_async_context(_asking(gw.port, 4096, _get(first, reader)))
                if kept_alive:  # the page on an adopted connection (core/fastrest.py)
                    status, _ = await _answer(sock)
                    assert status == 200
                    await loop.sock_sendall(sock, _get("/api/projects?limit=100", reader))
                socks.append(sock)
            # A reader with an ordinary answer, a moment behind, is not among the largest.
            small = await stack.enter_async_context(
                _asking(gw.port, 4096, _get("/api/projects?limit=1", reader) * 64)
            )
            await until(lambda: sum(map(_reset, socks)) >= 3, 10 * UNIT)
            await asyncio.sleep(0.3)  # (a check every 0.1 s at most)
            held = _answers_buffered(gw)
            assert 0 < held <= budget
            reset = sum(map(_reset, socks))
            assert 3 <= reset < len(socks)
            # Each answer knows whom it serves (the budget cuts the client holding the most),
            # on Tornado's streams and on adopted connections alike.
            stalled = gw.server._stalled  # type: ignore[union-attr]
            assert stalled and {conn.client() for conn in stalled} == {"127.0.0.1"}
            assert (
                gw.ctx.metrics.registry.get_sample_value("gateway_answer_budget_resets_total")
                == reset
            )
            assert _timeouts(gw) == 0  # not the deadline: the budget
            assert not _reset(small)
            status, body = await _answer(small)
            assert status == 200 and len(json.loads(body)["items"]) == 1
            # Everyone else is served as before.
            anyone = ApiClient(gw.port, reader)
            try:
                assert (await anyone.call("GET", "/api/projects?limit=1"))[0] == 200
            finally:
                anyone.close()


def _forwarded(path: str, token: str, client: str, close: bool = False) -> bytes:
    """A request for ``path`` as a trusted reverse proxy sends it for ``client``."""
    more = f"X-Forwarded-For: {client}\r\n" + ("Connection: close\r\n" if close else "")
    return _get(path, token).replace(b"\r\n\r\n", f"\r\n{more}\r\n".encode())


async def test_behind_a_reverse_proxy_the_budget_resets_the_client_holding_the_most(clean_db):
    # Behind an HTTP reverse proxy every connection comes from the proxy's address: the
    # budget saw one client, and reset the largest answers whoever asked them. One client
    # asking pages of ~5.8 MB on eight connections got another's one ~9.6 MB answer reset
    # first. Now each answer serves the client the trusted proxy forwarded.
    budget = 16 << 20
    async with running_gateway(
        **clean_db,
        write_timeout=60 * UNIT,
        answer_buffer_total_bytes=budget,
        trusted_proxies=("127.0.0.0/8",),
    ) as gw:
        await _large_projects(gw)
        reader = token_for(gw, "bob")
        assert gw.server is not None
        loop = asyncio.get_running_loop()
        page = "/api/projects?limit=60"
        async with contextlib.AsyncExitStack() as stack:
            many = []
            for kept_alive in (False, True) * 4:
                # Tornado's stream answers a request that closes; a kept-alive connection's
                # second request is read off Tornado (core/fastrest.py).
                first = _forwarded("/api/projects?limit=1" if kept_alive else page, reader,
                                   "203.0.113.9", close=not kept_alive)  # fmt: skip
                sock = await stack.enter_async_context(_asking(gw.port, 4096, first))
                if kept_alive:
                    status, _ = await _answer(sock)
                    assert status == 200
                    await loop.sock_sendall(sock, _forwarded(page, reader, "203.0.113.9"))
                many.append(sock)
            # Another client's one larger answer, the first on its (adopted) connection.
            other = await stack.enter_async_context(
                _asking(
                    gw.port, 4096, _forwarded("/api/projects?limit=100", reader, "198.51.100.7")
                )
            )
            await until(lambda: any(map(_reset, many)), 10 * UNIT)
            await asyncio.sleep(0.3)  # (a check every 0.1 s at most)
            assert 0 < _answers_buffered(gw) <= budget
            assert not _reset(other), (
                "another client's answer was reset for the one holding the most"
            )
            # Those of the eight left (on both paths) serve the client, not the proxy.
            stalled = gw.server._stalled  # type: ignore[union-attr]
            assert {conn.client() for conn in stalled} <= {"203.0.113.9", "198.51.100.7"}
            status, body = await _answer(other)
            assert status == 200 and len(json.loads(body)["items"]) == 100
