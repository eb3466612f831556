"""In-process broker: one gateway process, no Redis."""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Mapping

import msgspec

from core.infra.broker.base import (
    CONTROL,
    Broker,
    BrokerUnavailable,
    Entry,
    EventBatch,
    Position,
    PublicationHandler,
    StateListener,
    stamped,
)

__all__ = ["MemoryBroker"]

log = logging.getLogger("core.infra.broker")


class _History:
    __slots__ = ("calls", "entries", "epoch", "expires", "offset")

    #: Call ids kept with their offsets, as the Redis script keeps them.
    KEEP = 8

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.offset = 0
        self.entries: collections.deque[Entry] = collections.deque(maxlen=size)
        self.expires = 0.0
        self.calls: collections.deque[tuple[str, int]] = collections.deque(maxlen=self.KEEP)


class _Stream:
    """The event stream: entries with ids ``<ms>-<seq>`` as Redis gives them."""

    __slots__ = ("entries", "last")

    def __init__(self) -> None:
        self.entries: collections.deque[tuple[tuple[int, int], bytes]] = collections.deque()
        self.last = (0, 0)

    def append(self, events: list[bytes], maxlen: int) -> None:
        for event in events:
            ms = int(time.time() * 1000)
            self.last = (ms, 0) if ms > self.last[0] else (self.last[0], self.last[1] + 1)
            self.entries.append((self.last, event))
        while len(self.entries) > maxlen:
            self.entries.popleft()

    def read(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        ms, _, seq = after.partition("-")
        start = (int(ms), int(seq or 0))
        found = [(f"{i[0]}-{i[1]}", event) for i, event in self.entries if i > start]
        return found[:limit]


class _EntryUser(msgspec.Struct):
    """The ``user`` of a presence entry (whose other fields are not read here)."""

    user: str = ""


_user_of = msgspec.json.Decoder(_EntryUser).decode


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._handler: PublicationHandler | None = None
        self._channels: set[str] = {CONTROL}
        self._histories: dict[str, _History] = {}
        #: Per channel: client -> (entry, until, the entry's user).
        self._presence: dict[str, dict[str, tuple[bytes, float, str]]] = {}
        self._values: dict[str, bytes] = {}
        self._expiring: dict[str, dict[str, float]] = {}
        self._events = _Stream()
        #: Node -> when its mark of life expires (time.time()); its live connections.
        self._nodes: dict[str, float] = {}
        self._clients: dict[str, dict[str, bytes]] = {}

    async def start(
        self, handler: PublicationHandler, on_state: StateListener | None = None
    ) -> None:
        self._handler = handler
        if on_state is not None:
            on_state(True)

    async def close(self) -> None:
        self._handler = None
        self._channels = {CONTROL}

    async def subscribe(self, ch: str) -> None:
        if self._handler is None:
            raise BrokerUnavailable("broker is not running")
        self._channels.add(ch)

    async def unsubscribe(self, ch: str) -> None:
        if ch != CONTROL:
            self._channels.discard(ch)

    async def publish(self, ch: str, data: bytes) -> None:
        self._send(ch, data, None)

    async def publish_history(
        self, ch: str, data: bytes, size: int, ttl: float, call: str | None = None
    ) -> Position:
        now = time.monotonic()
        self._expire(now)
        history = self._live(ch, now)
        if history is None or history.entries.maxlen != size:
            history = _History(size)
        else:
            del self._histories[ch]  # to the end: the dict is in order of last publication
        self._histories[ch] = history
        if call is not None:
            for seen, offset in history.calls:
                if seen == call:  # this very call, made again: it ran
                    return Position(offset, history.epoch)
            history.calls.append((call, history.offset + 1))
        history.offset += 1
        history.entries.append((history.offset, data))
        history.expires = now + ttl
        position = Position(history.offset, history.epoch)
        self._send(ch, data, position)
        return position

    async def history(self, ch: str, after: int, limit: int) -> tuple[list[Entry], Position | None]:
        history = self._live(ch, time.monotonic())
        if history is None:
            return [], None
        entries = [e for e in history.entries if e[0] > after][:limit]
        return entries, Position(history.offset, history.epoch)

    async def presence_add(self, ch: str, entries: dict[str, bytes], ttl: float) -> None:
        until = time.monotonic() + ttl
        room = self._presence.setdefault(ch, {})
        for client, info in entries.items():
            try:
                user = _user_of(info).user
            except msgspec.DecodeError:  # ValidationError too
                user = ""
            room[client] = (info, until, user)

    async def put_value(self, key: str, data: bytes) -> None:
        self._values[key] = data

    async def get_value(self, key: str) -> bytes | None:
        return self._values.get(key)

    async def expiring_add_many(self, key: str, members: Mapping[str, float]) -> None:
        if members:
            self._expiring.setdefault(key, {}).update(members)

    async def expiring_remove(self, key: str, member: str) -> None:
        self._expiring.get(key, {}).pop(member, None)

    async def expiring_members(self, key: str, now: float) -> dict[str, float]:
        members = self._expiring.get(key, {})
        gone = min(now, time.time())  # as Redis: never past this process's own clock
        for member in [m for m, until in members.items() if until <= gone]:
            del members[member]
        return {m: until for m, until in members.items() if until > now}

    async def expiring_members_from(self, key: str, until: float) -> dict[str, float]:
        return {m: u for m, u in self._expiring.get(key, {}).items() if u >= until}

    async def presence_remove(self, ch: str, clients: list[str]) -> None:
        room = self._presence.get(ch, {})
        for client in clients:
            room.pop(client, None)
        if not room:
            self._presence.pop(ch, None)

    async def presence(self, ch: str) -> dict[str, bytes]:
        return {client: info for client, (info, _, _) in self._live_room(ch).items()}

    async def presence_stats(self, ch: str) -> tuple[int, int]:
        room = self._live_room(ch)
        return len(room), len({user for _, _, user in room.values()})

    def _live_room(self, ch: str) -> dict[str, tuple[bytes, float, str]]:
        now = time.monotonic()
        room = self._presence.get(ch, {})
        for client in [c for c, (_, until, _) in room.items() if until <= now]:
            del room[client]
        return room

    async def append_events(self, node: str, batch: EventBatch, ttl: float, maxlen: int) -> bool:
        self._events.append(batch.events, maxlen)
        live = self._clients.setdefault(node, {})
        live.update(batch.opened)
        for client in batch.closed:
            live.pop(client, None)
        absent = node not in self._nodes
        self._nodes[node] = time.time() + ttl
        return absent

    async def lost_nodes(self) -> list[str]:
        now = time.time()
        return [node for node, until in self._nodes.items() if until <= now]

    async def claim_node(self, node: str, maxlen: int, limit: int) -> tuple[list[bytes], bool]:
        now = time.time()
        if self._nodes.get(node, now + 1) > now:
            return [], False
        live = self._clients.get(node, {})
        ms = int(now * 1000)
        events = [stamped(live.pop(client), ms) for client in list(live)[:limit]]
        self._events.append(events, maxlen)
        if live:
            return events, False
        await self.forget_node(node)
        return events, True

    async def forget_node(self, node: str) -> None:
        self._nodes.pop(node, None)
        self._clients.pop(node, None)

    async def read_events(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        return self._events.read(after, limit)

    def _expire(self, now: float) -> None:
        """Forget the histories expired by ``now``, oldest publication first: a channel
        nobody publishes on or reads again is forgotten all the same (with one TTL for
        all, as the gateway's policy has, every expired one; a history kept longer
        holds back only those published before it)."""
        histories = self._histories
        while histories:
            ch = next(iter(histories))
            if histories[ch].expires > now:
                return
            del histories[ch]

    def _live(self, ch: str, now: float) -> _History | None:
        history = self._histories.get(ch)
        if history is not None and history.expires <= now:
            del self._histories[ch]
            return None
        return history

    def _send(self, ch: str, data: bytes, position: Position | None) -> None:
        if self._handler is None:
            raise BrokerUnavailable("broker is not running")
        if ch in self._channels:
            # Deliver on the next loop turn, as a remote broker would: the
            # publisher's reply never waits for the fan-out.
            asyncio.get_running_loop().call_soon(self._deliver, ch, data, position)

    def _deliver(self, ch: str, data: bytes, position: Position | None) -> None:
        if self._handler is not None and ch in self._channels:
            try:
                self._handler(ch, data, position)
            except Exception:
                if self.on_fault is not None:
                    self.on_fault("handler")
                log.exception("publication handler failed on %r", ch)

    @property
    def connected(self) -> bool:
        return self._handler is not None

    @property
    def description(self) -> str:
        return "in-memory broker (single process)"
