"""This gateway's figures over the last second: what the server API's ``info`` and the
admin console show.

`NodeStats.tick` runs once a second (the gateway's sweep) and turns the
Prometheus counters the hot paths already keep (deliveries, handshakes, the
delivery-lag histogram) into rates over the last second: reading them costs
a few microseconds a second and nothing per message.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable

from prometheus_client import Metric

from core.infra.control import NodeInfo
from core.infra.metrics import TRANSPORTS, Metrics
from gateway.hub import Hub

__all__ = ["NodeStats", "resident_memory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int:
    """This process's resident memory in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _total(metrics: Iterable[Metric], suffix: str = "_total") -> float:
    return sum(s.value for m in metrics for s in m.samples if s.name.endswith(suffix))


#: (upper bound, cumulative count) of each bucket of a histogram
_Buckets = list[tuple[float, float]]
#: when (monotonic), deliveries, handshakes, lag count, lag sum, lag buckets
_Sample = tuple[float, float, float, float, float, _Buckets]


class NodeStats:
    """Rates of one gateway, sampled once a second."""

    def __init__(self, node: str, version: str, hub: Hub, metrics: Metrics) -> None:
        self.node = node
        self.version = version
        self.started = time.time()
        self._hub = hub
        self._metrics = metrics
        self._last: _Sample | None = None
        self.deliveries_per_second = 0.0
        self.connects_per_second = 0.0
        #: delivery lag over the last second: mean, and the bucket bound under which 99% fell
        self.lag_ms = 0.0
        self.lag_p99_ms = 0.0

    def _sample(self, now: float) -> _Sample:
        m = self._metrics
        lag = m.write_lag.collect()
        buckets = [
            (float(s.labels["le"]), s.value)
            for f in lag
            for s in f.samples
            if s.name.endswith("_bucket")
        ]
        return (
            now,
            _total(m.messages_out.collect()),
            _total(m.handshakes.collect()),
            _total(lag, "_count"),
            _total(lag, "_sum"),
            buckets,
        )

    def tick(self, now: float) -> None:
        """Sample the counters (``now``: monotonic seconds) and update the rates."""
        sample = self._sample(now)
        last, self._last = self._last, sample
        if last is None or sample[0] <= last[0]:
            return
        seconds = sample[0] - last[0]
        self.deliveries_per_second = (sample[1] - last[1]) / seconds
        self.connects_per_second = (sample[2] - last[2]) / seconds
        count = sample[3] - last[3]
        self.lag_ms = 1000.0 * (sample[4] - last[4]) / count if count > 0 else 0.0
        self.lag_p99_ms = 1000.0 * self._p99(last[5], sample[5], count)

    @staticmethod
    def _p99(before: _Buckets, after: _Buckets, count: float) -> float:
        """The upper bound of the bucket holding the 99th percentile of the last second.

        Past the last finite bound, that bound (the histogram knows no more).
        """
        if count <= 0 or len(before) != len(after) or len(after) < 2:
            return 0.0
        for (bound, b), (_, a) in zip(before, after, strict=True):
            if a - b >= 0.99 * count and bound != float("inf"):
                return bound
        return after[-2][0]

    def connections(self) -> dict[str, int]:
        """Open connections by transport, every transport named."""
        counts = dict.fromkeys(TRANSPORTS, 0)
        counts.update(self._hub.transport_counts())
        return counts

    def info(
        self, redis: bool, postgres: bool | None, hooks: dict[str, bool] | None = None
    ) -> NodeInfo:
        hub = self._hub
        return NodeInfo(
            node=self.node,
            version=self.version,
            started=self.started,
            uptime=time.time() - self.started,
            connections=self.connections(),
            subscriptions=hub.subscription_count(),
            channels=hub.channel_count(),
            deliveries_per_second=self.deliveries_per_second,
            connects_per_second=self.connects_per_second,
            memory_bytes=resident_memory(),
            redis=redis,
            postgres=postgres,
            hooks=hooks or {},
        )
