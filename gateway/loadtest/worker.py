"""One load process: opens its share of connections and reports to the driver.

The driver (`gateway.loadtest.cli`) talks to each process over a pipe:
the process sends ``("progress", counts)`` twice a second, ``("connected",
counts)`` once every connection was tried, and ``("result", tally)`` after
the driver says ``"stop"``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from gateway.loadtest.httpclients import SSEClient, longpoll_client, sse_request
from gateway.loadtest.stats import Tally
from gateway.loadtest.wsclient import WSClient, handshake_request
from gateway.runtime import raise_file_limit, run

__all__ = ["WorkerSpec", "worker_main"]


@dataclass
class WorkerSpec:
    index: int
    host: str
    port: int
    path: str
    mode: str  # "ws", "sse" or "longpoll"
    tokens: list[str]
    sources: list[str]
    channels: list[str]
    concurrency: int
    connect_rate: float  # new connections per second from this process; 0: no limit
    timeout: float = 30.0  # seconds for connect, handshake and subscription


def worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    raise_file_limit()
    run(_Worker(spec, pipe).main())


class _Worker:
    def __init__(self, spec: WorkerSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.tally = Tally()
        self.clients: list[WSClient | SSEClient] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()

    def counts(self) -> dict[str, int]:
        t = self.tally
        return {"opened": t.opened, "failed": t.failed, "subscribed": t.subscribed,
                "received": t.received, "closed": t.closed}  # fmt: skip

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._command)
        progress = asyncio.create_task(self._progress())
        await self._connect_all()
        self.pipe.send(("connected", self.counts()))
        await self.stop.wait()
        progress.cancel()
        self.tally.stopping = True
        for client in self.clients:
            client.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.sleep(0)
        self.pipe.send(("result", self.tally.state()))

    def _command(self) -> None:
        try:
            message = self.pipe.recv()
        except EOFError:
            message = "stop"
        if message == "stop":
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self.stop.set()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.pipe.send(("progress", self.counts()))

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
            task = asyncio.create_task(self._connect(token, next(sources), gate))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    async def _connect(self, token: str, source: str, gate: asyncio.Semaphore) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        local = (source, 0) if source else None
        host = f"{spec.host}:{spec.port}"
        try:
            if spec.mode == "longpoll":
                client_run = longpoll_client(
                    spec.host, spec.port, source or None, spec.channels, token, self.tally, done
                )
                task = asyncio.create_task(client_run)
                self.tasks.append(task)
            else:
                client: WSClient | SSEClient
                if spec.mode == "sse":
                    request = sse_request(host, spec.channels, token)
                    client = SSEClient(request, spec.channels, self.tally, done)
                else:
                    request = handshake_request(host, spec.path, token)
                    client = WSClient(request, spec.channels, self.tally, done)
                self.clients.append(client)
                await loop.create_connection(lambda: client, spec.host, spec.port, local_addr=local)
            if not await asyncio.wait_for(done, spec.timeout):
                self.tally.failed += 1
        except (OSError, TimeoutError) as exc:
            self.tally.failed += 1
            self.tally.errors[type(exc).__name__] += 1
        finally:
            gate.release()
