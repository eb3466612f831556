"""``python -m gateway.loadtest`` (console script ``gateway-loadtest``).

Opens ``--connections`` authenticated sockets (or SSE streams, or long-poll
sessions) over ``--processes`` client processes and the loopback source
addresses of ``--sources``, subscribes each to its channel (``--channels N
--group M``: M sockets on each of N channels, and every socket also on
``--broadcast``), publishes ``--messages`` publications spread over the
channels at ``--rate`` per second through Redis or the gateway's HTTP API,
and reports connections, connect rate, the server's memory per connection,
delivery latency, deliveries per second, and whether every socket got every
publication of its channels exactly once and in order. Example, against
``make run`` with ``JWT_SECRET=$SECRET REDIS_URL=...`` (32 bytes or more)::

    python -m gateway.loadtest --secret "$SECRET" --connections 10000 --rate 20 --messages 200

Each publication carries its channel, its sequence number in that channel
and its send time, so every delivery is timed (wall clock: the tool and the
server share a machine or synchronised clocks) and every missing, repeated
or reordered one is counted. After the last publication the tool waits up
to ``--drain`` seconds for every socket to have everything, then as long as
deliveries still arrive (until none came for ``--late-wait`` seconds): what
arrives then is *late*, what never arrives *lost*. Sockets that lose their
connection reconnect with jittered backoff (to the next of ``--urls``) and
recover with ``since``; ``--kill-after`` SIGKILLs a local server mid-run to
make that happen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import jwt

from gateway.loadtest.kill import Kill
from gateway.loadtest.laggard import merge, roles
from gateway.loadtest.options import PER_PROCESS, check, parse_sources, parser
from gateway.loadtest.publish import Publishing, publish_all
from gateway.loadtest.report import ChannelFigure, Report, render
from gateway.loadtest.stats import Histogram, Tally
from gateway.loadtest.worker import WorkerSpec, worker_main

__all__ = ["main"]


def mint(secret: str, n: int, channels: list[str], ttl: float, pub: bool = False) -> list[str]:
    now = int(time.time())
    claims: dict[str, Any] = {"channels": channels, "iat": now, "exp": now + int(ttl)}
    if pub:
        claims["pub"] = True
    return [jwt.encode({**claims, "sub": f"load-{i}"}, secret, algorithm="HS256") for i in range(n)]


def server_cpu(pids: Sequence[int]) -> float | None:
    """CPU seconds (user + system) the server's processes (``--server-pid``) used so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if pids else None


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
    kill: Kill
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    connected: set[int] = field(default_factory=set)
    #: per process: monotonic times of its first connection attempt and its last one's end
    windows: dict[int, tuple[float, float]] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    phase: str = "connecting"
    started: float = field(default_factory=time.monotonic)
    last_line: tuple[float, int] = (0.0, 0)
    #: the server's CPU seconds from the first publication to the end of the drain
    publish_cpu: float | None = None

    def total(self, key: str) -> int:
        return sum(c.get(key, 0) for c in self.counts.values())

    def complete(self) -> bool:
        """Whether every process says each of its sockets has every publication sent."""
        counts = [self.counts.get(i, {}) for i in range(len(self.pipes))]
        return all(c.get("incomplete", 1) == 0 for c in counts)

    def send(self, message: object) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(message)
            except OSError:
                pass

    def pump(self, timeout: float) -> None:
        """Read what the processes sent within ``timeout``."""
        self.kill.check(time.monotonic())
        live = [p for i, p in enumerate(self.pipes) if i not in self.results]
        for pipe in wait(live, timeout):
            assert isinstance(pipe, Connection)
            index = self.pipes.index(pipe)
            try:
                kind, body = pipe.recv()
            except EOFError:
                self.results.setdefault(index, {})
                continue
            if kind in ("progress", "connected"):
                self.counts[index] = body
                if kind == "connected":
                    self.connected.add(index)
            elif kind == "window":
                self.windows[index] = body
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
                f"({rate:,.0f}/s) reconnects {self.total('reconnects')}   ")  # fmt: skip
        print(line if tty else line.strip(), end="" if tty else "\n", file=sys.stderr, flush=True)


def _pad_json(file: BinaryIO | None) -> bytes:
    """The JSON value of ``--payload-json``, checked, as one line of bytes."""
    if file is None:
        return b""
    with file:
        return json.dumps(json.load(file), separators=(",", ":")).encode()


