"""The Broker interface: moves publications between gateway processes.

A broker knows channels, not connections. The node asks it to subscribe to
a channel when the first local subscriber arrives and to unsubscribe when
the last one leaves; the broker calls the node's handler once for every
publication on a subscribed channel, whichever process published it.

Contract (tests/test_broker_contract.py runs it against every broker):

* ``start(handler, on_state)`` connects and calls ``handler(channel, data)`` for each
  publication afterwards, in publication order per channel. ``data`` is the
  publication's JSON bytes exactly as published.
* ``subscribe(ch)`` returns once publications on ``ch`` will be delivered; it
  raises `BrokerUnavailable` when it cannot promise that (the caller rolls
  back). Subscribing twice is harmless.
* ``unsubscribe(ch)`` stops delivery; it never raises for a lost backend.
  ``unsubscribe_many(channels)`` does it for many channels at once.
* ``publish(ch, data)`` returns once the backend accepted the publication;
  it raises `BrokerUnavailable` otherwise. Publishing to a channel nobody
  subscribes to succeeds and delivers nothing.
* After the backend is lost and comes back, the broker reconnects by itself
  (with backoff) and resubscribes every channel it holds; ``connected``
  tells whether it currently can deliver. A broker with `reports_lost`
  (a cluster) also calls `on_lost` with the channels of a lost link once
  they are delivered again: the others never stopped.
* Publications on `CONTROL` (``__control``) are always delivered, subscribed
  or not: it carries node-wide messages such as session revocations.
* ``publish_history(ch, data, size, ttl)`` also appends to the channel's
  history and returns its `Position`: the next offset (1, 2, 3…) in the
  channel's epoch, assigned atomically with the publication, so every
  process sees one order. The handler then receives the position too. The
  history keeps the last ``size`` publications and disappears ``ttl``
  seconds after the last one; when it is gone (or the backend lost it), the
  next publication starts a new epoch at offset 1.
* ``history(ch, after, limit)`` returns up to ``limit`` publications with
  offsets above ``after``, oldest first, and the channel's current position
  (None when it has no history).
* ``expiring_add(key, member, until)`` keeps ``member`` in the shared set
  ``key`` until ``until`` (Unix seconds, this host's clock; adding again
  moves it); ``expiring_members(key, now)`` returns the members live at
  ``now`` with their ``until``, forgetting the others, but only those
  expired by the backend's own clock as well (a reader whose clock runs
  ahead leaves the others what is still live for them);
  ``expiring_members_from(key, until)`` returns only those whose ``until``
  is at least ``until`` (one range read; what expired is not forgotten
  there); ``expiring_remove`` drops one. The gateways' registry of live nodes and the block list of
  the server API are such sets.
* ``append_events(node, batch, ttl, maxlen)`` does in one atomic step, for
  process ``node``: appends ``batch.events`` (JSON objects) to the event
  stream, trimmed to about ``maxlen`` entries (never fewer); records
  ``batch.opened`` (client -> the disconnect event to report should the node
  die) among the node's live connections, then forgets ``batch.closed``; and
  marks the node alive for ``ttl`` seconds. It returns True when the node was
  not marked alive (its first call, or it was reported lost meanwhile).
* ``lost_nodes()`` lists the nodes whose mark expired. ``claim_node(node,
  maxlen, limit)``, if the node's mark is still expired, appends the recorded
  disconnect event of up to ``limit`` of its live connections, each with a
  ``ts`` member added (milliseconds, the backend's clock), forgets them, and
  forgets the node once none is left; atomically, so that of many processes
  claiming at once, each connection is reported by exactly one. It returns
  the events it appended and whether the node is now forgotten.
  ``forget_node(node)`` forgets a node that stops cleanly.
* ``read_events(after, limit)`` returns up to ``limit`` stream entries with
  ids after ``after`` (``"0"``: from the start), oldest first.
* ``close()`` releases everything; the handler is not called afterwards.
* The reader survives anything: a message it cannot parse is dropped, a
  handler that raises is logged, and any unexpected error restarts the
  reader with backoff like a lost link (``connected`` is False meanwhile);
  each is reported to `on_fault`.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast, runtime_checkable

from proto import Position

__all__ = [
    "CONTROL",
    "Broker",
    "BrokerUnavailable",
    "EachPublisher",
    "Entry",
    "EventBatch",
    "FaultListener",
    "Position",
    "PublicationHandler",
    "Publisher",
    "StateListener",
    "stamped",
]

#: The node-wide channel every broker always delivers. Client channels may not
#: start with ``__`` (proto/connection.py), so no client reads or forges it.
CONTROL = "__control"

#: An epoch that a history begun again because it could not be trusted (a
#: failover, a restart from a snapshot: core/infra/lua/publish_with_history.lua)
#: starts with this; one begun because the history was gone (expired) does not.
UNTRUSTED_EPOCH = "~"

#: ``handler(channel, data_json, position)``; must not block or raise.
#: ``position`` is None for publications without history.
PublicationHandler = Callable[[str, bytes, Position | None], None]
#: (offset, data_json) of one publication in a history.
Entry = tuple[int, bytes]
#: ``listener(up)``: called when the backend link goes up or down.
StateListener = Callable[[bool], None]
#: ``listener(kind)``: the broker dropped a malformed message (``malformed``),
#: its handler raised (``handler``), or its reader restarted after an
#: unexpected error (``reader``); for metrics.
FaultListener = Callable[[str], None]


class Publisher(Protocol):
    """Anything that publishes to every subscriber of a channel on every node.

    A `Broker`, the gateway's node, `core.infra.history.HistoryPublisher`.
    """

    async def publish(self, ch: str, data: bytes) -> object:
        """Publish JSON bytes to every subscriber of ``ch`` on every node."""


@runtime_checkable
class EachPublisher(Publisher, Protocol):
    """A `Publisher` that publishes one message on several channels at once.

    The gateway's node and `core.infra.history.HistoryPublisher`: the
    message is checked once and, on Redis, sent in one round trip.
    """

    async def publish_each(
        self, channels: Sequence[str], data: bytes, *, call: str | None = None
    ) -> Sequence[object]:
        """Publish ``data`` on each of ``channels``: each one's outcome, an
        exception for one that failed. Raises `proto.InvalidData` (for all).

        ``call``: an id of this publication, the same when it is made again (an
        outbox row's, core/outbox.py): a history channel that has it among its
        last 8 answers with that run's position and publishes nothing."""


@dataclasses.dataclass(slots=True)
class EventBatch:
    """What one process appends to the event stream in one step (`Broker.append_events`)."""

    #: Events to append, each a JSON object, in order.
    events: list[bytes] = dataclasses.field(default_factory=list)
    #: Connections that opened: client id -> its disconnect event, a JSON
    #: object without ``ts``, appended (with ``ts``) if the node is lost.
    opened: dict[str, bytes] = dataclasses.field(default_factory=dict)
    #: Connections that closed (after those that opened, if in both).
    closed: list[str] = dataclasses.field(default_factory=list)


def stamped(event: bytes, ms: int) -> bytes:
    """``event`` (a JSON object) with a last member ``"ts": ms``."""
    return b'%s,"ts":%d}' % (event[:-1], ms)


class BrokerUnavailable(Exception):
    """The backend cannot take the request now; retrying later may work."""


class Broker(abc.ABC):
    #: Told of every message dropped and every reader restart (set by the node).
    on_fault: FaultListener | None = None
    #: Whether the broker says which channels' deliveries were cut (`on_lost`): a
    #: backend of several links (a cluster's shards), where one link lost is not
    #: every channel's loss. Otherwise ``on_state(True)`` after a loss means that
    #: any channel may have missed publications.
    reports_lost: bool = False
    #: Called with the channels that may have missed publications, once each is
    #: delivered again (set by the node, when `reports_lost`).
    on_lost: Callable[[list[str]], None] | None = None

    @abc.abstractmethod
    async def start(
        self, handler: PublicationHandler, on_state: StateListener | None = None
    ) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, ch: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, ch: str) -> None: ...

    async def verify(self, channels: list[str]) -> list[str]:
        """Of ``channels`` (the node has members for them), those not delivered now.

        For the node's periodic reconciliation. An in-process broker cannot
        diverge from the node: none.
        """
        return []

    async def resubscribe(self, ch: str) -> None:
        """Subscribe ``ch`` again, even if this broker believes it holds it."""
        await self.subscribe(ch)

    async def unsubscribe_many(self, channels: list[str]) -> None:
        """`unsubscribe` each of ``channels``; brokers with a server send one command."""
        for ch in channels:
            await self.unsubscribe(ch)

    @abc.abstractmethod
    async def publish(self, ch: str, data: bytes) -> None: ...

    async def publish_many(
        self,
        channels: Sequence[tuple[str, tuple[int, float] | None]],
        data: bytes,
        call: str | None = None,
    ) -> list[Position | Exception | None]:
        """Publish ``data`` on each channel, with history where it comes with its
        ``(size, ttl)``: each one's position (None without history) or its error.

        One failing does not stop the others. Brokers with a server send them
        in one round trip. ``call``: as `publish_history`'s, for each channel.
        """
        outcomes = await asyncio.gather(
            *(
                self.publish(ch, data)
                if history is None
                else self.publish_history(ch, data, *history, call=call)
                for ch, history in channels
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
        return cast(list[Position | Exception | None], outcomes)

    @abc.abstractmethod
    async def put_value(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` for every process to read (a snapshot, not a log)."""

    @abc.abstractmethod
    async def get_value(self, key: str) -> bytes | None:
        """What `put_value` last stored under ``key`` (by any process), or None."""

    async def expiring_add(self, key: str, member: str, until: float) -> None:
        """Keep ``member`` in the set ``key`` until ``until`` (Unix seconds), for every process."""
        await self.expiring_add_many(key, {member: until})

    @abc.abstractmethod
    async def expiring_add_many(self, key: str, members: Mapping[str, float]) -> None:
        """`expiring_add` for each of ``members`` (member: until), in one round trip."""

    @abc.abstractmethod
    async def expiring_remove(self, key: str, member: str) -> None: ...

    @abc.abstractmethod
    async def expiring_members(self, key: str, now: float) -> dict[str, float]:
        """The members of ``key`` live at ``now`` (Unix seconds), each with its ``until``."""

    @abc.abstractmethod
    async def expiring_members_from(self, key: str, until: float) -> dict[str, float]:
        """The members of ``key`` kept until ``until`` or later, each with its ``until``:
        when every member is kept for one span from when it was added, those added since a
        moment, in one read of those alone."""

    @abc.abstractmethod
    async def publish_history(
        self, ch: str, data: bytes, size: int, ttl: float, call: str | None = None
    ) -> Position:
        """Append ``data`` to ``ch``'s history (``size`` kept, for ``ttl`` s) and publish it.

        ``call``: an id of this publication, the same when it is made again
        (no ``;`` nor ``=``): when the channel's last 8 calls hold it, the
        first run's position is returned and nothing is published. Without
        one, the broker makes one per call (its own resend of a lost answer).
        """

    @abc.abstractmethod
    async def presence_add(self, ch: str, entries: dict[str, bytes], ttl: float) -> None:
        """Add or refresh presence entries (client id -> info JSON), each living ``ttl`` s."""

    @abc.abstractmethod
    async def presence_remove(self, ch: str, clients: list[str]) -> None: ...

    @abc.abstractmethod
    async def presence(self, ch: str) -> dict[str, bytes]:
        """The live presence entries of ``ch`` (expired ones are dropped).

        Reads every entry: on a room of thousands, milliseconds of the broker's time
        (Redis's, shared by every gateway). `presence_stats` counts without reading.
        """

    @abc.abstractmethod
    async def presence_stats(self, ch: str) -> tuple[int, int]:
        """How many live presence entries ``ch`` has, and of how many distinct users.

        Kept as counts beside the entries (the entries' ``user`` field), so neither
        grows with the room: the cheap call for big rooms.
        """

    @abc.abstractmethod
    async def history(
        self, ch: str, after: int, limit: int
    ) -> tuple[list[Entry], Position | None]: ...

    # -- connection events (docs/events.md) ---------------------------------

    @abc.abstractmethod
    async def append_events(self, node: str, batch: EventBatch, ttl: float, maxlen: int) -> bool:
        """Append, record and mark ``node`` alive, atomically; True if it was not marked."""

    @abc.abstractmethod
    async def lost_nodes(self) -> list[str]:
        """The nodes whose mark of life expired (not yet claimed)."""

    @abc.abstractmethod
    async def claim_node(self, node: str, maxlen: int, limit: int) -> tuple[list[bytes], bool]:
        """Report up to ``limit`` live connections of a lost ``node``: (events, node forgotten)."""

    @abc.abstractmethod
    async def forget_node(self, node: str) -> None:
        """``node`` stops cleanly: forget its mark and its live connections."""

    @abc.abstractmethod
    async def read_events(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` (id, event) entries of the stream after id ``after``."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    async def healthy(self) -> bool:
        """For readiness: the link is up (brokers with a server also ping it, 1 s at most)."""
        return self.connected

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line for logs, without credentials."""
