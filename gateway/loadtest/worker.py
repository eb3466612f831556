"""One load process: opens its share of connections and reports to the driver.

The driver (`gateway.loadtest.cli`) talks to each process over a pipe:
the process sends ``("progress", counts)`` twice a second, ``("window",
(first, last))`` (the monotonic times of its first connection attempt and
of its last connection's end: the driver's connect time is theirs, not the
processes' start-up) and then ``("connected", counts)`` once every
connection was tried, and ``("result", state)`` after
the driver says ``"stop"``. Before that the driver sends ``("sent",
counts)`` (publications sent per channel, so the process can tell which of
its sockets still miss some: ``incomplete`` in its counts) and ``"late"``
when the drain window is over (deliveries from then on are late).

Sockets and SSE streams whose connection ends before the stop reconnect
(``reconnect``) after a jittered exponential backoff, to the next URL of
``urls`` as a load balancer would send them, and resubscribe with ``since``
(a stream: with the ``Last-Event-ID`` of its last event, as a browser does).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from core.infra.runtime import raise_file_limit, run
from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.httpclients import SSEClient, longpoll_client, sse_request
from gateway.loadtest.laggard import READER, ROLES, LaggardClient, account
from gateway.loadtest.ledger import Ledger
from gateway.loadtest.sources import connected
from gateway.loadtest.stats import Tally
from gateway.loadtest.stream import StreamClient
from gateway.loadtest.wsclient import WSClient

__all__ = ["WorkerSpec", "worker_main"]


@dataclass
class WorkerSpec:
    index: int
    urls: list[tuple[str, int]]  # (host, port): the first for connecting, the rest for reconnecting
    path: str
    mode: str  # "ws", "sse" or "longpoll"
    tokens: list[str]
    sources: list[str]
    #: every channel of the run, by index; with ``broadcast`` the last is the shared one
    names: list[str]
    #: per token: the index of its group's channel
    groups: list[int]
    concurrency: int
    connect_rate: float  # new connections per second from this process; 0: no limit
    timeout: float = 30.0  # seconds for connect, handshake and subscription
    broadcast: bool = False
    reconnect: bool = True
    backoff: float = 0.5  # first reconnection delay, seconds (doubled per failure, jittered)
    backoff_max: float = 10.0
    #: per token: its role (`gateway.loadtest.laggard`: reader, stalled or slow); empty: readers
    roles: list[int] = field(default_factory=list)
    slow_rate: float = 0.0  # bytes a second a slow socket reads
    laggard_mss: int = 0  # TCP_MAXSEG of the laggards' sockets (0: the system's)
    laggard_rcvbuf: int = 0  # SO_RCVBUF of the laggards' sockets (0: the system's)
    compression: bool = False  # offer permessage-deflate (--compression)


def worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    raise_file_limit()
    run(_Worker(spec, pipe).main())


class _Worker:
    def __init__(self, spec: WorkerSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.tally = Tally()  # the readers'
        #: per laggard role: its own tally (their losses are expected, and apart)
        self.laggard_tallies = {role: Tally() for role in range(1, len(ROLES))}
        self.laggards: list[tuple[LaggardClient, Ledger]] = []
        self.clients: list[WSClient | SSEClient] = []
        self.ledgers: list[Ledger] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.sent: list[int] | None = None
        self.reconnecting: set[asyncio.Task[None]] = set()
        b = len(spec.names) - 1
        self.chans = [(g, b) if spec.broadcast else (g,) for g in range(len(spec.names))]

    def counts(self) -> dict[str, int]:
        t = self.tally
        lag = self.laggard_tallies.values()
        counts = {"opened": t.opened + sum(x.opened for x in lag), "failed": t.failed,
                  "subscribed": t.subscribed + sum(x.subscribed for x in lag),
                  "received": t.received + sum(x.received for x in lag), "closed": t.closed,
                  "reconnects": t.reconnects, "late": t.late,
                  "laggards_open": sum(1 for c, _ in self.laggards if not c.ended)}  # fmt: skip
        if self.sent is not None:
            sent = self.sent
            counts["incomplete"] = sum(1 for ledger in self.ledgers if not ledger.complete(sent))
        return counts

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._command)
        progress = asyncio.create_task(self._progress())
        first = time.monotonic()
        await self._connect_all()
        self.pipe.send(("window", (first, time.monotonic())))
        self.pipe.send(("connected", self.counts()))
        await self.stop.wait()
        progress.cancel()
        self.tally.stopping = True
        for tally in self.laggard_tallies.values():
            tally.stopping = True
        state = {**self.tally.state(), **self._account(), "laggards": self._laggards()}
        for client in self.clients:
            client.close()
        for task in [*self.tasks, *self.reconnecting]:
            task.cancel()
        await asyncio.sleep(0)
        # add_reader made the pipe non-blocking; the result is large (a time per publication)
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(("result", state))

    def _command(self) -> None:
        try:
            message = self.pipe.recv()
        except EOFError:
            message = "stop"
        if message == "stop":
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self.stop.set()
        elif message == "late":
            self.tally.late_phase = True
        elif isinstance(message, tuple) and message[0] == "sent":
            self.sent = list(message[1])

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for client, _ in self.laggards:
                client.probe()
            self.pipe.send(("progress", self.counts()))

    def _account(self) -> dict[str, object]:
        """Exactly-once per socket and per channel, over the sockets that ever subscribed."""
        sent = self.sent or [0] * len(self.spec.names)
        channels = len(self.spec.names)
        members = [0] * channels
        got_min: list[int | None] = [None] * channels
        got_sum = [0] * channels
        exact = gaps = dups = disorder = lost = explicit = expected = 0
        for ledger in self.ledgers:
            short = 0
            for slot, c in enumerate(ledger.chans):
                got = ledger.got(slot, sent[c])
                missed = sent[c] - got
                members[c] += 1
                got_sum[c] += got
                low = got_min[c]
                got_min[c] = got if low is None else min(low, got)
                expected += sent[c]
                short += missed
                if ledger.unrecovered >> slot & 1:
                    explicit += missed
                else:
                    lost += missed
            gaps += short > 0
            dups += ledger.dups > 0
            disorder += ledger.disorder > 0
            exact += short == 0 and ledger.dups == 0 and ledger.disorder == 0
        return {
            "expected": expected,
            "lost_silent": lost,
            "lost_explicit": explicit,
            "sockets": {"exact": exact, "gaps": gaps, "duplicates": dups, "out_of_order": disorder},
            "channels": {"members": members, "min": got_min, "sum": got_sum},
        }

    def _laggards(self) -> dict[str, object]:
        """Per laggard role present: what its sockets got, and how they ended (still open)."""
        sent = self.sent or [0] * len(self.spec.names)
        out: dict[str, object] = {}
        for role, tally in self.laggard_tallies.items():
            mine = [(c, ledger) for c, ledger in self.laggards if c.role == role]
            if role in self.spec.roles:
                out[ROLES[role]] = {**account(mine, sent), "opened": tally.opened,
                                    "errors": dict(tally.errors)}  # fmt: skip
        return out

    # -- connecting --------------------------------------------------------

    async def _connect_all(self) -> None:
        spec = self.spec
        gate = asyncio.Semaphore(spec.concurrency)
        sources = itertools.cycle(spec.sources or [""])
        interval = 1.0 / spec.connect_rate if spec.connect_rate > 0 else 0.0
        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        for i, token in enumerate(spec.tokens):
            if self.stop.is_set():
                break
            if interval:
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await gate.acquire()
            chans = self.chans[spec.groups[i]]
            role = spec.roles[i] if spec.roles else READER
            task = asyncio.create_task(self._connect(token, chans, next(sources), gate, role))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    async def _connect(
        self,
        token: str,
        chans: tuple[int, ...],
        source: str,
        gate: asyncio.Semaphore,
        role: int = READER,
    ) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        host, port = spec.urls[0]
        channels = [spec.names[c] for c in chans]
        ledger = Ledger(chans)
        laggard: LaggardClient | None = None
        try:
            if role != READER:
                request = handshake_request(f"{host}:{port}", spec.path, token,
                                            compression=spec.compression)  # fmt: skip
                lag = laggard = LaggardClient(request, channels, self.laggard_tallies[role], done,
                                              ledger, role=role, rate=spec.slow_rate)  # fmt: skip
                self.clients.append(lag)
                sock = await asyncio.wait_for(
                    connected(host, port, source, mss=spec.laggard_mss,
                              rcvbuf=spec.laggard_rcvbuf), spec.timeout)  # fmt: skip
                await loop.create_connection(lambda: lag, sock=sock)
            elif spec.mode == "longpoll":
                client_run = longpoll_client(
                    host, port, source or None, channels, token, self.tally, done, ledger
                )
                task = asyncio.create_task(client_run)
                self.tasks.append(task)
            else:
                client: WSClient | SSEClient
                owner = self if spec.reconnect else None
                if spec.mode == "sse":
                    request = sse_request(f"{host}:{port}", channels, token)
                    client = SSEClient(request, channels, self.tally, done, ledger, owner)
                else:
                    request = handshake_request(f"{host}:{port}", spec.path, token,
                                                compression=spec.compression)  # fmt: skip
                    client = WSClient(request, channels, self.tally, done, ledger, owner)
                self.clients.append(client)
                await self._connect_client(client, host, port, source)
            if await asyncio.wait_for(done, spec.timeout):
                if laggard is not None:
                    self.laggards.append((laggard, ledger))
                else:
                    self.ledgers.append(ledger)  # only subscribed readers owe an account
            else:
                self.tally.failed += 1
        except (OSError, TimeoutError) as exc:
            self.tally.failed += 1
            self.tally.errors[type(exc).__name__] += 1
        finally:
            gate.release()

    @staticmethod
    async def _connect_client(client: StreamClient, host: str, port: int, source: str) -> None:
        """Connect ``client``'s transport, from ``source`` when one is given (`connected`)."""
        loop = asyncio.get_running_loop()
        if source:
            sock = await connected(host, port, source)
            await loop.create_connection(lambda: client, sock=sock)
        else:
            await loop.create_connection(lambda: client, host, port)

    # -- reconnecting ------------------------------------------------------

    def lost(self, client: StreamClient) -> None:
        if 4500 <= client.code <= 4999:
            self.tally.errors[f"not reconnected after {client.code}"] += 1
            return
        spec = self.spec
        delay = min(spec.backoff_max, spec.backoff * 2**client.attempt) * random.uniform(0.5, 1.0)
        client.attempt += 1
        asyncio.get_running_loop().call_later(delay, self._start_reconnect, client)

    def _start_reconnect(self, client: StreamClient) -> None:
        if self.tally.stopping:
            return
        task = asyncio.create_task(self._reconnect(client))
        self.reconnecting.add(task)
        task.add_done_callback(self.reconnecting.discard)

    async def _reconnect(self, client: StreamClient) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        old = spec.urls[client.url]
        client.url = (client.url + 1) % len(spec.urls)
        host, port = spec.urls[client.url]
        request = client.request.replace(
            f"Host: {old[0]}:{old[1]}\r\n".encode(), f"Host: {host}:{port}\r\n".encode(), 1
        )
        done: asyncio.Future[bool] = loop.create_future()
        client.renew(request, done)
        self.tally.reconnect_attempts += 1
        source = random.choice(spec.sources) if spec.sources else ""
        try:
            await asyncio.wait_for(self._connect_client(client, host, port, source), spec.timeout)
        except (OSError, TimeoutError) as exc:
            self.tally.errors[f"reconnect {type(exc).__name__}"] += 1
            self.lost(client)
            return
        try:
            await asyncio.wait_for(done, spec.timeout)
        except TimeoutError:
            self.tally.errors["reconnect timeout"] += 1
            client.close()  # connection_lost schedules the next attempt
