"""The WebSocket handshake (RFC 6455 §4.2), answered by a thin Tornado handler.

* The token is verified in ``prepare()``, before the upgrade: a missing or
  bad token is an HTTP 401 with a JSON body, never an accepted socket; so
  are a refused origin (403), a request that is not an upgrade (400, or 426
  for another protocol version) and a full process (503, see below).
* The codec is chosen from ``Sec-WebSocket-Protocol``.
* Then the handler detaches the socket from Tornado's HTTP machinery and
  gives it to the event loop's transport with a `WSConnection`, which
  writes the 101 and carries the connection from there on: the handler,
  its request and headers are garbage as soon as ``get`` returns.

Capacity: a process refuses new sockets once it holds ``MAX_CONNECTIONS``
(by default the open-file limit less a reserve for everything else), with a
503 and a log line, so reaching the file limit is a clear refusal rather
than failing ``accept`` calls.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time

import tornado.web

from gateway.auth import Identity
from gateway.context import Context
from gateway.http import ApiError
from gateway.session import Session
from gateway.transport.admission import admit
from gateway.transport.wsconn import WSConnection
from proto import Connection, select_codec

__all__ = ["WebSocketHandler", "accept_value"]

log = logging.getLogger("gateway.websocket")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


class WebSocketHandler(tornado.web.RequestHandler):
    ctx: Context

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    async def prepare(self) -> None:
        self.identity = await admit(self, self.ctx)

    def write_error(self, status_code: int, **kwargs: object) -> None:
        ApiError.write_json(self, status_code, kwargs.get("exc_info"))

    async def get(self) -> None:
        ctx, headers = self.ctx, self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in (
            headers.get("Connection", "").lower()
        ):
            raise ApiError(400, "bad_request", "expected a WebSocket upgrade (Upgrade: websocket)")
        if headers.get("Sec-WebSocket-Version") != "13":
            raise ApiError(426, "upgrade_required", "WebSocket version 13 only",
                           headers={"Sec-WebSocket-Version": "13"})  # fmt: skip
        key = headers.get("Sec-WebSocket-Key", "")
        if len(key) != 24:
            raise ApiError(400, "bad_request", "missing or malformed Sec-WebSocket-Key")
        origin = headers.get("Origin")
        allowed = ctx.settings.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            ctx.metrics.handshake_failures.labels("origin").inc()
            raise ApiError(403, "forbidden", f"origin {origin} is not allowed")
        limit = ctx.max_connections
        if ctx.node.hub.connection_count() >= limit:
            ctx.metrics.handshake_failures.labels("capacity").inc()
            _log_full(limit)
            raise ApiError(503, "unavailable", f"this process holds its limit of {limit} connections",
                           headers={"Retry-After": "1"})  # fmt: skip
        offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        codec, name = select_codec(offered)
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_value(key).encode() + b"\r\n"
            + (b"Sec-WebSocket-Protocol: " + name.encode() + b"\r\n" if name else b"")
            + b"\r\n"
        )  # fmt: skip
        identity: Identity = self.identity
        settings = ctx.settings

        def make_session(ws: WSConnection) -> Session:
            conn = Connection(codec, identity.grants, max_subscriptions=settings.max_subscriptions,
                              max_publish_bytes=settings.max_publish_bytes)  # fmt: skip
            return Session(ws, conn, identity, ctx.node, ctx.metrics, ctx.core.dispatch,
                           ctx.verifier.verify, commands=settings.rate_socket_commands,
                           publishes=settings.rate_socket_publish)  # fmt: skip

        ws = WSConnection(response, codec, make_session, ctx.metrics, settings.max_frame_bytes,
                          ctx.coalescer)  # fmt: skip
        stream = self.detach()
        # The socket leaves Tornado's stream for the loop's transport; the
        # stream (and its buffers) closes its own descriptor, a duplicate.
        sock = stream.socket.dup()
        stream.close()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: ws, sock)
        except OSError as exc:
            sock.close()
            log.info("socket lost during the handshake: %s", exc)
            return
        transport.set_write_buffer_limits(high=settings.send_buffer_bytes)


_last_full_log = 0.0


def _log_full(limit: int) -> None:
    """Log a full process at most every 10 s."""
    global _last_full_log
    now = time.monotonic()
    if now - _last_full_log > 10:
        _last_full_log = now
        log.warning("refusing new sockets: this process holds its limit of %d connections", limit)
