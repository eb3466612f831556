"""The gateway's HTTP server: what every connection meets before any route.

`Listener` is Tornado's `HTTPServer` with the limits an unauthenticated
client reaches first:

* ``HEADER_TIMEOUT``: a request line and headers (and the wait for the next
  request on a kept-alive connection) must arrive within it, or the
  connection is closed (checked a few times per timeout by one timer over
  the connections reading headers, rather than a timeout per read).
  ``MAX_HEADER_BYTES`` bounds their size: past it the answer is 414 (a
  longer request line) or 431, then the connection closes; Tornado's read
  stops at the limit (`core.infra.httpstream.HTTPStream` answers there), and
  the guard measures each parsed request against it as well.
  ``BODY_TIMEOUT`` likewise bounds the time to send a body, so a route
  open to anyone (login) cannot be held by a dripped body.
* ``WRITE_TIMEOUT``: an answer the process cannot hand to the kernel (the
  client stopped reading, or reads a few bytes at a time) must move on: from
  the moment bytes are left unsent, within each ``WRITE_TIMEOUT`` the client
  must take `WRITE_PROGRESS` bytes of it (counted as acknowledged by the
  client's TCP, the kernel's queue left out) or all that is left, or the
  connection is reset and ``gateway_write_timeouts`` counts it. Without it
  a client with no token that asked for a large document and read nothing
  held a connection (and up to 64 KiB of answer plus a kernel send queue)
  for good. Tornado's streams (`HTTPStream`) and adopted connections
  (core/infra/adoption.py) say when they stall and when they drain; the
  same timer as the header deadline checks the stalled ones. A connection
  that ends (``Connection: close``, or the client's FIN) while its client
  has not acknowledged all it was sent *lingers* (`Listener.linger`): a FIN
  goes behind the bytes, and a duplicate descriptor keeps the connection
  under the same rule until the client has taken them, then closes it; a
  plain close left them to an orphan socket that the kernel kept probing
  a client that reads nothing for minutes, outside every count.
* ``MAX_PENDING_PER_IP``: connections from one TCP peer that have not
  finished their first request's headers; one more is answered 429 and
  closed at accept. (A kept-alive connection is not pending between
  requests: it has spoken HTTP, and ``HEADER_TIMEOUT`` still bounds it.)
  Trusted proxies are exempt (they hold many clients' connections).
* ``PROXY_PROTOCOL``: a connection may start with a PROXY protocol header
  (an NLB's); its source address is the client's when the TCP peer is in
  ``TRUSTED_PROXIES`` (and ``MAX_PENDING_PER_IP`` counts that address). A
  malformed one, or silence past ``HEADER_TIMEOUT``, closes it.
* The accept loop survives running out of file descriptors: on ``EMFILE``
  or ``ENFILE`` it stops listening for `ACCEPT_PAUSE` seconds (the kernel
  keeps new connections in the backlog), logs at most once a second and
  counts ``gateway_accept_errors``, then tries again.
* Connections taken off Tornado between requests (a long-poll's, see
  gateway/transport/pollconn.py) are *adopted*: the listener keeps their
  ``HEADER_TIMEOUT`` between requests as for its own, closes them when it
  closes its connections, and takes them back with `resume` (the bytes
  already read first) for any request they do not serve themselves.
* Fast routes (``fast``, by exact path): a ``GET`` whose request line and
  headers, with no body, are already in the socket when it is accepted (as
  under a burst of connections, when accepting lags behind the clients) is
  parsed at accept (core/infra/requesthead.py: a strict parser for the
  plainest heads, Tornado's own parser and its router's ``Host`` checks for
  the rest) and handed, with the bytes behind
  it, straight to its route (the WebSocket upgrade): no stream, no request
  loop, no routing for a connection that leaves HTTP at once. It has spoken
  HTTP in full, so it is not pending, and its client IP is resolved as the
  guard resolves it. Anything else (no bytes yet, a partial or oversized head,
  another path or method, a body, TLS, a PROXY header) goes to Tornado with
  the bytes read so far, as if Tornado had read them.
* Every request passes a `_Guard` at its headers: the client IP is resolved
  (`TrustedProxies`) into the request context that every later reader
  (rate limits, logs, ``Request.client``) uses, and the route's `BodyPolicy`
  may refuse it (401, 404, 413) before a byte of its body is read; a chunked
  body is cut with 413 once it passes the route's limit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import time
from asyncio import Future
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from http import HTTPStatus
from typing import Any, Protocol, cast, runtime_checkable

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError

from core.infra.answerbudget import AnswerBudget
from core.infra.clientip import TrustedProxies, limit_key
from core.infra.errors import ApiError, PayloadTooLarge, error_body
from core.infra.httpstream import HTTPStream
from core.infra.ids import request_id_of
from core.infra.logs import access_level
from core.infra.metrics import Metrics
from core.infra.proxyprotocol import ProxyHeaderError, read_proxy_header
from core.infra.requesthead import parse_head, within
from core.infra.settings import Settings
from core.infra.tcp import kernel_queue, reset_on_close, resetting
from core.infra.throttled import ThrottledLog

__all__ = ["ACCEPT_PAUSE", "WRITE_PROGRESS", "Adopted", "BodyPolicy", "FastRoute", "Listener",
           "Writer", "unread", "write_refusal"]  # fmt: skip

log = logging.getLogger("core.infra.listener")
access_log = logging.getLogger("gateway.access")

#: Seconds the accept loop rests after running out of file descriptors.
ACCEPT_PAUSE = 0.1
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Bytes of a stalled answer its client must take within each ``WRITE_TIMEOUT`` (or all of it).
WRITE_PROGRESS = 64 * 1024
#: Accepts per readiness event, as Tornado's own loop (its listen backlog).
_ACCEPTS_PER_EVENT = 128
_LENGTH = re.compile(r"[0-9]{1,18}")
#: No body may be larger than this whatever the route (Tornado's own backstop).
_UNBOUNDED = 1 << 62


#: A request head's fields come as Tornado's `HTTPHeaders` or an adopted connection's
#: `core.fastrest.Fields`: read with ``get`` (any spelling of the name).
BodyPolicy = Callable[[httputil.RequestStartLine, Mapping[str, str]], int]
"""The largest body a request may send, called at its headers (only when it has a body).

