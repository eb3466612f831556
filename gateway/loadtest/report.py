"""The load run's report: a table for people, a dict for ``--json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.loadtest.stats import Histogram, percentile_ms

__all__ = ["Report", "render"]


@dataclass
class Report:
    mode: str
    connections: int
    opened: int
    failed: int
    subscribed: int
    closed: int  # opened, then closed by the server or the network before the end
    connect_seconds: float
    handshake: Histogram
    rss_before: float | None
    rss_after: float | None
    publications: int
    rate: float
    publish: str
    received: int
    lost: int
    duplicates: int
    window: float  # first publication sent to last delivery, seconds
    latency: Histogram
    completion: Histogram  # per publication: send to its last delivery
    errors: dict[str, int]

    @property
    def connect_rate(self) -> float:
        return self.opened / self.connect_seconds if self.connect_seconds else 0.0

    @property
    def bytes_per_connection(self) -> float | None:
        if self.rss_before is None or self.rss_after is None or not self.opened:
            return None
        return (self.rss_after - self.rss_before) / self.opened

    @property
    def deliveries_per_second(self) -> float:
        return self.received / self.window if self.window > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        def quantiles(h: Histogram) -> dict[str, float]:
            return {
                "p50_ms": percentile_ms(h, 0.5),
                "p95_ms": percentile_ms(h, 0.95),
                "p99_ms": percentile_ms(h, 0.99),
                "max_ms": round(h.max * 1000, 2),
                "count": h.count,
            }

        per = self.bytes_per_connection
        return {
            "mode": self.mode,
            "connections": {
                "asked": self.connections,
                "opened": self.opened,
                "failed": self.failed,
                "subscribed": self.subscribed,
                "closed_early": self.closed,
                "seconds": round(self.connect_seconds, 3),
                "per_second": round(self.connect_rate, 1),
                "handshake": quantiles(self.handshake),
            },
            "server_memory": {
                "rss_before_bytes": self.rss_before,
                "rss_after_bytes": self.rss_after,
                "bytes_per_connection": None if per is None else round(per),
            },
            "publications": {"sent": self.publications, "rate": self.rate, "via": self.publish},
            "deliveries": {
                "expected": self.publications * self.subscribed,
                "received": self.received,
                "lost": self.lost,
                "duplicates": self.duplicates,
                "per_second": round(self.deliveries_per_second),
                "window_seconds": round(self.window, 3),
            },
            "latency": quantiles(self.latency),
            "completion": quantiles(self.completion),
            "errors": self.errors,
        }


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def render(r: Report) -> str:
    per = r.bytes_per_connection
    lat, comp = r.latency, r.completion
    rows = [
        ("transport", r.mode),
        ("connections", f"{r.opened:,} opened, {r.failed:,} failed of {r.connections:,}; "
                        f"{r.subscribed:,} subscribed; {r.closed:,} closed before the end"),
        ("connect", f"{r.connect_seconds:.2f} s, {r.connect_rate:,.0f}/s; handshake p50 "
                    f"{percentile_ms(r.handshake, 0.5)} ms p99 {percentile_ms(r.handshake, 0.99)} ms"),
        ("server memory", f"{_mb(r.rss_before)} before, {_mb(r.rss_after)} after: "
                          + ("n/a" if per is None else f"{per / 1024:.2f} KiB per connection")),
        ("publications", f"{r.publications:,} at {r.rate:g}/s via {r.publish}"),
        ("deliveries", f"{r.received:,} of {r.publications * r.subscribed:,}; lost {r.lost:,}, "
                       f"duplicates {r.duplicates:,}"),
        ("throughput", f"{r.deliveries_per_second:,.0f} deliveries/s over {r.window:.2f} s"),
        ("latency", f"p50 {percentile_ms(lat, 0.5)} ms  p95 {percentile_ms(lat, 0.95)} ms  "
                    f"p99 {percentile_ms(lat, 0.99)} ms  max {lat.max * 1000:.2f} ms"),
        ("to last subscriber", f"p50 {percentile_ms(comp, 0.5)} ms  p95 {percentile_ms(comp, 0.95)} ms"
                               f"  max {comp.max * 1000:.2f} ms (per publication)"),
    ]  # fmt: skip
    if r.errors:
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items()))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
