"""The Node joins the Hub (local members) to the Broker (other processes).

It subscribes the broker to a channel once, when the channel's first local
member arrives, and unsubscribes when the last one leaves. Members who join
while that first SUBSCRIBE is in flight wait for its outcome; if it fails,
every member that joined meanwhile is removed again in one step (no await in
between), so the hub never holds members of a channel the broker does not
deliver.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, NamedTuple

from core.infra import control
from core.infra.broker import CONTROL, UNTRUSTED_EPOCH, Broker, Entry, Position
from core.infra.history import HistoryPolicy, HistoryPublisher
from core.infra.metrics import Metrics
from core.infra.tasks import TaskSet
from core.infra.throttled import ThrottledLog
from gateway.events import EventRecorder
from gateway.hub import Hub, Member
from gateway.presence import Presence, decode_change
from proto import InvalidData, Join, Leave, PresenceInfo
from proto.publication import DEFAULT_MAX_BYTES, from_broker

__all__ = ["HistoryRead", "Node"]

log = logging.getLogger("gateway.node")

_dropped = ThrottledLog(log)
_jumped = ThrottledLog(log)

#: Channels in one UNSUBSCRIBE sent for channels that lost their last member.
UNSUBSCRIBE_BATCH = 256
#: Seconds between two reconciliations of the node's channels with the broker's.
RECONCILE_EVERY = 30.0


class HistoryRead(NamedTuple):
    """A read of a channel's history (`Node.history`)."""

    #: The publishable entries after the offset asked for, oldest first.
    entries: list[Entry]
    #: Where the channel stands (None: it keeps no history).
    top: Position | None
    #: The first and last offsets read, publishable or not (None: none): whether
    #: the read began where it was asked to and reached ``top`` does not depend
    #: on which entries were left out.
    span: tuple[int, int] | None


class _Pending:
    __slots__ = ("future", "joined")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.joined: list[Member] = []


