"""Faults across a real network: gateway hosts, Redis (and a Redis Cluster), PostgreSQL and
clients in network namespaces (tests/netns.py), partitioned, cut, slowed and failed over.

Every scenario numbers its publications and checks, for each client, that each one it was
owed arrived exactly once, or that the client was told it may be missing (a `Gap`, which the
Python client yields for a ``gap`` push it could not repair from history and for
``recovered: false``). Each records its figures (tests/netfault.py; ``python -m
tests.netfault`` prints them) and docs/operations.md quotes them. Marked ``netfault``; skipped,
with the reason in the pytest header, where the machine cannot build namespaces (not root, no
``ip``). docs/testing.md shows how to run one scenario, or build the network, by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from core.infra.backoff import Backoff
from core.infra.mint import mint_token
from core.infra.settings import Settings
from gateway.client import Client, Gap, Publication
from tests.harness import SECRET
from tests.netfault import record
from tests.netns import Host, Network, Process, leftovers, netns_problem
from tests.servers import UNIT, redis_cluster_executable

PROBLEM = netns_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"netfault: {PROBLEM}")

PORT = 8000  # every host has its own ports: the same one everywhere
PING_INTERVAL = 1.0
PONG_TIMEOUT = 2.0
SWEEP = 1.0  # gateway/app.py: liveness is checked once a second
TOKEN = mint_token(Settings(jwt_secret=SECRET), "netfault", ["nf:*"], ttl=None)
FAST = Backoff(base=0.1, cap=1.0)
#: Inherited settings that would point a gateway at the machine's own servers.
FOREIGN = ("REDIS_URL", "REDIS_CLUSTER", "DATABASE_URL", "DATABASE_SCHEMA", "CORE_URL")


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A fresh network; at teardown, even after a failure, nothing of it may be left."""
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()
        left = leftovers(net.prefix)
        assert not left, f"left behind: {left}"


# -- processes ---------------------------------------------------------------------


def start_gateway(host: Host, **env: str) -> Process:
    """``python -m gateway`` on ``host``, port 8000, with the short intervals of these tests."""
    environ = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    environ.update(
        PORT=str(PORT), HOST="0.0.0.0", WORKERS="1", JWT_SECRET=SECRET, PYTHONUNBUFFERED="1",
        DATA_DIR=str(host.network.workdir / f"data-{host.name}"), LOG_FORMAT="json",
        PING_INTERVAL=str(PING_INTERVAL), PONG_TIMEOUT=str(PONG_TIMEOUT),
        REDIS_HEALTH_INTERVAL="0.5", REDIS_HEALTH_TIMEOUT="0.5",
        HISTORY_CHANNELS="nf:*", HISTORY_SIZE="5000", PRESENCE_CHANNELS="nf:presence",
        PRESENCE_TTL="5", RATE_CONNECT_IP="off", RATE_SOCKET_COMMANDS="off",
        RATE_SOCKET_PUBLISH="off", RATE_REST="off", DRAIN_SECONDS="1", SHUTDOWN_TIMEOUT="5",
    )  # fmt: skip
    environ.update(env)
    return host.spawn("gateway", [sys.executable, "-m", "gateway"], environ)


def start_redis(host: Host, port: int = 6379, *args: str) -> Process:
    executable, why = redis_cluster_executable()
    assert executable is not None, why
    directory = host.network.workdir / f"redis-{host.name}-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [executable, "--port", str(port), "--bind", host.ip, "--protected-mode", "no",
            "--save", "", "--appendonly", "no", "--dir", str(directory), *args]  # fmt: skip
    return host.spawn(f"redis-{port}", argv)


def base(host: Host, port: int = PORT) -> str:
    return f"http://{host.ip}:{port}"


def ws_url(host: Host, port: int = PORT) -> str:
    return f"ws://{host.ip}:{port}/ws"


