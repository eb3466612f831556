"""API keys and revoked sessions on a gateway without a database, kept current.

With ``CORE_URL`` the gateway cannot read the keys from PostgreSQL; the core
stores them, as SHA-256 digests with their grants, through the broker
(core/infra/keyring.py). This reads that snapshot at start, on every
``api_keys_changed`` control message and every `SYNC` seconds (a missed
broadcast), and swaps the verifier's mapping; a key no longer listed has its
sockets closed (4510). A snapshot that is missing (Redis restarted and the
core has not written it again yet) or unreadable changes nothing.

Revoked login sessions reach such a gateway on the control channel; at the
same times it also applies those the core keeps in the broker's store
(core/infra/revocation.py), which a gateway that started after the
revocation, or whose broker link was down when it was broadcast, would
otherwise never learn of: the session's tokens would open sockets there
until they expired.
"""

from __future__ import annotations

import asyncio
import logging

from core.infra import control
from core.infra.broker.base import Broker, BrokerUnavailable
from core.infra.keyring import SNAPSHOT_KEY, KeyRing, decode_snapshot
from core.infra.revocation import Revocations
from core.infra.tasks import TaskSet

__all__ = ["KeyMirror"]

log = logging.getLogger("gateway.keymirror")


class KeyMirror:
    #: Seconds between reloads that catch up on a missed broadcast.
    SYNC = 30.0

    def __init__(
        self, broker: Broker, ring: KeyRing, revocations: Revocations | None = None
    ) -> None:
        self._broker = broker
        self._ring = ring
        self._revocations = revocations
        self._tasks = TaskSet(log)

    async def reload(self) -> bool:
        """Apply the stored revocations and key snapshot; False when there is no snapshot."""
        if self._revocations is not None:
            applied = await self._revocations.catch_up()
            if applied:
                log.info("applied %d session revocation(s) from the store", applied)
        try:
            data = await self._broker.get_value(SNAPSHOT_KEY)
        except BrokerUnavailable as exc:
            log.warning("API keys not reloaded (the last ones stay): %s", exc)
            return False
        entries = None if data is None else decode_snapshot(data)
        if entries is None:
            return False
        self._ring.replace(entries)
        return True

    def start(self) -> None:
        self._tasks.spawn(self._every(), "api-key-mirror")

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.SYNC)
            await self.reload()

    def on_control(self, message: control.ControlMessage) -> None:
        if isinstance(message, control.ApiKeysChanged):
            self._tasks.spawn(self.reload(), "api-key-reload")

    async def close(self) -> None:
        await self._tasks.cancel()