Raises `ApiError` to answer before the body is read (unknown route, missing
token); the `_Guard` answers 413 itself when the body is over the limit.
"""


FastRoute = Callable[
    [socket.socket, httputil.RequestStartLine, httputil.HTTPHeaders, str, bytes], None
]
"""Serves a connection whose whole request head arrived with its accept (see above).

Called with the socket (blocking, as accepted), the request line, the
headers, the client IP and the bytes sent behind the head; from then on the
socket is the route's.
"""


class Adopted(Protocol):
    """A connection served off Tornado's stream between requests (`Listener.adopt`)."""

    def close(self) -> None:
        """Close it (its ``HEADER_TIMEOUT`` passed, or the listener closes its connections)."""


@runtime_checkable
class Writer(Protocol):
    """A connection that writes answers (`Listener.stalled`): Tornado's stream, or adopted."""

    def taken(self) -> int:
        """Bytes of its answers the client's TCP has acknowledged so far."""

    def client(self) -> str:
        """Whom it serves: the client's address (``limit_key``), "" when unknown."""

    def unsent(self) -> int:
        """Bytes of its answers the process holds (0: drained, or closed)."""

    def unacked(self) -> int:
        """Bytes of its answers the client's TCP has not acknowledged (process and kernel)."""

    def reset(self) -> None:
        """Close it with a TCP reset, dropping what is unsent."""


