"""The WebSocket handshake (RFC 6455 §4.2), answered below Tornado's web layer.

``GET /ws`` is routed to `WebSocketServer` before Tornado's `Application`:
no RequestHandler, no routing table, no per-request handler state. Tornado's
HTTP/1.1 connection parses the request (`_Upgrade`), or, when the whole
request head came with the accept (as in a burst of connections), the
listener parses it with Tornado's parser and hands the socket over at once
(`WebSocketServer.accept`, core/infra/listener.py's fast routes). Either way
`_handshake_on` checks it (on the fast route, with no connect limit and no
connect hook, nothing is awaited before the upgrade: `_handshake_now` runs
the same checks at the accept, and only the upgrade is a task), and then:

* the token is verified before the upgrade: a missing or bad token is an
  HTTP 401 with a JSON body, never an accepted socket; so are a refused
  origin (403), a request that is not an upgrade (400, or 426 for another
  protocol version), draining (503), ``RATE_CONNECT_IP`` (429) and a full
  process (503, see below);
* the request must be well formed (RFC 6455 §4.2.1): HTTP/1.1 (else 505)
  and a ``Sec-WebSocket-Key`` that is the base64 of 16 bytes (else 400);
* the codec is chosen from ``Sec-WebSocket-Protocol``; with
  ``COMPRESSION=on``, permessage-deflate is agreed from
  ``Sec-WebSocket-Extensions`` (`proto.deflate.negotiate`);
* the socket is detached from Tornado's stream and given to the event
  loop's transport with a `WSConnection`, which writes the 101 and carries
  the connection from there on, starting with any bytes the client sent
  behind its request (Tornado's stream had already read them).

Capacity: a process refuses new sockets once it holds ``MAX_CONNECTIONS``
sockets and SSE streams together (by default the open-file limit less a
reserve for everything else; long-poll sessions have their own
``MAX_LONGPOLL_SESSIONS``), with a 503 and a log line
(`gateway.transport.admission.refuse_full`, which SSE checks too), so
reaching the file limit is a clear refusal rather than failing ``accept``
calls.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
from http import HTTPStatus
from urllib.parse import parse_qs

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream

from core.errormap import from_exception
from core.infra.errors import ApiError
from core.infra.httpstream import unread
from core.infra.identity import Identity
from core.infra.ids import request_id_of
from core.infra.logs import access_level, redact
from core.infra.tasks import TaskSet
from gateway.context import Context
from gateway.hooks.connect import Disconnected
from gateway.session import Session
from gateway.transport.admission import (
    admit_hooked,
    admit_now,
    admit_request,
    admits_at_once,
    refuse_full,
)
from gateway.transport.delegate import BodylessRequest
from gateway.transport.wsconn import WSConnection
from proto import Codec, select_codec
from proto.deflate import Agreement, negotiate
from proto.wsprotocol import WebSocketProtocol

__all__ = ["WebSocketServer", "accept_value"]

log = logging.getLogger("gateway.websocket")
access_log = logging.getLogger("tornado.access")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


class WebSocketServer(httputil.HTTPServerConnectionDelegate):
    """``/ws``: one handshake per request, from Tornado's connection or straight from accept."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._tasks = TaskSet(log)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Upgrade(self, request_conn)

    def accept(
        self,
        sock: socket.socket,
        start: httputil.RequestStartLine,
        headers: httputil.HTTPHeaders,
        remote_ip: str,
        early: bytes,
    ) -> None:
        """The listener's fast route (`core.infra.listener.FastRoute`): the head came with the accept."""
        io = _Accepted(sock, early)
        if admits_at_once(self.ctx):
            # Nothing to wait for before the upgrade (no connect limit, no
            # connect hook): checked here, and only the upgrade is a task.
            _handshake_now(self.ctx, io, start, headers, remote_ip, self._tasks)
            return
        self._tasks.spawn(_handshake_on(self.ctx, io, start, headers, remote_ip))

    def spawn(self, upgrade: _Upgrade) -> None:
        conn, start, headers = upgrade.conn, upgrade.start, upgrade.headers
        assert isinstance(conn, HTTP1Connection) and start is not None and headers is not None
        remote_ip = str(getattr(getattr(conn, "context", None), "remote_ip", ""))
        self._tasks.spawn(_handshake_on(self.ctx, _Detached(conn), start, headers, remote_ip))


