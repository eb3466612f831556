"""WebSocket frames (RFC 6455 §5), sans I/O.

Out: RFC 6455 §5.1 says a server MUST NOT mask frames it sends, so the bytes
of a frame do not depend on the recipient. Fan-out builds one frame per
publication and encoding and hands the same ``bytes`` object to every
subscriber's stream.

In: `read_frames` takes the bytes a client sent and returns its whole
frames, unmasked, and how many bytes they used; a violation raises
`FrameError` with the close code to send (1002 protocol error, 1009 too big).
Fragmented messages are reassembled by the caller (`Fragments`), which is
rare enough that a connection holds no state for it until it happens.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Fragments",
    "FrameError",
    "close_frame",
    "frame",
    "parse_close",
    "parse_header",
    "read_frames",
    "unmask",
]

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_FIN: Final = 0x80
_KNOWN = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
PROTOCOL_ERROR: Final = 1002
TOO_BIG: Final = 1009
_U16: Final = struct.Struct("!BBH")
_U64: Final = struct.Struct("!BBQ")


def frame(payload: bytes, binary: bool = False) -> bytes:
    """One unfragmented, unmasked, uncompressed data frame."""
    first = _FIN | (OP_BINARY if binary else OP_TEXT)
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n <= 0xFFFF:
        return _U16.pack(first, 126, n) + payload
    return _U64.pack(first, 127, n) + payload


def parse_header(data: bytes) -> tuple[int, bool, int, int]:
    """(opcode, fin, header length, payload length) of an unmasked frame.

    For tests and tools; the gateway never parses its own frames.
    """
    b0, b1 = data[0], data[1]
    if b1 & 0x80:
        raise ValueError("masked frame")
    n = b1 & 0x7F
    if n == 126:
        return b0 & 0x0F, bool(b0 & _FIN), 4, int.from_bytes(data[2:4], "big")
    if n == 127:
        return b0 & 0x0F, bool(b0 & _FIN), 10, int.from_bytes(data[2:10], "big")
    return b0 & 0x0F, bool(b0 & _FIN), 2, n


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame with ``code`` and a reason of at most 123 bytes."""
    # Cut at 123 bytes without splitting a character: a reason must be valid UTF-8.
    payload = code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()
    return bytes((_FIN | OP_CLOSE, len(payload))) + payload


def parse_close(payload: bytes) -> int:
    """The code of a close frame's payload: 1005 when it has none."""
    if len(payload) < 2:
        if payload:
            raise FrameError(PROTOCOL_ERROR, "close frame of one byte")
        return 1005
    return int.from_bytes(payload[:2], "big")


class FrameError(Exception):
    """The peer broke the framing: close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def read_frames(data: bytes, max_size: int) -> tuple[list[tuple[int, bool, bytes]], int]:
    """The complete client frames at the start of ``data`` and the bytes they take.

    Each frame is ``(opcode, fin, payload)`` with the payload unmasked. A
    frame over ``max_size`` bytes is refused as soon as its header is read.
    """
    frames: list[tuple[int, bool, bytes]] = []
    pos = 0
    size = len(data)
    while size - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        opcode = b0 & 0x0F
        if b0 & 0x70:
            raise FrameError(PROTOCOL_ERROR, "reserved bits set")
        if opcode not in _KNOWN:
            raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not b1 & 0x80:
            raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
        n = b1 & 0x7F
        head = 6
        if n == 126:
            if size - pos < 4:
                break
            n = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 8
        elif n == 127:
            if size - pos < 10:
                break
            n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 14
        if opcode >= OP_CLOSE and (n > 125 or not b0 & _FIN):
            raise FrameError(PROTOCOL_ERROR, "control frames are short and unfragmented")
        if n > max_size:
            raise FrameError(TOO_BIG, f"frame over {max_size} bytes")
        end = pos + head + n
        if end > size:
            break
        mask = data[pos + head - 4 : pos + head]
        frames.append((opcode, bool(b0 & _FIN), unmask(mask, data[pos + head : end])))
        pos = end
    return frames, pos


class Fragments:
    """A fragmented message being reassembled (RFC 6455 §5.4)."""

    __slots__ = ("opcode", "parts", "size")

    def __init__(self, opcode: int, first: bytes) -> None:
        self.opcode = opcode
        self.parts = [first]
        self.size = len(first)

    def add(self, payload: bytes, max_size: int) -> None:
        self.size += len(payload)
        if self.size > max_size:
            raise FrameError(TOO_BIG, f"message over {max_size} bytes")
        self.parts.append(payload)

    def message(self) -> bytes:
        return b"".join(self.parts)