class Listener(HTTPServer):
    """`HTTPServer` with the limits above; ``policy`` and the proxies come from `Gateway.listen`."""

    # HTTPServer is a tornado Configurable: its arguments go to `initialize`.
    def initialize(  # type: ignore[override]
        self,
        router: httputil.HTTPServerConnectionDelegate,
        settings: Settings,
        metrics: Metrics,
        policy: BodyPolicy,
        proxies: TrustedProxies,
        fast: dict[str, FastRoute] | None = None,
    ) -> None:
        super().initialize(
            router,
            # Both timeouts are this class's (`_expire`), not Tornado's: Tornado
            # wraps each read of every request in a `gen.with_timeout`, a third of
            # the CPU of a long-poll (many small requests); here it is a dict entry.
            idle_connection_timeout=None,
            body_timeout=None,
            # Past this the stream answers 414/431 (HTTPStream); the guard checks each request too.
            max_header_size=settings.max_header_bytes,
            max_body_size=_UNBOUNDED,  # each route's own limit is the guard's
        )
        self.metrics = metrics
        self.policy = policy
        self.proxies = proxies
        self.fast = fast or {}
        self.max_pending_per_ip = settings.max_pending_per_ip
        self.max_header_bytes = settings.max_header_bytes
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.write_timeout = settings.write_timeout
        #: Connection whose answer stalled -> (monotonic time of its next check,
        #: bytes its client had taken at the last one).
        self._stalled: dict[Writer, tuple[float, int]] = {}
        #: Ended connection, kept until its client took what it was sent (`linger`) ->
        #: (monotonic time of its next check, bytes unacknowledged at the last one).
        self._lingering: dict[socket.socket, tuple[float, int]] = {}
        self._log_stalled = ThrottledLog(log)
        self.answers = AnswerBudget(
            settings.answer_buffer_total_bytes,
            self._stalled.keys,
            self.flowing,  # type: ignore[arg-type]  # (a Writer is Held)
            metrics.answer_budget_resets,
        )
        metrics.answer_buffered.set_function(self.answers.held)
        #: Stream (or adopted connection) -> monotonic time by which its headers
        #: (or its body) must be in.
        self._deadlines: dict[object, float] = {}
        self._adopted: set[Adopted] = set()
        shortest = min(settings.header_timeout, settings.body_timeout, settings.write_timeout)
        every = max(0.05, min(shortest, 4.0) / 4)
        self._expiry = PeriodicCallback(self._expire, every * 1000)
        self.proxy_protocol = settings.proxy_protocol
        self._log_proxy = ThrottledLog(log)
        self._proxy_reads: set[asyncio.Future[None]] = set()
        self._pending: dict[str, int] = {}
        self._pending_streams: dict[object, str] = {}
        self._log_files = ThrottledLog(log)
        self._log_pending = ThrottledLog(log)
        self._resume: dict[int, object] = {}

    # -- accept ----------------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        if not self._expiry.is_running():
            self._expiry.start()
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._watch(sock)

    def _watch(self, sock: socket.socket) -> Callable[[], None]:
        """Accept on ``sock``; returns what stops it (as Tornado's ``add_accept_handler``)."""
        loop = IOLoop.current()
        fd = sock.fileno()
        state = {"listening": True, "stopped": False}
        # `socket.accept` converts the listener's family and type to enums for
        # each connection (a tenth of the accept under a burst): once here.
        kind = (int(sock.family), int(sock.type), sock.proto)

        def resume() -> None:
            self._resume.pop(fd, None)
            if not state["stopped"]:
                loop.add_handler(sock, on_readable, IOLoop.READ)
                state["listening"] = True
                on_readable(sock, IOLoop.READ)

        def on_readable(_: Any, events: int) -> None:
            for _ in range(_ACCEPTS_PER_EVENT):
                if state["stopped"]:
                    return
                try:
                    new, address = sock._accept()  # type: ignore[attr-defined]  # as accept()
                    conn = socket.socket(*kind, fileno=new)
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in _OUT_OF_FILES:
                        raise
                    self.metrics.accept_errors.labels(
                        errno.errorcode.get(exc.errno or 0, "?")
                    ).inc()
                    self._log_files.log(logging.ERROR, "accept paused %.1fs: %s", ACCEPT_PAUSE, exc)
                    if state["listening"]:
                        loop.remove_handler(sock)
                        state["listening"] = False
                    self._resume[fd] = loop.call_later(ACCEPT_PAUSE, resume)
                    return
                self._serve(conn, address)

        def stop() -> None:
            state["stopped"] = True
            handle = self._resume.pop(fd, None)
            if handle is not None:
                loop.remove_timeout(handle)
            if state["listening"]:
                loop.remove_handler(sock)

        loop.add_handler(sock, on_readable, IOLoop.READ)
        return stop

    # -- connections -----------------------------------------------------------

    def _serve(self, conn: socket.socket, address: Any) -> None:
        """Serve an accepted connection on an `HTTPStream` (Tornado's own loop makes an IOStream)."""
        if self.ssl_options is not None:
            self._handle_connection(conn, address)
            return
        try:
            first: bytes | None = b""
            if self.fast:
                first = self._first_bytes(conn, address)
                if first is None:
                    return  # served by its fast route, or gone
            stream = HTTPStream(conn, max_buffer_size=self.max_buffer_size,
                                read_chunk_size=self.read_chunk_size)  # fmt: skip
            stream.writes = self
            if first:
                _refill(stream, first)
            stream.serves(address)
            self.handle_stream(stream, address)
        except Exception:
            log.exception("serving a new connection failed")
            conn.close()

    def _first_bytes(self, conn: socket.socket, address: Any) -> bytes | None:
        """What ``conn`` sent before its accept, for Tornado; None when a fast route took it."""
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        if self.proxy_protocol and self.proxies.trusts(peer):
            return b""
        try:
            data = conn.recv(self.max_header_bytes, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            conn.close()
            return None
        if not data:
            conn.close()  # closed before a byte: nothing to serve
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0 or not data.startswith(b"GET /") or _ends_sooner(data, end):
            return data
        try:
            start, headers = parse_head(data, end)
        except httputil.HTTPInputError:
            return data  # Tornado answers it (400)
        route = self.fast.get(start.path.partition("?")[0])
        if (
            route is None
            or "Content-Length" in headers
            or "Transfer-Encoding" in headers
            or (
                not within(data, end, self.max_header_bytes)
                and _oversized(start, headers, self.max_header_bytes) is not None
            )
        ):
            return data
        route(conn, start, headers, self.proxies.client_ip(peer, headers), data[end + 4 :])
        return None

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        if not self._admit(stream, peer):
            return
        if self.proxy_protocol and self.proxies.trusts(peer):
            # Only a trusted balancer's header is read; from anyone else a
            # "PROXY ..." line is just a bad request line (400).
            task = asyncio.ensure_future(self._proxied(stream, address, peer))
            self._proxy_reads.add(task)
            task.add_done_callback(self._proxy_reads.discard)
            return
        super().handle_stream(stream, address)

    def _admit(self, stream: IOStream, peer: str) -> bool:
        """Count ``stream`` as pending for ``peer``, or answer 429 when it has too many."""
        ip = limit_key(peer)
        if not self.proxies.trusts(peer) and self._pending.get(ip, 0) >= self.max_pending_per_ip:
            self.metrics.handshake_failures.labels("pending_per_ip").inc()
            self._log_pending.log(logging.WARNING, "refused a connection from %s: %d connections "
                              "without complete headers", ip, self.max_pending_per_ip)  # fmt: skip
            body = error_body(429, "rate_limited", "too many connections waiting to send headers")
            head = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))  # fmt: skip
            stream.write(head + body).add_done_callback(partial(_close_after_write, stream))
            return False
        # Counted at accept, not when the request loop starts (a task later):
        # one readiness event accepts many connections before any of them runs.
        self._pending_streams[stream] = ip
        self._pending[ip] = self._pending.get(ip, 0) + 1
        return True

    async def _proxied(self, stream: IOStream, address: tuple[Any, ...], peer: str) -> None:
        """Read the PROXY protocol header, then serve as from the client it names."""
        try:
            source = await asyncio.wait_for(read_proxy_header(stream), self.header_timeout)
        except (ProxyHeaderError, StreamClosedError, UnsatisfiableReadError, TimeoutError) as exc:
            self.headers_done(stream)
            self.metrics.handshake_failures.labels("proxy_protocol").inc()
            self._log_proxy.log(logging.WARNING, "closed a connection from %s: %s", peer,
                            str(exc) or "no PROXY header in time")  # fmt: skip
            stream.close()
            return
        except Exception:
            self.headers_done(stream)
            log.exception("reading a PROXY header from %s failed", peer)
            stream.close()
            return
        if source is not None and source != peer:
            self.headers_done(stream)
            if not self._admit(stream, source):
                return
            address = (source, *address[1:])
            if isinstance(stream, HTTPStream):
                stream.serves(source)
        super().handle_stream(stream, address)

    def stop(self) -> None:
        self._expiry.stop()
        self._drop_lingering()
        super().stop()

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        # Called as each request's headers start to be read (also the keep-alive wait).
        stream = _stream_of(server_conn)
        self._deadlines[stream] = time.monotonic() + self.header_timeout
        inner = super().start_request(server_conn, request_conn)
        return _Guard(self, stream, request_conn, inner)

    def reading(self, stream: object, body: bool) -> None:
        """``stream``'s headers are in: it now has ``BODY_TIMEOUT`` for a body, or no deadline."""
        if body:
            self._deadlines[stream] = time.monotonic() + self.body_timeout
        else:
            self._deadlines.pop(stream, None)

    def stalled(self, conn: Writer) -> None:
        """``conn`` holds answer bytes it could not send: from now its client must move on."""
        if conn not in self._stalled:
            self._stalled[conn] = (time.monotonic() + self.write_timeout, conn.taken())
            self.answers.stalled()

    def flowing(self, conn: Writer) -> None:
        """``conn`` sent all it held (or closed): no write deadline."""
        self._stalled.pop(conn, None)

    def linger(self, sock: socket.socket) -> None:
        """``sock``'s connection ends (its descriptor is about to close): if its client has
        not acknowledged all it was sent, send a FIN behind that and keep the connection
        (a duplicate descriptor) until it has, under ``WRITE_TIMEOUT``'s rule.

        Under `WRITE_PROGRESS` unacknowledged, the close is a plain one: that much is
        what a client far away has in flight at any time, and the kernel delivers it
        (holding a descriptor for each would take many from a busy process).
        """
        if kernel_queue(sock) < WRITE_PROGRESS:
            return
        try:  # (the event loop's transports give a stand-in for the socket: its descriptor)
            held = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        try:
            if resetting(held):
                held.close()
                return
            held.shutdown(socket.SHUT_WR)  # (the bytes queued go first)
        except OSError:
            held.close()
            return
        self._lingering[held] = (time.monotonic() + self.write_timeout, kernel_queue(held))

    @property
    def lingering(self) -> int:
        """Ended connections kept until their clients take the rest of their answers."""
        return len(self._lingering)

    def _expire(self) -> None:
        """Close the connections past their header or body deadline (``HEADER_TIMEOUT``...)."""
        now = time.monotonic()
        if self._stalled:
            self._expire_writes(now)
            self.answers.stalled()  # (an event stream's answer grows while it stalls)
        if self._lingering:
            self._expire_lingering(now)
        late = [stream for stream, deadline in self._deadlines.items() if deadline <= now]
        for stream in late:
            del self._deadlines[stream]
            if isinstance(stream, IOStream):
                log.debug("closing a connection that sent no complete request in time")
                _close_idle(stream)
            elif stream in self._adopted:
                log.debug("closing a connection that sent no complete request in time")
                self._adopted.discard(stream)
                _close_idle(stream)

    def _expire_writes(self, now: float) -> None:
        """Reset the stalled connections whose client took under `WRITE_PROGRESS` in a
        ``WRITE_TIMEOUT`` (``WRITE_TIMEOUT``)."""
        due = [(conn, taken) for conn, (at, taken) in self._stalled.items() if at <= now]
        for conn, before in due:
            if not conn.unsent():
                del self._stalled[conn]
                continue
            taken = conn.taken()
            if taken - before >= WRITE_PROGRESS:
                self._stalled[conn] = (now + self.write_timeout, taken)
                continue
            del self._stalled[conn]
            self._timed_out(taken - before)
            conn.reset()

    def _timed_out(self, taken: int) -> None:
        """Count and log a connection reset for ``WRITE_TIMEOUT`` (its client took ``taken``)."""
        self.metrics.write_timeouts.inc()
        self._log_stalled.log(logging.WARNING, "reset a connection whose client took %d bytes "
                              "of its answer in %gs (WRITE_TIMEOUT)", taken,
                              self.write_timeout)  # fmt: skip

    def _expire_lingering(self, now: float) -> None:
        """Close the lingering connections whose clients took it all; reset those that took
        under `WRITE_PROGRESS` in a ``WRITE_TIMEOUT`` (counted as write timeouts)."""
        for held, (at, before) in list(self._lingering.items()):
            left = kernel_queue(held)
            if not left or held.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                del self._lingering[held]
                held.close()  # all acknowledged (the FIN too), or the client reset it
            elif at <= now:
                if before - left >= WRITE_PROGRESS:
                    self._lingering[held] = (now + self.write_timeout, left)
                    continue
                del self._lingering[held]
                self._timed_out(before - left)
                reset_on_close(held)
                held.close()

    def _drop_lingering(self) -> None:
        for held in self._lingering:
            reset_on_close(held)
            held.close()
        self._lingering.clear()

    # -- adopted connections ---------------------------------------------------

    def adopt(self, conn: Adopted) -> None:
        """``conn`` now serves itself; it is closed with the listener's connections."""
        self._adopted.add(conn)

    @property
    def adopted(self) -> int:
        """Connections serving themselves now (long-poll connections after their first poll)."""
        return len(self._adopted)

    def await_request(self, conn: Adopted) -> None:
        """``conn`` waits for its next request: it has ``HEADER_TIMEOUT`` from now.

        ``reading(conn, False)`` once its headers are in.
        """
        self._deadlines[conn] = time.monotonic() + self.header_timeout

    def release(self, conn: Adopted) -> None:
        """``conn`` closed, or went back to Tornado (`resume`)."""
        self._adopted.discard(conn)
        self._deadlines.pop(conn, None)

    def resume(self, sock: socket.socket, address: Any, buffered: bytes) -> None:
        """Serve ``sock`` with Tornado again from its next request, ``buffered`` read already.

        A connection that has spoken HTTP: not pending, and from the same
        client ``address`` as when it was accepted (a PROXY header's source).
        """
        stream = HTTPStream(sock, max_buffer_size=self.max_buffer_size,
                            read_chunk_size=self.read_chunk_size)  # fmt: skip
        stream.writes = self
        stream.serves(address)
        if buffered:
            _refill(stream, buffered)
        HTTPServer.handle_stream(self, stream, address)

    async def close_all_connections(self) -> None:
        for conn in list(self._adopted):
            conn.close()
        self._adopted.clear()
        await super().close_all_connections()
        self._drop_lingering()

    def headers_done(self, stream: object) -> None:
        """The connection on ``stream`` sent its first headers: it is pending no more."""
        peer = self._pending_streams.pop(stream, None)
        if peer is not None:
            left = self._pending[peer] - 1
            if left:
                self._pending[peer] = left
            else:
                del self._pending[peer]

    def on_close(self, server_conn: object) -> None:
        self._deadlines.pop(_stream_of(server_conn), None)
        self.headers_done(_stream_of(server_conn))
        super().on_close(server_conn)

    def pending(self, ip: str) -> int:
        """Connections from ``ip`` that have not finished their headers."""
        return self._pending.get(ip, 0)


