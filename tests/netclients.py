"""Clients on the hosts of a tests/netns.py network: numbered publications and verdicts.

A `Publisher` sends ``{"n": 1}``, ``{"n": 2}``… (with the time sent) through one gateway; a
`Reader` keeps every event of its subscriptions (the Python client's, gateway/client); its
`Verdict` says whether each publication it was owed came exactly once, or was missing where
a `Gap` told it so, or was lost silently. `Load` runs them on hosts' loops. No pytest here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect

from core.infra.backoff import Backoff
from gateway.client import Client, Gap, Publication, Subscription
from tests.nethosts import TOKEN, wait_for
from tests.netns import Host
from tests.servers import UNIT

FAST = Backoff(base=0.1, cap=1.0)


@dataclass
class Reader:
    """A subscriber: every event it got, with the time it got it."""

    name: str
    events: list[tuple[float, Publication | Gap]] = field(default_factory=list)
    client: Client | None = None
    subs: list[Subscription] = field(default_factory=list)

    def recovered(self) -> bool:
        """Whether its last resubscription of every channel recovered all that it missed."""
        return all(s.recovered for s in self.subs)

    def numbers(self, channel: str | None = None) -> list[int]:
        return [
            e.data["n"]
            for _, e in self.events
            if isinstance(e, Publication) and (channel is None or e.channel == channel)
        ]

    def gaps(self, channel: str | None = None) -> int:
        return sum(
            isinstance(e, Gap) and (channel is None or e.channel == channel) for _, e in self.events
        )

    def trace(self, channel: str) -> str:
        """Its events on ``channel``, briefly (``n@offset/epoch``, ``GAP(reason, position)``)."""
        return " ".join(
            f"{e.data['n']}@{e.offset}/{e.epoch}"
            if isinstance(e, Publication)
            else f"GAP({e.reason}, {e.position})"
            for _, e in self.events
            if e.channel == channel
        )

    def verdict(self, owed: set[int], channel: str | None = None) -> Verdict:
        """Each of ``owed`` exactly once, or missing where a Gap was reported around it."""
        seen = self.numbers(channel)
        stream = [
            e for _, e in self.events if channel is None or getattr(e, "channel", None) == channel
        ]
        missing = sorted(owed - set(seen))
        told = []
        for n in missing:
            before = max(
                (i for i, e in enumerate(stream) if isinstance(e, Publication) and e.data["n"] < n),
                default=-1,
            )
            after = min(
                (i for i, e in enumerate(stream) if isinstance(e, Publication) and e.data["n"] > n),
                default=len(stream),
            )
            if any(isinstance(e, Gap) for e in stream[before + 1 : after]):
                told.append(n)
        return Verdict(
            duplicates=len(seen) - len(set(seen)),
            missing=len(missing),
            reported=len(told),
            silently_lost=sorted(set(missing) - set(told)),
        )


@dataclass
class Verdict:
    duplicates: int
    missing: int
    reported: int
    silently_lost: list[int]


async def read(reader: Reader, url: str, channels: tuple[str, ...], subscribed: Any) -> None:
    """Run on a host's loop: subscribe and keep every event until cancelled."""

    async def drain(sub: Any) -> None:
        async for event in sub:
            if isinstance(event, Publication | Gap):
                reader.events.append((time.monotonic(), event))

    async with Client(
        url, token=TOKEN, backoff=FAST, transports=("websocket",), request_timeout=5.0,
        ping_interval=5.0, ping_timeout=10.0,
    ) as client:  # fmt: skip
        reader.client = client
        subs = reader.subs = [await client.subscribe(ch) for ch in channels]
        subscribed()
        await asyncio.gather(*(drain(s) for s in subs))


