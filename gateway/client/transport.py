"""One client WebSocket: the `websockets` library's asyncio connection, adapted.

Why `websockets`: it is the maintained, strict RFC 6455 client of the Python
world (the test suite already checks every frame the gateway writes with
it), with TLS, fragments, UTF-8 checks, the closing handshake and flow
control done and fuzzed upstream; the client no longer carries framing and
handshake code of its own. What stays here is the adapter that gives the
`Connection` above what it needs, as the long-poll fallback gives it too:

* ``on_message`` gets every message in order (``str`` for text frames,
  checked as UTF-8: 1007 otherwise; ``bytes`` for binary ones), from one
  reader task;
* ``closed`` resolves with `Closed` once the last message was handed over:
  the code the gateway sent, or the one the client failed the connection
  with (1002, 1007, 1009), or 1006 when no close frame came either way;
* ``pause_reading`` stops the reader: `websockets` then holds at most
  ``_FRAMES_AHEAD`` frames before it stops reading the socket, so the
  gateway's send buffer, not the client, fills up (and its slow-consumer
  close, 4001, applies);
* what `websockets` raises becomes the client's own errors (`_error`):
  a refused upgrade is a `HandshakeError` with the gateway's JSON message and
  ``Retry-After``, a peer that hangs up during the handshake an `OSError`
  (retried, and counted towards the long-poll fallback), a closed socket a
  `ConnectionClosed` with its code.

The token travels in ``Authorization`` (never in the URL), and the debug
lines `websockets` writes (every header, the start of every frame) go to the
``gateway.client.wire`` logger with it, a ``Cookie`` and a ``refresh``
frame's token redacted (`_Redact`); ``wss://`` uses
``ssl`` or a default context. Pings are the client's own app-level ``ping``
commands (`Connection`), so `websockets`' keepalive is off; so are proxies
from the environment (as the long-poll fallback's HTTP client).

permessage-deflate is offered unless ``compression=False`` (as browsers
offer it): a gateway with ``COMPRESSION=on`` accepts it, answering
``server_no_context_takeover; client_no_context_takeover``, and then sends
each publication compressed once for all its compressing subscribers;
`websockets` inflates each message on its own and compresses what the client
sends without keeping a context either. A gateway with ``COMPRESSION=off``
declines, and nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl as ssl_module
from collections.abc import Callable, Mapping, Sequence
from typing import Final, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from websockets import exceptions as ws
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State
from websockets.typing import Subprotocol

from gateway.client.exceptions import ConnectionClosed, HandshakeError

__all__ = ["Closed", "OnMessage", "WebSocket", "open_websocket"]

log = logging.getLogger("gateway.client")


class _Redact(logging.Filter):
    """Credentials out of `websockets`' debug lines: the ``Authorization`` and ``Cookie``
    headers, and a ``refresh`` frame (its start and end are shown, the token among them)."""

    _HEADER: Final = re.compile(r"(?i)^([<>] (?:authorization|cookie|set-cookie): ).+")
    _REFRESH: Final = re.compile(
        r"^(> (?:TEXT|BINARY) ).*(?:refresh|72 65 66 72 65 73 68).*( \[.*\])$"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        redacted = self._REFRESH.sub(r"\1[redacted]\2", self._HEADER.sub(r"\1[redacted]", text))
        if redacted != text:
            record.msg, record.args = redacted, ()
        return True


#: `websockets`' own logger for the client's sockets: its DEBUG lines, redacted.
wire_log = logging.getLogger("gateway.client.wire")
wire_log.addFilter(_Redact())

_ABNORMAL: Final = 1006
_CLOSE_TIMEOUT: Final = 5.0  # seconds for the server's end of a closing handshake
#: Frames `websockets` takes in while the reader is paused, before it stops reading the socket.
_FRAMES_AHEAD: Final = 4
_SCHEMES: Final = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}

#: Where messages go: ``str`` from text frames, ``bytes`` from binary ones.
OnMessage = Callable[[bytes | str], None]


class Closed(NamedTuple):
    code: int
    reason: str


class WebSocket:
    """The client end of one open socket, until its TCP connection ends."""

    def __init__(self, conn: ClientConnection, on_message: OnMessage) -> None:
        #: The `websockets` connection (its ``transport`` is the socket's).
        self.conn = conn
        self.closed: asyncio.Future[Closed] = asyncio.get_running_loop().create_future()
        self._on_message = on_message
        self._reading = asyncio.Event()
        self._reading.set()
        self._aborted = False
        self._reader = asyncio.create_task(self._read())

    @property
    def subprotocol(self) -> str | None:
        return self.conn.subprotocol

    async def _read(self) -> None:
        conn = self.conn
        lost = asyncio.ensure_future(conn.wait_closed())
        try:
            while True:
                if not self._reading.is_set():
                    resumed = asyncio.ensure_future(self._reading.wait())
                    await asyncio.wait((resumed, lost), return_when=asyncio.FIRST_COMPLETED)
                    resumed.cancel()
                    if not self._reading.is_set():
                        break  # the connection ended while paused: what it held is dropped
                message = await conn.recv()
                if self._aborted:
                    break  # dropped by the client: nothing it still held is handed over
                self._on_message(message)
        except ws.ConnectionClosed:
            pass  # every message before the close was handed over
        except Exception:
            log.exception("the client failed on a message: dropping the socket")
            self.abort()
            await lost
        finally:
            lost.cancel()
            if not self.closed.done():
                self.closed.set_result(self._ending())

    def _ending(self) -> Closed:
        """The close code: the peer's, else the one this end sent (a failure), else 1006."""
        protocol = self.conn.protocol
        frame = protocol.close_rcvd or protocol.close_sent
        return Closed(frame.code, frame.reason) if frame is not None else Closed(_ABNORMAL, "")

    async def send(self, payload: bytes, binary: bool) -> None:
        """Write one message; waits while the transport's buffer is full."""
        if self.conn.state is not State.OPEN:
            raise ConnectionClosed(*self._ending())
        try:
            await self.conn.send(payload, text=not binary)
        except ws.ConnectionClosed:
            raise ConnectionClosed(*self._ending()) from None

    async def close(self, code: int = 1000, reason: str = "") -> Closed:
        """The closing handshake: send a close frame, await the server's end of it."""
        await self.conn.close(code, reason)
        return await asyncio.shield(self.closed)

    def abort(self) -> None:
        """Drop the TCP connection at once (``closed`` says 1006 unless a close frame passed).

        Messages already received and not yet handed over are dropped with it.
        """
        self._aborted = True
        self.conn.transport.abort()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()


