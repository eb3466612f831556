"""A closed-loop ``rpc`` load client: N sockets, each with one ``rpc`` frame in flight at a time.

It is to socket ``rpc`` what ``wrk -c N`` is to HTTP: every socket sends
the same ``rpc`` frame, waits for its reply, and sends the next, for
``--warmup`` seconds (not counted) and then ``--duration`` seconds (timed).
It prints one JSON object: replies per second, latency percentiles (frame
written to reply read), replies whose ``status`` was not 2xx, and the
share of one CPU this process used while timing, so a run can show that
the client was not what limited it (``bench/proxy.py`` reports it). With
``--signal`` it first prints a line ``timing`` when the timed part starts
(the JSON line ends it), for whoever measures the servers meanwhile.

It is lean on purpose: one asyncio ``Protocol`` per socket on uvloop, the
upgrade request from the load tool (`gateway.loadtest.handshake`), frames
read by the gateway's own sans-I/O protocol object (client side), the
command encoded once per socket, and of each reply only ``id``, ``ok`` and
``status`` decoded (msgspec skips the body).

Run by ``bench/proxy.py``; alone::

    .venv/bin/python -m bench.rpcload --url ws://127.0.0.1:8888/ws --token "$TOKEN" \\
        --path '/api/projects?limit=20' --connections 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from core.infra.runtime import run
from gateway.client.encoding import JSON, RpcCommand
from gateway.loadtest.handshake import handshake_request
from gateway.loadtest.wsclient import MAX_MESSAGE, client_frame
from proto.wsprotocol import WebSocketProtocol, WSState

__all__ = ["Load", "RpcSocket", "main", "percentile"]


class _Answer(msgspec.Struct):
    id: int = 0
    ok: bool = False
    status: int = 0


_decode_answer = msgspec.json.Decoder(_Answer).decode


@dataclass
class Load:
    """What every socket of a run shares: whether to time, and the tallies."""

    timing: bool = False
    stopping: bool = False
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


class RpcSocket(asyncio.Protocol):
    """One socket: upgrade, then one ``rpc`` frame at a time until the load stops."""

    def __init__(self, request: bytes, frame: bytes, load: Load, ready: asyncio.Future[bool]):
        self.request = request
        self.frame = frame
        self.load = load
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.ws: WebSocketProtocol | None = None
        self.head = b""
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are only alike
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.load.stopping:
            self.load.failures["connection lost"] += 1
        if not self.ready.done():
            self.ready.set_result(False)

    def data_received(self, data: bytes) -> None:
        if self.ws is None:
            data = self._upgrade(data)
            if self.ws is None:
                return
        ws = self.ws
        for message in ws.receive(data):
            self._answered(message)
        if ws.state is WSState.CLOSED and self.transport is not None:
            self.load.failures[f"closed {ws.close_code}"] += 1
            self.transport.close()

    def _upgrade(self, data: bytes) -> bytes:
        data = self.head + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.head = data
            return b""
        if data[9:12] != b"101":
            self.load.failures[f"HTTP {data[9:12].decode('latin-1')}"] += 1
            self.ready.set_result(False)
            assert self.transport is not None
            self.transport.close()
            return b""
        self.ws = WebSocketProtocol(MAX_MESSAGE, client=True)
        self.ready.set_result(True)
        self._send()
        return data[end + 4 :]

    def _send(self) -> None:
        if self.transport is not None and not self.load.stopping:
            self.sent = time.perf_counter()
            self.transport.write(self.frame)

    def _answered(self, message: bytes) -> None:
        took = time.perf_counter() - self.sent
        load = self.load
        try:
            answer = _decode_answer(message)
        except msgspec.DecodeError:
            answer = _Answer()
        if load.timing:
            if answer.ok and 200 <= answer.status < 300:
                load.latencies.append(took)
            else:
                load.failures[f"status {answer.status}" if answer.ok else "error reply"] += 1
        self._send()


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (1-99) of ``values``, interpolated, as statistics does."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def drive(args: argparse.Namespace, out: dict[str, typing.Any]) -> None:
    """Open the sockets, warm up, time; ``out`` gets the report, which is printed at once."""
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = handshake_request(f"{host}:{port}", url.path or "/ws", args.token)
    frame = client_frame(JSON.command(RpcCommand(id=1, method="GET", path=args.path)))
    load = Load()
    loop = asyncio.get_running_loop()
    ready: list[asyncio.Future[bool]] = []
    for _ in range(args.connections):
        done: asyncio.Future[bool] = loop.create_future()
        ready.append(done)
        await loop.create_connection(lambda d=done: RpcSocket(request, frame, load, d), host, port)
    opened = sum(await asyncio.gather(*ready))
    await asyncio.sleep(args.warmup)
    load.timing = True
    if args.signal:
        print("timing", flush=True)
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(args.duration)
    load.timing = False
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    load.stopping = True
    ms = sorted(x * 1000 for x in load.latencies)
    out.update(
        connections=opened,
        replies=len(ms),
        seconds=round(elapsed, 3),
        requests_per_s=round(len(ms) / elapsed, 1),
        p50_ms=round(percentile(ms, 50), 3),
        p99_ms=round(percentile(ms, 99), 3),
        failures=dict(load.failures),
        client_cpu=round(cpu / elapsed, 3),
    )
    print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rpcload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="ws://host:port/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--path", default="/api/projects?limit=20", help="the rpc's GET path")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--signal", action="store_true", help="print `timing` when timing starts")
    args = parser.parse_args(argv)
    out: dict[str, typing.Any] = {}
    run(drive(args, out))
    return 0 if out["connections"] == args.connections and not out["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
