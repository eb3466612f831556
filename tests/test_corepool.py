"""The gateway's HTTP/1.1 client for the core (gateway/corepool.py).

The answer reader is fed bytes with no event loop; the pool talks to a real
Tornado server, or to a raw asyncio server where a misbehaving core is the
point (an answer cut short, a connection closed under a request).
"""

from __future__ import annotations

import asyncio

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gateway.corepool import (
    MAX_BODY,
    ConnectionLost,
    CorePool,
    PoolTimeout,
    ProtocolError,
    ResponseReader,
    request_head,
)

# -- the reader, bytes in, answer out -----------------------------------------------------


def _feed_bytewise(reader: ResponseReader, data: bytes):
    answers = [a for i in range(len(data)) if (a := reader.feed(data[i : i + 1])) is not None]
    return answers


def test_an_answer_with_content_length_arrives_in_any_pieces():
    raw = b'HTTP/1.1 201 Created\r\nETag: "3"\r\nContent-Length: 11\r\n\r\n{"id": 42}\n'
    [answer] = _feed_bytewise(ResponseReader(), raw)
    assert (answer.status, answer.body, answer.keep_alive) == (201, b'{"id": 42}\n', True)
    assert ("ETag", '"3"') in answer.headers
    whole = ResponseReader().feed(raw)
    assert whole is not None and whole.body == answer.body


def test_a_chunked_answer_is_joined_with_extensions_and_trailers_dropped():
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=x\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    [answer] = _feed_bytewise(ResponseReader(), raw)
    assert answer.body == b"hello world"
    assert ResponseReader().feed(raw).body == b"hello world"  # type: ignore[union-attr]


def test_head_204_and_informational_answers_have_no_body():
    head = ResponseReader(no_body=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert head is not None and head.body == b""
    empty = ResponseReader().feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert empty is not None and empty.status == 204
    after_continue = ResponseReader().feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert after_continue is not None and after_continue.body == b"ok"
    many = b"HTTP/1.1 102 Processing\r\n\r\n" * 5000  # no recursion, however many
    last = ResponseReader().feed(many + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert last is not None and last.status == 200


def test_an_answer_the_close_delimits_ends_at_eof_and_is_not_kept_alive():
    reader = ResponseReader()
    assert reader.feed(b"HTTP/1.0 200 OK\r\n\r\npart one, ") is None
    assert reader.feed(b"part two") is None
    answer = reader.feed_eof()
    assert (answer.body, answer.keep_alive) == (b"part one, part two", False)
    closing = ResponseReader().feed(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    assert closing is not None and not closing.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
)
def test_an_answer_cut_short_is_an_error_at_eof(raw):
    reader = ResponseReader()
    assert reader.feed(raw) is None
    with pytest.raises(ProtocolError):
        reader.feed_eof()


@pytest.mark.parametrize(
    "raw",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),  # isdigit()
        "HTTP/1.0 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",  # bytes past the answer
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000,
    ],
)
def test_malformed_answers_are_refused(raw):
    with pytest.raises(ProtocolError):
        ResponseReader().feed(raw)


def test_no_input_can_add_a_header_or_a_request():
    with pytest.raises(ValueError):
        request_head("GET", "/api/x", "core", [("X-Request-Id", "a\r\nX-Evil: 1")], 0)
    head = request_head("GET", "/api/é x\r\nHost: evil", "core:81", [], 0)
    assert head.startswith(b"GET /api/%C3%A9%20x%0D%0AHost:%20evil HTTP/1.1\r\nHost: core:81\r\n")
    assert head.count(b"\r\n") == 3
    post = request_head("POST", "/api/x?a=1&b=%20", "core", [("Content-Type", "json")], 0)
    assert post.endswith(b"Content-Type: json\r\nContent-Length: 0\r\n\r\n")


# -- the pool against a real server -------------------------------------------------------


class _Answer(tornado.web.RequestHandler):
    def initialize(self, state: dict) -> None:
        self.state = state

    def prepare(self) -> None:
        conn = self.request.connection.stream  # type: ignore[union-attr]
        self.state["peers"].add(conn.socket.getpeername()[1])

    async def get(self, what: str) -> None:
        self.state["now"] += 1
        self.state["entered"].put_nowait(what)
        self.state["most"] = max(self.state["most"], self.state["now"])
        try:
            if what == "slow":
                await self.state["go"].wait()
            if what == "chunked":  # a flush before the end: Tornado sends it chunked
                self.write(b'{"part":1,')
                await self.flush()
                self.write(b'"end":true}')
            else:
                self.write(b'{"ok":true}')
        finally:
            self.state["now"] -= 1

    async def post(self, what: str) -> None:
        self.write(self.request.body)


@pytest.fixture
async def server():
    state: dict = {"peers": set(), "now": 0, "most": 0, "go": asyncio.Event()}
    state["entered"] = asyncio.Queue()
    sockets = bind_sockets(0, "127.0.0.1")
    app = tornado.web.Application([(r"/(\w+)", _Answer, {"state": state})])
    http = HTTPServer(app, idle_connection_timeout=0.2)
    http.add_sockets(sockets)
    yield sockets[0].getsockname()[1], state
    http.stop()
    await http.close_all_connections()


