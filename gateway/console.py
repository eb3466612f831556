"""The admin console's live figures, over the gateway's own socket protocol.

The console (``/admin``, gateway/static/admin.js) is an admin's socket
subscribed to ``__admin`` (`proto.ADMIN_CHANNEL`: only admins of this
deployment may subscribe, nobody may publish there). While someone watches,
each gateway publishes its own figures there once a second (`Figures`), and
the page draws every gateway's and the total.

Who watches is told across gateways by the control channel: a gateway with
an admin subscribed to ``__admin`` broadcasts ``console_watched`` every
`ANNOUNCE` seconds, and every gateway publishes for `WATCH` seconds after the
last one it heard. So a console costs each gateway one publication a second,
and none when nobody watches: the per-channel delivery counts behind the
busiest channels are switched on only while watched (`Node.count_deliveries`).
"""

from __future__ import annotations

import heapq
import logging
import time

import msgspec

from core.infra import control
from core.infra.broker import BrokerUnavailable
from core.infra.control import NodeInfo
from core.infra.tasks import TaskSet
from core.infra.throttled import ThrottledLog
from gateway.node import Node
from gateway.nodestats import NodeStats
from gateway.serverapi.agent import Health
from proto import ADMIN_CHANNEL, RESERVED_PREFIX

__all__ = ["ANNOUNCE", "BUSIEST", "HEALTH_EVERY", "WATCH", "Busy", "Console", "Figures"]

log = logging.getLogger("gateway.console")
_failed = ThrottledLog(log, 30.0)

#: Seconds between two ``console_watched`` messages from a gateway with watchers.
ANNOUNCE = 5.0
#: Seconds a gateway publishes after the last ``console_watched`` it heard.
WATCH = 12.0
#: Channels listed as the busiest, per gateway.
BUSIEST = 10
#: Seconds between two health checks (Redis PING, PostgreSQL ``select 1``) while watched.
HEALTH_EVERY = 5.0


class Busy(msgspec.Struct):
    ch: str
    #: deliveries to this gateway's subscribers over the last second
    deliveries: int


class Figures(NodeInfo, kw_only=True):
    """One gateway's figures over the last second, as published on ``__admin``:
    its `NodeInfo` (what the server API's ``info`` answers), and more."""

    #: Unix seconds
    t: float
    #: delivery lag (first frame queued to last written) over the last second
    lag_ms: float
    lag_p99_ms: float
    busiest: list[Busy]


class Console:
    def __init__(self, node: Node, stats: NodeStats, health: Health) -> None:
        self._node = node
        self._stats = stats
        self._health_check = health
        #: Redis, PostgreSQL (None: no database here), hooks: checked every `HEALTH_EVERY` s
        self._health: tuple[bool, bool | None, dict[str, bool]] = (node.broker.connected, None, {})
        self._checked = float("-inf")
        self._announced = float("-inf")
        self.watched_until = float("-inf")
        self._publishing = TaskSet(log)
        self._other = TaskSet(log)

    def watched(self, seconds: float) -> None:
        """A ``console_watched`` message came: publish for ``seconds`` more."""
        self.watched_until = max(self.watched_until, time.monotonic() + seconds)
        self._node.count_deliveries(True)

    def tick(self, now: float) -> None:
        """Called every second (``now``: monotonic)."""
        if self._node.hub.has_subscribers(ADMIN_CHANNEL) and now - self._announced >= ANNOUNCE:
            self._announced = now
            self._other.spawn(self._announce())
        if now >= self.watched_until:
            self._node.count_deliveries(False)
            return
        if now - self._checked >= HEALTH_EVERY and not self._other:
            self._checked = now
            self._other.spawn(self._check())
        if not self._publishing:  # at most one publication a second, none piled up
            self._publishing.spawn(self._publish())

    def figures(self) -> Figures:
        node, stats = self._node, self._stats
        tally = [
            (ch, n) for ch, n in node.take_tally().items() if not ch.startswith(RESERVED_PREFIX)
        ]
        busiest = heapq.nlargest(BUSIEST, tally, key=lambda item: item[1])
        info = stats.info(*self._health)
        return Figures(
            **msgspec.structs.asdict(info),
            t=time.time(),
            lag_ms=stats.lag_ms,
            lag_p99_ms=stats.lag_p99_ms,
            busiest=[Busy(ch, n) for ch, n in busiest],
        )

    async def _publish(self) -> None:
        try:
            await self._node.broker.publish(ADMIN_CHANNEL, msgspec.json.encode(self.figures()))
        except BrokerUnavailable as exc:
            _failed.warning("console figures not published: %s", exc)

    async def _announce(self) -> None:
        try:
            await control.broadcast(self._node.broker, control.ConsoleWatched(WATCH))
        except BrokerUnavailable as exc:
            _failed.warning("console watch not announced: %s", exc)

    async def _check(self) -> None:
        self._health = await self._health_check()

    async def close(self) -> None:
        await self._publishing.cancel()
        await self._other.cancel()
