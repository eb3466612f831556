"""Counters a client process keeps, cheap to update per delivery and to merge.

Latencies go into a log-scale histogram (about 1.1 % wide buckets), so a
process records millions of deliveries in a few kilobytes and the driver
merges processes exactly; percentiles are read from the merged buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Histogram", "Tally", "percentile_ms"]

#: Buckets per doubling: 64 gives about 1.1 % resolution.
_SCALE = 64
_LOG2 = _SCALE / math.log(2)


class Histogram:
    """Latencies in seconds, bucketed by the logarithm of microseconds."""

    __slots__ = ("buckets", "count", "max")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        self.buckets[int(math.log(us) * _LOG2) if us > 1.0 else 0] += 1
        self.count += 1
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile in seconds (the upper edge of its bucket), 0 when empty."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(self.max, math.exp((bucket + 1) / _LOG2) / 1e6)
        return self.max

    def state(self) -> tuple[dict[int, int], int, float]:
        return dict(self.buckets), self.count, self.max

    @classmethod
    def from_state(cls, state: tuple[dict[int, int], int, float]) -> Histogram:
        h = cls()
        h.buckets.update(state[0])
        h.count, h.max = state[1], state[2]
        return h


def percentile_ms(h: Histogram, q: float) -> float:
    return round(h.quantile(q) * 1000, 2)


@dataclass
class Tally:
    """What one client process saw; merged by the driver."""

    opened: int = 0
    failed: int = 0
    closed: int = 0
    subscribed: int = 0
    received: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    #: seq -> deliveries of that publication seen here
    per_seq: Counter[int] = field(default_factory=Counter)
    #: seq -> latest arrival (wall clock) of that publication seen here
    last_arrival: dict[int, float] = field(default_factory=dict)
    connect_seconds: Histogram = field(default_factory=Histogram)
    #: set when the tool closes its connections: closes after that are not counted
    stopping: bool = False

    def delivered(self, seq: int, sent: float, now: float) -> None:
        self.received += 1
        self.latency.add(now - sent)
        self.per_seq[seq] += 1
        self.last_arrival[seq] = now

    def state(self) -> dict[str, object]:
        return {
            "opened": self.opened,
            "failed": self.failed,
            "closed": self.closed,
            "subscribed": self.subscribed,
            "received": self.received,
            "errors": dict(self.errors),
            "latency": self.latency.state(),
            "per_seq": dict(self.per_seq),
            "last_arrival": self.last_arrival,
            "connect_seconds": self.connect_seconds.state(),
        }
