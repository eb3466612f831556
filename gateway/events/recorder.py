"""The EventRecorder: this process's connection events, appended to the stream in batches.

Sessions call `connected`, `disconnected`, `subscribed` and `unsubscribed`;
each encodes one event and queues it, never waiting and never raising. One
task appends what is queued in one `Broker.append_events` call per round
trip (so a loop iteration's events go together, and a burst becomes a few
large appends), and also records, in the same atomic step, which
connections are live here: a connect stores the disconnect event to report
should this process die, a disconnect removes it. Each append marks the
process alive for ``ttl`` seconds (PRESENCE_TTL); when idle, `tick` sends
an empty one every third of that.

Every process also looks, every third of ``ttl``, for processes whose mark
expired, and claims them (`Broker.claim_node`): each of their live
connections gets its disconnect event (``node_lost``) appended exactly
once, by whichever process claimed it.

While Redis cannot take them, events wait (up to ``buffer``; more are
dropped, counted and logged) and are appended when it is back, in order.
A process reported lost that turns out alive (it was paused, or cut off
from Redis, for longer than ``ttl``) appends a connect event again for each
of its connections. docs/events.md says what this guarantees.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Collection
from typing import Any, NamedTuple, Protocol

from core.infra.backoff import Backoff
from core.infra.broker import Broker, BrokerUnavailable, EventBatch
from core.infra.metrics import Metrics
from core.infra.tasks import TaskSet
from core.infra.throttled import ThrottledLog
from gateway.events.schema import (
    NODE_LOST,
    Connect,
    Disconnect,
    Event,
    Subscribe,
    Unsubscribe,
    encode,
    unstamped,
)
from gateway.events.webhook import Webhook
from proto import CloseCode, close_reason

__all__ = ["APPEND_BATCH", "CLAIM_BATCH", "EventRecorder", "Recorded", "node_name", "reason_for"]

log = logging.getLogger("gateway.events")
_dropping = ThrottledLog(log, 10.0)
_failing = ThrottledLog(log, 10.0)

#: Events in one append at most (Lua arguments, and the time Redis spends on one script).
APPEND_BATCH = 1000
#: Connections of a lost node reported in one claim at most.
CLAIM_BATCH = 1000
#: Waits between appends that failed (Redis unreachable).
RETRY = Backoff(0.1, 5.0)

#: Reasons for close codes the gateway does not name itself (proto's table has the rest).
_REASONS = {1005: "no status", 1006: "connection lost"}


def reason_for(code: int, reason: str = "") -> str:
    """``reason``, or what ``code`` means when none was given."""
    if reason:
        return reason
    if code in _REASONS:
        return _REASONS[code]
    try:
        return close_reason(CloseCode(code))
    except (ValueError, KeyError):
        return ""


def node_name() -> str:
    """This process's name in events: host, process id and a random part (unique)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Recorded(Protocol):
    """What the recorder needs of a connection (the session has it)."""

    @property
    def client_id(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def transport_kind(self) -> str: ...


class _Item(NamedTuple):
    kind: str
    event: bytes
    client: str | None = None  # a connect's or disconnect's
    lost: bytes | None = None  # a connect's disconnect event, should this node die


def _membership(item: _Item) -> bool:
    return item.kind in ("subscribe", "unsubscribe")


class EventRecorder:
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        live: Callable[[], Collection[Recorded]],
        *,
        ttl: float,
        maxlen: int,
        buffer: int,
        webhook: Webhook | None = None,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
        backoff: Backoff = RETRY,
    ) -> None:
        """``live``: this process's connections now (to announce again if it was reported lost)."""
        self.node = node if node is not None else node_name()
        self._broker = broker
        self._metrics = metrics
        self._live = live
        self._ttl = ttl
        self._maxlen = maxlen
        self._buffer = buffer
        self._webhook = webhook
        self._clock = clock
        self._backoff = backoff
        self._items: collections.deque[_Item] = collections.deque()
        self._seq = itertools.count(1)
        self._flushing: asyncio.Task[None] | None = None
        self._beat = False  # an append is due to keep the mark alive
        self._marked = False  # the first append went through
        self._refreshed = float("-inf")  # monotonic time of the last append
        self._swept = time.monotonic() + random.uniform(0, ttl / 3)  # spread the processes
        self._sweeping = False
        self._closing = False
        self._closed = False  # nothing is appended any more (what comes is left queued)
        self._tasks = TaskSet(log)
        metrics.events_queued.labels("stream").set_function(lambda: len(self._items))

    async def start(self) -> None:
        """Mark this process alive now (and start the webhook's client)."""
        if self._webhook is not None:
            await self._webhook.start()
        self._beat = True
        self._wake()

    # -- recording (from sessions: never waits, never raises) ----------------

    def connected(self, conn: Recorded) -> None:
        self._add("connect", Connect, conn, opened=True)

    def disconnected(self, conn: Recorded, code: int, reason: str = "") -> None:
        self._add(
            "disconnect", Disconnect, conn, closed=True, code=code, reason=reason_for(code, reason)
        )

    def subscribed(self, conn: Recorded, ch: str) -> None:
        self._add("subscribe", Subscribe, conn, channel=ch)

    def unsubscribed(self, conn: Recorded, ch: str) -> None:
        self._add("unsubscribe", Unsubscribe, conn, channel=ch)

    def _add(
        self,
        kind: str,
        cls: type[Event],
        conn: Recorded,
        *,
        opened: bool = False,
        closed: bool = False,
        **fields: Any,
    ) -> None:
        client = conn.client_id
        common: dict[str, Any] = {
            "node": self.node,
            "client": client,
            "user": conn.subject,
            "transport": conn.transport_kind,
        }
        try:
            event = encode(cls(id=self._id(), ts=int(self._clock() * 1000), **common, **fields))
            lost = None
            if opened:
                lost = unstamped(
                    Disconnect(
                        id=f"{self.node}/lost/{client}", code=1006, reason=NODE_LOST, ts=0, **common
                    )
                )
        except Exception:  # no JSON carries it (a lone surrogate in a sub?): this event only
            self._metrics.events_dropped.labels("stream").inc()
            _dropping.warning("dropped a %s event that cannot be encoded", kind, exc_info=True)
            return
        self._queue(_Item(kind, event, client if opened or closed else None, lost))

    def _id(self) -> str:
        return f"{self.node}/{next(self._seq)}"

    def _queue(self, item: _Item) -> None:
        if len(self._items) >= self._buffer:
            self._metrics.events_dropped.labels("stream").inc()
            _dropping.warning(
                "dropped a %s event: %d events wait for Redis (EVENTS_BUFFER)",
                item.kind,
                len(self._items),
            )
            return
        self._items.append(item)
        self._wake()

    # -- appending -----------------------------------------------------------

    def _wake(self) -> None:
        if self._flushing is None and not self._closed:
            self._flushing = self._tasks.spawn(self._flush(), name="events-append")

    async def _flush(self) -> None:
        """Append what is queued, one batch per round trip, until nothing is; retry on failure."""
        attempt = 0
        try:
            while self._items or self._beat:
                items = list(itertools.islice(self._items, APPEND_BATCH))
                batch = EventBatch([item.event for item in items])
                for item in items:
                    if item.lost is not None:
                        batch.opened[item.client or ""] = item.lost
                    elif item.client is not None:
                        batch.closed.append(item.client)
                try:
                    absent = await self._broker.append_events(
                        self.node, batch, self._ttl, self._maxlen
                    )
                except BrokerUnavailable as exc:
                    delay = self._backoff.delay(attempt)
                    attempt += 1
                    _failing.warning(
                        "appending %d events failed (%s); %d wait, retrying in %.2fs",
                        len(items),
                        exc,
                        len(self._items),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                for _ in items:
                    self._items.popleft()
                self._appended(items)
                if absent and self._marked:
                    self._announce_again()
                self._marked = True
        finally:
            self._flushing = None

    def _appended(self, items: list[_Item]) -> None:
        self._beat = False
        self._refreshed = time.monotonic()
        for kind, group in itertools.groupby(items, key=lambda item: item.kind):
            self._metrics.events_appended.labels(kind).inc(sum(1 for _ in group))
        if self._webhook is not None:
            for membership, group in itertools.groupby(items, key=_membership):
                self._webhook.offer([item.event for item in group], membership=membership)

    def _announce_again(self) -> None:
        """This process was reported lost while alive: its connections are news again."""
        live = self._live()
        log.warning(
            "this process (%s) was reported lost (no mark of life for %.0fs); "
            "announcing its %d connections again",
            self.node,
            self._ttl,
            len(live),
        )
        for conn in list(live):
            self.connected(conn)

    # -- liveness ------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Every second (monotonic ``now``): keep the mark alive, look for lost processes."""
        if self._closing:
            return
        if now - self._refreshed >= self._ttl / 3:
            self._beat = True
            self._wake()
        if now - self._swept >= self._ttl / 3 and not self._sweeping:
            self._swept = now
            self._sweeping = True
            self._tasks.spawn(self.sweep(), name="events-sweep")

    async def sweep(self) -> int:
        """Claim every lost process; returns the disconnects this process reported."""
        reported = 0
        try:
            for node in await self._broker.lost_nodes():
                if node != self.node:
                    reported += await self._claim(node)
        except BrokerUnavailable as exc:
            log.debug("looking for lost processes failed: %s", exc)
        except Exception:  # the sweep survives anything; the next one tries again
            log.exception("looking for lost processes failed")
        finally:
            self._sweeping = False
        return reported

    async def _claim(self, node: str) -> int:
        reported = 0
        while True:
            events, done = await self._broker.claim_node(node, self._maxlen, CLAIM_BATCH)
            reported += len(events)
            if events:
                self._metrics.events_appended.labels("disconnect").inc(len(events))
                if self._webhook is not None:
                    self._webhook.offer(events)
            if done:
                self._metrics.events_nodes_lost.inc()
                log.warning("process %s was lost: reported %d disconnects", node, reported)
            if done or not events:
                return reported

    # -- shutdown ------------------------------------------------------------

    async def close(self, wait: float = 5.0) -> None:
        """Append what waits (``wait`` s at most); forget this process if nothing is left.

        Connections still open, or events not appended, are left to the
        others: once the mark expires they report the connections lost.
        """
        self._closing = True
        flushing = self._flushing
        if flushing is not None:
            await asyncio.wait([flushing], timeout=wait)
        self._closed = True
        await self._tasks.cancel()
        left = len(self._live())
        if self._items or left:
            log.warning(
                "stopping with %d events not appended and %d connections open: "
                "other processes will report them lost",
                len(self._items),
                left,
            )
        else:
            try:
                await self._broker.forget_node(self.node)
            except BrokerUnavailable as exc:
                log.warning("could not say this process stopped (%s): reported lost later", exc)
        if self._webhook is not None:
            await self._webhook.close(wait)