def _split(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i::n] for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    cmdline = parser()
    args = cmdline.parse_args(argv)
    urls = [u.strip() for u in args.urls.split(",") if u.strip()] or [args.url]
    problem = check(args, urls)
    if problem:
        cmdline.error(problem)
    endpoints = []
    for u in urls:
        parts = urlsplit(u)
        endpoints.append((parts.hostname or "127.0.0.1", parts.port or 80))
    metrics_url = args.metrics_url or (urls[0].rstrip("/") + "/metrics")
    if args.group:
        args.connections = args.channels * args.group
    n = args.connections
    names = (
        [args.channel]
        if args.channels == 1
        else [f"{args.channel}:{i}" for i in range(args.channels)]
    )
    if args.broadcast:
        names.append(args.broadcast)
    groups = [i // args.group if args.group else i % args.channels for i in range(n)]
    grants = sorted(
        {args.channel, f"{args.channel}:*", *([args.broadcast] if args.broadcast else [])}
    )
    if args.tokens:
        lines = [line.strip() for line in args.tokens.read_text().splitlines() if line.strip()]
        tokens = [lines[i % len(lines)] for i in range(n)]
        pub_token: str | None = lines[0]
    elif args.secret:
        tokens = mint(args.secret, n, grants, args.ttl)
        pub_token = mint(args.secret, 1, grants, args.ttl, pub=True)[0]
    else:
        tokens = [""] * n
        pub_token = None
    processes = args.processes or max(1, math.ceil(n / PER_PROCESS))
    sources = parse_sources(args.sources)
    per_process_rate = args.connect_rate / processes
    role_shares = _split(roles(n, args.stall, args.slow), processes)
    specs = [
        WorkerSpec(i, endpoints, args.path, args.mode, share, sources, names, group_share,
                   args.concurrency, per_process_rate, args.timeout, bool(args.broadcast),
                   args.reconnect and args.mode != "longpoll", args.backoff, args.backoff_max,
                   role_shares[i], args.slow_rate, args.laggard_mss, args.laggard_rcvbuf,
                   args.compression)
        for i, (share, group_share) in enumerate(zip(_split(tokens, processes),
                                                     _split(groups, processes), strict=True))
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
    publishing = Publishing(
        names, args.messages, args.rate, args.publish, args.spread, args.payload_bytes,
        args.redis_url, args.prefix,
        tuple(p.strip() for p in args.history_channels.split(",") if p.strip()),
        args.history_size, args.history_ttl, urls, pub_token,
        _pad_json(args.payload_json),
    )  # fmt: skip
    run = _Run(args, pipes, Kill(args.kill_after, args.kill_pid, args.kill_cmd))
    try:
        report = _drive(run, args, metrics_url, rss_before, publishing)
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
    return 0 if report.ok else 1


def _drive(
    run: _Run,
    args: argparse.Namespace,
    metrics_url: str,
    rss_before: float | None,
    publishing: Publishing,
) -> Report:
    connect_start = time.monotonic()
    while len(run.connected) < len(run.pipes) and len(run.results) < len(run.pipes):
        run.pump(0.5)
    connect_seconds = time.monotonic() - connect_start
    if len(run.windows) == len(run.pipes):
        # From the first attempt to the last socket's end, in whichever process: not
        # the processes' start-up (spawn and imports, about half a second).
        connect_seconds = max(w[1] for w in run.windows.values()) - min(
            w[0] for w in run.windows.values()
        )
    run.phase = "settling"
    settle_until = time.monotonic() + args.settle
    while time.monotonic() < settle_until:
        run.pump(0.25)
    rss_after = server_rss(metrics_url, args.server_pid)
    subscribed = run.total("subscribed")
    drain_seconds = late_seconds = 0.0
    if args.publish != "none" and args.messages > 0 and subscribed:
        run.phase = "publishing"
        cpu_before = server_cpu(args.server_pid)
        asyncio.run(publish_all(publishing, lambda: run.pump(0), run.kill.arm))
        run.send(("sent", publishing.sent))
        run.counts = {
            i: {k: v for k, v in c.items() if k != "incomplete"} for i, c in run.counts.items()
        }
        run.phase = "draining"
        started = time.monotonic()
        while not run.complete() and time.monotonic() - started < args.drain:
            run.pump(0.1)
        drain_seconds = time.monotonic() - started
        cpu_after = server_cpu(args.server_pid)
        if cpu_before is not None and cpu_after is not None:
            run.publish_cpu = cpu_after - cpu_before
        if not run.complete():
            run.phase = "late"
            run.send("late")
            started = quiet_since = time.monotonic()
            last = run.total("received")
            while not run.complete() and time.monotonic() - quiet_since < args.late_wait:
                run.pump(0.25)
                if run.total("received") != last:  # still arriving: keep waiting
                    last, quiet_since = run.total("received"), time.monotonic()
            late_seconds = time.monotonic() - started
        if args.stall or args.slow:
            run.phase = "laggards"
            started = time.monotonic()
            while run.total("laggards_open") and time.monotonic() - started < args.laggard_wait:
                run.pump(0.25)
    run.phase = "closing"
    run.send("stop")
    deadline = time.monotonic() + 60
    while len(run.results) < len(run.pipes) and time.monotonic() < deadline:
        run.pump(0.5)
    return _report(run, args, connect_seconds, rss_before, rss_after, subscribed, publishing,
                   drain_seconds, late_seconds)  # fmt: skip


def _report(
    run: _Run,
    args: argparse.Namespace,
    connect_seconds: float,
    rss_before: float | None,
    rss_after: float | None,
    subscribed: int,
    publishing: Publishing,
    drain_seconds: float,
    late_seconds: float,
) -> Report:
    tally = Tally()
    last_arrival: dict[int, float] = {}
    names = publishing.names
    sent = publishing.sent or [0] * len(names)
    figures: Counter[str] = Counter()
    members = [0] * len(names)
    got_sum = [0] * len(names)
    got_min: list[int | None] = [None] * len(names)
    laggards: dict[str, list[dict[str, Any]]] = {}
    for state in run.results.values():
        if not state:
            continue
        for role, part in state.get("laggards", {}).items():
            laggards.setdefault(role, []).append(part)
            tally.opened += part["opened"]
        for key in ("opened", "failed", "closed", "received", "late", "reconnects",
                    "reconnect_attempts", "recovered", "unrecovered", "no_history"):  # fmt: skip
            setattr(tally, key, getattr(tally, key) + state[key])
        tally.errors.update(state["errors"])
        tally.latency.merge(Histogram.from_state(state["latency"]))
        tally.connect_seconds.merge(Histogram.from_state(state["connect_seconds"]))
        for pub, at in state["last_arrival"].items():
            last_arrival[pub] = max(at, last_arrival.get(pub, 0.0))
        figures["expected"] += state["expected"]
        figures["lost_silent"] += state["lost_silent"]
        figures["lost_explicit"] += state["lost_explicit"]
        figures.update({f"sockets_{k}": v for k, v in state["sockets"].items()})
        per = state["channels"]
        for c in range(len(names)):
            members[c] += per["members"][c]
            got_sum[c] += per["sum"][c]
            low, theirs = got_min[c], per["min"][c]
            if theirs is not None:
                got_min[c] = theirs if low is None else min(low, theirs)
    completion = Histogram()
    for pub, t in publishing.times.items():
        if pub in last_arrival:
            completion.add(last_arrival[pub] - t)
    window = (max(last_arrival.values()) - min(publishing.times.values())
              if publishing.times and last_arrival else 0.0)  # fmt: skip
    channels = [
        ChannelFigure(names[c], sent[c], members[c], got_min[c] or 0, got_sum[c])
        for c in range(len(names))
    ]
    lost = figures["lost_silent"] + figures["lost_explicit"]
    failed = tally.failed + (args.connections - tally.opened - tally.failed)
    notes = []
    if tally.no_history:
        notes.append(
            f"{tally.no_history:,} resubscriptions had no position to recover from: the "
            "channel keeps no history (set HISTORY_CHANNELS on the gateways to match them"
            + (", and --history-channels here)" if args.publish == "redis" else ")")
            + ", or it had none yet when the socket subscribed and nothing reached the socket "
            "before its connection was lost"
        )
    if tally.unrecovered:
        notes.append(f"{tally.unrecovered:,} resubscriptions answered recovered: false "
                     "(history lost or too short): their losses are explicit")  # fmt: skip
    if run.kill.after is not None and run.kill.done_at is None:
        notes.append("the kill was not reached: the run ended (or never published) before it")
    if publishing.errors:
        notes.append(f"{publishing.errors:,} publications could not be sent and were not counted")
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
        publications=sum(sent),
        rate=args.rate,
        publish=args.publish,
        received=tally.received,
        expected=figures["expected"],
        lost=lost,
        lost_explicit=figures["lost_explicit"],
        late=tally.late,
        duplicates=max(0, tally.received - (figures["expected"] - lost)),
        window=window,
        drain_seconds=drain_seconds,
        late_seconds=late_seconds,
        latency=tally.latency,
        completion=completion,
        errors=dict(tally.errors),
        sockets={k[8:]: v for k, v in figures.items() if k.startswith("sockets_")},
        channels=channels,
        reconnects={
            "reconnects": tally.reconnects,
            "attempts": tally.reconnect_attempts,
            "recovered": tally.recovered,
            "not_recovered": tally.unrecovered,
            "no_history": tally.no_history,
        },
        publish_errors=publishing.errors,
        kill=None
        if run.kill.done_at is None
        else {"at_seconds": round(run.kill.done_at, 3), "outcome": run.kill.outcome},
        notes=notes,
        laggards={role: merge(parts) for role, parts in laggards.items()},
        server_cpu_publishing=run.publish_cpu,
    )