def _stream_of(server_conn: object) -> object:
    return getattr(server_conn, "stream", server_conn)


# Tornado has no public way to take the bytes a stream has read ahead, or to
# give them to a new one; these two keep that knowledge of its read buffer
# (``_read_buffer``, with ``_read_buffer_size`` its length) in one place.


def unread(stream: IOStream) -> bytes:
    """The bytes ``stream`` has read from its socket and not yet handed out."""
    buffer = stream._read_buffer
    if stream._user_read_buffer or len(buffer) != stream._read_buffer_size:
        raise RuntimeError("an IOStream read buffer this code does not know")  # not from HTTP1
    return bytes(buffer)


def _refill(stream: IOStream, data: bytes) -> None:
    """Give a new ``stream`` ``data`` as if it had read them first."""
    assert not stream._read_buffer_size
    stream._read_buffer += data
    stream._read_buffer_size += len(data)


def _close_idle(conn: object) -> None:
    """Close ``conn``, past its ``HEADER_TIMEOUT``; with a reset when its client left some of
    its last answer unread, so that the kernel does not keep probing it with those bytes
    for minutes."""
    if isinstance(conn, Writer) and conn.unacked():
        conn.reset()
    else:
        cast(Adopted, conn).close()


def _close_after_write(stream: IOStream, written: Future[None]) -> None:
    written.exception()  # a peer already gone is no error here
    stream.close()


