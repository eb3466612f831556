"""WebSocket frames as a client writes and reads them (RFC 6455 §5), sans I/O.

Shared by the Python client (`gateway.client.transport`) and the load tool
(`gateway.loadtest.wsclient`), which holds tens of thousands of sockets: so
`read_frames` hands each frame to a callback instead of building a list, and
its loop is the only per-frame work it adds.

Client frames are masked (§5.3); server frames never are, so a masked one,
like a reserved bit, is a protocol error (`FrameError` with code 1002).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proto.wsframe import OP_TEXT, PROTOCOL_ERROR, TOO_BIG, FrameError, close_payload
from proto.wsprotocol import masked_frame

__all__ = ["UNLIMITED", "client_frame", "close_payload", "read_frames"]

#: No limit on a server frame's size (the load tool's setting).
UNLIMITED: Final = 2**63


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked, unfragmented frame from client to server."""
    return masked_frame(opcode, payload)


def read_frames(
    data: bytes, on_frame: Callable[[int, bool, bytes], object], max_size: int = UNLIMITED
) -> int:
    """Pass each complete server frame at the start of ``data`` to ``on_frame``.

    ``on_frame(opcode, fin, payload)`` is called in order; the return value is
    how many bytes the complete frames took (the rest is an incomplete frame
    to keep for the next call). Raises `FrameError` on a masked frame, a
    reserved bit, or an incomplete frame announcing more than ``max_size``
    bytes (1009: refused before it is buffered; a complete one is the
    caller's to judge, as the reassembly of fragments must be anyway).
    """
    pos = 0
    size = len(data)
    while size - pos >= 2:
        b0 = data[pos]
        n = data[pos + 1]  # the mask bit and the 7-bit length: < 126 is the common case
        if b0 & 0x70:
            raise FrameError(PROTOCOL_ERROR, "reserved bits set")
        if n < 126:
            head = 2
        elif n == 126:
            if size - pos < 4:
                break
            n = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 4
        elif n == 127:
            if size - pos < 10:
                break
            n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 10
        else:
            raise FrameError(PROTOCOL_ERROR, "masked server frame")
        end = pos + head + n
        if end > size:
            if n > max_size:
                raise FrameError(TOO_BIG, f"frame over {max_size} bytes")
            break
        on_frame(b0 & 0x0F, b0 >= 0x80, data[pos + head : end])
        pos = end
    return pos
