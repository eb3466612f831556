"""Presence: who is subscribed to a channel, across every gateway process.

On channels matching ``PRESENCE_CHANNELS``, each subscribed connection is an
entry ``{"user": <sub>, "client": <connection id>}`` in the broker (Redis),
living ``PRESENCE_TTL`` seconds. This process refreshes its own entries about
every third of that, and removes them when a connection leaves; the entries
of a process that dies without saying so expire by themselves.

Reading a channel's whole list costs Redis (single-threaded, shared by every
gateway) ~8 ms for 5,000 entries, and this process more. So a process reads
a channel's list at most once every `READ_EVERY` seconds, however many of its
sockets ask (one read under way serves everyone who asks meanwhile), and keeps
that list up to date with the joins and leaves it makes and hears pushed.
What it may miss meanwhile: an entry that expired (its process died), and,
when no socket of this process is subscribed to the channel or pushes are off
(``PRESENCE_PUSHES``), another process's joins and leaves: for at most
`READ_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Literal

import msgspec

from core.infra.broker import Broker, BrokerUnavailable
from core.infra.history import ChannelPatterns
from core.infra.tasks import TaskSet

__all__ = [
    "PRESENCE_MARK",
    "READ_EVERY",
    "Presence",
    "PresenceChange",
    "PresenceEntry",
    "decode_change",
]

log = logging.getLogger("gateway.presence")


class PresenceEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    user: str
    client: str
    info: dict[str, Any] | None = None


class PresenceChange(msgspec.Struct, frozen=True, omit_defaults=True):
    """A join or leave, as it travels between processes on the channel itself."""

    op: Literal["join", "leave"]
    user: str
    client: str
    info: dict[str, Any] | None = None


#: Presence changes travel on the channel behind this byte (no JSON starts
#: with it), so they reach subscribers on every process like publications.
PRESENCE_MARK = b"\x1d"
_change = msgspec.json.Decoder(PresenceChange)


def decode_change(data: bytes) -> PresenceChange | None:
    """The presence change in a publication, or None for an ordinary one."""
    if data[:1] != PRESENCE_MARK:
        return None
    try:
        return _change.decode(data[1:])
    except msgspec.DecodeError:
        return None


_entry = msgspec.json.Decoder(PresenceEntry)

#: Seconds a channel's list, once read, answers for this process.
READ_EVERY = 1.0
#: Channels whose list is kept at once, at most (the oldest reads go first).
KEPT_LISTS = 256


class _Read:
    """A channel's list as read at ``at`` (monotonic), with what was heard since."""

    __slots__ = ("at", "done", "entries", "heard")

    def __init__(self, at: float, done: asyncio.Future[None]) -> None:
        self.at = at
        self.done = done
        #: client -> entry; None while the read is under way
        self.entries: dict[str, PresenceEntry] | None = None
        #: Changes heard while the read was under way: applied over it.
        self.heard: list[tuple[str, PresenceEntry | None]] = []

    def apply(self, client: str, entry: PresenceEntry | None) -> None:
        if self.entries is None:
            self.heard.append((client, entry))
        elif entry is None:
            self.entries.pop(client, None)
        else:
            self.entries[client] = entry


