"""WebSocket frames (RFC 6455 §5), sans I/O.

Out: RFC 6455 §5.1 says a server MUST NOT mask frames it sends, so the bytes
of a frame do not depend on the recipient. Fan-out builds one frame per
publication and encoding and hands the same ``bytes`` object to every
subscriber's stream.

In: frames from the peer are read by `proto.wsprotocol.WebSocketProtocol`
(framing, fragments, UTF-8, the closing handshake); a violation is a
`FrameError` with the close code to send (1002 protocol error, 1007 invalid
UTF-8, 1009 too big).
"""

from __future__ import annotations

import struct
from typing import Final

from proto.codes import CloseCode

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "close_frame",
    "close_payload",
    "frame",
    "parse_header",
    "unmask",
]

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_FIN: Final = 0x80
_RSV1: Final = 0x40
PROTOCOL_ERROR: Final = int(CloseCode.PROTOCOL_ERROR)
TOO_BIG: Final = int(CloseCode.MESSAGE_TOO_BIG)
_U16: Final = struct.Struct("!BBH")
_U64: Final = struct.Struct("!BBQ")


def frame(payload: bytes, binary: bool = False, compressed: bool = False) -> bytes:
    """One unfragmented, unmasked data frame; ``compressed``: RSV1 set (RFC 7692 §6).

    A compressed frame's ``payload`` is what `proto.deflate.Compressor` made.
    """
    first = _FIN | (OP_BINARY if binary else OP_TEXT) | (_RSV1 if compressed else 0)
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n <= 0xFFFF:
        return _U16.pack(first, 126, n) + payload
    return _U64.pack(first, 127, n) + payload


def parse_header(data: bytes) -> tuple[int, bool, int, int]:
    """(opcode, fin, header length, payload length) of an unmasked frame (RSV bits ignored).

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


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: ``code``, then the reason cut to at most 123 bytes.

    The cut never splits a character: a close reason must be valid UTF-8.
    """
    return code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame with ``code`` and a reason of at most 123 bytes."""
    payload = close_payload(code, reason)
    return bytes((_FIN | OP_CLOSE, len(payload))) + payload


class FrameError(Exception):
    """The peer broke the framing: close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """``data`` XORed with the 4-byte ``mask`` repeated (masking and unmasking alike)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
