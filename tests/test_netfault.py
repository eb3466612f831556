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
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from websockets.asyncio.client import connect

from core.infra.backoff import Backoff
from core.infra.mint import mint_token
from core.infra.settings import Settings
from gateway.client import Client, Gap, Publication, Subscription
from tests.harness import SECRET
from tests.netfault import record
from tests.netns import Host, Network, Process, leftovers, netns_problem
from tests.servers import UNIT, postgres_dir, redis_cluster_executable

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
#: The REST core elsewhere, as gateway pods have it (docs/deploy.md); none answers here,
#: which leaves the sockets and readiness alone, and starts no embedded PostgreSQL.
NO_CORE = "http://127.0.0.1:9"


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A fresh network; at teardown, even after a failure, nothing of it may be left."""
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()
        left = leftovers(net.prefix, tmp_path)
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
        CORE_URL=NO_CORE,
    )  # fmt: skip
    environ.update(env)
    environ = {k: v for k, v in environ.items() if v != ""}  # "": unset
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
    # Readiness waits up to 1 s for PostgreSQL: give it more.
    return await status(base(gw) + "/readyz", 3.0) == 503


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


async def test_a_client_host_that_vanishes_is_detected_freed_and_leaves_presence(
    network: Network,
):
    gw, lost, clients = (network.host(n) for n in ("gw", "lost", "clients"))
    start_gateway(gw)
    await ready(clients, gw)
    sockets = 20
    held = [lost.submit(hold_socket(ws_url(gw), "nf:presence")) for _ in range(sockets)]
    observer = Client(ws_url(gw), token=TOKEN, backoff=FAST, transports=("websocket",))
    await clients.run(observer.connect())

    async def present() -> int:
        return len(await clients.run(observer.presence("nf:presence")))

    await wait_for(lambda: present_at_least(present, sockets), 10)
    connections = await metric(gw, clients, "gateway_connections")
    network.isolate(lost)
    cut = time.monotonic()
    detect = await wait_for(
        lambda: metric_at_most(gw, clients, "gateway_connections", connections - sockets), 15
    )
    left = time.monotonic() - cut
    await wait_for(lambda: present_at_least(present, 0, exactly=True), 5)
    presence_gone = time.monotonic() - cut
    dead = await metric(gw, clients, "gateway_dead_peer_disconnects_total")
    subscriptions = await metric(gw, clients, "gateway_subscriptions")
    buffered = await metric(gw, clients, "gateway_send_buffered_bytes")
    await clients.run(observer.close())
    for future in held:
        future.cancel()
    assert dead == sockets, "each one dropped as a dead peer"
    assert detect <= (PING_INTERVAL + PONG_TIMEOUT + 2 * SWEEP) * UNIT
    assert subscriptions == 0 and buffered == 0, "nothing of them is kept"
    record(
        "client_host_vanishes",
        sockets=sockets,
        ping_interval=PING_INTERVAL,
        pong_timeout=PONG_TIMEOUT,
        all_dropped_after=left,
        presence_empty_after=presence_gone,
        dead_peer_disconnects_metric=dead,
        log=log_lines(network.processes[0], "dropping"),
    )


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


async def metric_at_most(host: Host, via: Host, name: str, most: float) -> bool:
    return await metric(host, via, name) <= most


async def balance(listen: Host, backends: tuple[Host, ...], chosen: list[str]) -> None:
    """A TCP load balancer, as in front of gateway pods: new connections go to the first
    backend whose /readyz said 200 at the last check (every 0.1 s); open ones are left be."""
    healthy = list(backends)

    async def check() -> None:
        while True:
            answers = await asyncio.gather(*(status(base(b) + "/readyz", 0.5) for b in backends))
            healthy[:] = [b for b, code in zip(backends, answers, strict=True) if code == 200]
            await asyncio.sleep(0.1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not healthy:
            writer.close()
            return
        target = healthy[0]
        chosen.append(target.name)
        try:
            up_reader, up_writer = await asyncio.open_connection(target.ip, PORT)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen.ip, PORT)
    async with server:
        await asyncio.gather(server.serve_forever(), check())


async def test_a_draining_gateway_hands_its_clients_to_the_other_host(network: Network):
    redis, gw1, gw2, lb, clients = (
        network.host(n) for n in ("redis", "gw1", "gw2", "lb", "clients")
    )
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    p1, _ = start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)
    await ready(clients, gw1, gw2)
    chosen: list[str] = []
    balancer = lb.submit(balance(lb, (gw1, gw2), chosen))
    channel = ("nf:drain",)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(lb), 10, channel, "via-lb-")
        assert set(chosen) == {"gw1"}
        run.publish(clients, ws_url(gw2), channel, 0.02)
        await asyncio.sleep(0.5)
        p1.signal(signal.SIGTERM)
        term = time.monotonic()
        moved = await wait_for(
            lambda: all(r.client is not None and r.client.connections == 2 for r in readers), 15
        )
        exit_code = await asyncio.to_thread(p1.wait, 10 * UNIT)
        exited = time.monotonic() - term
        await asyncio.sleep(0.5)
        owed = await run.stop_publishing()
        await run.caught_up(readers)
        on_gw2 = await metric(gw2, clients, "gateway_connections")
    balancer.cancel()
    verdicts = [r.verdict(owed) for r in readers]
    assert exit_code == 0
    assert chosen.count("gw2") >= len(readers), "every reader reconnected to the other host"
    assert on_gw2 >= len(readers)
    for v in verdicts:
        assert v == Verdict(duplicates=0, missing=0, reported=0, silently_lost=[]), v
    assert all(r.recovered() for r in readers)
    record(
        "sigterm_drain_across_hosts",
        clients=len(readers),
        drain_seconds=1.0,
        all_clients_on_the_other_host_after=moved,
        gateway_exited_after=exited,
        exit_code=exit_code,
        published_while_moving=published_between(run, term, term + moved),
        recovered_per_client=published_between(run, term, term + moved),
        reported_lost=sum(v.reported for v in verdicts),
        silently_lost=sum(len(v.silently_lost) for v in verdicts),
        log=log_lines(p1, "drain", "shutdown", "stopp"),
    )


def postgres_binaries() -> Path | None:
    """Debian's PostgreSQL (/usr/lib/postgresql/N/bin), else the one in the pgserver wheel."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").is_file():
            return candidate
    spec = importlib.util.find_spec("pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    return None


def start_postgres(host: Host, directory: Path) -> Process:
    """PostgreSQL on ``host``:5432, trusting the test network, run as an unprivileged user."""
    binaries = postgres_binaries()
    assert binaries is not None, "no PostgreSQL binaries (Debian postgresql, or pgserver)"
    user = (
        "postgres"
        if shutil.which("id") and host.exec("id", "-u", "postgres", check=False)
        else "nobody"
    )
    data = directory / "data"
    directory.chmod(0o777)
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    host.exec(*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust",
              "-U", "postgres", "--no-sync")  # fmt: skip
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write("host all all 10.231.0.0/16 trust\n")
    return host.spawn("postgres", [*as_user, str(binaries / "postgres"), "-D", str(data),
                                    "-k", str(directory), "-h", host.ip, "-p", "5432",
                                    "-c", "fsync=off"])  # fmt: skip


async def test_postgresql_behind_a_partition_is_a_quick_503_and_the_pool_heals(
    network: Network,
):
    db, gw, clients = (network.host(n) for n in ("db", "gw", "clients"))
    with postgres_dir() as directory:
        start_postgres(db, directory)
        database = f"postgresql://postgres@{db.ip}:5432/postgres"
        await wait_for(lambda: clients.run(accepts(db.ip, 5432)), 20)
        process = start_gateway(
            gw, CORE_URL="", DATABASE_URL=database, DATABASE_SCHEMA="netfault",
            MIGRATE_ON_START="true", DB_POOL_MIN="2", DB_CONNECT_TIMEOUT="1",
            DB_COMMAND_TIMEOUT="1",
        )  # fmt: skip
        await ready(clients, gw)
        api = base(gw) + "/api/projects"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await clients.run(http(api, headers=auth)))[0] == 200
        async with load() as run:
            (reader,) = await run.readers_on(clients, ws_url(gw), 1, ("nf:db",), "socket-")
            run.publish(clients, ws_url(gw), ("nf:db",), 0.05)
            network.partition(gw, db)
            cut = time.monotonic()
            answers = []
            for _ in range(3):
                asked = time.monotonic()
                code, body = await clients.run(http(api, 10, headers=auth))
                answers.append((code, time.monotonic() - asked))
            await wait_for(lambda: clients.run(unready(gw)), 10)
            red = time.monotonic() - cut
            during = len(reader.numbers())
            await asyncio.sleep(1.0)
            assert len(reader.numbers()) > during, "the socket is served meanwhile"
            network.heal(gw, db)
            healed = time.monotonic()

            async def rest_ok() -> bool:
                return (await clients.run(http(api, 5, headers=auth)))[0] == 200

            heal = await wait_for(rest_ok, 15)
            owed = await run.stop_publishing()
            await run.caught_up([reader])
            verdict = reader.verdict(owed)
            pool = await metric(gw, clients, "gateway_db_pool_connections")
    assert [code for code, _ in answers] == [503] * 3
    assert json.loads(body)["error"]["code"] == "unavailable"
    assert verdict == Verdict(0, 0, 0, []) and reader.client is not None
    assert reader.client.connections == 1
    record(
        "postgresql_partition",
        first_503_after=answers[0][1],
        slowest_503=max(seconds for _, seconds in answers),
        db_command_timeout=1.0,
        readiness_red_after=red,
        rest_200_after_heal=heal,
        partition_seconds=healed - cut,
        socket_publications_meanwhile=len(reader.numbers()),
        socket_publications_lost=verdict.missing,
        pool_connections_metric=pool,
        log=log_lines(process, "database", "postgres", "pool", "unavailable"),
    )