class Presence(ChannelPatterns):
    def __init__(
        self, broker: Broker, patterns: tuple[str, ...], ttl: float, pushes: bool = True
    ) -> None:
        super().__init__(patterns)
        self._broker = broker
        self.ttl = ttl
        #: Whether joins and leaves are pushed to the channel's subscribers.
        self.pushes = pushes
        self._local: dict[str, dict[str, bytes]] = {}
        self._refreshed = time.monotonic()
        self._tasks = TaskSet(log)
        #: Joins whose entry is on its way to the broker, by (channel, client): a
        #: leave meanwhile waits for it, or its removal could land first (another
        #: pooled connection) and leave the entry behind until it expires.
        self._joining: dict[tuple[str, str], asyncio.Future[None]] = {}
        #: The lists read lately, by channel (`who`).
        self._reads: dict[str, _Read] = {}

    async def join(self, ch: str, user: str, client: str, info: bytes | None = None) -> None:
        extra = msgspec.json.decode(info, type=dict[str, Any]) if info is not None else None
        entry = PresenceEntry(user, client, extra)
        encoded = msgspec.json.encode(entry)
        self._local.setdefault(ch, {})[client] = encoded
        key = (ch, client)
        added = self._joining[key] = asyncio.get_running_loop().create_future()
        try:
            await self._broker.presence_add(ch, {client: encoded}, self.ttl)
        finally:
            if self._joining.get(key) is added:
                del self._joining[key]
            added.set_result(None)
        if self._local.get(ch, {}).get(client) is encoded:  # not gone meanwhile
            self._heard(ch, client, entry)
            await self._announce(ch, "join", entry)

    def leave(self, ch: str, client: str) -> None:
        room = self._local.get(ch)
        info = room.pop(client, None) if room is not None else None
        if room is None or info is None:
            return
        self._heard(ch, client, None)
        if not room:
            del self._local[ch]
        self._spawn(self._gone(ch, _entry.decode(info)))

    async def _gone(self, ch: str, entry: PresenceEntry) -> None:
        joining = self._joining.get((ch, entry.client))
        if joining is not None:
            await joining  # its entry first, then its removal
        await self._broker.presence_remove(ch, [entry.client])
        await self._announce(ch, "leave", entry)

    async def _announce(self, ch: str, op: Literal["join", "leave"], entry: PresenceEntry) -> None:
        if not self.pushes:
            return
        try:
            change = PresenceChange(op, entry.user, entry.client, entry.info)
            await self._broker.publish(ch, PRESENCE_MARK + msgspec.json.encode(change))
        except Exception as exc:
            log.warning("presence %s on %s not announced: %s", op, ch, exc)

    def heard(self, change: PresenceChange, ch: str) -> None:
        """A join or leave pushed on ``ch`` (from any process): the list kept follows it."""
        entry = PresenceEntry(change.user, change.client, change.info)
        self._heard(ch, change.client, entry if change.op == "join" else None)

    def _heard(self, ch: str, client: str, entry: PresenceEntry | None) -> None:
        read = self._reads.get(ch)
        if read is not None:
            read.apply(client, entry)

    async def who(self, ch: str) -> list[PresenceEntry]:
        """Every entry of ``ch``: read at most once every `READ_EVERY` seconds here."""
        now = time.monotonic()
        read = self._reads.get(ch)
        if read is None or now - read.at >= READ_EVERY:
            read = await self._read(ch, now)
        elif read.entries is None:
            await asyncio.shield(read.done)
        if read.entries is None:
            raise BrokerUnavailable(f"presence of {ch} not read")
        return list(read.entries.values())

    async def _read(self, ch: str, now: float) -> _Read:
        read = _Read(now, asyncio.get_running_loop().create_future())
        self._reads.pop(ch, None)  # to the end: the oldest reads are first
        self._reads[ch] = read
        if len(self._reads) > KEPT_LISTS:
            del self._reads[next(iter(self._reads))]
        try:
            found = await self._broker.presence(ch)
            entries = {client: _entry.decode(info) for client, info in found.items()}
            read.entries = entries
            for client, entry in read.heard:
                read.apply(client, entry)
            read.heard.clear()
        finally:
            if read.entries is None and self._reads.get(ch) is read:
                del self._reads[ch]  # failed or cancelled: the next ask reads again
            read.done.set_result(None)
        return read

    async def stats(self, ch: str) -> tuple[int, int]:
        """How many clients and distinct users ``ch`` has: counts the broker keeps."""
        return await self._broker.presence_stats(ch)

    def tick(self, now: float) -> None:
        """Refresh this process's entries when a third of their TTL has passed."""
        if self._reads:
            self._reads = {
                ch: r
                for ch, r in self._reads.items()
                if r.entries is None or now - r.at < READ_EVERY
            }
        if self._local and now - self._refreshed >= self.ttl / 3:
            self._refreshed = now
            self._spawn(self._refresh())

    async def _refresh(self) -> None:
        for ch, entries in list(self._local.items()):
            sent = dict(entries)
            try:
                await self._broker.presence_add(ch, sent, self.ttl)
            except Exception as exc:  # the next tick tries again
                log.warning("presence refresh of %s failed: %s", ch, exc)
            # A client that left meanwhile had its entry removed at once (another pooled
            # connection), maybe before this add landed: remove it again, after. (The add
            # may have landed even when it failed: a timeout.)
            here = self._local.get(ch, {})
            gone = [client for client in sent if client not in here]
            try:
                if gone:
                    await self._broker.presence_remove(ch, gone)
            except Exception as exc:  # its entries expire with PRESENCE_TTL
                log.warning("presence refresh of %s could not remove %d: %s", ch, len(gone), exc)

    async def close(self, wait: float = 1.0) -> None:
        """Let removals and announcements under way finish (``wait`` s at most)."""
        await self._tasks.wait(wait)
        await self._tasks.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)
