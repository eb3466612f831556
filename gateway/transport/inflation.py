"""A socket's allowance of inflated bytes (permessage-deflate, RFC 7692).

A compressed message of ~100 bytes inflates to 64 KiB: without an allowance,
one client at 200 KiB/s made its process inflate and parse ~150 MiB a second
(a bystander's ping went from 0.5 ms to 108 ms), and no limit on a message's
size sees it. Each socket that agreed to compression may make the gateway
inflate at most `COMPRESSION_INFLATE_RATE` bytes a second, and four times
`MAX_FRAME_BYTES` at once (so a message of any allowed size always fits a
full allowance); a message past what is left fails the connection with 1008,
and its inflation stops there.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from proto.deflate import inflate

__all__ = ["BURST_FRAMES", "InflateBudget", "InflateLimits"]

#: The allowance when full, in frames of `MAX_FRAME_BYTES`.
BURST_FRAMES = 4


class InflateLimits(NamedTuple):
    """A process's allowance, shared by its sockets: ``rate`` bytes a second, ``burst`` at once."""

    rate: float
    burst: float  # seconds of ``rate``

    @classmethod
    def of(cls, rate: int, burst: int) -> InflateLimits:
        return cls(float(rate), burst / rate)


class InflateBudget:
    """`proto.deflate.inflate` within `InflateLimits`, for one socket.

    The socket's `WebSocketProtocol` calls it in place of `inflate`. The
    allowance is a GCRA in seconds: ``_tat`` is when it will be full again.
    Two slots a socket (~50 bytes), the limits shared.
    """

    __slots__ = ("_limits", "_tat")

    def __init__(self, limits: InflateLimits) -> None:
        self._limits = limits
        self._tat = 0.0

    def __call__(self, data: bytes, max_size: int) -> bytes:
        rate, burst = self._limits
        now = time.monotonic()
        tat = max(self._tat, now)
        left = int((now + burst - tat) * rate)
        message = inflate(data, max_size, max(left, 0))
        self._tat = tat + len(message) / rate
        return message