async def accepts(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def test_latency_and_loss_to_the_clients_drop_no_healthy_client(network: Network):
    redis, gw1, gw2, source = (network.host(n) for n in ("redis", "gw1", "gw2", "source"))
    clients = network.host("clients", shaped=True)
    start_redis(redis)
    url = f"redis://{redis.ip}:6379/0"
    gateways = [start_gateway(gw1, REDIS_URL=url), start_gateway(gw2, REDIS_URL=url)]
    await ready(source, gw1, gw2)
    channel = ("nf:far",)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(gw1), 5, channel, "gw1-")
        readers += await run.readers_on(clients, ws_url(gw2), 5, channel, "gw2-")
        network.shape(clients, DELAY, LOSS)
        shaped = time.monotonic()
        run.publish(source, ws_url(gw1), channel, 0.05)
        await asyncio.sleep(SHAPED_SECONDS)
        owed = await run.stop_publishing()
        await run.caught_up(readers)
        network.shape(clients, 0.0, 0.0)
        dead = [await metric(g, source, "gateway_dead_peer_disconnects_total") for g in (gw1, gw2)]
    lags = sorted(
        at - event.data["t"]
        for r in readers
        for at, event in r.events
        if isinstance(event, Publication) and at > shaped
    )
    verdicts = [r.verdict(owed) for r in readers]
    assert dead == [0, 0], "no healthy client dropped as dead"
    assert all(r.client is not None and r.client.connections == 1 for r in readers)
    for v in verdicts:
        assert v == Verdict(0, 0, 0, []), v
    record(
        "latency_and_loss_to_clients",
        delay_each_way=DELAY,
        loss=LOSS,
        clients=len(readers),
        seconds=SHAPED_SECONDS,
        deliveries=len(lags),
        lag_p50=percentile(lags, 0.50),
        lag_p99=percentile(lags, 0.99),
        lag_max=lags[-1],
        dead_peer_disconnects=sum(dead),
        reconnects=sum(r.client.connections - 1 for r in readers if r.client is not None),
        log=log_lines(gateways[0], "dropping", "slow"),
    )


