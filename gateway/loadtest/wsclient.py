"""A lean WebSocket client for load: one asyncio Protocol per socket.

Tens of thousands of these live in a few processes, so each is a slotted
object with no task, no future and no buffer while idle: the handshake is
written on connect (`gateway.loadtest.handshake`), and from the 101 on the
bytes go through the gateway's own sans-I/O protocol object, client side
(`proto.wsprotocol.WebSocketProtocol`: framing, fragments, UTF-8, pongs and
the closing handshake by RFC 6455's rules, compressed messages inflated once
``--compression`` was agreed: see `inflate_shared`), whose messages are timed and
counted into the process's `Tally` and the socket's `Ledger`. Client frames
are masked (RFC 6455 §5.3).

When the connection ends before the tool stops (the server was killed,
drained with 4000, closed it as a slow consumer with 4001…), the socket
tells its ``owner``, which reconnects it later (docs/protocol.md: 4000-4499
and 1006 reconnect, 4500-4999 do not). The same object then serves the new
connection, with a new protocol object, and resubscribes each channel with
``since`` its last position.

The commands are the Python client's (`gateway.client.encoding`); only the
decoding of pushes is the tool's own, straight into `Payload`, the cheapest
way to time a delivery.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec

from gateway.client.encoding import JSON
from gateway.loadtest.stream import Owner, StreamClient
from proto import Sub
from proto.deflate import inflate
from proto.wsframe import OP_TEXT
from proto.wsprotocol import WebSocketProtocol, WSState, masked_frame

__all__ = [
    "MAX_MESSAGE",
    "Owner",
    "Payload",
    "WSClient",
    "client_frame",
    "inflate_shared",
    "parse_push",
]

#: The largest message a load socket takes (as the Python client's ``max_size``); larger: 1009.
MAX_MESSAGE: Final = 2**24


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked, unfragmented frame from client to server."""
    return masked_frame(opcode, payload)


class Payload(msgspec.Struct):
    """What the load tool publishes: the channel's sequence number, the send time, the channel."""

    s: int
    t: float
    c: int = 0


class _Error(msgspec.Struct):
    code: int = 0


class _Push(msgspec.Struct):
    op: str | None = None
    data: Payload | None = None
    id: int | None = None
    ok: bool | None = None
    error: _Error | None = None
    recovered: bool | None = None
    offset: int | None = None
    epoch: str | None = None
    code: int | None = None  # an SSE close event's


_decode_push = msgspec.json.Decoder(_Push).decode
_inflated: dict[bytes, bytes] = {}
_INFLATED_KEPT: Final = 256


def inflate_shared(data: bytes, max_size: int) -> bytes:
    """`proto.deflate.inflate`, once per distinct compressed message in this process.

    One load process stands for thousands of clients on one CPU, and the
    gateway sends every compressing subscriber the same compressed bytes: each
    phone would inflate them once, so the process inflates them once and
    reuses the result for the same bytes (inflating is deterministic). Without
    this, the tool's own inflating (15 us a message) would be what a
    compressed fan-out benchmark measures.
    """
    out = _inflated.get(data)
    if out is None:
        out = inflate(data, max_size)
        if len(_inflated) >= _INFLATED_KEPT:
            _inflated.clear()
        _inflated[data] = out
    return out


def parse_push(payload: bytes) -> _Push | None:
    """The push or reply in ``payload``, None when it is not one the tool knows."""
    try:
        return _decode_push(payload)
    except msgspec.DecodeError:
        return None


class WSClient(StreamClient):
    """One load socket: handshake, subscribe, count publications; reconnects through its owner."""

    __slots__ = ("ws",)
    ws: WebSocketProtocol  # made when the 101 arrives, for each connection

    # -- bytes in ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if not self.open:
            rest = self.head(data, b"101")
            if rest is None:
                return
            assert self.transport is not None
            # The server agreed to compress (it offers nothing a request did not).
            deflate = b"permessage-deflate" in data[: len(data) - len(rest)].lower()
            self.ws = WebSocketProtocol(MAX_MESSAGE, client=True, deflate=deflate,
                                        inflate=inflate_shared)  # fmt: skip
            for slot, ch in enumerate(self.channels):
                sub = Sub(id=slot + 1, ch=ch, since=self.ledger.since(slot))
                self.transport.write(client_frame(JSON.command(sub)))
            data = rest
        ws = self.ws
        for message in ws.receive(data):
            self._message(message)
        transport = self.transport
        if transport is None:
            return
        out = ws.data_to_send()  # pongs, the answer to a close frame, or our failure's
        if out:
            transport.write(out)
        if ws.state is WSState.CLOSED and not transport.is_closing():
            if ws.failure is not None:
                self.tally.errors[f"frame error {ws.failure.code}"] += 1
                self.close()
            else:
                self.code = ws.close_code or 1005
                self.tally.errors[f"closed {self.code}"] += 1
                transport.close()

    def _message(self, payload: bytes) -> None:
        push = parse_push(payload)
        if push is None:
            self.tally.errors["unparsed frame"] += 1
        elif push.data is not None:
            d = push.data
            self.tally.delivered(self.ledger, d.c, d.s, d.t, time.time())
            if push.offset is not None:
                self.ledger.position_of(d.c, push.offset, push.epoch)
        elif push.id is not None:
            self._reply(push)
        elif push.op == "gap":
            self.tally.errors["gap push"] += 1

    def _reply(self, push: _Push) -> None:
        error = push.error.code if push.error is not None else "?"
        self.reply((push.id or 0) - 1, push.ok, error, push.recovered, push.offset, push.epoch)
