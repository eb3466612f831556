"""A lean HTTP/1.1 client for the REST core: a bounded pool of keep-alive connections.

aiohttp cost the gateway about as much CPU per forwarded request as the
core spends serving it (bench/proxy.py; flame graphs in bench/results/):
its request and response objects, header multidicts, timeout handles and
stream readers are general-purpose machinery the hop does not need. The
core is one known peer that answers JSON with ``Content-Length`` (Tornado),
so the hop here is: one pre-serialized request head and the body written
with one ``transport.write``, and an `asyncio.Protocol` whose `ResponseReader`
cuts the answer out of the bytes received (``Content-Length``, chunked, or
until the close, as HTTP/1.1 allows) with no copy of the body beyond the
slice.

The pool holds at most ``limit`` connections (open or opening); a request
beyond waits for one to be released (or closed), FIFO. A connection is
reused while the core keeps it alive, for at most ``max_age`` seconds from
its opening (so that core pods added under load get their share), and not
after ``idle`` seconds unused: the core closes an idle connection after
its ``HEADER_TIMEOUT`` (10 s), and one closed under a request is a lost
request. If a reused connection dies before any byte of the answer came
back, the request is sent again on a new connection when ``repeatable``
(the caller's rule: the method or an Idempotency-Key), like Go's
``net/http``; otherwise `ConnectionLost` says whether anything was received.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
from collections.abc import Callable
from typing import Protocol, cast
from urllib.parse import quote

__all__ = [
    "Answer",
    "ConnectionLost",
    "CoreConnection",
    "CorePool",
    "PoolTimeout",
    "ProtocolError",
    "Reader",
    "ResponseReader",
    "head_end",
    "request_head",
]

#: An answer's head (status line and headers) may be at most this long.
MAX_HEAD = 65536
#: An answer's body may be at most this long (the core's pages are far smaller).
MAX_BODY = 64 * 1024 * 1024

_NO_BODY = frozenset({204, 304})
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: Bytes a request target may carry as they are; anything else is percent-encoded.
_TARGET_SAFE = "/?&=%:@!$'()*+,;~-._"
_UNSAFE_TARGET = re.compile(r"[^A-Za-z0-9/?&=%:@!$'()*+,;~\-._]")
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}")


class ProtocolError(Exception):
    """The peer's bytes are not an HTTP/1.1 answer this client accepts."""


class ConnectionLost(ConnectionError):
    """The connection ended before the whole answer came; ``answered``: some bytes did."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class PoolTimeout(TimeoutError):
    """The deadline passed while the request waited for a connection of the pool.

    The core was not asked: every connection the pool may hold was busy
    (with other requests, perhaps slow ones, which count for themselves).
    """


class Answer:
    """A whole HTTP answer: status, headers as sent (name, value), body, and keep-alive."""

    __slots__ = ("body", "headers", "keep_alive", "status")

    def __init__(
        self, status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


def request_head(
    method: str, target: str, host: str, headers: list[tuple[str, str]], length: int
) -> bytes:
    """The request line and headers, ready to write; ValueError for a value that cannot be sent.

    A target with anything but URL characters is percent-encoded (an rpc
    frame's path is any string); a header value with a control character
    (CR and LF above all) is refused, so no input can add a header or a
    second request.
    """
    if _UNSAFE_TARGET.search(target) is not None:
        target = quote(target, safe=_TARGET_SAFE, encoding="utf-8", errors="strict")
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers:
        if _UNSAFE_VALUE.search(value) is not None:
            raise ValueError(f"header {name} has a control character")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n" if length or method in _WITH_BODY else "\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header value is not Latin-1") from None


_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class Reader(Protocol):
    """What cuts one answer out of a connection's bytes (`ResponseReader`, or a caller's own)."""

    @property
    def started(self) -> bool: ...

    def feed(self, data: bytes) -> object | None:
        """The answer once whole, else None; `ProtocolError` for bytes that are no answer."""

    def feed_eof(self) -> object:
        """The answer the close ends; `ProtocolError` when it was cut short."""


def head_end(buf: bytes) -> int:
    """Where the answer head at the start of ``buf`` ends (its blank line), -1 if not in yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0 and len(buf) > MAX_HEAD:
        raise ProtocolError("answer head too long")
    return end


