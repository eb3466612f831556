"""Prometheus metrics of one gateway, in a registry passed in (not global).

Hot paths touch only counters incremented once per publication, never once
per recipient; gauges of sizes are read from the hub at scrape time.
"""

from __future__ import annotations

import hmac
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from functools import partial
from typing import Protocol

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from core.infra.breaker import Breaker

__all__ = [
    "METRICS_CHALLENGE",
    "METRICS_REFUSED",
    "TRANSPORTS",
    "LoopHistogram",
    "Metrics",
    "scrape_allowed",
    "warn_open_metrics",
]

log = logging.getLogger("core.infra.metrics")

#: The transports a connection can use (label values of gateway_connections).
TRANSPORTS = ("websocket", "sse", "longpoll")
_COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
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
        self.dropped_publications = Counter(
            "gateway_publications_dropped",
            "Broker publications dropped because not every codec and client could carry them "
            "(invalid UTF-8, numbers out of range, too deep or too large), by source.",
            ["source"],
            registry=r,
        )
        self.encode_failures = Counter(
            "gateway_encode_failures",
            "Publications that could not be encoded for a codec (their subscribers on that "
            "codec skipped, everyone else served), by codec.",
            ["codec"],
            registry=r,
        )
        self.broker_faults = Counter(
            "gateway_broker_faults",
            "Broker reader faults: malformed messages dropped, handler errors, reader restarts.",
            ["kind"],
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

        self.handshakes = Counter(
            "gateway_handshakes",
            "Connections accepted (authenticated and upgraded), by transport.",
            ["transport"],
            registry=r,
        )
        self.command_seconds = LoopHistogram(
            "gateway_command_seconds",
            "Time to run one client command and queue its reply, by op.",
            _COMMAND_BUCKETS,
            r,
            ("op",),
        )
        self.write_lag = Histogram(
            "gateway_delivery_lag_seconds",
            "Per event-loop iteration that wrote publications: from the first frame queued "
            "to the last written to its socket (fan-out plus flush).",
            buckets=_FANOUT_BUCKETS,
            registry=r,
        )
        self.accept_errors = Counter(
            "gateway_accept_errors",
            "Failed accepts (out of file descriptors: the listener pauses), by errno.",
            ["errno"],
            registry=r,
        )
        self.write_timeouts = Counter(
            "gateway_write_timeouts",
            "HTTP connections reset because their client took too little of an answer within "
            "WRITE_TIMEOUT.",
            registry=r,
        )
        self.answer_budget_resets = Counter(
            "gateway_answer_budget_resets",
            "HTTP connections reset, the largest first, because the answers the process held "
            "unsent exceeded ANSWER_BUFFER_TOTAL_BYTES.",
            registry=r,
        )
        self.answer_buffered = Gauge(
            "gateway_answer_buffered_bytes",
            "Bytes of HTTP answers the process holds that their sockets would not take "
            "(ANSWER_BUFFER_TOTAL_BYTES bounds it).",
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests and commands refused by a rate limit, by scope.",
            ["scope"],
            registry=r,
        )
        self.rest_seconds = Histogram(
            "gateway_rest_request_seconds",
            "REST requests (HTTP, rpc frames, Lambda) by route (operation id) and status.",
            ["route", "status"],
            buckets=_COMMAND_BUCKETS,
            registry=r,
        )
        self._rest_children: dict[tuple[str, int], Histogram] = {}
        self._command_children: dict[str, tuple[Counter, Observations]] = {}
        self.db_pool = Gauge(
            "gateway_db_pool_connections",
            "Connections of the REST core's PostgreSQL pool, by state (idle, in_use, max).",
            ["state"],
            registry=r,
        )
        self.subscription_repairs = Counter(
            "gateway_subscription_repairs",
            "Channels with local members that the broker did not deliver, found and "
            "resubscribed by the periodic reconciliation (should stay 0).",
            registry=r,
        )
        self.send_buffered = Gauge(
            "gateway_send_buffered_bytes",
            "Bytes queued in the sockets' send buffers at the last budget check "
            "(SEND_BUFFER_TOTAL_BYTES bounds it).",
            registry=r,
        )
        self.redis_pool = Gauge(
            "gateway_redis_pool_connections",
            "Connections of the Redis command pool (history, presence, publishing), by state "
            "(in_use, max).",
            ["state"],
            registry=r,
        )
        self.redis_waiters = Gauge(
            "gateway_redis_pool_waiters",
            "Redis commands waiting for a pool connection (saturation).",
            registry=r,
        )
        self.db_breaker_open = Gauge(
            "gateway_db_breaker_open",
            "1 while PostgreSQL is held unreachable (the database's breaker is open: REST calls "
            "that need it are refused at once, a probe runs), else 0.",
            registry=r,
        )
        self.db_refused = Counter(
            "gateway_db_refused",
            "REST calls answered 503 at once because PostgreSQL is held unreachable.",
            registry=r,
        )
        self.db_waiters = Gauge(
            "gateway_db_pool_waiters",
            "Requests waiting for a connection of the PostgreSQL pool.",
            registry=r,
        )
        # A core elsewhere (CORE_URL): gateway/upstream.py.
        self.core_upstream_seconds = LoopHistogram(
            "gateway_core_upstream_seconds",
            "Requests forwarded to the REST core (CORE_URL) that it answered, by time to answer.",
            _COMMAND_BUCKETS,
            r,
        )
        self.core_upstream_errors = Counter(
            "gateway_core_upstream_errors",
            "Forwarded requests the REST core did not answer well, by kind (unreachable, "
            "timeout, status_502/503/504, breaker_open: refused at once while it is down).",
            ["kind"],
            registry=r,
        )
        self.core_pool_in_use = Gauge(
            "gateway_core_pool_in_use",
            "Requests to the REST core in flight (each holds one pooled connection).",
            registry=r,
        )
        self.adopted_connections = Gauge(
            "gateway_adopted_connections",
            "Kept-alive connections served off Tornado's HTTP server now (long-poll, and REST: "
            "core/fastrest.py).",
            registry=r,
        )
        self.core_pool_size = Gauge(
            "gateway_core_pool_size",
            "Connections to the REST core the pool may hold (CORE_POOL_SIZE).",
            registry=r,
        )
        self.core_breaker_open = Gauge(
            "gateway_core_breaker_open",
            "1 while the breaker in front of the REST core is open or probing, else 0.",
            registry=r,
        )
        # Hooks: the application's backends in the loop (gateway/hooks/).
        self.hook_calls = Counter(
            "gateway_hook_calls",
            "Hook requests sent to a backend, by hook and by what it answered (result, error, "
            "disconnect; none: no usable answer).",
            ["hook", "answer"],
            registry=r,
        )
        self.hook_errors = Counter(
            "gateway_hook_errors",
            "Hook calls that failed (their failure policy applied), by hook and kind (timeout, "
            "unreachable, status, bad_answer, too_large, breaker_open, overloaded).",
            ["hook", "kind"],
            registry=r,
        )
        self.hook_seconds = Histogram(
            "gateway_hook_seconds",
            "Time from sending a hook request to its answer (or its failure), by hook.",
            ["hook"],
            buckets=_COMMAND_BUCKETS,
            registry=r,
        )
        self.hook_breaker_open = Gauge(
            "gateway_hook_breaker_open",
            "1 while a hook's breaker is open or probing (its backend is not called), else 0.",
            ["hook"],
            registry=r,
        )
        self.hook_in_flight = Gauge(
            "gateway_hook_in_flight",
            "Hook calls under way or waiting for a slot (HOOK_CONCURRENCY bounds those under way).",
            registry=r,
        )

        # The outbox of change events: core/outbox.py, core/relay.py.
        self.outbox_pending = Gauge(
            "gateway_outbox_pending",
            "Change events waiting in the outbox for a relay, as this process's relay last saw "
            "them (every process's: one table): 0 when its last round left none past the "
            "writers' grace; grows while the broker is down.",
            registry=r,
        )
        self.outbox_relayed = Counter(
            "gateway_outbox_relayed",
            "Change events published by this process's outbox relay: left behind by their "
            "writer (the broker was down, or the writing process died).",
            registry=r,
        )

        # Connection events (EVENTS_STREAM): gateway/events/.
        self.events_appended = Counter(
            "gateway_events_appended",
            "Connection events appended to the event stream by this process, by type "
            "(node_lost disconnects it reported for a dead process included).",
            ["type"],
            registry=r,
        )
        self.events_dropped = Counter(
            "gateway_events_dropped",
            "Connection events dropped, by target: stream (Redis unreachable for long, "
            "EVENTS_BUFFER full), webhook (EVENTS_WEBHOOK_QUEUE full, its 3/4 share for "
            "subscribes and unsubscribes full, or retries exhausted).",
            ["target"],
            registry=r,
        )
        self.events_queued = Gauge(
            "gateway_events_queued",
            "Connection events waiting in this process, by target (stream, webhook).",
            ["target"],
            registry=r,
        )
        self.events_nodes_lost = Counter(
            "gateway_events_nodes_lost",
            "Dead gateway processes whose connections this process reported (node_lost).",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "gateway_events_webhook_deliveries",
            "Batches of connection events the webhook (EVENTS_WEBHOOK_URL) accepted (2xx).",
            registry=r,
        )
        self.webhook_failures = Counter(
            "gateway_events_webhook_failures",
            "Webhook POSTs that failed, by kind (timeout, unreachable, status_4xx, status_5xx, "
            "...); each is retried until EVENTS_WEBHOOK_RETRIES.",
            ["kind"],
            registry=r,
        )

    def watch(
        self,
        connections: Callable[[str], int],
        channels: Callable[[], int],
        subscriptions: Callable[[], int],
    ) -> None:
        """Read size gauges from the hub at scrape time (``connections`` by transport)."""
        for transport in TRANSPORTS:
            self.connections.labels(transport).set_function(partial(connections, transport))
        self.channels.set_function(channels)
        self.subscriptions.set_function(subscriptions)

    def watch_compression(self, counts: CompressionCounts) -> None:
        """permessage-deflate's counters, read from the compressor at scrape time.

        The compressor counts in plain integers (once per compressed message,
        once per fan-out for the deliveries), so the hot path touches no metric.
        """
        self.registry.register(_CompressionCollector(counts))

    def watch_redis_pool(self, usage: Callable[[], tuple[int, int, int]]) -> None:
        """The Redis command pool's use (in use, size, waiters), read at scrape time."""
        self.redis_pool.labels("in_use").set_function(lambda: usage()[0])
        self.redis_pool.labels("max").set_function(lambda: usage()[1])
        self.redis_waiters.set_function(lambda: usage()[2])

    def watch_pool(self, pool: asyncpg.Pool, breaker: Breaker | None = None) -> None:
        """The PostgreSQL pool's sizes and its breaker's state, read at scrape time."""
        if breaker is not None:
            self.db_breaker_open.set_function(lambda: 0 if breaker.state == "closed" else 1)
        self.db_pool.labels("idle").set_function(pool.get_idle_size)
        self.db_pool.labels("in_use").set_function(lambda: pool.get_size() - pool.get_idle_size())
        self.db_pool.labels("max").set_function(pool.get_max_size)
        # asyncpg exposes no waiter count: its queue's getters are the waiters.
        self.db_waiters.set_function(
            lambda: len(getattr(getattr(pool, "_queue", None), "_getters", ()))
        )

    def rest_request(self, route: str, status: int, seconds: float) -> None:
        # The labelled child is kept: routes and statuses are few, and
        # ``labels()`` per request costs a lock and a lookup by strings.
        key = (route, status)
        child = self._rest_children.get(key)
        if child is None:
            child = self._rest_children[key] = self.rest_seconds.labels(route, str(status))
        child.observe(seconds)
        if status == 429:
            self.rate_limited.labels("rest").inc()

    def command(self, op: str) -> tuple[Counter, Observations]:
        """``op``'s children of ``gateway_messages_in`` and ``gateway_command_seconds``.

        Kept, as `rest_request` keeps its: ops are few, and two ``labels()``
        per frame were 7% of a socket's ``rpc`` frame in the gateway.
        """
        children = self._command_children.get(op)
        if children is None:
            children = (self.messages_in.labels(op), self.command_seconds.labels(op))
            self._command_children[op] = children
        return children

    def broker_state(self, up: bool) -> None:
        self.broker_connected.set(1 if up else 0)
        if not up:
            self.broker_reconnects.inc()


class CompressionCounts(Protocol):
    """What `proto.deflate.Compressor` counts."""

    frames: int
    bytes_in: int
    bytes_out: int
    seconds: float
    delivered: int
    delivered_plain: int
    delivered_bytes: int


class _CompressionCollector(Collector):
    def __init__(self, counts: CompressionCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = self._counts
        yield CounterMetricFamily(
            "gateway_compressed_frames",
            "Messages compressed with permessage-deflate (once per publication per codec, "
            "once per reply).",
            value=c.frames,
        )
        payload = CounterMetricFamily(
            "gateway_compression_payload_bytes",
            "Bytes of the messages compressed, by stage: before and after compression.",
            labels=["stage"],
        )
        payload.add_metric(["before"], c.bytes_in)
        payload.add_metric(["after"], c.bytes_out)
        yield payload
        yield CounterMetricFamily(
            "gateway_compression_seconds",
            "Time spent compressing (divide by gateway_compressed_frames for the mean).",
            value=c.seconds,
        )
        yield CounterMetricFamily(
            "gateway_compressed_deliveries",
            "Publications and events delivered as a shared compressed frame.",
            value=c.delivered,
        )
        sent = CounterMetricFamily(
            "gateway_compressed_delivery_bytes",
            "Frame bytes of those deliveries, by stage: as they would have been sent without "
            "compression (before) and as sent (after).",
            labels=["stage"],
        )
        sent.add_metric(["before"], c.delivered_plain)
        sent.add_metric(["after"], c.delivered_bytes)
        yield sent


#: The 401 of a scrape without the token: message and ``WWW-Authenticate`` (RFC 6750).
METRICS_REFUSED = "/metrics needs Authorization: Bearer <METRICS_TOKEN>"
METRICS_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="metrics"'}


def scrape_allowed(token: str | None, authorization: str | None) -> bool:
    """Whether a scrape may read /metrics: no ``METRICS_TOKEN``, or ``Bearer <it>``.

    Compared in constant time, so timing tells nothing about the token.
    """
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def warn_open_metrics(token: str | None) -> None:
    """Say at start that /metrics is open (the default, kept so existing scrapes go on)."""
    if token is None:
        log.warning(
            "METRICS_TOKEN is not set: /metrics is open to whoever reaches this port "
            "(set it, or keep the port private; docs/operations.md)"
        )


class LoopHistogram(Collector):
    """A histogram observed on the event loop's thread alone: a bisection and two additions.

    prometheus-client's `Histogram` takes a lock twice per observation and
    walks its buckets in Python: 4% of the gateway's CPU per REST request
    forwarded behind ``CORE_URL`` and 5% per socket ``rpc`` frame (issue 16,
    py-spy and perf). Scrapes run on the same thread (the metrics endpoint
    is the gateway's), so nothing writes these counts while they are read.
    With ``labelnames``, `labels` gives each combination's child, as
    prometheus-client's does; without, the histogram observes itself.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
        labelnames: tuple[str, ...] = (),
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._bounds = [*buckets, float("inf")]
        # As prometheus-client spells each bound ("0.0005", "1.0", "+Inf")
        self._spelled: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], Observations] = {}
        self._own = Observations(self._bounds)
        if not labelnames:
            self._children[()] = self._own
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self._own.observe(seconds)

    def labels(self, *values: str) -> Observations:
        """The child of these label values (made on first use)."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Observations(self._bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            cumulative, buckets = 0, []
            for bound, count in zip(self._spelled, child.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class Observations:
    """One histogram's counts: what `LoopHistogram` and its children observe into."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds
