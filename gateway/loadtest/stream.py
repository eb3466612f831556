"""What the socket and SSE load clients share: an HTTP request, then a stream."""

from __future__ import annotations

import asyncio
import time
import typing

from gateway.loadtest.ledger import Ledger
from gateway.loadtest.stats import Tally

__all__ = ["StreamClient"]


class StreamClient(asyncio.Protocol):
    """Writes ``request`` on connect; `head` reads the response head.

    ``done`` resolves True once every channel is subscribed, False when the
    connection fails first (the reason is counted in the tally's errors).
    Deliveries go into ``ledger``, the socket's account of its channels.
    """

    __slots__ = (
        "buffer", "channels", "done", "ledger", "open", "request", "started", "tally", "transport"
    )  # fmt: skip

    def __init__(
        self,
        request: bytes,
        channels: list[str],
        tally: Tally,
        done: asyncio.Future[bool],
        ledger: Ledger,
    ) -> None:
        self.request = request
        self.channels = channels
        self.tally = tally
        self.done = done
        self.ledger = ledger
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.open and not self.tally.stopping:
            self.tally.closed += 1
        self.finish(False, "connection lost" if exc is None else type(exc).__name__)

    def finish(self, ok: bool, error: str | None = None) -> None:
        if not self.done.done():
            if error is not None:
                self.tally.errors[error] += 1
            self.done.set_result(ok)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def head(self, data: bytes, status: bytes) -> bytes | None:
        """The bytes after the response head once it is complete and has ``status``.

        None while the head is incomplete (kept for the next call) or when
        the status is another (the connection is then closed and counted).
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = data
            return None
        got = data[9:12]
        if got != status:
            self.finish(False, f"HTTP {got.decode('latin-1')}")
            self.close()
            return None
        self.open = True
        self.count_open()
        return data[end + 4 :]

    def count_open(self) -> None:
        self.tally.opened += 1
        self.tally.connect_seconds.add(time.monotonic() - self.started)