async def http(
    url: str, timeout: float = 2.0, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.0 request with asyncio streams (in whichever host's loop awaits it)."""
    found = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert found, url
    lines = [f"{method} {found[3]} HTTP/1.0", f"Host: {found[1]}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(found[1], int(found[2]))
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def status(url: str, timeout: float = 1.0) -> int:
    """The HTTP status at ``url``, 0 when nothing answered in time."""
    try:
        return (await http(url, timeout))[0]
    except (OSError, TimeoutError):
        return 0


async def wait_for(check: Callable[[], Any], timeout: float, step: float = 0.05) -> float:
    """Poll ``check`` (maybe async) until true; the seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout * UNIT:
            raise AssertionError(f"not within {timeout * UNIT:.1f} s: {check}")
        await asyncio.sleep(step)


async def ready(client_host: Host, *gateways: Host) -> None:
    for gw in gateways:

        async def up(gw: Host = gw) -> bool:
            return await client_host.run(status(base(gw) + "/readyz")) == 200

        await wait_for(up, 20)


async def metric(host: Host, via: Host, name: str) -> float:
    """The sum of the samples of ``name`` on ``host``'s /metrics, read from ``via``."""
    code, body = await via.run(http(base(host) + "/metrics"))
    assert code == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def log_lines(process: Process, *words: str, limit: int = 3) -> list[str]:
    """The first messages of ``process``'s JSON log that mention one of ``words``."""
    found = []
    for line in process.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = f"{entry.get('level', '')} {entry.get('msg', entry.get('message', ''))}"
        if any(w in message.lower() for w in words) and message not in found:
            found.append(message)
    return found[:limit]


# -- clients and their verdicts ------------------------------------------------------------


@dataclass
class Reader:
    """A subscriber: every event it got, with the time it got it."""

    name: str
    events: list[tuple[float, Publication | Gap]] = field(default_factory=list)
    client: Client | None = None

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
        subs = [await client.subscribe(ch) for ch in channels]
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
                except Exception:
                    self.failed += 1
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
        """Until each reader has the last acknowledged publication (or a gap after it)."""
        assert self.publisher is not None
        last = max(self.publisher.all_acked())

        def done() -> bool:
            return all(last in r.numbers() or r.gaps() for r in readers)

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


# -- the scenarios ---------------------------------------------------------------------


async def test_a_gateway_cut_off_from_redis_tells_its_clients_and_recovers(network: Network):
    redis, gw1, gw2, clients = (network.host(n) for n in ("redis", "gw1", "gw2", "clients"))
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    p1, _ = start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)
    await ready(clients, gw1, gw2)
    channel = ("nf:1",)
    async with load() as run:
        cut_off = await run.readers_on(clients, ws_url(gw1), 3, channel, "gw1-")
        others = await run.readers_on(clients, ws_url(gw2), 2, channel, "gw2-")
        pushes: list[dict[str, Any]] = []
        raw = clients.submit(watch_raw(ws_url(gw1), "nf:1", pushes))
        run.publish(clients, ws_url(gw2), channel, 0.02)
        await asyncio.sleep(1.0)

        network.partition(gw1, redis)
        cut = time.monotonic()
        detect = await wait_for(lambda: clients.run(unready(gw1)), 10)
        await asyncio.sleep(max(0.0, cut + 10.0 - time.monotonic()))
        network.heal(gw1, redis)
        healed = time.monotonic()
        recover = await wait_for(lambda: clients.run(is_ready(gw1)), 15)
        await wait_for(lambda: any(p.get("op") == "gap" for p in pushes), 10)
        told = time.monotonic() - healed
        await asyncio.sleep(1.0)
        owed = await run.stop_publishing()
        await run.caught_up(cut_off + others)
        raw.cancel()
        verdicts = {r.name: r.verdict(owed) for r in run.readers}
        reconnects = await metric(gw1, clients, "gateway_broker_reconnects_total")
    for name, v in verdicts.items():
        assert v.duplicates == 0 and v.silently_lost == [], (name, v)
    assert all(r.client is not None and r.client.connections == 1 for r in cut_off), (
        "the sockets stay open through a Redis outage"
    )
    missed_live = published_between(run, cut, healed)
    record(
        "redis_partition",
        partition_seconds=healed - cut,
        readiness_red_after=detect,
        readiness_green_after_heal=recover,
        gap_push_after_heal=told,
        published_during_partition=missed_live,
        recovered_per_client=min(missed_live - verdicts[r.name].missing for r in cut_off),
        reported_lost_per_client=max(verdicts[r.name].reported for r in cut_off),
        silently_lost=sum(len(v.silently_lost) for v in verdicts.values()),
        broker_reconnects_metric=reconnects,
        log=log_lines(p1, "redis", "broker", "gap"),
    )


async def watch_raw(url: str, channel: str, pushes: list[dict[str, Any]]) -> None:
    """A bare socket (no client library): the pushes as the gateway sends them."""
    async with connect(f"{url}?token={TOKEN}", subprotocols=["gw.v1.json"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "op": "sub", "ch": channel}))
        async for raw in ws:
            pushes.append(json.loads(raw))


async def unready(gw: Host) -> bool:
    return await status(base(gw) + "/readyz") == 503


async def is_ready(gw: Host) -> bool:
    return await status(base(gw) + "/readyz") == 200


def published_between(run: Load, start: float, end: float) -> int:
    """How many publications readers on the healthy side got stamped between the two times."""
    stamps = {
        e.data["n"]: e.data["t"]
        for r in run.readers
        for _, e in r.events
        if isinstance(e, Publication)
    }
    return sum(start <= t < end for t in stamps.values())
