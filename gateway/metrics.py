"""Prometheus metrics of one gateway, in a registry passed in (not global).

Hot paths touch only counters incremented once per publication, never once
per recipient; gauges of sizes are read from the hub at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

__all__ = ["Metrics"]

_FANOUT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_open_fds, ... of this process.
        ProcessCollector(registry=r)
        self.connections = Gauge(
            "gateway_connections", "Open client connections.", ["transport"], registry=r
        )
        self.channels = Gauge("gateway_channels", "Channels with local subscribers.", registry=r)
        self.subscriptions = Gauge(
            "gateway_subscriptions", "Channel subscriptions of local connections.", registry=r
        )
        self.handshake_failures = Counter(
            "gateway_handshake_failures",
            "Refused handshakes and HTTP authentications, by reason.",
            ["reason"],
            registry=r,
        )
        self.messages_in = Counter(
            "gateway_messages_in", "Client frames received, by op.", ["op"], registry=r
        )
        self.messages_out = Counter(
            "gateway_messages_out", "Publications delivered to local connections.", registry=r
        )
        self.publications = Counter(
            "gateway_publications",
            "Publications received from the broker.",
            registry=r,
        )
        self.invalid_publications = Counter(
            "gateway_publications_not_json",
            "Broker publications that were not JSON (delivered as a string).",
            registry=r,
        )
        self.fanout_seconds = Histogram(
            "gateway_fanout_seconds",
            "Time to hand one publication to every local subscriber.",
            buckets=_FANOUT_BUCKETS,
            registry=r,
        )
        self.slow_consumers = Counter(
            "gateway_slow_consumer_disconnects",
            "Connections closed because their send buffer overflowed.",
            registry=r,
        )
        self.errors = Counter(
            "gateway_command_errors", "Error replies sent, by code.", ["code"], registry=r
        )
        self.dead_peers = Counter(
            "gateway_dead_peer_disconnects",
            "Connections dropped because nothing came from the peer in time.",
            registry=r,
        )
        self.broker_connected = Gauge(
            "gateway_broker_connected", "1 when the broker link is up.", registry=r
        )
        self.broker_reconnects = Counter(
            "gateway_broker_reconnects", "Times the broker link was lost.", registry=r
        )

    def watch(
        self,
        connections: Callable[[], int],
        channels: Callable[[], int],
        subscriptions: Callable[[], int],
    ) -> None:
        """Read size gauges from the hub at scrape time."""
        self.connections.labels("websocket").set_function(connections)
        self.channels.set_function(channels)
        self.subscriptions.set_function(subscriptions)

    def broker_state(self, up: bool) -> None:
        self.broker_connected.set(1 if up else 0)
        if not up:
            self.broker_reconnects.inc()
