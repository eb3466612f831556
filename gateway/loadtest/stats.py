"""Counters a client process keeps, cheap to update per delivery and to merge.

Latencies go into a log-scale histogram (about 1.1 % wide buckets), so a
process records millions of deliveries in a few kilobytes and the driver
merges processes exactly; percentiles are read from the merged buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from gateway.loadtest.ledger import Ledger

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
    #: every publication frame received, duplicates included
    received: int = 0
    #: distinct deliveries that arrived after the drain window (see `late_phase`)
    late: int = 0
    #: reconnections that subscribed again, and the attempts made
    reconnects: int = 0
    reconnect_attempts: int = 0
    #: resubscription replies: ``recovered`` true, false, and absent (no history)
    recovered: int = 0
    unrecovered: int = 0
    no_history: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    #: (channel << 32 | seq) -> latest arrival (wall clock) of that publication seen here
    last_arrival: dict[int, float] = field(default_factory=dict)
    connect_seconds: Histogram = field(default_factory=Histogram)
    #: set when the drain window is over: new deliveries from then on are late
    late_phase: bool = False
    #: set when the tool closes its connections: closes after that are not counted
    stopping: bool = False

    def delivered(self, ledger: Ledger, c: int, s: int, sent: float, now: float) -> None:
        """Count a publication frame: timed and counted once, duplicates aside."""
        self.received += 1
        new = ledger.record(c, s)
        if new is None:
            self.errors["publication of another channel"] += 1
        elif new:
            self.latency.add(now - sent)
            self.last_arrival[c << 32 | s] = now
            if self.late_phase:
                self.late += 1

    def state(self) -> dict[str, object]:
        return {
            "opened": self.opened,
            "failed": self.failed,
            "closed": self.closed,
            "subscribed": self.subscribed,
            "received": self.received,
            "late": self.late,
            "reconnects": self.reconnects,
            "reconnect_attempts": self.reconnect_attempts,
            "recovered": self.recovered,
            "unrecovered": self.unrecovered,
            "no_history": self.no_history,
            "errors": dict(self.errors),
            "latency": self.latency.state(),
            "last_arrival": self.last_arrival,
            "connect_seconds": self.connect_seconds.state(),
        }
