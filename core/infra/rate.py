"""A configured rate (``"20/60"``) and the arithmetic every limiter shares.

Kept apart from the limiters so that reading settings loads no Redis client.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["US", "Rate", "interval_us"]

#: Microseconds in a second: limiters count time in whole microseconds.
US = 1_000_000


def interval_us(limit: int, period: float, cost: int) -> int:
    """Microseconds per request, after checking the arguments."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    if not (period > 0 and math.isfinite(period)):
        raise ValueError(f"period must be a positive number of seconds, not {period}")
    if not 1 <= cost <= limit:
        raise ValueError(f"cost must be between 1 and the limit ({limit}), not {cost}")
    return max(1, -(-round(period * US) // limit))


class Rate(NamedTuple):
    """A limit as configured: ``limit`` requests per ``period`` seconds (``"20/60"``)."""

    limit: int
    period: float

    @classmethod
    def parse(cls, raw: str) -> Rate | None:
        """``"20/60"`` -> Rate(20, 60.0); ``"off"`` or ``"0"`` -> None (no limit)."""
        text = raw.strip().lower()
        if text in ("", "0", "off", "none"):
            return None
        count, sep, seconds = text.partition("/")
        rate = cls(int(count), float(seconds) if sep else 1.0)
        interval_us(rate.limit, rate.period, 1)  # raises ValueError when out of range
        return rate

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}"
