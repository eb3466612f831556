"""`Operations`: the parts of one gateway that the server API and the console stand on.

Made in `gateway.app.make_app`: this node's id and figures (`NodeStats`), its
place in the registry of live nodes, the `Fleet` that asks every node, the
`Agent` that answers for this one, the block list checked at admission, and
the admin console's figures (`Console`). The gateway's one-second sweep
calls `tick`.
"""

from __future__ import annotations

import logging

from core.infra import control
from core.infra.broker import BrokerUnavailable
from core.infra.metrics import Metrics
from gateway.console import Console
from gateway.node import Node
from gateway.nodestats import NodeStats
from gateway.serverapi.agent import Agent, Health
from gateway.serverapi.blocks import BlockList
from gateway.serverapi.fleet import Fleet
from gateway.serverapi.registry import NodeRegistry, new_node_id

__all__ = ["Operations"]

log = logging.getLogger("gateway.serverapi")


class Operations:
    def __init__(
        self,
        node: Node,
        metrics: Metrics,
        version: str,
        health: Health,
        node_id: str | None = None,
    ) -> None:
        self.node = node
        self.node_id = node_id or new_node_id()
        self.stats = NodeStats(self.node_id, version, node.hub, metrics)
        self.registry = NodeRegistry(node.broker, self.node_id)
        self.fleet = Fleet(node.broker, self.registry)
        self.blocks = BlockList(node.broker)
        self.agent = Agent(node, self.stats, self.blocks, health)
        node.inbox = self.fleet.inbox
        node.on_reply = self.fleet.on_reply
        self.console = Console(node, self.stats, health)
        self.agent.on_watched = self.console.watched

    def on_control(self, message: control.ControlMessage) -> None:
        self.agent.on_control(message)

    async def start(self) -> None:
        """Join the registry, open the inbox and read the block list (what fails, `tick` retries)."""
        try:
            await self.fleet.listen()
        except BrokerUnavailable as exc:
            log.warning("server API inbox not subscribed yet: %s", exc)
        await self.registry.beat()
        await self.blocks.sync()

    def tick(self, now: float) -> None:
        """Called every second (``now``: monotonic)."""
        self.stats.tick(now)
        self.registry.tick(now)
        self.blocks.tick(now)
        self.console.tick(now)

    async def close(self) -> None:
        await self.console.close()
        await self.agent.close()
        await self.blocks.close()
        await self.registry.leave()
