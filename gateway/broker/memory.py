"""In-process broker: one gateway process, no Redis."""

from __future__ import annotations

import asyncio

from gateway.broker.base import (
    CONTROL,
    Broker,
    BrokerUnavailable,
    PublicationHandler,
    StateListener,
)

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._handler: PublicationHandler | None = None
        self._channels: set[str] = {CONTROL}

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
        if self._handler is None:
            raise BrokerUnavailable("broker is not running")
        if ch in self._channels:
            # Deliver on the next loop turn, as a remote broker would: the
            # publisher's reply never waits for the fan-out.
            asyncio.get_running_loop().call_soon(self._deliver, ch, data)

    def _deliver(self, ch: str, data: bytes) -> None:
        if self._handler is not None and ch in self._channels:
            self._handler(ch, data)

    @property
    def connected(self) -> bool:
        return self._handler is not None

    @property
    def description(self) -> str:
        return "in-memory broker (single process)"
