"""The load run's report: a table for people, a dict for ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.loadtest.stats import Histogram, percentile_ms

__all__ = ["ChannelFigure", "Report", "render"]


@dataclass
class ChannelFigure:
    """One channel's deliveries: ``sent`` publications to ``members`` subscribed sockets."""

    name: str
    sent: int
    members: int
    min_received: int  # distinct publications the worst-served member got
    received: int  # distinct deliveries over all members

    @property
    def dead(self) -> bool:
        """Publications were sent to members and not one arrived anywhere."""
        return self.sent > 0 and self.members > 0 and self.received == 0


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
    received: int  # publication frames, duplicates included
    expected: int  # per subscribed socket, the publications sent on its channels
    lost: int  # never delivered (lost_explicit of them after a recovered: false)
    lost_explicit: int
    late: int  # delivered after the drain window, before the tool stopped
    duplicates: int
    window: float  # first publication sent to last delivery, seconds
    drain_seconds: float  # waited after the last publication for everything (the window)
    late_seconds: float  # waited after that for late deliveries
    latency: Histogram  # late deliveries included
    completion: Histogram  # per publication: send to its last delivery
    errors: dict[str, int]
    sockets: dict[str, int]  # exact, gaps, duplicates, out_of_order: sockets with each
    channels: list[ChannelFigure]
    reconnects: dict[str, int]
    publish_errors: int
    kill: dict[str, object] | None
    notes: list[str]
    #: per laggard role (stalled, slow): `gateway.loadtest.laggard.merge`'s summary
    laggards: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the server's CPU seconds while publishing and draining (with --server-pid)
    server_cpu_publishing: float | None = None

    @property
    def readers(self) -> int:
        """Subscribed sockets that are not laggards: the ones the exactly-once account covers."""
        return self.subscribed - sum(int(x["subscribed"]) for x in self.laggards.values())

    @property
    def ok(self) -> bool:
        """No failed connection, and every socket got everything exactly once, in order."""
        s = self.sockets
        return not (self.failed or self.lost or s.get("duplicates") or s.get("out_of_order"))

    @property
    def dead_channels(self) -> list[str]:
        return [c.name for c in self.channels if c.dead]

    @property
    def starved_channels(self) -> list[str]:
        """Channels with a member that got none of their publications."""
        return [c.name for c in self.channels if c.sent and c.members and not c.min_received]

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
                "expected": self.expected,
                "received": self.received,
                "on_time": self.expected - self.lost - self.late,
                "late": self.late,
                "lost": self.lost,
                "lost_explicit": self.lost_explicit,
                "lost_silent": self.lost - self.lost_explicit,
                "duplicates": self.duplicates,
                "per_second": round(self.deliveries_per_second),
                "window_seconds": round(self.window, 3),
                "drain_seconds": round(self.drain_seconds, 3),
                "late_wait_seconds": round(self.late_seconds, 3),
            },
            "sockets": {"accounted": self.readers, **self.sockets},
            "laggards": self.laggards,
            "server_cpu": {
                "publishing_seconds": None
                if self.server_cpu_publishing is None
                else round(self.server_cpu_publishing, 3)
            },
            "channels": {
                "count": len(self.channels),
                "dead": self.dead_channels,
                "starved": self.starved_channels,
                "min_received": min(
                    (c.min_received for c in self.channels if c.members), default=0
                ),
                "per_channel": [
                    {
                        "name": c.name,
                        "sent": c.sent,
                        "members": c.members,
                        "min_received": c.min_received,
                        "received": c.received,
                    }
                    for c in self.channels
                ],
            },
            "reconnects": self.reconnects,
            "publish_errors": self.publish_errors,
            "kill": self.kill,
            "latency": quantiles(self.latency),
            "completion": quantiles(self.completion),
            "errors": self.errors,
            "notes": self.notes,
        }


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def _few(names: list[str]) -> str:
    return f" ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})" if names else ""


def _share(c: ChannelFigure) -> float:
    return c.min_received / c.sent if c.sent else 1.0


