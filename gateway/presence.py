"""Presence: who is subscribed to a channel, across every gateway process.

On channels matching ``PRESENCE_CHANNELS``, each subscribed connection is an
entry ``{"user": <sub>, "client": <connection id>}`` in the broker (Redis),
living ``PRESENCE_TTL`` seconds. This process refreshes its own entries about
every third of that, and removes them when a connection leaves; the entries
of a process that dies without saying so expire by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from gateway.broker import Broker
from gateway.history import ChannelPatterns

__all__ = ["Presence", "PresenceEntry"]

log = logging.getLogger("gateway.presence")


class PresenceEntry(msgspec.Struct, frozen=True):
    user: str
    client: str


_entry = msgspec.json.Decoder(PresenceEntry)


class Presence(ChannelPatterns):
    def __init__(self, broker: Broker, patterns: tuple[str, ...], ttl: float) -> None:
        super().__init__(patterns)
        self._broker = broker
        self.ttl = ttl
        self._local: dict[str, dict[str, bytes]] = {}
        self._refreshed = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()

    async def join(self, ch: str, user: str, client: str) -> None:
        info = msgspec.json.encode(PresenceEntry(user, client))
        self._local.setdefault(ch, {})[client] = info
        await self._broker.presence_add(ch, {client: info}, self.ttl)

    def leave(self, ch: str, client: str) -> None:
        room = self._local.get(ch)
        if room is None or room.pop(client, None) is None:
            return
        if not room:
            del self._local[ch]
        self._spawn(self._broker.presence_remove(ch, [client]))

    async def who(self, ch: str) -> list[PresenceEntry]:
        return [_entry.decode(info) for info in (await self._broker.presence(ch)).values()]

    def tick(self, now: float) -> None:
        """Refresh this process's entries when a third of their TTL has passed."""
        if self._local and now - self._refreshed >= self.ttl / 3:
            self._refreshed = now
            self._spawn(self._refresh())

    async def _refresh(self) -> None:
        for ch, entries in list(self._local.items()):
            try:
                await self._broker.presence_add(ch, dict(entries), self.ttl)
            except Exception as exc:  # the next tick tries again
                log.warning("presence refresh of %s failed: %s", ch, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
