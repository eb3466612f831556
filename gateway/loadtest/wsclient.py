"""A lean WebSocket client for load: one asyncio Protocol per socket.

Tens of thousands of these live in a few processes, so each is a slotted
object with no task, no future and no buffer while idle: the handshake is
written on connect, frames are parsed in ``data_received``, pings are
answered at once, and publications are timed and counted into the
process's `Tally`. Client frames are masked (RFC 6455 §5.3).
"""

from __future__ import annotations

import base64
import os
import time

import msgspec

from gateway.loadtest.stream import StreamClient

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


def handshake_request(host: str, path: str, token: str | None, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}{extra}\r\n"
    ).encode()


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked frame from client to server."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n <= 0xFFFF:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


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
                sub = b'{"op":"sub","ch":"%s","id":%d}' % (ch.encode(), i)
                self.transport.write(client_frame(sub))
            data = rest
        pos = 0
        size = len(data)
        while size - pos >= 2:
            b1 = data[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + n
            if end > size:
                break
            self._frame(data[pos] & 0x0F, data[pos + head : end])
            pos = end
        if pos < size:
            self.buffer = data[pos:]

    def _frame(self, opcode: int, payload: bytes) -> None:
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