class _Upgrade(BodylessRequest):
    """A handshake request read by Tornado's HTTP/1.1 connection."""

    __slots__ = ("_server",)

    def __init__(self, server: WebSocketServer, conn: httputil.HTTPConnection) -> None:
        super().__init__(conn)
        self._server = server

    @property
    def conn(self) -> httputil.HTTPConnection:
        return self._conn

    @property
    def start(self) -> httputil.RequestStartLine | None:
        return self._start

    @property
    def headers(self) -> httputil.HTTPHeaders | None:
        return self._headers

    def finish(self) -> None:
        self._server.spawn(self)


class _Detached:
    """The socket of a request Tornado read: taken off its stream (a duplicate descriptor)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: HTTP1Connection) -> None:
        self._conn = conn

    def take(self) -> tuple[socket.socket, bytes] | None:
        stream = self._conn.detach()
        # The stream closes its own descriptor, a duplicate. What the client
        # sent behind its request (frames, in the same packet or while it was
        # being admitted) is in the stream's buffer: the socket's first input.
        try:
            if stream.closed():
                return None  # the client went away while it was being admitted
            return stream.socket.dup(), unread(stream)
        except OSError:
            return None  # the client is already gone
        finally:
            stream.writes = None  # type: ignore[attr-defined]  # the socket lives on: no linger
            stream.close()

    def answer(self, data: bytes) -> None:
        stream = self._conn.detach()
        if not stream.closed():
            stream.write(data).add_done_callback(lambda _: stream.close())


class _Accepted:
    """The socket of a request whose head came with its accept (the listener's fast route)."""

    __slots__ = ("_early", "_sock")

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self._sock, self._early = sock, early

    def take(self) -> tuple[socket.socket, bytes]:
        return self._sock, self._early

    def answer(self, data: bytes) -> None:
        stream = IOStream(self._sock)
        stream.write(data).add_done_callback(lambda _: stream.close())


async def _handshake_on(
    ctx: Context,
    io: _Detached | _Accepted,
    start: httputil.RequestStartLine,
    headers: httputil.HTTPHeaders,
    remote_ip: str,
) -> None:
    """Admit the request, then upgrade it (or answer it with its refusal) on ``io``."""
    try:
        _check_method(start)
        identity = await admit_request(ctx, remote_ip, headers, _query_token(start))
        codec, agreement, response = _handshake(ctx, start, headers)
        if ctx.hooks is not None and ctx.hooks.connect is not None:
            # After every check of its own: the backend is asked only about
            # requests the gateway would admit.
            identity = await admit_hooked(
                ctx,
                identity,
                transport="websocket",
                protocol=codec.name,
                remote_ip=remote_ip,
                headers=headers,
            )
        assert identity is not None  # without a connect hook, a token is required
    except Disconnected as goodbye:
        # The connect hook's ``disconnect``: the upgrade, then at once its close frame.
        io.answer(response + WebSocketProtocol(125).close(goodbye.code, goodbye.reason))
        log.info("socket closed at once by the connect hook: %d", goodbye.code)
        return
    except Exception as exc:
        _refuse(io, start, headers, exc)
        return
    taken = io.take()
    if taken is not None:
        await _upgrade(ctx, *taken, identity, codec, response, remote_ip, agreement)


def _handshake_now(
    ctx: Context,
    io: _Accepted,
    start: httputil.RequestStartLine,
    headers: httputil.HTTPHeaders,
    remote_ip: str,
    tasks: TaskSet,
) -> None:
    """`_handshake_on` when `admits_at_once`: the same checks in the same order, no await."""
    try:
        _check_method(start)
        identity = admit_now(ctx, remote_ip, headers, _query_token(start))
        codec, agreement, response = _handshake(ctx, start, headers)
    except Exception as exc:
        _refuse(io, start, headers, exc)
        return
    sock, early = io.take()
    tasks.spawn(_upgrade(ctx, sock, early, identity, codec, response, remote_ip, agreement))


def _check_method(start: httputil.RequestStartLine) -> None:
    if start.method != "GET":
        raise ApiError(405, "method_not_allowed", "the socket opens with GET",
                       headers={"Allow": "GET"})  # fmt: skip


def _query_token(start: httputil.RequestStartLine) -> str | None:
    _, _, query = start.path.partition("?")
    return parse_qs(query).get("token", [None])[0] if query else None


def _refuse(
    io: _Detached | _Accepted,
    start: httputil.RequestStartLine,
    headers: httputil.HTTPHeaders,
    exc: Exception,
) -> None:
    """Answer ``io`` with the refusal ``exc`` stands for, and close it."""
    refusal = exc if isinstance(exc, ApiError) else from_exception(exc, "the WebSocket handshake")
    # A refused upgrade ends the connection, as python-websockets does:
    # what the client sent behind its request are frames, not a request.
    request_id = request_id_of(headers.get("X-Request-Id", ""))
    io.answer(_refusal(refusal, request_id, head_only=start.method == "HEAD"))
    status = refusal.status_code
    access_log.log(access_level(status), "%d %s %s", status, start.method, redact(start.path))


async def _upgrade(
    ctx: Context,
    sock: socket.socket,
    early: bytes,
    identity: Identity,
    codec: Codec,
    response: bytes,
    remote_ip: str,
    agreement: Agreement | None = None,
) -> None:
    """Give ``sock`` to the event loop's transport with a `WSConnection`, which writes the 101."""
    settings = ctx.settings

    def make_session(ws: WSConnection) -> Session:
        return ctx.open_session(ws, codec, identity, remote_ip)

    ws = WSConnection(response, codec, make_session, ctx.metrics, settings.max_frame_bytes,
                      ctx.coalescer, early, ctx.compressor if agreement else None, agreement,
                      ctx.inflate)  # fmt: skip
    try:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: ws, sock)
    except OSError as exc:
        sock.close()
        log.info("socket lost during the handshake: %s", exc)
        return
    transport.set_write_buffer_limits(high=settings.send_buffer_bytes)


