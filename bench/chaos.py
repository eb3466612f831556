"""Faults at scale: thousands of sockets on two gateways while a gateway or Redis fails.

Two gateway processes share a throwaway ``redis-server`` on a port of its own;
``--sockets`` sockets are split between them, each on one of ``--groups``
history channels and one of ``--wide`` shared ones. A publisher sends
``--rate`` publications a second through the history script straight to Redis
(each with a call id, sent again with the same id after a failure, so a
publication is never in history twice), another ``--http-rate`` a second
through ``POST /api/publish`` of the gateway that is not being hurt (with an
``Idempotency-Key``, sent again after a failure), and ``--rest-rate`` PATCHes a
second of ``--projects`` projects through that gateway's REST core, whose
change events come through the outbox on ``projects:<id>`` (each socket
watches one). Meanwhile one fault is made ``--repeat`` times:

* ``kill``: SIGKILL one gateway (in turn), restarted on its port once its
  sockets are back on the other;
* ``drain``: SIGTERM one gateway (``DRAIN_SECONDS``), restarted likewise;
* ``redis-kill``: SIGKILL Redis and start it again (``--save ""``: history lost);
* ``redis-restart``: ``SHUTDOWN`` (append-only file kept) and start it again;
* ``redis-sleep``: ``DEBUG SLEEP`` for ``--pause`` seconds;
* ``redis-pause``: ``CLIENT PAUSE`` for ``--pause`` seconds;
* ``kill-and-redis-kill``: SIGKILL a gateway and, 0.5 s later, Redis (down for
  ``--pause`` seconds) while its clients reconnect to the other.

Each socket acts as the Python and browser clients do: it resubscribes with
``since`` its last position after any reconnect (to the other gateway, with
jittered exponential backoff), and after a ``gap`` push holds the channel's
live publications and pages ``history`` from its last offset. Each
publication carries its channel and sequence number, so every socket checks
per channel: delivered once, duplicated (the same offset again, or the same
publication at another offset), repaired from ``history``, and every
publication it never got, counted as *reported* when the gateway had said so
(``recovered: false`` or a ``gap`` whose repair could not fill it) before the
next publication arrived, or *silent* otherwise: the bug this hunts. A change
event carries the whole project, so on ``projects:<id>`` only the last version
written must arrive (a skipped one is counted, not lost).

``--transport sse`` or ``longpoll`` drives event streams or long-poll
sessions instead of sockets, with the same account (`bench.chaos_http`: an
``EventSource`` that resumes with ``Last-Event-ID`` alone, and gateway.js's
long-poll); keep them to about 1,000.

Rerun (from the repository root; no shared Redis is touched)::

    .venv/bin/python -m bench.chaos --fault kill --sockets 4000 --repeat 3
    .venv/bin/python -m bench.chaos --fault redis-kill --sockets 4000 --repeat 3
    .venv/bin/python -m bench.chaos --fault kill --sources 2   # 2,000 clients an address
    .venv/bin/python -m bench.chaos --transport sse --fault redis-sleep --sockets 1000 --repeat 2

PostgreSQL at ``DATABASE_URL`` (default 127.0.0.1:5432/test) holds the
projects, in the schema ``chaos16``.

``--json FILE`` writes the figures; the exit status is 1 on any silent loss
or duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import jwt
import msgspec

from core.infra.runtime import raise_file_limit, run
from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.sources import connected
from gateway.loadtest.wsclient import client_frame
from proto.wsprotocol import WebSocketProtocol, WSState

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-chaos-fixed-secret-0123456789abcdef"
PATTERN = "chaos:*"


# -- what a socket reads ------------------------------------------------------


class Pub(msgspec.Struct):
    """A publication of the driver's, or a REST write's change event (``version``)."""

    s: int = -1
    c: int = -1
    t: float = 0.0
    version: int | None = None

    def __post_init__(self) -> None:
        if self.version is not None:  # the first PATCH after the create is version 2
            self.s = self.version - 2


class Item(msgspec.Struct):
    offset: int
    data: Pub


class Err(msgspec.Struct):
    code: int = 0
    temporary: bool = False


class Frame(msgspec.Struct):
    op: str | None = None
    ch: str | None = None
    data: Pub | None = None
    id: int | None = None
    ok: bool | None = None
    error: Err | None = None
    recovered: bool | None = None
    offset: int | None = None
    epoch: str | None = None
    publications: list[Item] | None = None


_decode = msgspec.json.Decoder(Frame).decode
HISTORY_ID = 1000  # a history request's id is HISTORY_ID + slot


@dataclass
class Spec:
    first: int  # index of this process's first socket
    count: int
    urls: list[tuple[str, int]]
    sources: list[str]
    names: list[str]  # every channel, by index
    groups: int
    wide: int
    backoff: float
    backoff_max: float
    transport: str = "ws"


class Counts:
    """What one process's sockets saw (summed by the driver)."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.events: Counter[str] = Counter()  # the projects' change events
        self.recover_seconds: list[float] = []


