"""A lean WebSocket client for load: one asyncio Protocol per socket.

Tens of thousands of these live in a few processes, so each is a slotted
object with no task, no future and no buffer while idle: the handshake is
written on connect, frames are parsed in ``data_received``, pings are
answered at once, and publications are timed and counted into the
process's `Tally` and the socket's `Ledger`. Client frames are masked
(RFC 6455 §5.3).

When the connection ends before the tool stops (the server was killed,
drained with 4000, closed it as a slow consumer with 4001…), the socket
tells its ``owner``, which reconnects it later (docs/protocol.md: 4000-4499
and 1006 reconnect, 4500-4999 do not). The same object then serves the new
connection and resubscribes each channel with ``since`` its last position.

The framing, the handshake and the commands are the Python client's
(`gateway.client.frames`, `.handshake`, `.encoding`); only the decoding of
pushes is the tool's own, straight into `Payload`, the cheapest way to time
a delivery.
"""

from __future__ import annotations

import time

import msgspec

from gateway.client.encoding import JSON
from gateway.client.frames import client_frame, read_frames
from gateway.client.handshake import handshake_request
from gateway.loadtest.stream import Owner, StreamClient
from proto import Sub
from proto.wsframe import FrameError

__all__ = ["Owner", "Payload", "WSClient", "client_frame", "handshake_request", "parse_push"]


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


def parse_push(payload: bytes) -> _Push | None:
    """The push or reply in ``payload``, None when it is not one the tool knows."""
    try:
        return _decode_push(payload)
    except msgspec.DecodeError:
        return None


class WSClient(StreamClient):
    """One load socket: handshake, subscribe, count publications; reconnects through its owner."""

    __slots__ = ()

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
            for slot, ch in enumerate(self.channels):
                sub = Sub(id=slot + 1, ch=ch, since=self.ledger.since(slot))
                self.transport.write(client_frame(JSON.command(sub)))
            data = rest
        try:
            pos = read_frames(data, self._frame)
        except FrameError as exc:
            self.tally.errors[f"frame error {exc.code}"] += 1
            self.close()
            return
        if pos < len(data):
            self.buffer = data[pos:]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == 0x1 or opcode == 0x2:
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
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(client_frame(payload, 0xA))
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.code = code
            self.tally.errors[f"closed {code}"] += 1
            if self.transport is not None:
                self.transport.write(client_frame(payload[:2], 0x8))
                self.transport.close()

    def _reply(self, push: _Push) -> None:
        error = push.error.code if push.error is not None else "?"
        self.reply((push.id or 0) - 1, push.ok, error, push.recovered, push.offset, push.epoch)
