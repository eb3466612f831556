"""permessage-deflate (RFC 7692), sans I/O: the offer, the answer, and the bytes.

The gateway compresses a publication **once per codec** and hands the same
compressed frame to every subscriber that negotiated compression. That is
possible only because every answer it gives carries:

* ``server_no_context_takeover``: each message the server sends is
  compressed on its own, with no memory of the previous ones, so its bytes do
  not depend on who receives it. One `Compressor` per process serves every
  socket; ``Z_FULL_FLUSH`` after each message resets its history (and is five
  times cheaper than a new ``zlib`` stream per message);
* ``client_no_context_takeover`` (a server may add it to any offer, RFC 7692
  §7.1.1.2): the client compresses each message on its own too, so the server
  inflates each with a fresh decompressor (`inflate`) and keeps **no zlib
  state per socket** (a kept inflate context would cost about 40 KB a socket;
  docs/protocol.md has the measurement).

What a client may offer, and what happens (§7.1): every parameter may appear
at most once with a valid value (``server_max_window_bits`` 8-15,
``client_max_window_bits`` none or 8-15, the two ``*_no_context_takeover``
without a value); an offer breaking that, or carrying an unknown parameter,
is *declined* (the next offer is tried; none left: no compression, the
handshake still succeeds). ``server_max_window_bits=N`` is accepted and
echoed: since no message refers to another, a message of at most ``2**N``
bytes never refers further back than the client's window, so the shared
compressed frame is valid for that client; longer messages go to it
uncompressed (RFC 7692 lets any message be sent uncompressed).

Sending (§7.2.1): the payload is deflated, flushed, and its trailing
``00 00 ff ff`` removed; the first frame has RSV1 set. Receiving (§7.2.2):
the tail is put back and the message inflated with at most ``max_size``
bytes of output, so a decompression bomb costs ``max_size`` bytes and a
1009 close, never more memory.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Final

from proto.codes import CloseCode
from proto.wsframe import PROTOCOL_ERROR, TOO_BIG, FrameError

__all__ = [
    "EXTENSION",
    "UNLIMITED",
    "Agreement",
    "Compressor",
    "inflate",
    "negotiate",
    "offer_params",
]

#: The extension's registered name (RFC 7692 §7).
EXTENSION: Final = "permessage-deflate"
_TAIL: Final = b"\x00\x00\xff\xff"
_BITS: Final = frozenset(str(n) for n in range(8, 16))
_FLAGS: Final = ("server_no_context_takeover", "client_no_context_takeover")


@dataclass(frozen=True, slots=True)
class Agreement:
    """What one connection agreed to: the answer to send, and the largest message to compress.

    ``max_bytes`` is ``2**server_max_window_bits`` when the client asked for
    a window under the compressor's 32 KB (longer messages are sent
    uncompressed to it), else `UNLIMITED`.
    """

    response: str
    max_bytes: int


#: No limit on the size of a message to compress (the client's window is the compressor's);
#: under 2**30, a one-digit int for Python, cheap to compare on every delivery.
UNLIMITED: Final = (1 << 30) - 1

_AGREEMENTS: Final = {
    bits: Agreement(
        f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"
        + (f"; server_max_window_bits={bits}" if bits is not None else ""),
        1 << bits if bits is not None and bits < 15 else UNLIMITED,
    )
    for bits in (None, *range(8, 16))
}


def offer_params(offer: str) -> tuple[str, dict[str, str | None]] | None:
    """The extension name and parameters of one offer (``name; a; b=1``), or None if malformed.

    A parameter value may be a token or a quoted string (RFC 6455 §9.1); a
    repeated parameter makes the offer malformed (RFC 7692 §7).
    """
    parts = [part.strip() for part in offer.split(";")]
    name = parts[0]
    if not name:
        return None
    params: dict[str, str | None] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not key or key in params:
            return None
        if not eq:
            params[key] = None
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if not value:
            return None
        params[key] = value
    return name, params


def negotiate(headers: list[str]) -> Agreement | None:
    """The agreement for the first acceptable ``permessage-deflate`` offer, or None.

    ``headers`` are the values of every ``Sec-WebSocket-Extensions`` header
    of the request (offers are comma-separated, in preference order).
    """
    for header in headers:
        for offer in header.split(","):
            parsed = offer_params(offer)
            if parsed is None or parsed[0].lower() != EXTENSION:
                continue
            agreement = _accept(parsed[1])
            if agreement is not None:
                return agreement
    return None


def _accept(params: dict[str, str | None]) -> Agreement | None:
    bits: int | None = None
    for key, value in params.items():
        if key in _FLAGS:
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if value not in _BITS:
                return None
            bits = int(value)
        elif key == "client_max_window_bits":
            if value is not None and value not in _BITS:
                return None
        else:
            return None  # a parameter RFC 7692 does not define for an offer
    return _AGREEMENTS[bits]


class Compressor:
    """The process's one deflater: each message compressed on its own (no context takeover).

    Messages shorter than ``min_bytes`` are not worth it (the caller sends
    them uncompressed). Counts what it did, for metrics: ``frames``
    compressed, ``bytes_in`` / ``bytes_out`` (payloads before and after),
    ``seconds`` spent; and the deliveries of shared compressed frames
    (``delivered``, ``delivered_plain`` / ``delivered_bytes``: frame bytes
    without and with compression).
    """

    __slots__ = (
        "_z",
        "bytes_in",
        "bytes_out",
        "delivered",
        "delivered_bytes",
        "delivered_plain",
        "frames",
        "level",
        "min_bytes",
        "seconds",
    )

    def __init__(self, level: int = 6, min_bytes: int = 256) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"a zlib level is 0-9, not {level}")
        self.level = level
        self.min_bytes = min_bytes
        self._z = zlib.compressobj(level, zlib.DEFLATED, -15)
        self.frames = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.seconds = 0.0
        self.delivered = 0
        self.delivered_plain = 0
        self.delivered_bytes = 0

    def compress(self, payload: bytes) -> bytes:
        """``payload`` deflated with no reference to any other message, its tail removed."""
        started = time.perf_counter()
        z = self._z
        out = z.compress(payload) + z.flush(zlib.Z_FULL_FLUSH)
        if out.endswith(_TAIL):
            out = out[:-4]
        self.seconds += time.perf_counter() - started
        self.frames += 1
        self.bytes_in += len(payload)
        self.bytes_out += len(out)
        return out

    def worth(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is long enough to compress (``min_bytes``).

        A client's `Agreement.max_bytes` may still make it too long for that client.
        """
        return size >= self.min_bytes


def inflate(data: bytes, max_size: int, allowed: int | None = None) -> bytes:
    """One message compressed with no context takeover, inflated to at most ``max_size`` bytes.

    Raises `FrameError`: 1009 past ``max_size`` (a decompression bomb stops
    there), 1002 for data that is not deflate; with ``allowed`` below
    ``max_size``, 1008 past it (inflation stops there: a connection's
    allowance, `gateway.transport.inflation`).
    """
    limit = max_size if allowed is None or allowed >= max_size else allowed
    z = zlib.decompressobj(-15)
    try:
        out = z.decompress(data + _TAIL, limit + 1)
    except zlib.error:
        raise FrameError(PROTOCOL_ERROR, "compressed message is not valid deflate") from None
    if len(out) > limit or z.unconsumed_tail:
        if limit < max_size:
            reason = "inflating more than this connection may"
            raise FrameError(int(CloseCode.POLICY_VIOLATION), reason)
        raise FrameError(TOO_BIG, f"message over {max_size} bytes once inflated")
    return out