def _laggard(lag: dict[str, Any]) -> str:
    closed = ", ".join(f"{n:,} closed with {code}" for code, n in sorted(lag["closed"].items()))
    got, nbytes, lived = lag["publications"], lag["bytes"], lag["seconds_subscribed"]
    return (f"{lag['subscribed']:,} sockets: {closed or 'none closed with a close frame read'}, "
            f"{lag['dropped']:,} dropped (no close frame read), {lag['open_at_end']:,} open at "
            f"the end; got {got['median']:,g} publications each (min {got['min']:,}, max "
            f"{got['max']:,}), {_mb(nbytes['median'])} median; subscribed for "
            f"{lived['median']:g} s median, {lived['max']:g} s max before the end")  # fmt: skip


def render(r: Report) -> str:
    per = r.bytes_per_connection
    lat, comp = r.latency, r.completion
    sk, rc = r.sockets, r.reconnects
    dead, starved = r.dead_channels, r.starved_channels
    worst_channel = min((c for c in r.channels if c.members), key=_share, default=None)
    worst = (
        "n/a"
        if worst_channel is None
        else f"{worst_channel.min_received:,} of {worst_channel.sent:,} on {worst_channel.name}"
    )
    rows = [
        ("transport", r.mode),
        ("connections", f"{r.opened:,} opened, {r.failed:,} failed of {r.connections:,}; "
                        f"{r.subscribed:,} subscribed; {r.closed:,} closed before the end"),
        ("connect", f"{r.connect_seconds:.2f} s, {r.connect_rate:,.0f}/s; handshake p50 "
                    f"{percentile_ms(r.handshake, 0.5)} ms p99 {percentile_ms(r.handshake, 0.99)} ms"),
        ("server memory", f"{_mb(r.rss_before)} before, {_mb(r.rss_after)} after: "
                          + ("n/a" if per is None else f"{per / 1024:.2f} KiB per connection")),
        ("publications", f"{r.publications:,} at {r.rate:g}/s via {r.publish}"),
        ("deliveries", f"{r.expected - r.lost:,} of {r.expected:,}: {r.late:,} late; lost {r.lost:,} "
                       f"({r.lost_explicit:,} explicit), duplicates {r.duplicates:,}; waited "
                       f"{r.drain_seconds:.2f} s + {r.late_seconds:.2f} s late"),
        ("exactly once", f"{sk.get('exact', 0):,} sockets with all, {sk.get('gaps', 0):,} with gaps, "
                         f"{sk.get('duplicates', 0):,} with duplicates, "
                         f"{sk.get('out_of_order', 0):,} out of order"),
        ("channels", f"{len(r.channels):,}; dead {len(dead):,}{_few(dead)}; with a starved member "
                     f"{len(starved):,}{_few(starved)}; worst member got {worst}"),
        ("reconnects", f"{rc.get('reconnects', 0):,} ({rc.get('attempts', 0):,} attempts); "
                       f"recovered {rc.get('recovered', 0):,}, not recovered "
                       f"{rc.get('not_recovered', 0):,}, no history {rc.get('no_history', 0):,}"),
        ("throughput", f"{r.deliveries_per_second:,.0f} deliveries/s over {r.window:.2f} s"),
        ("latency", f"p50 {percentile_ms(lat, 0.5)} ms  p95 {percentile_ms(lat, 0.95)} ms  "
                    f"p99 {percentile_ms(lat, 0.99)} ms  max {lat.max * 1000:.2f} ms"),
        ("to last subscriber", f"p50 {percentile_ms(comp, 0.5)} ms  p95 {percentile_ms(comp, 0.95)} ms"
                               f"  max {comp.max * 1000:.2f} ms (per publication)"),
    ]  # fmt: skip
    for role, lag in r.laggards.items():
        rows.append((role, _laggard(lag)))
    if r.kill is not None:
        rows.append(("kill", f"at {r.kill['at_seconds']} s: {r.kill['outcome']}"))
    if r.publish_errors:
        rows.append(("publish errors", f"{r.publish_errors:,}"))
    rows.extend(("note", note) for note in r.notes)
    if r.errors:
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items()))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