def _refusal(exc: ApiError, request_id: str, head_only: bool) -> bytes:
    """The response refusing an upgrade: the JSON error body, then the connection closes."""
    status = exc.status_code
    body = exc.body()
    headers = {**exc.headers, "X-Request-Id": request_id, "Content-Type": "application/json",
               "Content-Length": str(len(body)), "Connection": "close"}  # fmt: skip
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{lines}\r\n".encode("latin-1")
    return head if head_only else head + body


def _handshake(
    ctx: Context, start: httputil.RequestStartLine, headers: httputil.HTTPHeaders
) -> tuple[Codec, Agreement | None, bytes]:
    """The codec, compression and 101 response for a valid upgrade request; `ApiError` otherwise."""
    try:
        key = _upgrade_key(start, headers)
    except ApiError:
        ctx.metrics.handshake_failures.labels("malformed").inc()
        raise
    origin = headers.get("Origin")
    allowed = ctx.settings.allowed_origins
    if origin is not None and "*" not in allowed and origin not in allowed:
        ctx.metrics.handshake_failures.labels("origin").inc()
        # The answer depends on Origin: a shared cache must not give it to another origin.
        raise ApiError(403, "forbidden", f"origin {origin} is not allowed",
                       headers={"Vary": "Origin"})  # fmt: skip
    refuse_full(ctx)
    offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    codec, name = select_codec(offered)
    agreement = None
    if ctx.compressor is not None:
        agreement = negotiate(headers.get_list("Sec-WebSocket-Extensions"))
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_value(key).encode() + b"\r\n"
        + (b"Sec-WebSocket-Protocol: " + name.encode() + b"\r\n" if name else b"")
        + (b"Sec-WebSocket-Extensions: " + agreement.response.encode() + b"\r\n"
           if agreement else b"")
        + b"\r\n"
    )  # fmt: skip
    return codec, agreement, response


def _upgrade_key(start: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> str:
    """The ``Sec-WebSocket-Key`` of a well-formed upgrade request (RFC 6455 §4.2.1); `ApiError` otherwise.

    An upgrade over any HTTP version but 1.1 is 505, as python-websockets
    answers (Tornado's own handler does not check); Tornado's parser has
    already answered 400 to anything that is not ``HTTP/1.x``.
    """
    if start.version != "HTTP/1.1":
        raise ApiError(505, "http_version_not_supported",
                       f"the WebSocket handshake needs HTTP/1.1, not {start.version}")  # fmt: skip
    if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in (
        headers.get("Connection", "").lower()
    ):
        raise ApiError(400, "bad_request", "expected a WebSocket upgrade (Upgrade: websocket)")
    if headers.get("Sec-WebSocket-Version") != "13":
        raise ApiError(426, "upgrade_required", "WebSocket version 13 only",
                       headers={"Sec-WebSocket-Version": "13"})  # fmt: skip
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        valid = len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:  # binascii.Error, or a character outside ASCII
        valid = False
    if not valid:
        raise ApiError(400, "bad_request",
                       "Sec-WebSocket-Key must be the base64 of 16 bytes (RFC 6455 section 4.2.1)")  # fmt: skip
    return key
