"""One client WebSocket: a small asyncio Protocol over the sans-I/O pieces.

Why not a library: the gateway's runtime dependencies hold no WebSocket
client but Tornado's, and ``websockets`` is only a test dependency. Tornado's
``websocket_connect`` would do, but a Protocol on `gateway.client.frames` and
`gateway.client.handshake` is about 150 lines, puts the token in a header
rather than the URL, reports the close code and the HTTP refusal (status,
message, ``Retry-After``) exactly as the reconnect policy needs them, and
shares its framing with the load tool, which must stay one slotted Protocol
per socket. So one implementation of the client side of RFC 6455 serves both.

`open_websocket` connects (``ws://`` or ``wss://``), writes the handshake and
returns once the 101 is checked. From there the RFC 6455 rules are the
server's own: `proto.wsprotocol.WebSocketProtocol`, client side. Messages
(reassembled, at most ``max_size`` bytes, text checked as UTF-8) go to
``on_message``; pings are answered at once; a server that breaks the protocol
is failed (1002, 1007, 1009); ``closed`` resolves with the close code when the
TCP connection ends (1006: no close frame came).
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple, cast
from urllib.parse import urlsplit

from gateway.client.errors import ConnectionClosed, HandshakeError
from gateway.client.handshake import (
    Response,
    check_upgrade,
    handshake_request,
    new_key,
    parse_response,
    refusal,
)
from proto.wsprotocol import WebSocketProtocol, WSState

__all__ = ["Closed", "WebSocket", "open_websocket"]

_MAX_HEAD: Final = 16384
_NO_STATUS: Final = 1005
_ABNORMAL: Final = 1006
_CLOSE_TIMEOUT: Final = 5.0  # seconds for the server's end of a closing handshake


class Closed(NamedTuple):
    code: int
    reason: str


class WebSocket(asyncio.Protocol):
    """The client end of one socket, from the handshake to the last byte."""

    def __init__(
        self,
        request: bytes,
        key: str,
        offered: Sequence[str],
        on_message: Callable[[bytes], None],
        max_size: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[str | None] = loop.create_future()
        self.closed: asyncio.Future[Closed] = loop.create_future()
        self.subprotocol: str | None = None
        self._request = request
        self._key = key
        self._offered = offered
        self._on_message = on_message
        self._protocol = WebSocketProtocol(max_size, client=True)
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._refused: tuple[Response, int] | None = None  # a refusal and its body length
        self._received: Closed | None = None
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.opened.done():
            self.opened.set_exception(
                self._refusal() or ConnectionError("connection lost in the handshake")
            )
        if not self.closed.done():
            self.closed.set_result(self._received or Closed(_ABNORMAL, ""))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        data = self._buffer + data if self._buffer else data
        self._buffer = b""
        if not self.opened.done():
            data = self._handshake(data)
            if not data:
                return
        protocol = self._protocol
        for message in protocol.receive(data):
            self._on_message(message)
        self._write(protocol.data_to_send())
        if protocol.state is WSState.CLOSED and self._received is None:
            self._received = Closed(protocol.close_code or _NO_STATUS, protocol.close_reason)
            if protocol.failure is not None:  # the client closes at once when it fails
                self.abort()

    # -- use ---------------------------------------------------------------

    async def send(self, payload: bytes, binary: bool) -> None:
        """Write one message; waits while the kernel and transport buffers are full."""
        if self._transport is None or self._protocol.state is not WSState.OPEN:
            code, reason = self._received or (_ABNORMAL, "")
            raise ConnectionClosed(code, reason)
        self._transport.write(self._protocol.message(payload, binary))
        if self._drain is not None and not self._drain.done():
            await self._drain

    async def close(self, code: int = 1000, reason: str = "") -> Closed:
        """The closing handshake: send a close frame, await the server's end of it."""
        self._write(self._protocol.close(code, reason))
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), _CLOSE_TIMEOUT)
        except TimeoutError:
            self.abort()
            return await self.closed

    def fail(self, code: int, reason: str) -> None:
        """Close at once after a protocol violation by the peer; ``closed`` says ``code``."""
        self._received = self._received or Closed(code, reason)
        self._write(self._protocol.close(code, reason))
        self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # -- internals ---------------------------------------------------------

    def _handshake(self, data: bytes) -> bytes:
        """Consume the response head; returns the bytes after it (frames already sent)."""
        if self._refused is not None:
            self._buffer = data
            if len(data) >= self._refused[1]:
                self._fail_handshake(refusal(*self._body()))
            return b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > _MAX_HEAD:
                self._fail_handshake(HandshakeError(0, "response head too large"))
            else:
                self._buffer = data
            return b""
        try:
            response = parse_response(data[:end])
            if response.status != 101:
                self._refused = (response, response.content_length)
                return self._handshake(data[end + 4 :])
            self.subprotocol = check_upgrade(response, self._key, self._offered)
        except HandshakeError as exc:
            self._fail_handshake(exc)
            return b""
        self.opened.set_result(self.subprotocol)
        return data[end + 4 :]

    def _refusal(self) -> HandshakeError | None:
        return None if self._refused is None else refusal(*self._body())

    def _body(self) -> tuple[Response, bytes]:
        assert self._refused is not None
        response, length = self._refused
        return response, self._buffer[:length]

    def _fail_handshake(self, exc: HandshakeError) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.abort()

    def _write(self, data: bytes) -> None:
        if data and self._transport is not None:
            self._transport.write(data)


async def open_websocket(
    url: str,
    *,
    token: str | None,
    subprotocols: Sequence[str],
    on_message: Callable[[bytes], None],
    max_size: int = 2**24,
    ssl: ssl_module.SSLContext | None = None,
) -> WebSocket:
    """Connect to ``url`` (``ws://host:port/ws``) and complete the handshake.

    Raises `HandshakeError` when the gateway refuses, `OSError` when it
    cannot be reached; the caller bounds the time (``asyncio.timeout``).
    """
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    port = parts.port or (443 if secure else 80)
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if ":" in (parts.hostname or "") and parts.port is not None:
        host = f"[{parts.hostname}]:{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = new_key()
    request = handshake_request(host, target, token, key=key, subprotocols=subprotocols)
    context = (ssl or ssl_module.create_default_context()) if secure else None
    loop = asyncio.get_running_loop()

    def factory() -> WebSocket:
        return WebSocket(request, key, subprotocols, on_message, max_size)

    _, ws = await loop.create_connection(factory, parts.hostname, port, ssl=context)
    try:
        await ws.opened
    except BaseException:
        ws.abort()
        raise
    return ws
