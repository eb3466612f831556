"""A lean WebSocket client for load: one asyncio Protocol per socket.

Tens of thousands of these live in a few processes, so each is a slotted
object with no task, no future and no buffer while idle: the handshake is
written on connect, frames are parsed in ``data_received``, pings are
answered at once, and publications are timed and counted into the
process's `Tally`. Client frames are masked (RFC 6455 §5.3).

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
from gateway.loadtest.stream import StreamClient
from proto import Sub
from proto.wsframe import FrameError

__all__ = ["Payload", "WSClient", "client_frame", "handshake_request", "parse_push"]


class Payload(msgspec.Struct):
    """What the load tool publishes: a sequence number and the wall-clock send time."""

    s: int
    t: float


class _Error(msgspec.Struct):
    code: int = 0


class _Push(msgspec.Struct):
    op: str | None = None
    data: Payload | None = None
    id: int | None = None
    ok: bool | None = None
    error: _Error | None = None


_decode_push = msgspec.json.Decoder(_Push).decode


def parse_push(payload: bytes) -> _Push | None:
    """The push or reply in ``payload``, None when it is not one the tool knows."""
    try:
        return _decode_push(payload)
    except msgspec.DecodeError:
        return None


class WSClient(StreamClient):
    """One load socket: handshake, subscribe, then count publications."""

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
            for i, ch in enumerate(self.channels, 1):
                self.transport.write(client_frame(JSON.command(Sub(id=i, ch=ch))))
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
                self.tally.delivered(push.data.s, push.data.t, time.time())
            elif push.id is not None:
                self._reply(push)
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(client_frame(payload, 0xA))
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.tally.errors[f"closed {code}"] += 1
            if self.transport is not None:
                self.transport.write(client_frame(payload[:2], 0x8))
                self.transport.close()

    def _reply(self, push: _Push) -> None:
        if push.ok:
            if push.id == len(self.channels):
                self.tally.subscribed += 1
                self.finish(True)
        else:
            code = push.error.code if push.error is not None else "?"
            self.tally.errors[f"error reply {code}"] += 1
            self.finish(False)
