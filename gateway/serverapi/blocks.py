"""Users whose new connections are refused for a while: the block list of ``disconnect``.

A ``disconnect`` with ``block_seconds`` writes the user to the broker's
expiring set ``blocked`` (until when) and names the same time in the control
message every gateway acts on, so each gateway refuses the user's new
sockets, event streams and long-poll sessions at admission at once (403
``blocked``). Each gateway also reads the set at start and every `SYNC`
seconds, so one that started later, or missed the message, learns it too.

Admission looks the user up in a local dict: nothing is asked of Redis per
connection, and an empty list costs one truth test.
"""

from __future__ import annotations

import logging
import time

from core.infra.broker import Broker, BrokerUnavailable
from core.infra.tasks import TaskSet

__all__ = ["KEY", "SYNC", "BlockList"]

log = logging.getLogger("gateway.serverapi")

#: The expiring set of blocked users (user -> until).
KEY = "blocked"
#: Seconds between two reads of the set.
SYNC = 30.0


class BlockList:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._until: dict[str, float] = {}
        self._synced = float("-inf")
        self._tasks = TaskSet(log)

    def refuses(self, user: str, now: float) -> float | None:
        """Until when ``user`` is blocked (Unix seconds), or None."""
        if not self._until:
            return None
        until = self._until.get(user)
        if until is None:
            return None
        if until <= now:
            del self._until[user]
            return None
        return until

    def note(self, user: str, until: float) -> None:
        """Refuse ``user`` here until ``until`` (from a control message)."""
        if until > self._until.get(user, 0.0):
            self._until[user] = until

    async def block(self, user: str, until: float) -> None:
        """Refuse ``user`` everywhere until ``until``: in the shared set, and here."""
        await self._broker.expiring_add(KEY, user, until)
        self.note(user, until)

    async def unblock(self, user: str) -> None:
        """Take ``user`` again everywhere: out of the shared set, and here."""
        await self._broker.expiring_remove(KEY, user)
        self.forget(user)

    def forget(self, user: str) -> None:
        """Take ``user`` again here (another gateway unblocked it)."""
        self._until.pop(user, None)

    def tick(self, now: float) -> None:
        """Called every second (``now``: monotonic): a sync every `SYNC` seconds."""
        if now - self._synced >= SYNC and not self._tasks:
            self._synced = now
            self._tasks.spawn(self.sync())

    async def sync(self) -> None:
        try:
            self._until = await self._broker.expiring_members(KEY, time.time())
        except BrokerUnavailable as exc:  # the next sync tries again
            log.warning("block list not read: %s", exc)

    async def close(self) -> None:
        await self._tasks.cancel()
