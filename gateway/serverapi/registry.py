"""Which gateways are alive: a registry of node ids with heartbeats, in the broker.

Every gateway adds its id to the expiring set ``nodes`` (a Redis sorted set
``<prefix>z:nodes`` scored by expiry) every `BEAT` seconds, to live `TTL`
seconds; one that stops (killed, partitioned) drops out within `TTL`, one
that shuts down removes itself. The server API waits for exactly the nodes
listed here (tests/test_serverapi_processes.py).

Expiry uses each host's clock: keep hosts within a few seconds of each other
(NTP does far better), or a node may look dead to the others.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from core.infra.broker import Broker, BrokerUnavailable
from core.infra.tasks import TaskSet
from core.infra.throttled import ThrottledLog

__all__ = ["BEAT", "KEY", "TTL", "NodeRegistry", "new_node_id"]

log = logging.getLogger("gateway.serverapi")
_failed = ThrottledLog(log, 30.0)

#: The expiring set of live gateways.
KEY = "nodes"
#: Seconds between two heartbeats, and how long one keeps a node listed.
BEAT = 2.0
TTL = 6.0


def new_node_id() -> str:
    """``<host>:<pid>:<4 hex>``: tells an operator where the process is, and a restart apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class NodeRegistry:
    def __init__(self, broker: Broker, node_id: str) -> None:
        self._broker = broker
        self.node_id = node_id
        self._beaten = float("-inf")
        self._tasks = TaskSet(log)

    def tick(self, now: float) -> None:
        """Called every second (``now``: monotonic): a heartbeat every `BEAT` seconds."""
        if now - self._beaten >= BEAT and not self._tasks:
            self._beaten = now
            self._tasks.spawn(self.beat())

    async def beat(self) -> None:
        try:
            await self._broker.expiring_add(KEY, self.node_id, time.time() + TTL)
        except BrokerUnavailable as exc:  # the next beat tries again
            _failed.warning("node heartbeat failed: %s", exc)

    async def live(self) -> set[str]:
        """The ids of the gateways alive now (this one among them)."""
        return set(await self._broker.expiring_members(KEY, time.time())) | {self.node_id}

    async def leave(self) -> None:
        """Say this gateway is gone (at shutdown), rather than let its entry expire."""
        await self._tasks.cancel()
        try:
            await self._broker.expiring_remove(KEY, self.node_id)
        except BrokerUnavailable as exc:
            log.info("node %s not removed from the registry (it expires): %s", self.node_id, exc)