class ResponseReader:
    """Cuts one HTTP/1.1 answer out of the bytes fed to it; no I/O.

    `feed` returns the `Answer` once whole (bytes past it are an error: the
    client sends one request at a time), `feed_eof` the answer a close
    delimits; both raise `ProtocolError` for anything malformed or too large.
    Informational (1xx) answers are skipped.
    """

    __slots__ = ("_body_left", "_buf", "_chunks", "_head", "_mode", "_no_body")

    def __init__(self, no_body: bool = False) -> None:
        self._buf = b""
        self._no_body = no_body  # the request was HEAD
        self._head: tuple[int, list[tuple[str, str]], bool] | None = None
        self._mode = ""  # "length", "chunked" or "close", once the head is in
        self._body_left = 0
        self._chunks: list[bytes] = []

    @property
    def started(self) -> bool:
        return bool(self._buf) or self._head is not None

    def feed(self, data: bytes) -> Answer | None:
        buf = self._buf + data if self._buf else data
        while self._head is None:
            end = head_end(buf)
            if end < 0:
                self._buf = buf
                return None
            status, headers, keep_alive, length, chunked = _parse_head(buf[:end])
            buf = buf[end + 4 :]
            if status < 200:  # informational: the answer follows
                continue
            self._head = (status, headers, keep_alive)
            if self._no_body or status in _NO_BODY:
                self._mode, self._body_left = "length", 0
            elif chunked:
                self._mode = "chunked"
            elif length is not None:
                self._mode, self._body_left = "length", length
            else:
                self._mode = "close"
        if self._mode == "length":
            if len(buf) < self._body_left:
                self._buf = buf
                return None
            if len(buf) > self._body_left:
                if not (self._no_body and not self._head[2]):
                    raise ProtocolError("bytes past the answer")
                # A body to a HEAD, then the close (a server's refusal of a head
                # over its limit): nothing follows on this connection to misread.
                buf = b""
            self._buf = b""
            return self._answer(buf)
        if self._mode == "chunked":
            return self._chunked(buf)
        self._chunks.append(buf)
        self._buf = b""
        if sum(map(len, self._chunks)) > MAX_BODY:
            raise ProtocolError("answer body too long")
        return None

    def feed_eof(self) -> Answer:
        """The answer when the close ends it; ProtocolError when the answer was cut short."""
        if self._head is None or self._mode != "close":
            raise ProtocolError("connection closed in the middle of an answer")
        answer = self._answer(b"".join(self._chunks))
        answer.keep_alive = False
        return answer

    def _answer(self, body: bytes) -> Answer:
        assert self._head is not None
        status, headers, keep_alive = self._head
        return Answer(status, headers, body, keep_alive)

    def _chunked(self, buf: bytes) -> Answer | None:
        while True:
            if self._body_left < 0:  # the trailer section, after the last chunk
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                if end == 0:
                    if len(buf) > 2:
                        raise ProtocolError("bytes past the answer")
                    self._buf = b""
                    return self._answer(b"".join(self._chunks))
                buf = buf[end + 2 :]
                continue
            if self._body_left == 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    break
                size = buf[:end].partition(b";")[0].strip()
                if _CHUNK_SIZE.fullmatch(size) is None:
                    raise ProtocolError("bad chunk size")
                self._body_left = int(size, 16)
                buf = buf[end + 2 :]
                if self._body_left == 0:
                    self._body_left = -1
                    continue
                self._body_left += 2  # the chunk's own CRLF
                if sum(map(len, self._chunks)) + self._body_left > MAX_BODY:
                    raise ProtocolError("answer body too long")
            if len(buf) < self._body_left:
                break
            chunk, buf = buf[: self._body_left], buf[self._body_left :]
            if chunk[-2:] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            self._chunks.append(chunk[:-2])
            self._body_left = 0
        self._buf = buf
        return None


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]], bool, int | None, bool]:
    """Status, headers, keep-alive, Content-Length and chunked of an answer's head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or len(code) != 3
        or not (code.isascii() and code.isdigit())
    ):
        raise ProtocolError("bad status line")
    keep_alive = version == "HTTP/1.1"
    length: int | None = None
    chunked = False
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise ProtocolError("bad header line")
        value = value.strip()
        low = name.lower()
        if low == "content-length":  # ASCII digits: isdigit() admits "²", which int() refuses
            if _DIGITS.fullmatch(value) is None or (length is not None and int(value) != length):
                raise ProtocolError("bad Content-Length")
            length = int(value)
            if length > MAX_BODY:
                raise ProtocolError("answer body too long")
        elif low == "transfer-encoding":
            chunked = value.lower() == "chunked"
            if not chunked:
                raise ProtocolError("unsupported Transfer-Encoding")
        elif low == "connection":
            tokens = {t.strip().lower() for t in value.split(",")}
            keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
        headers.append((name, value))
    return int(code), headers, keep_alive, None if chunked else length, chunked


class CoreConnection(asyncio.Protocol):
    """One connection to the core: one request at a time.

    The answer goes to a future (`send`) or to a callback (`forward`, for a
    caller that runs no task per request: gateway/passthrough.py).
    """

    def __init__(self, pool: CorePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.reader: Reader | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.sink: Callable[[object], None] | None = None
        self.born = time.monotonic()
        self.used = self.born
        self.reused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, head: bytes, body: bytes, no_body: bool) -> asyncio.Future[Answer]:
        self._write(head, body, ResponseReader(no_body))
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def forward(self, data: bytes, reader: Reader, sink: Callable[[object], None]) -> None:
        """Send a request (``data``, head and body); ``sink`` is called once, later, with what
        ``reader`` cut out of the answer, or the exception that ended the wait for it."""
        self._write(data, b"", reader)
        self.sink = sink

    def detach(self) -> None:
        """Forget the request under way (given up): its sink is not called, the connection closes."""
        self.sink = None
        self.close()

    def _write(self, head: bytes, body: bytes, reader: Reader) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionLost("the connection closed before the request", answered=False)
        self.reader = reader
        self.transport.write(head + body if body else head)

    def _expecting(self) -> bool:
        return self.sink is not None or (self.waiter is not None and not self.waiter.done())

    def _settle(self, result: object) -> None:
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink(result)
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(cast(Answer, result))

    def data_received(self, data: bytes) -> None:
        if self.reader is None or not self._expecting():
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            answer = self.reader.feed(data)
        except ProtocolError as exc:
            self.close()
            self._settle(exc)
            return
        if answer is not None:
            self._settle(answer)

    def eof_received(self) -> bool:
        if self.reader is not None and self.reader.started and self._expecting():
            try:
                answer = self.reader.feed_eof()
            except ProtocolError as exc:
                self._settle(ConnectionLost(str(exc), answered=True))
            else:
                self._settle(answer)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._expecting():
            started = self.reader is not None and self.reader.started
            self._settle(ConnectionLost("the core closed the connection", started))
        self.pool._lost(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class CorePool:
    """At most ``limit`` keep-alive connections to ``host:port``; `request` sends one request."""

    def __init__(
        self,
        host: str,
        port: int,
        limit: int,
        max_age: float = 60.0,
        idle: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        default = 443 if tls is not None else 80
        self.authority = host if port == default else f"{host}:{port}"
        self.limit = limit
        self.max_age = max_age
        self.idle_for = idle
        self._idle: collections.deque[CoreConnection] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[CoreConnection | None]] = (
            collections.deque()
        )
        self._all: set[CoreConnection] = set()
        self._opening = 0
        self.in_use = 0
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open or opening."""
        return len(self._all) + self._opening

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        repeatable: bool = False,
        deadline: float | None = None,
    ) -> Answer:
        """The core's answer; ValueError for a request that cannot be sent, OSError if no answer.

        ``deadline`` (the event loop's clock) bounds the whole request:
        `PoolTimeout` if it passes while the request waits for a connection,
        TimeoutError once the request is sent. Without one the caller bounds
        the time (``asyncio.timeout``). Cancelled or timed out, the
        connection in use is closed, never reused.
        """
        head = request_head(method, target, self.authority, headers, len(body))
        no_body = method == "HEAD"
        while True:
            conn = await self._acquire(deadline)
            self.in_use += 1
            done = False
            try:
                async with asyncio.timeout_at(deadline):
                    answer = await conn.send(head, body, no_body)
                done = True
            except ConnectionLost as exc:
                if conn.reused and not exc.answered and repeatable:
                    continue  # the core closed it as it was taken: once more on a new one
                raise
            finally:
                self.in_use -= 1
                self._release(conn, done and answer.keep_alive)
            return answer

    def take(self) -> CoreConnection | None:
        """An idle connection to use now, counted in use (`give` returns it); None if none is.

        None too while requests wait: they are served first, in order.
        """
        if self._closed or self._waiters:
            return None
        conn = self._idle_one()
        if conn is not None:
            self.in_use += 1
        return conn

    def give(self, conn: CoreConnection, reusable: bool) -> None:
        """Return a connection `take` gave; ``reusable``: its last answer left it fit for more."""
        self.in_use -= 1
        self._release(conn, reusable)

    def _idle_one(self) -> CoreConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest alive
            if conn.closed or now - conn.used > self.idle_for or now - conn.born > self.max_age:
                conn.close()
                self._forget(conn)
                continue
            conn.reused = True
            return conn
        return None

    async def _acquire(self, deadline: float | None = None) -> CoreConnection:
        if self._closed:
            raise ConnectionLost("the pool is closed", answered=False)
        conn = self._idle_one()
        if conn is not None:
            return conn
        if self.size < self.limit and not self._waiters:
            self._opening += 1
            return await self._open(deadline)
        waiter: asyncio.Future[CoreConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                given = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())  # handed over as this request was cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolTimeout("every connection to the core stayed busy") from None
            raise
        if given is None:  # a free place, counted as opening already
            return await self._open(deadline)
        given.reused = True
        return given

    async def _open(self, deadline: float | None) -> CoreConnection:
        """A new connection, its place in the pool reserved already (``_opening``)."""
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: CoreConnection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except BaseException:
            self._opening -= 1
            self._free_place()
            raise
        self._opening -= 1
        self._all.add(conn)
        if self._closed:
            conn.close()
            raise ConnectionLost("the pool is closed", answered=False)
        return conn

    def _release(self, conn: CoreConnection, reusable: bool) -> None:
        conn.waiter = conn.reader = conn.sink = None
        conn.reused = False
        now = time.monotonic()
        if reusable and not conn.closed and not self._closed and now - conn.born < self.max_age:
            conn.used = now
            waiter = self._next_waiter()
            if waiter is None:
                self._idle.append(conn)
            else:
                waiter.set_result(conn)
        else:
            conn.close()
            self._forget(conn)

    def _give_back(self, given: CoreConnection | None) -> None:
        if given is None:
            self._opening -= 1
            self._free_place()
        else:
            self._release(given, True)

    def _lost(self, conn: CoreConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        self._forget(conn)

    def _forget(self, conn: CoreConnection) -> None:
        if conn in self._all:
            self._all.remove(conn)
            self._free_place()

    def _free_place(self) -> None:
        """A place in the pool is free: the first waiting request may open a connection."""
        if self.size < self.limit:
            waiter = self._next_waiter()
            if waiter is not None:
                self._opening += 1
                waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[CoreConnection | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    async def close(self) -> None:
        """Close every connection; requests waiting for one fail."""
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionLost("the pool is closed", answered=False))
        await asyncio.sleep(0)  # let the transports finish closing
