"""What the socket and SSE load clients share: an HTTP request, then a stream.

Both reconnect the same way: when the connection ends before the tool
stops, the client tells its ``owner`` (`gateway.loadtest.worker`), which
calls `StreamClient.renew` and connects the same object again; the
subscription replies on the new connection are counted as recovered, not
recovered, or without history (`StreamClient.reply`).
"""

from __future__ import annotations

import asyncio
import time
import typing
from typing import Protocol

from gateway.loadtest.ledger import Ledger
from gateway.loadtest.stats import Tally

__all__ = ["Owner", "StreamClient"]


class Owner(Protocol):
    def lost(self, client: StreamClient) -> None:
        """``client``'s connection ended before the tool stopped: reconnect it, or not."""


class StreamClient(asyncio.Protocol):
    """Writes ``request`` on connect; `head` reads the response head.

    ``done`` resolves True once every channel is subscribed, False when the
    connection fails first (the reason is counted in the tally's errors).
    Deliveries go into ``ledger``, the socket's account of its channels.
    """

    __slots__ = (
        "acked", "attempt", "buffer", "channels", "code", "done", "ever", "ledger", "open", "owner",
        "request", "started", "tally", "transport", "url",
    )  # fmt: skip

    def __init__(
        self,
        request: bytes,
        channels: list[str],
        tally: Tally,
        done: asyncio.Future[bool],
        ledger: Ledger,
        owner: Owner | None = None,
    ) -> None:
        self.owner = owner
        self.url = 0  # index of the URL connected to, in the worker's list
        self.attempt = 0  # reconnection attempts since the last subscription
        self.acked = 0  # subscription replies on this connection
        self.code = 0  # the close code the server sent, 0 when none
        self.ever = False  # subscribed at least once: later connections are reconnects
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

    def renew(self, request: bytes, done: asyncio.Future[bool]) -> None:
        """Ready the object for its next connection."""
        self.request = request
        self.done = done
        self.buffer = b""
        self.open = False
        self.acked = 0
        self.code = 0
        self.started = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.open and not self.tally.stopping:
            self.tally.closed += 1
        self.finish(False, "connection lost" if exc is None else type(exc).__name__)
        if self.owner is not None and self.ever and not self.tally.stopping:
            self.owner.lost(self)

    def reply(
        self,
        slot: int,
        ok: bool | None,
        error: int | str,
        recovered: bool | None,
        offset: int | None,
        epoch: str | None,
    ) -> None:
        """Count the reply to the subscription of ``slot``; done once every channel has one."""
        if not ok or not 0 <= slot < len(self.channels):
            self.tally.errors[f"error reply {error}"] += 1
            self.finish(False)
            if self.ever:  # a refused resubscription: try again on a new connection
                self.close()
            return
        self.ledger.position(slot, offset, epoch)
        if self.ever:
            if recovered is None:
                self.tally.no_history += 1
            elif recovered:
                self.tally.recovered += 1
            else:
                self.tally.unrecovered += 1
                self.ledger.unrecovered |= 1 << slot
        self.acked += 1
        if self.acked == len(self.channels):
            if self.ever:
                self.tally.reconnects += 1
            else:
                self.tally.subscribed += 1
                self.ever = True
            self.attempt = 0
            self.finish(True)

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
        if not self.ever:  # reconnections are counted once subscribed again
            self.tally.opened += 1
            self.tally.connect_seconds.add(time.monotonic() - self.started)
