"""WebSocket transport: a thin adapter from Tornado's handler to a Session.

* The token is verified in ``prepare()``, before the upgrade: a missing or
  bad token is an HTTP 401 with a JSON body, never an accepted socket.
* The codec is chosen from ``Sec-WebSocket-Protocol``.
* Replies and publications are written as complete pre-built frames to the
  connection's IOStream. The stream's ``max_write_buffer_size`` bounds what
  may queue for a client; when a write would pass it, the connection is
  closed with 4001 (slow consumer) and leaves the hub at once.
* ``on_message`` awaits the session, so one connection's commands run in
  order; the session never raises.
"""

from __future__ import annotations

import logging
import time

import tornado.websocket
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from gateway.auth import Identity
from gateway.context import Context
from gateway.http import ApiError
from gateway.hub import Prepared
from gateway.session import Session
from gateway.transport.admission import admit
from proto import JSON_CODEC, CloseCode, Codec, Connection, close_reason, frame, select_codec

__all__ = ["WebSocketHandler"]

log = logging.getLogger("gateway.websocket")


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    ctx: Context
    session: Session | None
    _identity: Identity | None
    _codec: Codec
    _stream: IOStream | None

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self.session = None
        self._identity = None
        self._codec = JSON_CODEC
        self._stream = None
        self._last_seen = time.monotonic()

    # -- handshake ---------------------------------------------------------

    async def prepare(self) -> None:
        self._identity = await admit(self, self.ctx)

    def write_error(self, status_code: int, **kwargs: object) -> None:
        ApiError.write_json(self, status_code, kwargs.get("exc_info"))

    def check_origin(self, origin: str) -> bool:
        allowed = self.ctx.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        self.ctx.metrics.handshake_failures.labels("origin").inc()
        return False

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        self._codec, name = select_codec(subprotocols)
        return name

    def open(self) -> None:
        assert self._identity is not None and self.ws_connection is not None
        settings = self.ctx.settings
        stream = self.ws_connection.stream
        assert stream is not None
        stream.max_write_buffer_size = settings.send_buffer_bytes
        self._stream = stream
        self.set_nodelay(True)
        conn = Connection(
            self._codec,
            self._identity.grants,
            max_subscriptions=settings.max_subscriptions,
            max_publish_bytes=settings.max_publish_bytes,
        )
        ctx = self.ctx
        self.session = Session(
            self, conn, self._identity, ctx.node, ctx.metrics, ctx.core.dispatch, ctx.verifier.verify,
            commands=settings.rate_socket_commands, publishes=settings.rate_socket_publish,
        )  # fmt: skip
        self._identity = None
        self.session.open()

    async def on_message(self, message: str | bytes) -> None:
        self._last_seen = time.monotonic()
        if self.session is not None:
            await self.session.handle(message)

    def on_pong(self, data: bytes) -> None:
        self._last_seen = time.monotonic()

    def on_ping(self, data: bytes) -> None:
        self._last_seen = time.monotonic()

    def heartbeat(self, now: float, dead_after: float) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        if now - self._last_seen > dead_after:
            sub = self.session.identity.sub if self.session else "?"
            log.info("dropping %s: nothing heard for %.0fs", sub, now - self._last_seen)
            self.ctx.metrics.dead_peers.inc()
            # No close handshake: a peer that answers nothing would not answer it.
            stream = self.ws_connection.stream
            if stream is not None:
                stream.close()
            return
        try:
            self.ping()
        except tornado.websocket.WebSocketClosedError:
            pass

    def on_close(self) -> None:
        if self.session is not None:
            self.session.closed()
        self._stream = None

    # -- Transport ---------------------------------------------------------

    def send(self, payload: bytes) -> None:
        self._write(frame(payload, self._codec.binary))

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        self._write(prepared.ws_frame(codec))

    def disconnect(self, code: CloseCode) -> None:
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.close(int(code), close_reason(code))

    def _write(self, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            # IOStream buffers what the socket does not take now and raises
            # once the bound would be passed; the returned future resolves
            # on flush and needs no awaiting (Tornado retrieves its errors).
            stream.write(data)
        except StreamBufferFullError:
            self._slow_consumer(stream)
        except StreamClosedError:
            self._stream = None

    def _slow_consumer(self, stream: IOStream) -> None:
        self._stream = None  # nothing more is queued for this client
        self.ctx.metrics.slow_consumers.inc()
        sub = self.session.identity.sub if self.session else "?"
        log.warning("closing slow consumer %s (send buffer full)", sub)
        stream.max_write_buffer_size = None  # room for the close frame
        # Deferred: this runs inside a hub broadcast, which must not see
        # its member set change under it.
        IOLoop.current().add_callback(self._close_slow)

    def _close_slow(self) -> None:
        if self.session is not None:
            self.session.closed()
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.close(int(CloseCode.SLOW_CONSUMER), close_reason(CloseCode.SLOW_CONSUMER))