DELAY = 0.1
LOSS = 0.02
SHAPED_SECONDS = 8.0


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


CLUSTER_PORTS = tuple(range(7000, 7006))  # three primaries, then their replicas


def start_cluster(host: Host) -> dict[int, Process]:
    """Six cluster nodes on ``host``, joined as three primaries with one replica each."""
    nodes = {
        port: start_redis(
            host,
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        )
        for port in CLUSTER_PORTS
    }
    for port in CLUSTER_PORTS:
        wait_sync(lambda port=port: "PONG" in cli(host, port, "ping"), 10)
    host.exec(redis_cli(), "--cluster", "create", *(f"{host.ip}:{p}" for p in CLUSTER_PORTS),
              "--cluster-replicas", "1", "--cluster-yes")  # fmt: skip
    for port in CLUSTER_PORTS:
        wait_sync(lambda port=port: "cluster_state:ok" in cli(host, port, "cluster", "info"), 20)
    wait_sync(lambda: len(replicas_in_sync(host)) == 3, 20)
    return nodes


def redis_cli() -> str:
    executable, _ = redis_cluster_executable()
    beside = Path(executable or "").with_name("redis-cli")
    return str(beside) if beside.is_file() else shutil.which("redis-cli") or "redis-cli"


def cli(host: Host, port: int, *args: str) -> str:
    return host.exec(redis_cli(), "-h", host.ip, "-p", str(port), *args, check=False)


