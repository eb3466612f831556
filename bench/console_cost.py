"""What the admin console costs a gateway, measured without the noise of a load test.

While someone watches, each gateway once a second samples its counters,
builds its figures (connections by transport: one pass over the sockets;
the busiest channels) and encodes them; and every publication with local
subscribers is counted per channel. This times both in-process, with
20,000 sockets on 1,000 channels::

    .venv/bin/python -m bench.console_cost

The figures are in docs/performance.md ("With the admin console open").
"""

from __future__ import annotations

import asyncio
import statistics
import time

import msgspec

from core.infra.broker import MemoryBroker
from core.infra.metrics import Metrics
from gateway.console import Console
from gateway.hub import Hub, Prepared
from gateway.node import Node
from gateway.nodestats import NodeStats
from proto import CloseCode

SOCKETS = 20_000
CHANNELS = 1_000


class Socket:
    """A hub member that takes publications and does nothing with them."""

    __slots__ = ("subject",)
    transport_kind = "websocket"

    def __init__(self, n: int) -> None:
        self.subject = f"u{n}"

    def deliver(self, prepared: Prepared) -> None:
        return None

    def close(self, code: CloseCode) -> None:
        return None


async def _health() -> tuple[bool, bool | None, dict[str, bool]]:
    return True, None, {}


async def main() -> None:
    metrics = Metrics()
    hub = Hub(metrics)
    node = Node(hub, MemoryBroker(), metrics)
    await node.start()
    for n in range(SOCKETS):
        member = Socket(n)
        hub.connect(member)  # type: ignore[arg-type]
        hub.add(f"room:{n % CHANNELS}", member)  # type: ignore[arg-type]
    stats = NodeStats("bench", "0", hub, metrics)
    console = Console(node, stats, _health)
    node.count_deliveries(True)
    seconds = []
    for _ in range(50):
        for ch in range(CHANNELS):  # a second's worth of publications to tally
            node._broadcast(f"room:{ch}", b"1", None)
        started = time.perf_counter()
        stats.tick(time.monotonic())
        msgspec.json.encode(console.figures())
        seconds.append(time.perf_counter() - started)
    print(
        f"once a second, watched ({SOCKETS:,} sockets, {CHANNELS:,} channels): "
        f"median {1000 * statistics.median(seconds):.2f} ms, max {1000 * max(seconds):.2f} ms"
    )
    for watched in (False, True):
        node.count_deliveries(watched)
        started = time.perf_counter()
        for _ in range(20):
            for ch in range(CHANNELS):
                node._broadcast(f"room:{ch}", b"1", None)
        per = (time.perf_counter() - started) / (20 * CHANNELS)
        what = "watched" if watched else "nobody watching"
        print(f"one publication to {SOCKETS // CHANNELS} sockets, {what}: {per * 1e6:.2f} us")
    await node.close()


if __name__ == "__main__":
    asyncio.run(main())
