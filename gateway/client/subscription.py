"""A subscription: the events of one channel as an async iterator.

Events are `Publication` (a ``msg`` push), `Gap` (publications may have been
missed and were not recovered), and proto's `Join` / `Leave` on presence
channels. The iterator ends when the channel is unsubscribed or the client
closes, and raises when the subscription is lost (`SubscriptionEnded`,
`ConnectionClosed` once the client stopped for good).

The queue is bounded: when ``max_queue`` events wait, the client stops
reading the socket (``pause``) until the consumer has taken half of them
(``resume``). A consumer that stays behind makes the gateway close the
socket as a slow consumer (4001); the client then reconnects and recovers.
A subscription the server made (``unread=True``) does not stop the socket
before its first read: nobody may know it exists, and every reply, ping
and channel would wait behind it. Its queue keeps the newest events after
a `Gap` (``unread``) instead. Live publications held back while a gap is
repaired are bounded by ``max_queue`` too (`overheld`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from proto import Join, Leave, Position

__all__ = ["Event", "Gap", "GapReason", "Publication", "Subscription"]


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication on ``channel``; history channels give its ``offset`` and ``epoch``."""

    channel: str
    data: Any
    offset: int | None = None
    epoch: str | None = None

    @property
    def position(self) -> Position | None:
        if self.offset is None or self.epoch is None:
            return None
        return Position(offset=self.offset, epoch=self.epoch)


#: ``not_recovered``: resubscribed with ``since`` and the gateway could not
#: replay what was missed (``recovered: false``). ``no_position``: resubscribed
#: without a position to recover from (a channel without history, or one with
#: no publication seen yet). ``broker``: the gateway's link to Redis was lost
#: (the ``gap`` push) and history could not fill the hole. ``unread``: a
#: subscription the server made (a ``subscribed`` push) that nobody had read
#: yet got more than ``max_queue`` events, and the oldest were dropped rather
#: than stopping the socket. In every case reload the state, e.g. over ``rpc``.
GapReason = Literal["not_recovered", "no_position", "broker", "unread"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Publications on ``channel`` may have been missed; live ones continue after ``position``."""

    channel: str
    reason: GapReason
    position: Position | None = None


Event = Publication | Gap | Join | Leave


class Subscription:
    """The live subscription of one client to one channel."""

    __slots__ = (
        "_end",
        "_events",
        "_held",
        "_high",
        "_pause",
        "_paused",
        "_resume",
        "_unread",
        "_unsubscribe",
        "_waiter",
        "channel",
        "confirmed",
        "position",
        "recovered",
    )

    def __init__(
        self,
        channel: str,
        since: Position | None,
        *,
        max_queue: int,
        pause: Callable[[Subscription], None],
        resume: Callable[[Subscription], None],
        unsubscribe: Callable[[str], Awaitable[None]],
        unread: bool = False,
    ) -> None:
        self.channel = channel
        #: The last position received (or given as ``since``): what a
        #: resubscription recovers from.
        self.position: Position | None = since
        #: The last ``sub`` reply's ``recovered``: None when no ``since`` was sent.
        self.recovered: bool | None = None
        #: Whether the gateway confirmed it once (then it is resubscribed after reconnects).
        self.confirmed = False
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._end: BaseException | None = None
        self._held: list[Publication] | None = None  # live ones, while a gap is repaired
        self._high = max_queue
        self._paused = False
        self._pause = pause
        self._resume = resume
        self._unsubscribe = unsubscribe
        self._unread = unread

    def __repr__(self) -> str:
        return f"<Subscription {self.channel} position={self.position} recovered={self.recovered}>"

    @property
    def active(self) -> bool:
        return self._end is None

    async def unsubscribe(self) -> None:
        """Leave the channel (`Client.unsubscribe`)."""
        await self._unsubscribe(self.channel)

    # -- consumer side -----------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        self._unread = False
        while not self._events:
            if self._end is not None:
                if isinstance(self._end, StopAsyncIteration):
                    raise StopAsyncIteration
                raise self._end
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if self._paused and len(self._events) <= self._high // 2:
            self._paused = False
            self._resume(self)
        return event

    # -- client side -------------------------------------------------------

    def publication(self, pub: Publication, live: bool = True) -> None:
        """Queue a publication, dropping a repeat of one already seen (same epoch).

        Live ones wait while a gap is being repaired from history (`hold`).
        """
        if live and self._held is not None:
            self._held.append(pub)
            return
        pos = self.position
        if pub.offset is not None and pub.epoch is not None:
            if pos is not None and pos.epoch == pub.epoch and pub.offset <= pos.offset:
                return
            self.position = Position(offset=pub.offset, epoch=pub.epoch)
        self.put(pub)

    def put(self, event: Event) -> None:
        if self._end is not None:
            return
        if self._unread and len(self._events) >= self._high:
            self._events.clear()  # nobody reads it (yet): never stop the socket for it
            self._events.append(Gap(self.channel, "unread", self.position))
        self._events.append(event)
        self._wake()
        if not self._paused and not self._unread and len(self._events) >= self._high:
            self._paused = True
            self._pause(self)

    def subscribed(
        self,
        since: Position | None,
        recovered: bool | None,
        now: Position | None,
        again: bool = False,
    ) -> None:
        """A ``sub`` reply: ``now`` is the channel's position when it took effect.

        ``again``: a resubscription after a reconnect, where no ``since``
        means that what was published meanwhile is lost.
        """
        self.recovered = recovered
        self.confirmed = True
        if since is not None and not recovered:
            self.put(Gap(self.channel, "not_recovered", now))
        elif since is None and again:
            self.put(Gap(self.channel, "no_position", now))
        if now is not None and not recovered:  # recovered: the replay follows from `since`
            self.position = now

    @property
    def holding(self) -> bool:
        return self._held is not None

    @property
    def overheld(self) -> bool:
        """More live publications held back than ``max_queue``: the repair fell behind."""
        return self._held is not None and len(self._held) > self._high

    def hold(self) -> None:
        """Keep live publications back while what was missed is fetched from history."""
        if self._held is None:
            self._held = []

    def discard_held(self) -> None:
        """Forget the live publications held back (history will bring them again)."""
        if self._held is not None:
            self._held = []

    def release(self) -> None:
        """Deliver the live publications held back (repeats of the history dropped)."""
        held, self._held = self._held or [], None
        for pub in held:
            self.publication(pub)

    def end(self, error: BaseException | None = None) -> None:
        """No more events: the iterator ends (None) or raises ``error`` once drained."""
        if self._end is None:
            self._end = error if error is not None else StopAsyncIteration()
            self._wake()
            if self._paused:
                self._paused = False
                self._resume(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