def wait_sync(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout * UNIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout * UNIT:.1f} s: {check}")
        time.sleep(0.05)


def replicas_in_sync(host: Host) -> list[int]:
    return [
        port
        for port in CLUSTER_PORTS
        if "master_link_status:up" in cli(host, port, "info", "replication")
    ]


def owner(host: Host, ask: int, slot: int) -> int | None:
    """The port of the primary serving ``slot``, as node ``ask`` sees the cluster."""
    for line in cli(host, ask, "cluster", "nodes").splitlines():
        words = line.split()
        if len(words) < 9 or "master" not in words[2] or "fail" in words[2]:
            continue
        for span in words[8:]:
            first, _, last = span.partition("-")
            if first.isdigit() and int(first) <= slot <= int(last or first):
                return int(words[1].split("@")[0].rsplit(":", 1)[1])
    return None


async def test_a_cluster_primary_killed_under_load_fails_over_and_clients_are_told(
    network: Network,
):
    rc, gw1, gw2, clients = (network.host(n) for n in ("cluster", "gw1", "gw2", "clients"))
    nodes = await asyncio.to_thread(start_cluster, rc)
    env = {"REDIS_URL": f"redis://{rc.ip}:7000/0", "REDIS_CLUSTER": "yes"}
    gateways = [start_gateway(gw1, **env), start_gateway(gw2, **env)]
    await ready(clients, gw1, gw2)
    channels = tuple(f"nf:c{i}" for i in range(6))
    slot = key_slot(b"gw:{nf:c0}")
    victim = await asyncio.to_thread(owner, rc, CLUSTER_PORTS[0], slot)
    assert victim is not None
    witness = next(p for p in CLUSTER_PORTS[:3] if p != victim)
    async with load() as run:
        readers = await run.readers_on(clients, ws_url(gw1), 3, channels, "gw1-")
        readers += await run.readers_on(clients, ws_url(gw2), 3, channels, "gw2-")
        run.publish(clients, ws_url(gw2), channels, 0.01)
        await asyncio.sleep(1.0)
        nodes[victim].kill()
        killed = time.monotonic()

        async def promoted() -> bool:
            now = await asyncio.to_thread(owner, rc, witness, slot)
            return now not in (None, victim)

        failover = await wait_for(promoted, 20)
        promoted_port = await asyncio.to_thread(owner, rc, witness, slot)
        assert promoted_port is not None
        before = len(readers[0].numbers("nf:c0"))
        await wait_for(lambda: len(readers[0].numbers("nf:c0")) > before, 15)
        flowing = time.monotonic() - killed
        await asyncio.sleep(1.0)
        await run.stop_publishing()
        assert run.publisher is not None
        await run.caught_up(readers, 20)
        failed = run.publisher.failed
        held = cli(rc, promoted_port, "pubsub", "shardchannels", "gw:*").split()
        metrics = {
            name: sum([await metric(g, clients, name) for g in (gw1, gw2)])
            for name in ("gateway_broker_reconnects_total", "gateway_broker_faults_total")
        }
    per_channel = {
        ch: [r.verdict(run.publisher.acked.get(ch, set()), ch) for r in readers] for ch in channels
    }
    for ch, verdicts in per_channel.items():
        for v in verdicts:
            assert v.duplicates == 0 and v.silently_lost == [], (ch, v)
    victims = per_channel["nf:c0"]
    assert "gw:{nf:c0}" in held, "the gateways resubscribed the shard on the promoted replica"
    epochs = {e.epoch for r in readers for _, e in r.events if isinstance(e, Publication)
              and e.channel == "nf:c0"}  # fmt: skip
    record(
        "redis_cluster_primary_killed",
        cluster="3 primaries + 1 replica each, cluster-node-timeout 1000 ms",
        replica_promoted_after=failover,
        victim_channel_flowing_again_after=flowing,
        publishes_refused_during_failover=failed,
        missing_on_victim_channel_per_client=max(v.missing for v in victims),
        reported_lost_per_client=max(v.reported for v in victims),
        gaps_per_client=max(r.gaps("nf:c0") for r in readers),
        epoch_changed=len(epochs) > 1,
        silently_lost=sum(len(v.silently_lost) for vs in per_channel.values() for v in vs),
        **{k: v for k, v in metrics.items()},
        log=log_lines(gateways[0], "redis", "moved", "cluster", "gap"),
    )
