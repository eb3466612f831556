"""Revoked login sessions, known to every process within seconds.

A session is revoked in PostgreSQL by whichever process handles the logout,
the session deletion or the detected refresh-token reuse. That process
applies it at once, then broadcasts it on the broker's control channel so
every other gateway process (and standalone core) applies it too. Applying
means: the session id joins this list, which `Verifier` consults after
every token check, so REST calls and handshakes with the session's access
tokens are refused; and open sockets of the session are closed with 4502.

An id stays listed for as long as an access token of the session can still
be valid (``ACCESS_TOKEN_TTL`` plus leeway). A process that missed a
broadcast (its broker link was down, or it started later) catches up: the
core reloads recent revocations from the database every
``REVOCATION_SYNC`` seconds. A gateway with ``CORE_URL`` has no database:
the processes that revoke keep each revoked id in the broker's store too
(an expiring set, `REVOKED_KEY`, each id until its tokens are dead), the
core's sync puts back what the store lost (Redis restarted), and such a
gateway reads the store when it starts and every 30 s (gateway/keymirror.py).

A process whose loop stops between requests (the core on Lambda, frozen
between invocations) reads the broadcast only after it has verified the
request that woke it. Before answering, it reads from the store only the
revocations added since its last read (`catch_up_recent`): each id is
kept until the time it was stored plus ``ttl``, so the set's scores grow
with the time of revocation, and a range read from the last read's time
plus ``ttl`` (less `RECENT_OVERLAP`) returns the new ones alone. The
core's `restore` stores what the store lost with a fresh score, so a
range read sees it again; a revocation stored with an older score still
(a clock more than `RECENT_OVERLAP` behind, a process with a shorter
``ACCESS_TOKEN_TTL``) waits for the next full sync from the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from core.infra import control
from core.infra.broker.base import Publisher

__all__ = ["RECENT_OVERLAP", "REVOKED_KEY", "RevocationStore", "Revocations"]

log = logging.getLogger("core.infra.revocation")

#: The broker's expiring set of revoked session ids (each until its tokens are dead).
REVOKED_KEY = "revoked_sessions"

#: Seconds by which a revocation stored after a read may be stamped before that read's
#: time: the revoking process takes the time, broadcasts, then stores; clocks differ.
RECENT_OVERLAP = 10.0


class RevocationStore(Protocol):
    """Where revocations are kept for processes without the database (the broker)."""

    async def expiring_add_many(self, key: str, members: Mapping[str, float]) -> None: ...

    async def expiring_members(self, key: str, now: float) -> dict[str, float]: ...

    async def expiring_members_from(self, key: str, until: float) -> dict[str, float]: ...


class Revocations:
    def __init__(
        self,
        ttl: float,
        publisher: Publisher | None = None,
        on_revoked: Callable[[str], object] | None = None,
        store: RevocationStore | None = None,
    ) -> None:
        self.ttl = ttl
        self.publisher = publisher
        self.on_revoked = on_revoked
        self.store = store
        self._until: dict[str, float] = {}

    def __contains__(self, sid: object) -> bool:
        return sid in self._until

    def __len__(self) -> int:
        return len(self._until)

    def apply(self, sids: Iterable[str], now: float | None = None) -> int:
        """Record revocations and close their sockets here; returns how many were new."""
        until = (time.time() if now is None else now) + self.ttl
        new = 0
        for sid in sids:
            if sid not in self._until:
                new += 1
                self._until[sid] = until
                if self.on_revoked is not None:
                    self.on_revoked(sid)
        return new

    async def revoke(self, sids: list[str]) -> None:
        """Apply here, tell every other process through the broker, then keep in the store."""
        if not sids:
            return
        self.apply(sids)
        if self.publisher is not None:  # first: open sockets elsewhere are what matters most
            try:
                await control.broadcast(self.publisher, control.SessionsRevoked(sids))
            except Exception as exc:
                # Other processes catch up from the database (or the store) within a sync.
                log.warning("revocation of %d session(s) not broadcast: %s", len(sids), exc)
        await self.remember(sids)

    async def remember(self, sids: Iterable[str]) -> None:
        """Keep ``sids`` in the store, for as long as their tokens can be valid."""
        if self.store is None:
            return
        until = time.time() + self.ttl
        try:
            await self.store.expiring_add_many(REVOKED_KEY, dict.fromkeys(sids, until))
        except Exception as exc:  # the core's next sync puts them back
            log.warning("revoked sessions not stored for gateways without a database: %s", exc)

    async def restore(self, sids: Collection[str]) -> int:
        """Put back in the store those of ``sids`` (the database's recent revocations) it
        lacks (Redis restarted, a write failed); returns how many."""
        held = await self._stored() if sids else None
        if held is None:
            return 0
        missing = [sid for sid in sids if sid not in held]
        await self.remember(missing)
        return len(missing)

    async def catch_up(self) -> int:
        """Apply what the store holds (a process without the database); returns how many
        were new. The store unreachable: the list stays as it is."""
        self.purge()
        held = await self._stored()
        return 0 if held is None else self._take(held)

    async def catch_up_recent(self, since: float) -> int | None:
        """Apply the revocations stored since ``since`` (Unix seconds, this host's clock):
        one range read of those alone. Returns how many were new; None when the store was
        not read (none, or out of reach), so that the next read starts from ``since`` again.
        """
        if self.store is None:
            return None
        try:
            held = await self.store.expiring_members_from(
                REVOKED_KEY, since + self.ttl - RECENT_OVERLAP
            )
        except Exception as exc:
            log.warning("recent revoked sessions not read from the store: %s", exc)
            return None
        return self._take(held)

    def _take(self, held: Mapping[str, float]) -> int:
        fresh = {sid for sid in held if sid not in self._until}
        new = self.apply(fresh)
        # Each kept as long as the store keeps it: not dropped here while the store still
        # holds it (it would be applied again at the next catch-up), nor kept longer.
        for sid, until in held.items():
            self._until[sid] = until if sid in fresh else max(self._until[sid], until)
        return new

    async def _stored(self) -> dict[str, float] | None:
        """The revoked sessions the store holds; None without one, or out of reach."""
        if self.store is None:
            return None
        try:
            return await self.store.expiring_members(REVOKED_KEY, time.time())
        except Exception as exc:
            log.warning("revoked sessions not read from the store: %s", exc)
            return None

    def on_control(self, message: control.ControlMessage) -> None:
        """Handle a control-channel message (others are not ours: ignored)."""
        if isinstance(message, control.SessionsRevoked):
            self.apply(message.sids)

    def purge(self, now: float | None = None) -> int:
        """Forget revocations whose access tokens have all expired."""
        now = time.time() if now is None else now
        gone = [sid for sid, until in self._until.items() if until <= now]
        for sid in gone:
            del self._until[sid]
        return len(gone)