class Sock(asyncio.Protocol):
    """One client socket: subscribes with ``since``, repairs after a ``gap``, keeps the account."""

    def __init__(self, owner: Worker, index: int, token: str, chans: tuple[int, ...]) -> None:
        self.owner = owner
        self.index = index
        self.token = token
        self.chans = chans
        self.slots = {owner.spec.names[c]: i for i, c in enumerate(chans)}
        n = len(chans)
        self.expect = [0] * n  # next sequence number expected per slot
        self.missing: list[dict[int, bool]] = [{} for _ in range(n)]  # seq -> told when missed
        self.told = [False] * n  # the gateway said a gap may be there, since the last delivery
        self.offset = [-1] * n
        self.epoch = [""] * n
        #: per slot while it repairs: live publications, and None for a gap push, in order
        self.held: list[list[tuple[Pub, int, str] | None] | None] = [None] * n
        self.url = index % len(owner.spec.urls)
        self.transport: asyncio.Transport | None = None
        self.ws: WebSocketProtocol | None = None
        self.buffer = b""
        self.acked = 0
        self.subscribed = False
        self.ever = False
        self.attempt = 0
        self.lost_at: float | None = None
        self.close_code = 0

    # -- connecting ---------------------------------------------------------

    async def connect(self) -> None:
        spec = self.owner.spec
        host, port = spec.urls[self.url]
        self.buffer, self.ws, self.acked, self.close_code = b"", None, 0, 0
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(connected(host, port, random.choice(spec.sources)), 10)
            await loop.create_connection(lambda: self, sock=sock)
        except (OSError, TimeoutError) as exc:
            self.owner.counts.c[f"connect {type(exc).__name__}"] += 1
            self.retry()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = self.owner.spec.urls[self.url]
        request = handshake_request(f"{host}:{port}", "/ws", self.token)
        transport.write(request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.dropped()

    def dropped(self) -> None:
        """The connection is gone (any transport's): count it, and come back unless told not to."""
        was = self.subscribed
        self.subscribed = False
        self.held = [None] * len(self.chans)  # the next connection recovers from the position
        if self.owner.stopping:
            return
        if was:
            self.lost_at = time.monotonic()
            self.owner.counts.c["connections lost"] += 1
            if self.close_code:
                self.owner.counts.c[f"closed {self.close_code}"] += 1
        if 4500 <= self.close_code <= 4999:
            self.owner.counts.c[f"not reconnected after {self.close_code}"] += 1
            return
        self.retry()

    def retry(self) -> None:
        spec = self.owner.spec
        delay = min(spec.backoff_max, spec.backoff * 2**self.attempt) * random.uniform(0.5, 1)
        self.attempt += 1
        self.url = (self.url + 1) % len(spec.urls)  # as a load balancer would send it
        self.owner.counts.c["reconnect attempts"] += 1
        asyncio.get_running_loop().call_later(delay, self.owner.spawn, self.connect())

    def send(self, obj: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(client_frame(msgspec.json.encode(obj)))

    def sub_frame(self, slot: int) -> dict[str, Any]:
        """The ``sub`` of a slot's channel, ``since`` its last position once it has one."""
        sub: dict[str, Any] = {
            "id": slot + 1,
            "op": "sub",
            "ch": self.owner.spec.names[self.chans[slot]],
        }
        if self.offset[slot] >= 0:
            sub["since"] = {"offset": self.offset[slot], "epoch": self.epoch[slot]}
        return sub

    def abort(self) -> None:
        """Drop the connection at once (``dropped`` follows unless the driver is stopping)."""
        if self.transport is not None:
            self.transport.abort()

    # -- bytes in -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.ws is None:
            data = self.buffer + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            status = data[9:12].decode("latin-1")
            if status != "101":
                self.owner.counts.c[f"HTTP {status}"] += 1
                assert self.transport is not None
                self.transport.abort()  # connection_lost tries again
                return
            self.buffer = b""
            self.ws = WebSocketProtocol(2**24, client=True)
            for slot in range(len(self.chans)):
                self.send(self.sub_frame(slot))
            data = data[end + 4 :]
        ws = self.ws
        for message in ws.receive(data):
            self.message(message)
        if self.transport is None:
            return
        out = ws.data_to_send()
        if out:
            self.transport.write(out)
        if ws.state is WSState.CLOSED and not self.transport.is_closing():
            self.close_code = ws.close_code or 1005
            self.transport.close()

    def message(self, payload: bytes) -> None:
        try:
            f = _decode(payload)
        except msgspec.DecodeError:
            self.owner.counts.c["unparsed frame"] += 1
            return
        if f.data is not None and f.ch is not None:
            slot = self.slots.get(f.ch)
            if slot is None or f.data.s < 0:
                return
            held = self.held[slot]
            if held is not None:
                held.append((f.data, f.offset or 0, f.epoch or ""))
                return
            self.live(slot, f.data, f.offset or 0, f.epoch or "")
        elif f.op == "gap" and f.ch is not None:
            slot = self.slots.get(f.ch)
            if slot is not None:
                self.owner.counts.c["gap pushes"] += 1
                held = self.held[slot]
                if held is not None:
                    held.append(None)  # told from there on
                    return
                self.told[slot] = True
                if self.offset[slot] >= 0:
                    self.held[slot] = []
                    self.ask_history(slot)
        elif f.id is not None and f.id >= HISTORY_ID:
            self.history_reply(f.id - HISTORY_ID, f)
        elif f.id is not None:
            self.sub_reply(f.id - 1, f)

    def sub_reply(self, slot: int, f: Frame) -> None:
        c = self.owner.counts.c
        if not f.ok:
            c[f"sub error {f.error.code if f.error else '?'}"] += 1
            self.abort()  # dropped() reconnects
            return
        if f.recovered is None:
            c["subscribed" if not self.ever else "resubscribed without since"] += 1
        elif f.recovered:
            c["recovered"] += 1
        else:
            c["not recovered"] += 1
            self.told[slot] = True
        if f.recovered is not True and f.offset is not None and f.epoch is not None:
            self.offset[slot], self.epoch[slot] = f.offset, f.epoch
        self.acked += 1
        if self.acked == len(self.chans):
            self.subscribed = self.ever = True
            self.attempt = 0
            if self.lost_at is not None:
                self.owner.counts.recover_seconds.append(time.monotonic() - self.lost_at)
                self.lost_at = None

    def ask_history(self, slot: int) -> None:
        ch = self.owner.spec.names[self.chans[slot]]
        self.send({"id": HISTORY_ID + slot, "op": "history", "ch": ch,
                   "since": self.offset[slot], "limit": 100})  # fmt: skip

    def history_reply(self, slot: int, f: Frame) -> None:
        held = self.held[slot]
        if held is None:
            return
        c = self.owner.counts.c
        done = True
        if not f.ok:
            c[f"history error {f.error.code if f.error else '?'}"] += 1
        elif f.epoch != self.epoch[slot]:
            c["history of another epoch"] += 1  # the gap stays told
        elif f.publications and (
            f.publications[0].offset > self.offset[slot] + 1
            or f.publications[-1].offset <= self.offset[slot]
        ):
            c["history short of the gap"] += 1  # the gap stays told (the Python client's `Gap`)
        else:
            for item in f.publications or ():
                if item.offset > self.offset[slot] and item.data.s >= 0:
                    self.apply(slot, item.data, item.offset, f.epoch, repair=True)
            if f.publications and f.offset is not None and self.offset[slot] < f.offset:
                done = False
                self.ask_history(slot)
            else:
                # Repaired up to where the channel stands: what is held must follow on. The
                # Python and browser clients deliver it without looking, so a hole there
                # (a stale read) would be lost silently: counted so.
                self.told[slot] = False
        if done:
            self.held[slot] = None
            for one in held:
                if one is None:
                    self.told[slot] = True
                    continue
                pub, offset, epoch = one
                if epoch == self.epoch[slot] and offset <= self.offset[slot]:
                    continue  # the repair brought it
                self.live(slot, pub, offset, epoch)

    def live(self, slot: int, pub: Pub, offset: int, epoch: str) -> None:
        self.apply(slot, pub, offset, epoch, repair=False)
        self.told[slot] = False

    def apply(self, slot: int, pub: Pub, offset: int, epoch: str, *, repair: bool) -> None:
        c = self.owner.counts.c if pub.version is None else self.owner.counts.events
        s, expect = pub.s, self.expect[slot]
        if s == expect:
            self.expect[slot] = s + 1
            c["repaired" if repair else "delivered"] += 1
        elif s > expect:
            told = self.told[slot]
            missing = self.missing[slot]
            for x in range(expect, s):
                missing[x] = told
            c["skips reported" if told else "skips silent"] += 1
            self.expect[slot] = s + 1
            c["repaired" if repair else "delivered"] += 1
        elif self.missing[slot].pop(s, None) is not None:
            c["repaired" if repair else "late, out of order"] += 1
        elif epoch == self.epoch[slot] and offset <= self.offset[slot]:
            c["duplicates (an offset seen)"] += 1
            return
        else:
            c["duplicates (a new offset)"] += 1
        if offset and (epoch != self.epoch[slot] or offset > self.offset[slot]):
            self.offset[slot], self.epoch[slot] = offset, epoch

    def account(self, sent: list[int], c: Counter[str], events: Counter[str]) -> None:
        """What never came, per channel. A change event carries the whole project, so for
        those only the last version matters: one skipped is counted, not lost."""
        for slot, ch in enumerate(self.chans):
            if self.owner.spec.names[ch].startswith("projects:"):
                events["expected (last versions)"] += 1
                if self.expect[slot] < sent[ch]:
                    told = self.told[slot]
                    events[
                        "last version missing, reported" if told else "last version missing, silent"
                    ] += 1
                events["versions skipped"] += len(self.missing[slot])
                continue
            for told in self.missing[slot].values():
                c["lost reported" if told else "lost silent"] += 1
            tail = sent[ch] - self.expect[slot]
            if tail > 0:
                c["lost reported" if self.told[slot] else "lost silent (tail)"] += tail
            c["expected"] += sent[ch]


class Worker:
    def __init__(self, spec: Spec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.counts = Counts()
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: Any = None  # aiohttp sessions (one a source), for bench.chaos_http's clients
        names = spec.names
        grants = [PATTERN, "projects:*"]
        now = int(time.time())
        self.socks: list[Sock] = []
        kind: type[Sock] = Sock
        if spec.transport != "ws":  # bench.chaos_http's clients
            from bench.chaos_http import LongPollSock, SSESock

            kind = SSESock if spec.transport == "sse" else LongPollSock
        for i in range(spec.first, spec.first + spec.count):
            token = jwt.encode({"sub": f"chaos-{i}", "channels": grants, "iat": now,
                                "exp": now + 86400}, SECRET, algorithm="HS256")  # fmt: skip
            chans: tuple[int, ...] = (i % spec.groups, spec.groups + i % spec.wide)
            if len(names) > spec.groups + spec.wide:  # the projects' channels
                chans += (spec.groups + spec.wide + i % (len(names) - spec.groups - spec.wide),)
            assert all(c < len(names) for c in chans)
            self.socks.append(kind(self, i, token, chans))

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def main(self) -> None:
        if self.spec.transport != "ws":
            import aiohttp

            # one an address: RATE_CONNECT_IP counts per address, as for the sockets
            self.http = [
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, local_addr=(source, 0))
                )
                for source in self.spec.sources
            ]
        gate = asyncio.Semaphore(200)

        async def first(sock: Sock) -> None:
            async with gate:
                await sock.connect()

        await asyncio.gather(*(first(s) for s in self.socks))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        result: list[int] = []

        def command() -> None:
            msg = self.pipe.recv()
            if msg == "count":
                self.pipe.send(sum(1 for s in self.socks if s.subscribed))
            elif isinstance(msg, tuple) and msg[0] == "stop":
                result.extend(msg[1])
                stop.set()

        loop.add_reader(self.pipe.fileno(), command)
        await stop.wait()
        loop.remove_reader(self.pipe.fileno())
        self.stopping = True
        c = self.counts.c
        for sock in self.socks:
            sock.account(result, c, self.counts.events)
            if not sock.subscribed:
                c["sockets not back at the end"] += 1
            sock.abort()
        for http in self.http or ():
            await http.close()
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send((dict(c), dict(self.counts.events), self.counts.recover_seconds))


def worker_main(spec: Spec, pipe: Connection) -> None:
    raise_file_limit()
    run(Worker(spec, pipe).main())


# -- servers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Redis:
    def __init__(self, port: int, workdir: Path, persist: bool) -> None:
        self.port, self.dir, self.persist = port, workdir, persist
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--maxclients", "20000",
                "--enable-debug-command", "local"]  # fmt: skip
        args += ["--appendonly", "yes" if self.persist else "no"]
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        for _ in range(100):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Gateway:
    def __init__(self, port: int, redis_port: int, workdir: Path, drain: float) -> None:
        self.port, self.log = port, workdir / f"gw-{port}.log"
        self.env = {
            **os.environ,
            "JWT_SECRET": SECRET,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "WORKERS": "1",
            "HISTORY_CHANNELS": f"{PATTERN},projects:*",
            "LOG_LEVEL": "info",
            "DRAIN_SECONDS": str(drain),
            "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
            "DATABASE_SCHEMA": "chaos16",
            "MIGRATE_ON_START": "true",
            "RATE_REST": "off",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=self.env,
                                     stdout=out, stderr=out)  # fmt: skip
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway {self.port} did not start: {self.log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def dead(self) -> bool:
        return not self.alive()

    def sample(self) -> tuple[float, float] | None:
        """RSS (MiB) and CPU seconds so far."""
        if not self.alive():
            return None
        assert self.proc is not None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return rss / 1024, (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def connections(self) -> dict[str, int]:
        """Its open connections by transport (``gateway_connections``); none when it is down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        found = {}
        for line in text.splitlines():
            if line.startswith("gateway_connections{"):
                label, _, value = line.partition("} ")
                found[label.partition('"')[2].rstrip('"')] = int(float(value))
        return found

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# -- the driver ---------------------------------------------------------------


async def until(done: Callable[[], bool], within: float, step: float = 0.25) -> None:
    """Wait until ``done()``, for ``within`` seconds at most, asking every ``step``."""
    end = time.monotonic() + within
    while True:
        if done() or time.monotonic() >= end:
            return
        await asyncio.sleep(step)


class Publisher:
    """Publications with sequence numbers per channel; a failed one is sent again (same id)."""

    def __init__(self, redis_port: int, names: list[str]) -> None:
        from core.infra.broker.redis import RedisBroker
        from core.infra.history import HistoryPolicy, HistoryPublisher

        self.broker = RedisBroker(f"redis://127.0.0.1:{redis_port}/0", "gw:")
        self.pub = HistoryPublisher(self.broker, HistoryPolicy((PATTERN,), 100, 300.0))
        self.names = names
        self.sent = [0] * len(names)
        self.c: Counter[str] = Counter()
        #: one per channel: a publication waits for the one before it on its channel,
        #: retries included, so that each channel's are published in order
        self.order = [asyncio.Lock() for _ in names]

    async def redis(self, c: int, s: int) -> None:
        async with self.order[c]:  # FIFO: in the order the publications were made
            await self._redis(c, s)

    async def _redis(self, c: int, s: int) -> None:
        data = msgspec.json.encode({"s": s, "c": c, "t": time.time()})
        call = os.urandom(8).hex()
        while True:
            try:
                got = await asyncio.wait_for(
                    self.pub.publish_each([self.names[c]], data, call=call), 10
                )
                if not isinstance(got[0], Exception):
                    self.c["redis ok"] += 1
                    return
                self.c[f"redis {type(got[0]).__name__}"] += 1
            except Exception as exc:  # counted, sent again
                self.c[f"redis {type(exc).__name__}"] += 1
            await asyncio.sleep(0.2)


async def rest(
    port: int, token: str, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, Any]:
    """A REST call to a gateway: its status (599 when no answer came) and decoded body."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key  # sent again after a lost answer: published once
    try:
        r = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}{path}", method=method, headers=headers, request_timeout=10,
            body=None if body is None else msgspec.json.encode(body),
        )  # fmt: skip
        return r.code, msgspec.json.decode(r.body)
    except HTTPClientError as exc:
        return exc.code, None
    except OSError:
        return 599, None