def write_refusal(
    conn: httputil.HTTPConnection,
    refusal: ApiError,
    method: str = "GET",
    request_id: str | None = None,
) -> None:
    """Answer with ``refusal``'s JSON error body (none to a ``HEAD``: its length only)
    and close once it is written."""
    body = refusal.body()
    out = httputil.HTTPHeaders(refusal.headers)
    if request_id is not None:
        out["X-Request-Id"] = request_id
    out["Content-Type"] = "application/json"
    out["Content-Length"] = str(len(body))
    out["Connection"] = "close"
    if refusal.status == 401:
        out["WWW-Authenticate"] = "Bearer"
    line = httputil.ResponseStartLine("HTTP/1.1", refusal.status, HTTPStatus(refusal.status).phrase)
    try:
        conn.write_headers(line, out, b"" if method == "HEAD" else body)
        conn.finish()  # the body still unread is dropped, and the connection closed
    except (StreamClosedError, OSError) as exc:
        log.debug("refusal not written: %s", exc)


class _Guard(httputil.HTTPMessageDelegate):
    """One request's way through the limits, in front of the routed delegate."""

    __slots__ = ("_client", "_conn", "_headers", "_inner", "_limit", "_listener", "_refused",
                 "_size", "_start", "_stream")  # fmt: skip

    def __init__(
        self,
        listener: Listener,
        stream: object,
        conn: httputil.HTTPConnection,
        inner: httputil.HTTPMessageDelegate,
    ) -> None:
        self._listener = listener
        self._stream = stream
        self._conn = conn
        self._inner = inner
        self._limit = _UNBOUNDED
        self._size = 0
        self._refused = False
        self._start: httputil.RequestStartLine | None = None
        self._headers: httputil.HTTPHeaders | None = None
        self._client = ""

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Any:
        assert isinstance(start_line, httputil.RequestStartLine)
        listener = self._listener
        listener.headers_done(self._stream)
        has_body = _has_body(headers)
        listener.reading(self._stream, has_body)
        self._start = start_line
        self._headers = headers
        # The context outlives this request (keep-alive): resolve from the TCP peer each time.
        context = getattr(self._conn, "context", None)
        peer = str(getattr(context, "_orig_remote_ip", getattr(context, "remote_ip", "")))
        client = self._client = listener.proxies.client_ip(peer, headers)
        if context is not None:
            context.remote_ip = client
        if listener.proxies and isinstance(self._stream, HTTPStream):
            self._stream.serves(client)  # whom the answer serves, request by request
        oversized = _oversized(start_line, headers, listener.max_header_bytes)
        if oversized is not None:
            self._refuse(start_line, client, oversized)
            return None
        if has_body:
            try:
                self._limit = listener.policy(start_line, headers)
                length = headers.get("Content-Length")
                # ASCII digits only: "²" is a digit to str.isdigit() and none to int();
                # Tornado refuses a Content-Length that is not one (400)
                if (
                    length is not None
                    and _LENGTH.fullmatch(length.strip())
                    and int(length) > self._limit
                ):
                    raise PayloadTooLarge(self._limit)
            except ApiError as refusal:
                self._refuse(start_line, client, refusal)
                return None
            except Exception:
                log.exception("body policy failed for %s %s", start_line.method, start_line.path)
                self._refuse(start_line, client, ApiError(500, "internal", "internal error"))
                return None
        return self._inner.headers_received(start_line, headers)

    def _refuse(self, start: httputil.RequestStartLine, client: str, refusal: ApiError) -> None:
        self._refused = True
        given = "" if self._headers is None else self._headers.get("X-Request-Id", "")
        write_refusal(self._conn, refusal, start.method, request_id_of(given))
        path = start.path.partition("?")[0]
        access_log.log(
            access_level(refusal.status),
            "%d %s %s (%s) refused before its body",
            refusal.status,
            start.method,
            path,
            client,
            extra={"status": refusal.status, "method": start.method, "path": path},
        )

    def data_received(self, chunk: bytes) -> Any:
        if self._refused:
            return None
        self._size += len(chunk)
        if self._size > self._limit:
            self._inner.on_connection_close()  # drops what it buffered
            assert self._start is not None
            self._refuse(self._start, self._client, PayloadTooLarge(self._limit))
            return None
        return self._inner.data_received(chunk)

    def finish(self) -> None:
        self._listener.reading(self._stream, False)
        if not self._refused:
            self._inner.finish()

    def on_connection_close(self) -> None:
        if not self._refused:
            self._inner.on_connection_close()


def _ends_sooner(data: bytes, end: int) -> bool:
    """Whether Tornado ends the head before ``end`` (its ``\\r?\\n\\r?\\n``, where a bare LF
    ends a line too): then Tornado reads it, so that it is cut in one place only."""
    return data.find(b"\n\n", 0, end + 2) >= 0 or data.find(b"\n\r\n", 0, end + 2) >= 0


def _oversized(
    start: httputil.RequestStartLine, headers: httputil.HTTPHeaders, limit: int
) -> ApiError | None:
    if len(start.path) > limit:
        return ApiError(414, "uri_too_long", f"request target over {limit} bytes")
    size = (
        len(start.method) + len(start.path) + sum(len(k) + len(v) + 4 for k, v in headers.get_all())
    )
    if size > limit:
        return ApiError(431, "headers_too_large", f"request line and headers over {limit} bytes")
    return None


def _has_body(headers: httputil.HTTPHeaders) -> bool:
    length = headers.get("Content-Length")
    if length is not None:
        return length.strip() != "0"
    return "Transfer-Encoding" in headers