def _error(exc: ws.InvalidHandshake) -> Exception:
    """The client's error for a failed opening handshake."""
    if isinstance(exc, ws.InvalidStatus):
        response = exc.response
        return HandshakeError.refused(
            response.status_code, bytes(response.body or b""), response.headers.get("Retry-After")
        )
    if isinstance(exc, ws.InvalidMessage) and isinstance(exc.__cause__, EOFError):
        return ConnectionError(f"connection lost in the handshake: {exc}")
    if isinstance(exc, ws.InvalidHeader | ws.NegotiationError):
        return HandshakeError(101, f"invalid upgrade response: {exc}")
    return HandshakeError(0, str(exc))


async def open_websocket(
    url: str,
    *,
    token: str | None,
    subprotocols: Sequence[str],
    on_message: OnMessage,
    max_size: int = 2**24,
    ssl: ssl_module.SSLContext | None = None,
    compression: bool = True,
    headers: Mapping[str, str] | None = None,
) -> WebSocket:
    """Connect to ``url`` (``ws://host:port/ws``) and complete the handshake.

    Raises `HandshakeError` when the gateway refuses, `OSError` when it
    cannot be reached; the caller bounds the time (``asyncio.timeout``).
    """
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    try:
        conn = await connect(
            urlunsplit((scheme, *parts[1:])),
            subprotocols=[Subprotocol(p) for p in subprotocols],
            additional_headers={
                **(headers or {}),
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
            compression="deflate" if compression else None,
            proxy=None,
            open_timeout=None,
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT,
            max_size=max_size,
            max_queue=_FRAMES_AHEAD,
            logger=wire_log,
            ssl=(ssl or True) if scheme == "wss" else None,  # True: a default context
        )
    except ws.InvalidHandshake as exc:
        raise _error(exc) from exc
    return WebSocket(conn, on_message)
