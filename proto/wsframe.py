"""Server-to-client WebSocket frames, built once and written many times.

RFC 6455 §5.1: a server MUST NOT mask frames it sends, so the bytes of a
frame do not depend on the recipient. Fan-out builds one frame per
publication and encoding and hands the same ``bytes`` object to every
subscriber's stream.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["OP_BINARY", "OP_TEXT", "frame", "parse_header"]

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_FIN: Final = 0x80
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