async def drive(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = args.redis_port or free_port()
    redis = Redis(port, workdir, persist=args.fault == "redis-restart")
    gws = [Gateway(p, port, workdir, args.drain) for p in args.ports]
    try:
        redis.start()
        for gw in gws:
            gw.start()
        return await _drive(args, redis, gws)
    finally:
        for gw in gws:
            if gw.alive():
                assert gw.proc is not None
                gw.proc.kill()
        redis.stop()


async def _drive(args: argparse.Namespace, redis: Redis, gws: list[Gateway]) -> dict[str, Any]:
    names = [f"chaos:g{i}" for i in range(args.groups)] + [f"chaos:w{i}" for i in range(args.wide)]
    admin = jwt.encode({"sub": "chaos-admin", "role": "admin", "channels": ["projects:*"],
                        "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")  # fmt: skip
    projects: list[int] = []
    for k in range(args.projects):  # their `created` events give every sub reply a position
        body = {"name": f"chaos {k}", "owner_email": "chaos@example.com", "budget": 1,
                "starts_on": "2026-01-01"}  # fmt: skip
        status, made = await rest(args.ports[1], admin, "POST", "/api/projects", body)
        assert status == 201, (status, made)
        projects.append(made["id"])
    names += [f"projects:{pid}" for pid in projects]
    publisher = Publisher(redis.port, names)
    for c in range(len(names)):  # every sub reply then carries a position
        await publisher.redis(c, -1)
    sources = [f"127.0.0.{i}" for i in range(2, 2 + args.sources)]
    procs, pipes = [], []
    per = -(-args.sockets // args.processes)
    ctx = multiprocessing.get_context("fork")
    for k in range(args.processes):
        first = k * per
        count = min(per, args.sockets - first)
        spec = Spec(first, count, [("127.0.0.1", p) for p in args.ports], sources, names,
                    args.groups, args.wide, args.backoff, args.backoff_max,
                    args.transport)  # fmt: skip
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, theirs), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(mine)

    def back() -> int:
        for p in pipes:
            p.send("count")
        return sum(p.recv() for p in pipes)

    t0 = time.monotonic()
    await until(lambda: back() >= args.sockets, 120)
    print(f"{back()} of {args.sockets} subscribed in {time.monotonic() - t0:.1f} s", flush=True)

    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    target = [0]  # the gateway being hurt (the HTTP publisher uses the other)
    token = jwt.encode({"sub": "chaos-pub", "channels": [PATTERN], "pub": True,
                        "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")  # fmt: skip
    http_codes: Counter[int] = Counter()
    rest_codes: Counter[int] = Counter()

    async def publish_redis() -> None:
        n, start, pending = 0, time.monotonic(), set()
        while not stop.is_set():
            c = n % (args.groups + args.wide)
            if args.http_rate and c % 2 == 1 and c >= args.groups:
                c -= 1  # odd wide channels are the HTTP publisher's
            s = publisher.sent[c]
            publisher.sent[c] += 1
            task = asyncio.ensure_future(publisher.redis(c, s))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            delay = start + n / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await until(lambda: len(pending) <= 2000, 3600)
        await asyncio.gather(*pending)

    async def publish_http() -> None:
        chans = [c for c in range(args.groups, args.groups + args.wide) if c % 2 == 1]
        n, start = 0, time.monotonic()
        while not stop.is_set() and chans:
            c = chans[n % len(chans)]
            s = publisher.sent[c]
            # the same body each time: a key sent again with other data publishes it again
            body = {"ch": names[c], "data": {"s": s, "c": c, "t": time.time()}}
            while True:  # in order per channel: a failed one is sent again before the next
                port = args.ports[1 - target[0]]
                code, _ = await rest(port, token, "POST", "/api/publish", body, f"chaos-{c}-{s}")
                http_codes[code] += 1
                if code == 200:
                    break
                await asyncio.sleep(0.2)
            publisher.sent[c] += 1
            n += 1
            delay = start + n / args.http_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def write_rest() -> None:
        """PATCH the projects in turn; each write's change event comes through the outbox."""
        first = args.groups + args.wide
        n, start = 0, time.monotonic()
        while not stop.is_set() and projects:
            k = n % len(projects)
            port = args.ports[1 - target[0]]
            path = f"/api/projects/{projects[k]}"
            status, made = await rest(port, admin, "PATCH", path, {"budget": n + 2})
            rest_codes[status] += 1
            if status != 200:  # the write may have happened: its version says
                status, made = await rest(port, admin, "GET", path)
            if status == 200:
                publisher.sent[first + k] = made["version"] - 1  # version 2 is s 0
            n += 1
            delay = start + n / args.rest_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def sampler() -> None:
        while not stop.is_set():
            row: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
            for gw in gws:
                row[str(gw.port)] = gw.sample()
            samples.append(row)
            await asyncio.sleep(0.5)

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(publish_redis()), asyncio.ensure_future(sampler())]
    if args.http_rate:
        tasks.append(asyncio.ensure_future(publish_http()))
    if args.rest_rate:
        tasks.append(asyncio.ensure_future(write_rest()))
    faults: list[dict[str, Any]] = []
    await asyncio.sleep(args.settle)
    for rep in range(args.repeat):
        target[0] = rep % 2
        gw = gws[target[0]]
        at = time.monotonic()
        what, answer = args.fault, ""
        if what in ("kill", "kill-and-redis-kill"):
            assert gw.proc is not None
            gw.proc.kill()
            gw.proc.wait()
            if what != "kill":  # its clients reconnect while Redis is away, then back
                await asyncio.sleep(0.5)
                redis.stop()
                await asyncio.sleep(args.pause)
                redis.start()
        elif what == "drain":
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
        elif what == "redis-kill":
            redis.stop()
            await asyncio.sleep(args.pause)
            redis.start()
        elif what == "redis-restart":
            redis.cli("SHUTDOWN")
            assert redis.proc is not None
            redis.proc.wait()
            await asyncio.sleep(args.pause)
            redis.start()
        elif what == "redis-sleep":
            sleep = ("DEBUG", "SLEEP", str(args.pause))
            answer = await asyncio.get_running_loop().run_in_executor(None, redis.cli, *sleep)
        elif what == "redis-pause":
            answer = redis.cli("CLIENT", "PAUSE", str(int(args.pause * 1000)), "ALL")
        await asyncio.sleep(1)
        if what in ("kill", "drain", "kill-and-redis-kill"):
            await until(gw.dead, 60)
        await until(lambda: back() >= args.sockets, 120)
        all_back = time.monotonic() - at
        if what in ("kill", "drain", "kill-and-redis-kill"):
            gw.start()
        faults.append({"fault": what, "gateway": gw.port, "answer": answer,
                       "all_back_seconds": round(all_back, 2)})  # fmt: skip
        print(f"fault {rep + 1}: {what} on {gw.port}: all back in {all_back:.1f} s", flush=True)
        await asyncio.sleep(args.settle)
    stop.set()
    await asyncio.gather(*tasks[:1], *tasks[2:])
    await asyncio.sleep(args.drain_wait)
    # What each gateway still holds, its clients all connected somewhere: a session or
    # stream kept for a client that moved to the other one shows here (long-poll ones
    # until LONGPOLL_IDLE, by design: --idle-wait waits past it and looks again).
    run_in = asyncio.get_running_loop().run_in_executor
    held = {str(gw.port): await run_in(None, gw.connections) for gw in gws}
    if args.idle_wait:
        await asyncio.sleep(args.idle_wait)
        held_later = {str(gw.port): await run_in(None, gw.connections) for gw in gws}
    totals: Counter[str] = Counter()
    events: Counter[str] = Counter()
    recover: list[float] = []
    for p in pipes:
        p.send(("stop", publisher.sent))
    for p in pipes:
        counts, seen, seconds = p.recv()
        totals.update(counts)
        events.update(seen)
        recover += seconds
    for proc in procs:
        proc.join(10)
    for gw in gws:
        gw.stop()
    redis.stop()
    recover.sort()

    def pct(q: float) -> float | None:
        return round(recover[min(len(recover) - 1, int(q * len(recover)))], 2) if recover else None

    peak: dict[str, Any] = {}
    for gw in gws:
        rows = [r[str(gw.port)] for r in samples if r.get(str(gw.port))]
        cpu = [(b[1] - a[1]) / 0.5 for a, b in itertools.pairwise(rows) if b[1] >= a[1]]
        peak[str(gw.port)] = {"rss_mib_max": round(max((r[0] for r in rows), default=0), 1),
                              "cpu_max": round(max(cpu, default=0), 2)}  # fmt: skip
    return {
        "args": vars(args),
        "publications": sum(publisher.sent),
        "publisher": dict(publisher.c),
        "http_publish_codes": {str(k): v for k, v in http_codes.items()},
        "rest_write_codes": {str(k): v for k, v in rest_codes.items()},
        "faults": faults,
        "sockets": dict(sorted(totals.items())),
        "change_events": dict(sorted(events.items())),
        "recover_seconds": {
            "n": len(recover),
            "p50": pct(0.5),
            "p99": pct(0.99),
            "max": round(recover[-1], 2) if recover else None,
        },
        "gateways": peak,
        "connections_held": held,
        "connections_held_after_idle_wait": held_later if args.idle_wait else None,
        "gap_lines": {
            str(gw.port): gw.log.read_text().count("told they may have a gap") for gw in gws
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fault", required=True,
                   choices=["none", "kill", "drain", "redis-kill", "redis-restart",
                            "redis-sleep", "redis-pause", "kill-and-redis-kill"])  # fmt: skip
    p.add_argument("--sockets", type=int, default=4000)
    p.add_argument("--transport", choices=["ws", "sse", "longpoll"], default="ws",
                   help="how the clients connect (bench.chaos_http: sse, longpoll)")  # fmt: skip
    p.add_argument("--groups", type=int, default=40)
    p.add_argument("--wide", type=int, default=4)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--http-rate", type=float, default=20)
    p.add_argument("--projects", type=int, default=20, help="projects whose writes are watched")
    p.add_argument("--rest-rate", type=float, default=10, help="PATCHes a second")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pause", type=float, default=5)
    p.add_argument("--settle", type=float, default=8)
    p.add_argument("--drain", type=float, default=5, help="the gateways' DRAIN_SECONDS")
    p.add_argument("--drain-wait", type=float, default=8)
    p.add_argument("--idle-wait", type=float, default=0,
                   help="then wait this long and count the gateways' connections again")  # fmt: skip
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--sources", type=int, default=8)
    p.add_argument("--backoff", type=float, default=0.5)
    p.add_argument("--backoff-max", type=float, default=10)
    p.add_argument("--ports", type=int, nargs=2, default=[18881, 18882])
    p.add_argument("--redis-port", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        result = asyncio.run(drive(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs in {workdir}")
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    s = result["sockets"]
    bad = sum(
        v for k, v in s.items() if k.startswith(("lost silent", "duplicates", "skips silent"))
    )
    bad += result["change_events"].get("last version missing, silent", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