@dataclass
class Publisher:
    """Numbered publications through one gateway, round-robin over ``channels``."""

    url: str
    channels: tuple[str, ...]
    interval: float = 0.02
    acked: dict[str, set[int]] = field(default_factory=dict)
    failed: int = 0
    errors: set[str] = field(default_factory=set)
    running: bool = True
    sent: int = 0

    def all_acked(self) -> set[int]:
        return set().union(*self.acked.values()) if self.acked else set()

    async def run(self) -> None:
        async with Client(
            self.url, token=TOKEN, backoff=FAST, transports=("websocket",), request_timeout=2.0
        ) as client:
            while self.running:
                self.sent += 1
                n = self.sent
                ch = self.channels[n % len(self.channels)]
                try:
                    await client.publish(ch, {"n": n, "t": time.monotonic()})
                    self.acked.setdefault(ch, set()).add(n)
                except Exception as exc:
                    self.failed += 1
                    self.errors.add(str(exc)[:100])
                await asyncio.sleep(self.interval)


class Load:
    """Readers and a publisher on hosts' loops, started and stopped together."""

    def __init__(self) -> None:
        self.readers: list[Reader] = []
        self._futures: list[Any] = []
        self.publisher: Publisher | None = None

    async def readers_on(
        self, host: Host, url: str, count: int, channels: tuple[str, ...], name: str
    ) -> list[Reader]:
        started = []
        main = asyncio.get_running_loop()
        for i in range(count):
            reader = Reader(f"{name}{i}")
            ok = main.create_future()

            def subscribed(ok: asyncio.Future[None] = ok) -> None:
                main.call_soon_threadsafe(lambda: ok.done() or ok.set_result(None))

            self._futures.append(host.submit(read(reader, url, channels, subscribed)))
            await asyncio.wait_for(ok, 10 * UNIT)
            started.append(reader)
        self.readers.extend(started)
        return started

    def publish(self, host: Host, url: str, channels: tuple[str, ...], interval: float) -> None:
        self.publisher = Publisher(url, channels, interval)
        self._futures.append(host.submit(self.publisher.run()))

    async def stop_publishing(self) -> set[int]:
        assert self.publisher is not None
        self.publisher.running = False
        await asyncio.sleep(0.1)
        return self.publisher.all_acked()

    async def caught_up(self, readers: list[Reader], timeout: float = 15) -> None:
        """Until each reader has, on each channel, its last acknowledged publication or a gap.

        Per channel: after a shard of a Redis Cluster fails over, the other
        shards' channels deliver again before its own do.
        """
        assert self.publisher is not None
        last = {ch: max(acked) for ch, acked in self.publisher.acked.items() if acked}

        def done() -> bool:
            return all(n in r.numbers(ch) or r.gaps(ch) for r in readers for ch, n in last.items())

        await wait_for(done, timeout)

    def close(self) -> None:
        for future in self._futures:
            future.cancel()


@contextlib.asynccontextmanager
async def load() -> AsyncIterator[Load]:
    running = Load()
    try:
        yield running
    finally:
        running.close()
        await asyncio.sleep(0.2)


def published_between(run: Load, start: float, end: float) -> int:
    """How many publications were sent between the two times (by their stamps, as read)."""
    stamps = {
        e.data["n"]: e.data["t"]
        for r in run.readers
        for _, e in r.events
        if isinstance(e, Publication)
    }
    return sum(start <= t < end for t in stamps.values())


async def watch_raw(url: str, channel: str, pushes: list[tuple[float, dict[str, Any]]]) -> None:
    """A bare socket (no client library): the frames as the gateway sends them, timed."""
    async with connect(f"{url}?token={TOKEN}", subprotocols=["gw.v1.json"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "op": "sub", "ch": channel}))
        async for raw in ws:
            pushes.append((time.monotonic(), json.loads(raw)))


async def hold_socket(url: str, channel: str) -> None:
    """A socket that answers pings and sends nothing else, subscribed to ``channel``."""
    async with connect(
        f"{url}?token={TOKEN}", subprotocols=["gw.v1.json"], ping_interval=None,  # type: ignore[list-item]
        close_timeout=0.1,
    ) as ws:  # fmt: skip
        await ws.send(json.dumps({"id": 1, "op": "sub", "ch": channel}))
        try:
            await asyncio.Event().wait()
        finally:
            ws.transport.abort()


async def present_at_least(count: Callable[[], Any], n: int, exactly: bool = False) -> bool:
    have = await count()
    return bool(have == n if exactly else have >= n)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]
