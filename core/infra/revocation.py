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
broadcast (its broker link was down) catches up from the database: the core
reloads recent revocations every ``sync_every`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from core.infra import control
from core.infra.broker.base import Publisher

__all__ = ["Revocations"]

log = logging.getLogger("core.infra.revocation")


class Revocations:
    def __init__(
        self,
        ttl: float,
        publisher: Publisher | None = None,
        on_revoked: Callable[[str], object] | None = None,
    ) -> None:
        self.ttl = ttl
        self.publisher = publisher
        self.on_revoked = on_revoked
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
        """Apply here, then tell every other process through the broker."""
        if not sids:
            return
        self.apply(sids)
        if self.publisher is None:
            return
        try:
            await control.broadcast(self.publisher, control.SessionsRevoked(sids))
        except Exception as exc:
            # Other processes catch up from the database within a sync period.
            log.warning("revocation of %d session(s) not broadcast: %s", len(sids), exc)

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