async def test_connections_are_kept_alive_and_reused(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=4)
    for _ in range(5):
        answer = await pool.request("GET", "/plain", [("Accept", "application/json")])
        assert (answer.status, answer.body) == (200, b'{"ok":true}')
    posted = await pool.request("POST", "/echo", [], b'{"a":1}')
    assert posted.body == b'{"a":1}'
    assert len(state["peers"]) == 1 and pool.size == 1
    await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=4)
    assert (await pool.request("GET", "/plain", [])).status == 200
    for _ in range(200):  # until the server's idle timeout closed the connection
        if pool.size == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.size == 0
    # Not repeatable, so a dead connection would fail it: a fresh one is used.
    assert (await pool.request("POST", "/echo", [], b"x")).body == b"x"
    assert len(state["peers"]) == 2
    await pool.close()


async def test_a_chunked_answer_arrives_whole(server):
    port, _ = server
    pool = CorePool("127.0.0.1", port, limit=1)
    answer = await pool.request("GET", "/chunked", [])
    assert answer.body == b'{"part":1,"end":true}'
    assert ("Transfer-Encoding", "chunked") in answer.headers
    assert (await pool.request("GET", "/plain", [])).body == b'{"ok":true}'  # still in step
    await pool.close()


async def test_the_pool_never_opens_more_than_its_limit(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=2)
    calls = [asyncio.ensure_future(pool.request("GET", "/slow", [])) for _ in range(6)]
    for _ in range(2):
        await state["entered"].get()
    assert pool.size == 2 and not any(c.done() for c in calls)
    state["go"].set()
    answers = await asyncio.gather(*calls)
    assert [a.status for a in answers] == [200] * 6
    assert state["most"] == 2 and len(state["peers"]) == 2
    await pool.close()


async def test_a_request_given_up_closes_its_connection_and_frees_its_place(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await pool.request("GET", "/slow", [])
    assert pool.size == 0 and pool.in_use == 0  # its answer may still come: not reusable
    state["go"].set()
    assert (await pool.request("GET", "/plain", [])).status == 200
    await pool.close()


async def test_a_deadline_tells_a_wait_for_the_pool_from_a_core_that_is_slow(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=1)
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(pool.request("GET", "/slow", [], deadline=loop.time() + 0.3))
    await state["entered"].get()
    with pytest.raises(PoolTimeout):  # the core was never asked
        await pool.request("GET", "/plain", [], deadline=loop.time() + 0.05)
    with pytest.raises(TimeoutError) as info:  # asked, and it did not answer in time
        await slow
    assert not isinstance(info.value, PoolTimeout)
    assert pool.size == 0 and pool.in_use == 0 and not pool._waiters
    state["go"].set()
    answer = await pool.request("GET", "/plain", [], deadline=loop.time() + 1)
    assert answer.status == 200
    await pool.close()


async def test_waiting_requests_fail_when_the_pool_closes(server):
    port, state = server
    pool = CorePool("127.0.0.1", port, limit=1)
    first = asyncio.ensure_future(pool.request("GET", "/slow", []))
    second = asyncio.ensure_future(pool.request("GET", "/plain", []))
    await state["entered"].get()
    await pool.close()
    for call in (first, second):
        with pytest.raises(ConnectionLost):
            await call


# -- a core that misbehaves ---------------------------------------------------------------


async def _raw_server(answer):
    """A server whose connections run ``answer(reader, writer, nth request on it)``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                n += 1
                if not await answer(reader, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_an_answer_cut_short_is_a_lost_connection_not_an_answer():
    async def cut(reader, writer, n):
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
        await writer.drain()
        return False

    server, port = await _raw_server(cut)
    pool = CorePool("127.0.0.1", port, limit=1)
    with pytest.raises(ConnectionLost) as lost:
        await pool.request("GET", "/x", [], repeatable=True)
    assert lost.value.answered and pool.size == 0
    await pool.close()
    server.close()


async def test_a_reused_connection_closed_under_a_request_is_retried_only_if_harmless():
    async def once_per_connection(reader, writer, n):
        if n > 1:
            return False  # closed without an answer, as a core closing an idle connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    server, port = await _raw_server(once_per_connection)
    pool = CorePool("127.0.0.1", port, limit=1)
    assert (await pool.request("GET", "/x", [])).body == b"ok"
    assert (await pool.request("GET", "/x", [], repeatable=True)).body == b"ok"
    with pytest.raises(ConnectionLost) as lost:
        await pool.request("POST", "/x", [], b"{}", repeatable=False)
    assert not lost.value.answered
    await pool.close()
    server.close()


async def test_bytes_nobody_asked_for_end_the_connection():
    async def chatty(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # unasked: the connection cannot be trusted
        await writer.drain()
        return True

    server, port = await _raw_server(chatty)
    pool = CorePool("127.0.0.1", port, limit=1)
    assert (await pool.request("GET", "/x", [])).body == b"ok"
    for _ in range(200):
        if pool.size == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.size == 0
    await pool.close()
    server.close()
