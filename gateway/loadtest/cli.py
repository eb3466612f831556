"""``python -m gateway.loadtest`` (console script ``gateway-loadtest``).

Opens ``--connections`` authenticated sockets (or SSE streams, or long-poll
sessions) over ``--processes`` client processes and the loopback source
addresses of ``--sources``, subscribes each to ``--channel``, publishes
``--messages`` publications at ``--rate`` per second through Redis or the
gateway's HTTP API, and reports connections, connect rate, the server's
memory per connection, delivery latency, deliveries per second and messages
lost. Example, against ``make run`` with ``JWT_SECRET=s REDIS_URL=...``::

    python -m gateway.loadtest --secret s --connections 10000 --rate 20 --messages 200

Each publication carries its sequence number and send time, so every
delivery is timed (wall clock: the tool and the server share a machine or
synchronised clocks) and every missing one is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import re
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from gateway.loadtest.report import Report, render
from gateway.loadtest.stats import Histogram, Tally
from gateway.loadtest.worker import WorkerSpec, worker_main

__all__ = ["main"]

#: Connections per client process by default: well under a 20,000 open-file limit.
PER_PROCESS = 5000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway.loadtest",
        description="Open many authenticated connections to a gateway, publish, and measure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8888", help="the gateway's base URL")
    p.add_argument("--path", default="/ws", help="WebSocket path")
    p.add_argument("--mode", choices=["ws", "sse", "longpoll"], default="ws", help="transport")
    p.add_argument("-n", "--connections", type=int, default=1000, help="connections to open")
    p.add_argument("--channel", default="load", help="channel every connection subscribes to")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--secret", help="JWT_SECRET of the gateway: mint one HS256 token per connection")
    auth.add_argument("--tokens", type=Path, help="file of tokens, one per line (reused round-robin)")
    p.add_argument("--ttl", type=float, default=3600.0, help="lifetime of minted tokens, seconds")
    p.add_argument("--processes", type=int, default=0,
                   help=f"client processes (default: one per {PER_PROCESS} connections)")
    p.add_argument("--sources", default="127.0.0.2-127.0.0.9",
                   help="local source addresses, a range or comma list ('' for the default)")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per process")
    p.add_argument("--connect-rate", type=float, default=0.0,
                   help="new connections per second in all (0: as fast as the server takes them)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds for one connection's handshake and subscription")
    p.add_argument("--publish", choices=["redis", "http", "none"], default="redis",
                   help="how publications are sent")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for --publish redis")
    p.add_argument("--prefix", default="gw:", help="the gateway's REDIS_PREFIX")
    p.add_argument("--rate", type=float, default=10.0, help="publications per second")
    p.add_argument("--messages", type=int, default=100, help="publications to send")
    p.add_argument("--payload-bytes", type=int, default=0, help="padding added to each publication")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds to wait for the last deliveries after the last publication")
    p.add_argument("--metrics-url", help="the server's /metrics (default: URL + /metrics)")
    p.add_argument("--server-pid", type=int, action="append", default=[],
                   help="read server memory from /proc/PID instead of /metrics (repeatable)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait after connecting before reading server memory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p  # fmt: skip


def parse_sources(spec: str) -> list[str]:
    """``127.0.0.2-127.0.0.9`` or ``127.0.0.2,127.0.0.3`` to a list of addresses."""
    out: list[str] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if "-" in part:
            lo, hi = (IPv4Address(x) for x in part.split("-", 1))
            out.extend(str(IPv4Address(i)) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(str(IPv4Address(part)))
    return out


def mint(secret: str, n: int, channel: str, ttl: float, pub: bool = False) -> list[str]:
    now = int(time.time())
    claims: dict[str, Any] = {"channels": [channel], "iat": now, "exp": now + int(ttl)}
    if pub:
        claims["pub"] = True
    return [jwt.encode({**claims, "sub": f"load-{i}"}, secret, algorithm="HS256") for i in range(n)]


def server_rss(metrics_url: str | None, pids: Sequence[int]) -> float | None:
    """Resident bytes of the server: its processes in /proc, or its /metrics (summed over workers)."""
    if pids:
        total = 0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            found = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(found.group(1)) * 1024 if found else 0
        return float(total)
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = re.findall(r"^process_resident_memory_bytes(?:\{[^}]*\})? (\S+)$", text, re.M)
    return sum(float(v) for v in values) if values else None


@dataclass
class _Run:
    args: argparse.Namespace
    pipes: list[Connection]
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    connected: set[int] = field(default_factory=set)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    phase: str = "connecting"
    started: float = field(default_factory=time.monotonic)
    last_line: tuple[float, int] = (0.0, 0)

    def total(self, key: str) -> int:
        return sum(c.get(key, 0) for c in self.counts.values())

    def pump(self, timeout: float) -> None:
        """Read what the processes sent within ``timeout``."""
        for pipe in wait(self.pipes, timeout):
            assert isinstance(pipe, Connection)
            try:
                kind, body = pipe.recv()
            except EOFError:
                self.pipes.remove(pipe)
                continue
            index = self.pipes.index(pipe)
            if kind in ("progress", "connected"):
                self.counts[index] = body
                if kind == "connected":
                    self.connected.add(index)
            elif kind == "result":
                self.results[index] = body
        self.progress()

    def progress(self) -> None:
        if self.args.quiet or self.args.json:
            return
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if not tty and now - self.last_line[0] < 5:
            return
        received = self.total("received")
        then, before = self.last_line
        rate = (received - before) / (now - then) if then and now > then else 0.0
        self.last_line = (now, received)
        line = (f"\r[{now - self.started:6.1f}s] {self.phase:<10} opened {self.total('opened'):>6}"
                f"/{self.args.connections} failed {self.total('failed'):>5} "
                f"subscribed {self.total('subscribed'):>6} received {received:>9} "
                f"({rate:,.0f}/s)   ")  # fmt: skip
        print(line if tty else line.strip(), end="" if tty else "\n", file=sys.stderr, flush=True)


async def _publisher(args: argparse.Namespace, token: str | None) -> tuple[Any, Any]:
    if args.publish == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(args.redis_url)
        key = args.prefix + args.channel

        async def send(data: bytes) -> None:
            await client.publish(key, data)

        return send, client.aclose
    from tornado.httpclient import AsyncHTTPClient

    http = AsyncHTTPClient()
    url = args.url.rstrip("/") + "/api/publish"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    channel = json.dumps(args.channel)

    async def post(data: bytes) -> None:
        body = b'{"ch":' + channel.encode() + b',"data":' + data + b"}"
        await http.fetch(url, method="POST", headers=headers, body=body)

    async def close() -> None:
        http.close()

    return post, close


async def _publish(run: _Run, args: argparse.Namespace, token: str | None) -> dict[int, float]:
    """Send the publications at the rate asked; returns seq -> send time."""
    send, close = await _publisher(args, token)
    sent: dict[int, float] = {}
    pad = "x" * args.payload_bytes
    start = time.monotonic()
    next_pump = start
    try:
        for seq in range(args.messages):
            due = start + seq / args.rate
            while True:
                now = time.monotonic()
                if now >= next_pump:
                    run.pump(0)
                    next_pump = now + 0.5
                if now >= due:
                    break
                await asyncio.sleep(min(due - now, 0.05))
            t = time.time()
            body = b'{"s":%d,"t":%.6f' % (seq, t) + (b',"pad":"%s"' % pad.encode() if pad else b"")
            await send(body + b"}")
            sent[seq] = t
    finally:
        await close()
    return sent


def _split(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    metrics_url = args.metrics_url or (args.url.rstrip("/") + "/metrics")
    n = args.connections
    if args.tokens:
        lines = [line.strip() for line in args.tokens.read_text().splitlines() if line.strip()]
        tokens = [lines[i % len(lines)] for i in range(n)]
        pub_token = lines[0]
    elif args.secret:
        tokens = mint(args.secret, n, args.channel, args.ttl)
        pub_token = mint(args.secret, 1, args.channel, args.ttl, pub=True)[0]
    else:
        tokens = [""] * n
        pub_token = None
    processes = args.processes or max(1, math.ceil(n / PER_PROCESS))
    sources = parse_sources(args.sources)
    per_process_rate = args.connect_rate / processes
    specs = [
        WorkerSpec(i, host, port, args.path, args.mode, share, sources, [args.channel],
                   args.concurrency, per_process_rate, args.timeout)
        for i, share in enumerate(_split(tokens, processes))
    ]  # fmt: skip
    rss_before = server_rss(metrics_url, args.server_pid)
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for spec in specs:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, theirs), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(mine)
    run = _Run(args, list(pipes))
    try:
        report = _drive(run, args, metrics_url, rss_before, pub_token, pipes)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        if not args.quiet and not args.json:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(render(report))
    return 0 if report.failed == 0 and report.lost == 0 else 1


def _drive(
    run: _Run,
    args: argparse.Namespace,
    metrics_url: str,
    rss_before: float | None,
    pub_token: str | None,
    pipes: list[Connection],
) -> Report:
    connect_start = time.monotonic()
    while len(run.connected) < len(pipes) and run.pipes:
        run.pump(0.5)
    connect_seconds = time.monotonic() - connect_start
    run.phase = "settling"
    settle_until = time.monotonic() + args.settle
    while time.monotonic() < settle_until:
        run.pump(0.25)
    rss_after = server_rss(metrics_url, args.server_pid)
    subscribed = run.total("subscribed")
    sent: dict[int, float] = {}
    if args.publish != "none" and args.messages > 0 and subscribed:
        run.phase = "publishing"
        sent = asyncio.run(_publish(run, args, pub_token))
        run.phase = "draining"
        expected = len(sent) * subscribed
        quiet_since = time.monotonic()
        last = run.total("received")
        while run.total("received") < expected and time.monotonic() - quiet_since < args.drain:
            run.pump(0.25)
            if run.total("received") != last:
                last, quiet_since = run.total("received"), time.monotonic()
    run.phase = "closing"
    for pipe in pipes:
        pipe.send("stop")
    deadline = time.monotonic() + 60
    while len(run.results) < len(pipes) and run.pipes and time.monotonic() < deadline:
        run.pump(0.5)
    return _report(run, args, connect_seconds, rss_before, rss_after, subscribed, sent)


def _report(
    run: _Run,
    args: argparse.Namespace,
    connect_seconds: float,
    rss_before: float | None,
    rss_after: float | None,
    subscribed: int,
    sent: dict[int, float],
) -> Report:
    tally = Tally()
    last_arrival: dict[int, float] = {}
    for state in run.results.values():
        tally.opened += state["opened"]
        tally.failed += state["failed"]
        tally.closed += state["closed"]
        tally.received += state["received"]
        tally.errors.update(state["errors"])
        tally.latency.merge(Histogram.from_state(state["latency"]))
        tally.connect_seconds.merge(Histogram.from_state(state["connect_seconds"]))
        tally.per_seq.update(state["per_seq"])
        for seq, at in state["last_arrival"].items():
            last_arrival[seq] = max(at, last_arrival.get(seq, 0.0))
    completion = Histogram()
    for seq, t in sent.items():
        if seq in last_arrival:
            completion.add(last_arrival[seq] - t)
    delivered_once = sum(min(tally.per_seq.get(seq, 0), subscribed) for seq in sent)
    lost = len(sent) * subscribed - delivered_once
    window = (max(last_arrival.values()) - min(sent.values())) if sent and last_arrival else 0.0
    failed = tally.failed + (args.connections - tally.opened - tally.failed)
    return Report(
        mode=args.mode,
        connections=args.connections,
        opened=tally.opened,
        failed=max(0, failed),
        subscribed=subscribed,
        closed=tally.closed,
        connect_seconds=connect_seconds,
        handshake=tally.connect_seconds,
        rss_before=rss_before,
        rss_after=rss_after,
        publications=len(sent),
        rate=args.rate,
        publish=args.publish,
        received=tally.received,
        lost=lost,
        duplicates=max(0, tally.received - delivered_once),
        window=window,
        latency=tally.latency,
        completion=completion,
        errors=dict(tally.errors),
    )