class Node:
    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        metrics: Metrics,
        history: HistoryPolicy | None = None,
        presence: tuple[tuple[str, ...], float, bool] = ((), 60.0, True),
        max_publication_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.hub = hub
        self.broker = broker
        self.presence = Presence(broker, *presence)
        self.history_policy = history if history is not None else HistoryPolicy((), 1, 1.0)
        self._metrics = metrics
        self.max_publication_bytes = max_publication_bytes
        self.publisher = HistoryPublisher(broker, self.history_policy, max_publication_bytes)
        broker.on_fault = lambda kind: metrics.broker_faults.labels(kind).inc()
        usage = getattr(broker, "pool_usage", None)
        if usage is not None:
            metrics.watch_redis_pool(usage)
        #: History reads under way, by (channel, after, limit): a storm of
        #: sockets recovering one channel reads it once (`history`).
        #: Each with the last position broadcast here when it was issued (its
        #: answer holds at least that much), and whether the channel was then
        #: subscribed here (so that everything after the read reached this node).
        self._reading: dict[
            tuple[str, int, int],
            tuple[Position | None, asyncio.Future[HistoryRead], bool],
        ] = {}
        #: The last position that reached here, per history channel with members
        #: (or leaving, its UNSUBSCRIBE not sent yet).
        self._seen: dict[str, Position] = {}
        #: Channels whose members were told of a gap when the broker link came
        #: back, until their next publication (`_follow`).
        self._told: set[str] = set()
        self._pending: dict[str, _Pending] = {}
        #: Channels whose last local member left, to UNSUBSCRIBE in batches.
        self._leaving: dict[str, None] = {}
        self._flushing = False
        self._reconciled = time.monotonic()
        self._reconciling = False
        self._tasks = TaskSet(log)
        self._down = False  # between a broker state change to down and the next to up
        #: Called with each message on the control channel (revocations).
        self.on_control: Callable[[control.ControlMessage], None] | None = None
        #: This gateway's inbox (``__reply:<node id>``), and what reads it: the
        #: server API's replies (gateway/serverapi/fleet.py).
        self.inbox: str | None = None
        self.on_reply: Callable[[bytes], None] | None = None
        #: Where a publication goes: the hub, or, while the admin console
        #: watches, `_tallied` (`count_deliveries`): nothing per message otherwise.
        self._broadcast: Callable[[str, bytes, Position | None], int] = hub.broadcast
        self._tally: dict[str, int] = {}
        #: Records connection events (EVENTS_STREAM); None when off.
        self.events: EventRecorder | None = None

    async def start(self) -> None:
        if self.broker.reports_lost:
            self.broker.on_lost = self._on_lost
        await self.broker.start(self._on_publication, self._on_state)
        log.info("using the %s", self.broker.description)
        if self.events is not None:
            await self.events.start()
            log.info("connection events on, as node %s", self.events.node)

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()
        await self._tasks.cancel()
        await self.presence.close()
        await self.broker.close()

    # -- membership --------------------------------------------------------

    async def subscribe(self, ch: str, member: Member) -> None:
        """Make ``member`` receive ``ch``; raises `BrokerUnavailable`."""
        if not self.hub.add(ch, member):
            pending = self._pending.get(ch)
            if pending is not None:
                pending.joined.append(member)
                await asyncio.shield(pending.future)
            return
        pending = self._pending[ch] = _Pending()
        try:
            await self.broker.subscribe(ch)
        except BaseException as exc:
            del self._pending[ch]
            for m in (member, *pending.joined):
                self.hub.remove(ch, m)
            if isinstance(exc, Exception):
                pending.future.set_exception(exc)
                pending.future.exception()  # each waiter re-raises it
            else:
                pending.future.cancel()
            raise
        del self._pending[ch]
        pending.future.set_result(None)
        if not self.hub.has_subscribers(ch):
            self._leave(ch)  # everyone left while SUBSCRIBE was in flight

    def unsubscribe(self, ch: str, member: Member) -> None:
        if self.hub.remove(ch, member) and ch not in self._pending:
            self._leave(ch)

    def _leave(self, ch: str) -> None:
        """Unsubscribe the broker from ``ch`` soon, together with others leaving.

        When hundreds of sockets drop hundreds of channels at once, one
        UNSUBSCRIBE carries up to `UNSUBSCRIBE_BATCH` channels, and the loop
        serves everyone else between two of them. A channel that gets a
        member again before its batch is sent is simply kept.
        """
        self._leaving[ch] = None
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush_leaving())

    async def _flush_leaving(self) -> None:
        try:
            while self._leaving:
                await asyncio.sleep(0)  # let the rest of a storm queue up first
                batch: list[str] = []
                for ch in list(itertools.islice(self._leaving, UNSUBSCRIBE_BATCH)):
                    del self._leaving[ch]
                    if not self.hub.has_subscribers(ch) and ch not in self._pending:
                        batch.append(ch)
                        self._forget(ch)
                if batch:
                    await self.broker.unsubscribe_many(batch)
        except Exception:
            log.exception("unsubscribing %d channels failed", len(self._leaving))
        finally:
            self._flushing = False
            if self._leaving and self.broker.connected:
                self._flushing = True  # what is left goes in the next round
                self._spawn(self._flush_leaving())

    def leave_all(self, member: Member, channels: Iterable[str]) -> None:
        for ch in channels:
            self.unsubscribe(ch, member)

    def tick(self, now: float) -> None:
        """Called every second: reconcile subscriptions every `RECONCILE_EVERY` seconds;
        keep the events' mark of life and look for lost processes."""
        if self.events is not None:
            self.events.tick(now)
        if now - self._reconciled >= RECONCILE_EVERY and not self._reconciling:
            self._reconciled = now
            self._spawn(self.reconcile())

    async def reconcile(self) -> int:
        """Subscribe the broker again to channels with members it does not deliver.

        The node and the broker must agree on every channel; should they
        not (a lost race, a command lost with a connection), this repairs it,
        counts it, says so and tells the channel's members of a gap. Returns
        the number of channels repaired.
        """
        if not self.broker.connected:
            return 0  # the reconnect resubscribes everything
        self._reconciling = True
        try:
            expected = [ch for ch in self.hub.channels() if self._settled(ch)]
            repaired = 0
            for ch in await self.broker.verify(expected):
                if self._settled(ch):
                    await self.broker.resubscribe(ch)
                    self.hub.gap(ch)  # what was published meanwhile never came
                    if ch in self._seen:
                        self._told.add(ch)  # told: the next offset's jump is no second gap
                    repaired += 1
        except Exception as exc:  # BrokerUnavailable, mostly: the next round tries again
            log.warning("subscription reconciliation failed: %s", exc)
            return 0
        finally:
            self._reconciling = False
        if repaired:
            self._metrics.subscription_repairs.inc(repaired)
            log.warning(
                "reconciliation: %d channel(s) had members but no broker subscription; repaired",
                repaired,
            )
        return repaired

    def _settled(self, ch: str) -> bool:
        """``ch`` has members and is neither being subscribed nor left."""
        return self.hub.has_subscribers(ch) and ch not in self._pending and ch not in self._leaving

    async def publish(
        self,
        ch: str,
        data: bytes,
        *,
        checked: bool = False,
        history: bool = True,
        call: str | None = None,
    ) -> Position | None:
        """Publish JSON bytes to every subscriber of ``ch`` on every node.

        On a history channel the publication is also kept (unless not
        ``history``), and its position returned. Raises `proto.InvalidData`
        for data that is not publishable (``checked``: the caller's codec
        checked it already). ``call``: `HistoryPublisher.publish`'s.
        """
        return await self.publisher.publish(ch, data, checked=checked, history=history, call=call)

    async def publish_each(
        self, channels: Sequence[str], data: bytes, *, call: str | None = None
    ) -> list[Position | Exception | None]:
        """`publish` ``data`` on each of ``channels`` at once (`HistoryPublisher.publish_each`)."""
        return await self.publisher.publish_each(channels, data, call=call)

    def seen(self, ch: str) -> Position | None:
        """The last position of ``ch`` that reached this node (None: none yet).

        A subscriber notes it when it begins to hold live publications and
        passes it to `history` as ``covering``.
        """
        return self._seen.get(ch)

    async def history(
        self,
        ch: str,
        after: int,
        limit: int,
        *,
        covering: Position | None = None,
        holding: bool = False,
    ) -> HistoryRead:
        """Kept publications of ``ch`` after offset ``after``, and where it stands.

        Entries that are not publishable (a backend may append to history
        itself) are left out, as their live publication was.

        Callers asking the same at once share one read, when it covers what
        they need: a subscriber that began to hold live publications once
        this node had broadcast ``covering`` shares a read only if it was
        issued after that broadcast (so its answer holds it, and everything
        later was held). A reconnect storm on one channel reads it a few
        times, not once per socket. A subscriber (``holding``) that began
        to hold before anything reached this node (``covering`` None) shares
        only a read issued while the channel was subscribed here: one issued
        before (a `history` command of a client not subscribed) can miss what
        was published before the subscription took effect.
        """
        key = (ch, after, limit)
        under_way = self._reading.get(key)
        if (
            under_way is not None
            and _covers(under_way[0], covering)
            and (covering is not None or under_way[2] or not holding)
        ):
            return await asyncio.shield(under_way[1])
        reading = asyncio.ensure_future(self._read_history(*key))
        reading.add_done_callback(lambda f: self._read(key, f))
        self._reading[key] = (self._seen.get(ch), reading, self._settled(ch))
        return await asyncio.shield(reading)

    def _read(self, key: tuple[str, int, int], reading: asyncio.Future[Any]) -> None:
        under_way = self._reading.get(key)
        if under_way is not None and under_way[1] is reading:
            del self._reading[key]
        if not reading.cancelled():
            reading.exception()  # retrieved: every waiter got it, or none was left

    async def _read_history(self, ch: str, after: int, limit: int) -> HistoryRead:
        entries, top = await self.broker.history(ch, after, limit)
        kept: list[Entry] = []
        for offset, data in entries:
            payload = self._publishable(ch, data, "history")
            if payload is not None:
                kept.append((offset, payload))
        return HistoryRead(kept, top, (entries[0][0], entries[-1][0]) if entries else None)

    def _publishable(self, ch: str, data: bytes, source: str) -> bytes | None:
        """The JSON form of a publication read from the broker, or None to drop it."""
        try:
            payload, was_json = from_broker(data, self.max_publication_bytes)
        except InvalidData as exc:
            self._metrics.dropped_publications.labels(source).inc()
            _dropped.warning("dropped a publication on %r (%s): %s", ch, source, exc.reason)
            return None
        if not was_json:
            self._metrics.invalid_publications.inc()
            log.debug("publication on %s was not JSON; delivered as a string", ch)
        return payload

    # -- broker side -------------------------------------------------------

    def _on_state(self, up: bool) -> None:
        self._metrics.broker_state(up)
        was_down, self._down = self._down, not up
        if not up:
            self._told.clear()
        elif was_down and not self.broker.reports_lost:
            # Whatever was published while the link was down did not reach us.
            n = self.hub.notify_gap()
            self._told = set(self._seen)
            log.info("broker link back: %d subscriptions told they may have a gap", n)

    def _on_lost(self, channels: list[str]) -> None:
        """The broker's link for ``channels`` (one shard's) was lost and is back: only
        their members may have missed publications (`Broker.reports_lost`)."""
        n = 0
        for ch in channels:
            n += self.hub.gap(ch)
            if ch in self._seen:
                self._told.add(ch)
        log.info("broker link for %d channels back: %d subscriptions told they may have a gap",
                 len(channels), n)  # fmt: skip

    def _on_publication(self, ch: str, data: bytes, position: Position | None) -> None:
        if ch == CONTROL:
            message = control.decode(data)
            if message is not None and self.on_control is not None:
                self.on_control(message)
            return
        if ch == self.inbox:
            if self.on_reply is not None:
                self.on_reply(data)
            return
        change = decode_change(data)
        if change is not None:
            self.presence.heard(change, ch)
            info = PresenceInfo(change.user, change.client, change.info)
            event = Join(ch, info) if change.op == "join" else Leave(ch, info)
            self.hub.broadcast_event(ch, event)
            return
        self._metrics.publications.inc()
        held = self.hub.has_subscribers(ch)
        if position is not None and (held or ch in self._leaving):
            self._follow(ch, position)
        if not held:
            return
        payload = self._publishable(ch, data, "live")
        if payload is not None:
            self._broadcast(ch, payload, position)

    def _follow(self, ch: str, position: Position) -> None:
        """Note where ``ch`` stands; a step that is not the next offset tells its members first.

        The broker link dropped publications (the gap push of a reconnect may
        come after the first new one), or the history went on from another
        state than the one this node followed (a new epoch after a failover
        or a restart, whose first publications did not reach this node). The
        members hold this publication and the next ones while they check
        their position against history. The first publication of an epoch
        begun because the history was gone (expired while quiet), while the
        link is up, follows on from the last: no gap there, or every quiet
        channel's subscribers would reload each time it wakes up. One begun
        because the history could not be trusted (`UNTRUSTED_EPOCH`: a
        failover, which may have kept this node's link, on a demoted primary)
        is a gap.
        """
        last = self._seen.get(ch)
        self._seen[ch] = position
        if self._told and not self._down and ch in self._told:
            self._told.discard(ch)  # told when the link came back: they check from here on
            return
        if last is not None and position.epoch == last.epoch:
            if position.offset == last.offset + 1:
                return
        elif self._down:
            # While the link is down (a shard back before the others, or its
            # resubscription confirmed before the link counts as up) every step
            # that is not the next one is a gap, a channel's first one too.
            pass
        elif last is None:
            return  # the first since its members joined, whose own reads cover what came before
        elif position.offset == 1 and not position.epoch.startswith(UNTRUSTED_EPOCH):
            # The first publication of a history begun again because it was gone
            # (expired while quiet, evicted): nothing came in between.
            return
        n = self.hub.gap(ch)
        if n:
            _jumped.log(
                logging.INFO,
                "publications on %r went from %s to offset %d (epoch %s)%s: "
                "%d subscribers told they may have a gap",
                ch, "nothing" if last is None else f"offset {last.offset} (epoch {last.epoch})",
                position.offset, position.epoch, " with the broker link down" if self._down else "", n,
            )  # fmt: skip

    # -- the admin console's busiest channels ------------------------------

    def count_deliveries(self, on: bool) -> None:
        """Count deliveries per channel (`take_tally`) from now on, or stop counting."""
        if on:
            self._broadcast = self._tallied
        elif self._broadcast != self.hub.broadcast:
            self._broadcast = self.hub.broadcast
            self._tally = {}

    def _tallied(self, ch: str, payload: bytes, position: Position | None) -> int:
        n = self.hub.broadcast(ch, payload, position)
        self._tally[ch] = self._tally.get(ch, 0) + n
        return n

    def take_tally(self) -> dict[str, int]:
        """Deliveries per channel since the last call (while counting)."""
        tally, self._tally = self._tally, {}
        return tally

    def _forget(self, ch: str) -> None:
        """``ch`` leaves the broker: what was seen and read before never covers a later member."""
        self._seen.pop(ch, None)
        self._told.discard(ch)
        for key in [key for key in self._reading if key[0] == ch]:
            del self._reading[key]

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        self._tasks.spawn(coro)


def _covers(issued: Position | None, needed: Position | None) -> bool:
    """Whether a read issued when ``issued`` had been broadcast holds ``needed``."""
    if needed is None:
        return True
    return issued is not None and issued.epoch == needed.epoch and issued.offset >= needed.offset
