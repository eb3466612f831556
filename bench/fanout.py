"""Fan-out benchmark: the gateway against plain Tornado and FastAPI, in one run.

Every scenario starts a fresh server, pinned to CPU 0 with ``taskset``, and
runs the shipped load tool (``python -m gateway.loadtest --json``) pinned to
CPU 1; Redis is not pinned. The servers are:

* ``gateway``: ``python -m gateway`` (one worker, Redis broker, JWT HS256);
* ``tornado``: ``bench/peers/tornado_broadcast.py``, the chat demo's loop;
* ``fastapi``: ``bench/peers/fastapi_broadcast.py``, the docs' ConnectionManager;
* ``console`` (asked for with ``--servers``): the gateway while the admin console
  watches: one admin socket subscribed to ``__admin`` for the whole scenario
  (``python -m gateway.client listen __admin``, pinned with the load tool), so the
  gateway publishes its figures once a second and counts deliveries per channel;
* ``baseline`` (with ``--baseline DIR``): ``python -m gateway`` of another checkout
  (``main``), the same settings: what a change costs, in the same run.

and, when asked for (``--servers gateway,gateway-events``), ``gateway-events``:
the gateway with ``EVENTS_STREAM=true`` (docs/events.md), to compare with
the same gateway without it; ``gateway-w2``: the gateway with ``WORKERS=2``
(gateway/workers.py: two processes on one port with ``SO_REUSEPORT``), not
pinned (it has both cores; the load client still runs on CPU 1, so on a
2-core machine it shares a core with a worker: each report says how much
CPU the client took).

Scenarios (the issue's targets in brackets):

* ``hold``: 19,500 sockets, each authenticated and subscribed; server memory
  per connection [<= 12 KB], then 10 broadcasts at 1/s to all of them: time
  for a publication to reach the last subscriber [<= 120 ms];
* ``broadcast``: a burst of 10,000 new connections [<= 10 s], then 10
  broadcasts at 1/s: time to the last of 10,000 subscribers [<= 60 ms];
* ``sustained``: 10,000 subscribers and 25 publications/s for 10 s, offered
  250,000 deliveries/s: deliveries per second achieved [>= 200,000];
* ``connect``: a burst of 10,000 WebSocket handshakes, each with its own
  HS256 token and one subscription, by ``bench/connclient.c`` (a C client,
  one epoll, 500 in flight; `bench.connrate`) pinned to CPU 1: sockets/s,
  handshake p50/p99, and handshakes per server CPU-second (the server's
  processes' CPU from ``/proc`` over the burst) [>= 5,000 per core-second;
  10,000 in <= 2 s; p99 <= 200 ms]; the client's own CPU share shows it was
  not the bottleneck. Gateways only (the peers speak another protocol);
* ``hold39k``: ``hold`` with 39,000 sockets, for ``gateway-w2`` (one process
  may hold 20,000 descriptors): time to the last subscriber against the
  kernel's floor for 39,000 sockets on two cores [<= 1.3x];
* ``burst-c`` and ``hold39k-c``: the receiving side is ``bench/connclient.c``
  in its receiver mode (C, one thread, one epoll per 19,500 sockets; see
  `_c_run`), not the Python load tool, so that the client is not the
  bottleneck: ``burst-c`` opens 10,000 subscribed sockets, then publishes 200
  publications at once (one Redis pipeline) and reports deliveries/s from the
  first publication to the last delivery (2,000,000 deliveries) [``gateway-w2`` >= 1.7x ``gateway``];
  ``hold39k-c`` is ``hold39k`` with the C receiver [<= 1.3x the two-core floor].
  Each report carries the CPU seconds per delivery of the server, the client
  and Redis, and the rate those allow on this machine (``bound_per_s``).

``--worker-cpu 0.6`` holds each server process (each worker of
``gateway-w2``) to 0.6 of a core with a cgroup quota (`bench.cpuquota`; not
pinned), so one worker gets 0.6 and two get 0.6 each: the
ratio then says how the workers scale with the CPU they are given, not how
the client and the servers share two cores. Report such runs beside
unlimited ones (``--name``), never instead.

It also prints the kernel's floor (`bench.sendfloor`): the time one ``send``
on each of N loopback sockets takes on CPU 0, which bounds "time to the last
subscriber" from below for any server on this machine.

Each scenario runs ``--rounds`` times per server (servers alternate within a
round); the table shows medians, and ratios gateway / peer. A scenario whose
run lost messages or failed connections is marked.

Rerun (from the repository root; needs Redis on 127.0.0.1:6379 and
``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.fanout --rounds 3 --save
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import connrate
from bench.connrate import process_tree_cpu
from bench.cpuquota import CpuQuota

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
JWT_SECRET = "bench-fanout-fixed-secret-0123456789abcdef"
SERVERS = ("gateway", "tornado", "fastapi")
#: Servers that are the gateway (``console``: watched; ``baseline``: another checkout's).
GATEWAYS = ("gateway", "console", "baseline")
#: The checkout ``baseline`` runs (``--baseline``).
BASELINE: list[Path] = []
#: Each server process's CPU quota in cores (``--worker-cpu``); empty: unlimited.
WORKER_CPU: list[float] = []
#: Sockets per receiving C client: one process may hold 20,000 descriptors.
C_CLIENT_SOCKETS = 19_500
#: Gateways with settings of their own, by name (not run unless named in --servers).
VARIANTS = {"gateway-events": {"EVENTS_STREAM": "true"}, "gateway-w2": {"WORKERS": "2"}}


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    rate: float
    messages: int
    target: str


SCENARIOS = {
    "hold": Scenario("hold", 19_500, 1, 10, "memory <= 12 KB/conn; last of 19,500 <= 120 ms"),
    "broadcast": Scenario("broadcast", 10_000, 1, 10, "10,000 connect <= 10 s; last <= 60 ms"),
    "sustained": Scenario("sustained", 10_000, 25, 250, ">= 200,000 deliveries/s"),
    "connect": Scenario("connect", 10_000, 0, 0, ">= 5,000 handshakes per server CPU-second"),
    "hold39k": Scenario("hold39k", 39_000, 1, 10, "last of 39,000 <= 1.3x the kernel floor"),
    # Rate 0: every publication at once (one Redis pipeline).
    "burst-c": Scenario("burst-c", 10_000, 0, 200, "deliveries/s, gateway-w2 >= 1.7x gateway"),
    "hold39k-c": Scenario("hold39k-c", 39_000, 1, 10, "last of 39,000 <= 1.3x the kernel floor"),
}
#: Scenarios whose receiving side is bench/connclient.c (`_c_run`), not the load tool.
C_SCENARIOS = ("burst-c", "hold39k-c")
#: Scenarios only some servers run (the rest are skipped for them).
ONLY = {
    "connect": (*GATEWAYS, "gateway-w2"),
    "hold39k": ("gateway-w2",),
    "burst-c": (*GATEWAYS, "gateway-w2"),
    "hold39k-c": ("gateway-w2",),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() != 1 else []


def _command(
    server: str, port: int, extra: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "JWT_SECRET": JWT_SECRET, "PYTHONUNBUFFERED": "1",
           "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}  # fmt: skip
    if server in GATEWAYS or server in VARIANTS:
        env.update(PORT=str(port), HOST="127.0.0.1", WORKERS="1", RATE_CONNECT_IP="off",
                   MAX_PENDING_PER_IP="1000000",  # the load tool is one address
                   LOG_LEVEL="warning",
                   DATABASE_URL=os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"))  # fmt: skip
        env["MIGRATE_ON_START"] = "true"  # a bench database: migrated at start, as `make run`
        env.update(VARIANTS.get(server, {}))
        env.update(extra or {})
        return [sys.executable, "-m", "gateway"], env
    return [sys.executable, "-m", f"bench.peers.{server}_broadcast", "--port", str(port)], env


def _watch(port: int) -> subprocess.Popen[bytes]:
    """An admin console's socket on ``__admin`` (pinned with the load tool): the gateway
    then publishes its figures once a second, as for the page at /admin."""
    from core.infra.mint import mint_token
    from core.infra.settings import Settings

    token = mint_token(
        Settings(jwt_secret=JWT_SECRET), "bench-admin", [], extra={"role": "admin"}, ttl=None
    )
    argv = [
        *_pin(1),
        sys.executable,
        "-m",
        "gateway.client",
        "--url",
        f"ws://127.0.0.1:{port}/ws",
        "--token",
        token,
        "listen",
        "__admin",
    ]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def _server(
    server: str, log: Path, extra: dict[str, str] | None = None
) -> Iterator[tuple[int, int]]:
    port = _free_port()
    argv, env = _command(server, port, extra)
    cwd = BASELINE[0] if server == "baseline" else ROOT
    pin = [] if server == "gateway-w2" else _pin(0)  # two workers: both cores
    with open(log, "ab") as out:
        proc = subprocess.Popen(pin + argv, cwd=cwd, env=env, stdout=out, stderr=out)
    watcher = None
    try:
        deadline = time.monotonic() + 60
        path = "/readyz" if server in GATEWAYS or server in VARIANTS else "/healthz"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{server} exited; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server} did not start; see {log}") from None
                time.sleep(0.2)
        if server == "console":
            watcher = _watch(port)
            time.sleep(2)  # connected, and the gateway told that someone watches
        time.sleep(1)  # let start-up garbage settle before the memory baseline
        with ExitStack() as quotas:
            if WORKER_CPU:
                _limit(quotas, server, proc.pid, WORKER_CPU[0])
            yield port, proc.pid
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(30)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_scenario(
    server: str,
    scenario: Scenario,
    log: Path,
    extra: dict[str, str] | None = None,
    channel: str = "bench",
    load_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One run of the load tool against a fresh ``server`` (the gateway's ``extra`` settings).

    ``load_args``: more options for the load tool. The report gains the
    server's CPU seconds (its workers' too) and the bytes it wrote to sockets
    (``wchar``) during the run, the load tool's own CPU seconds, and, for a
    gateway, its /metrics samples at the end (``server_metrics``).
    """
    if scenario.name == "connect":
        return _connect_run(server, scenario, log, extra)
    if scenario.name in C_SCENARIOS:
        return _c_run(server, scenario, log, extra)
    with _server(server, log, extra) as (port, pid):
        workers = _children(pid) if server == "gateway-w2" else []
        argv = [
            *_pin(1), sys.executable, "-W", "ignore", "-m", "gateway.loadtest", "--json", "--quiet",
            "--url", f"http://127.0.0.1:{port}", "--secret", JWT_SECRET,
            "-n", str(scenario.connections), "--rate", str(scenario.rate),
            "--messages", str(scenario.messages),
            *[a for p in (workers or [pid]) for a in ("--server-pid", str(p))],
            "--channel", f"{channel}-{scenario.name}-{os.getpid()}-{time.monotonic_ns()}",
            "--settle", "3", "--drain", "15", "--timeout", "60", *load_args,
        ]  # fmt: skip
        writers = workers or [pid]
        cpu, client, wrote = process_tree_cpu(pid), _children_cpu(), written_bytes(writers)
        started = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        cpu, client = process_tree_cpu(pid) - cpu, _children_cpu() - client
        wrote = written_bytes(writers) - wrote
        wall = time.monotonic() - started
        samples = scrape(port) if server in GATEWAYS or server in VARIANTS else {}
    if not done.stdout.strip():
        raise RuntimeError(f"load tool failed: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    report["server_cpu_seconds"] = round(cpu, 3)
    report["server_written_bytes"] = wrote
    report["server_metrics"] = samples
    # The load tool and its client processes (waited for, so counted), over the whole run:
    # on 2 cores with WORKERS=2 the client's CPU is taken from the workers'.
    report["client_cpu_seconds"] = round(client, 3)
    report["run_seconds"] = round(wall, 3)
    return report


def _limit(stack: ExitStack, server: str, pid: int, cores: float) -> None:
    """Hold each server process to ``cores`` of a CPU (`CpuQuota`), free to run on any CPU.

    Each worker gets a cgroup of its own: besides the quota, the scheduler then
    weighs it as one entity against every other session's processes (each
    session here is an autogroup, sched_autogroup_enabled), rather than
    sharing this session's one weight with the load client. Not pinned: on a
    shared machine a pinned worker waits behind whatever else is pinned there.
    """
    everywhere = set(range(os.cpu_count() or 1))
    for i, worker in enumerate(_children(pid) if server == "gateway-w2" else [pid]):
        quota = stack.enter_context(CpuQuota(f"bench-worker{i}", cores))
        quota.add(worker)
        os.sched_setaffinity(worker, everywhere)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children(pid: int) -> list[int]:
    """The worker processes of a supervisor (gateway/workers.py), once all are up."""
    deadline = time.monotonic() + 30
    while True:
        kids = [int(k) for t in Path(f"/proc/{pid}/task").glob("*/children")
                for k in t.read_text().split()]  # fmt: skip
        if len(kids) >= 2 or time.monotonic() > deadline:
            return kids
        time.sleep(0.2)


def _redis_cpu(client: Any) -> float:
    """CPU seconds Redis has used (INFO cpu): shared with anything else using this Redis."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _publish(client: Any, channel: str, messages: int, rate: float) -> list[int]:
    """Publish ``messages`` as the load tool does (``{"s", "t", "c"}``); rate 0: all at once.

    Returns how many subscribers (gateway processes) Redis gave each one to.
    """
    key = "gw:" + channel
    if rate == 0:
        pipe = client.pipeline(transaction=False)
        for seq in range(messages):
            pipe.publish(key, b'{"s":%d,"t":%.6f,"c":0}' % (seq, time.time()))
        return [int(n) for n in pipe.execute()]
    start, out = time.monotonic(), []
    for seq in range(messages):
        time.sleep(max(0.0, start + seq / rate - time.monotonic()))
        out.append(int(client.publish(key, b'{"s":%d,"t":%.6f,"c":0}' % (seq, time.time()))))
    return out


def _c_run(
    server: str, scenario: Scenario, log: Path, extra: dict[str, str] | None
) -> dict[str, Any]:
    """A fan-out scenario whose receivers are ``bench/connclient.c`` processes.

    The C clients (pinned to CPU 1, 19,500 sockets each, client i from address
    127.0.0.<2+i>: one address has ~28,000 ephemeral ports) connect and subscribe
    every socket, each with its own token; then this process publishes
    through Redis and each client reports its deliveries (per publication:
    how many, first and last arrival), losses and duplicates, and its own CPU
    over the receiving phase. Server, client and Redis CPU are read over the
    same span, from the first publication to the last client's report.
    """
    import redis

    n, m = scenario.connections, scenario.messages
    parts = -(-n // C_CLIENT_SOCKETS)
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    binary = connrate.client_binary()
    rds = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    files: list[str] = []
    with _server(server, log, extra) as (port, pid):
        channel = f"c-{scenario.name}-{os.getpid()}-{time.monotonic_ns()}"
        tokens = connrate.mint_tokens(JWT_SECRET, n, channel)
        clients = []
        try:
            for i, size in enumerate(sizes):
                start = sum(sizes[:i])
                with tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False) as f:
                    f.write("\n".join(tokens[start : start + size]) + "\n")
                files.append(f.name)
                argv = [
                    *_pin(1),
                    str(binary),
                    "127.0.0.1",
                    str(port),
                    str(size),
                    str(connrate.WINDOW // len(sizes)),  # as many in flight as `connect`
                    f.name,
                    channel,
                    str(m),
                    "15",
                    f"127.0.0.{2 + i}",
                ]
                clients.append(
                    subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                )
            connects = [json.loads(c.stdout.readline() or "{}") for c in clients if c.stdout]
            time.sleep(1)  # the last subscriptions reach Redis
            per_worker: dict[str, Any] = {
                k: v for k, v in scrape(port).items() if k.startswith("gateway_connections{")
            }
            workers = _children(pid) if server == "gateway-w2" else [pid]
            each = [process_tree_cpu(w) for w in workers]
            server_cpu, redis_cpu, started = process_tree_cpu(pid), _redis_cpu(rds), time.time()
            receivers = _publish(rds, channel, m, scenario.rate)
            received = [json.loads(c.stdout.readline() or "{}") for c in clients if c.stdout]
            server_cpu = process_tree_cpu(pid) - server_cpu
            # Each worker's share: an even split says SO_REUSEPORT and Redis serve both alike.
            per_worker["cpu_seconds"] = [
                round(process_tree_cpu(w) - c, 3) for w, c in zip(workers, each, strict=True)
            ]
            redis_cpu = _redis_cpu(rds) - redis_cpu
            span = time.time() - started
        finally:
            for c in clients:
                if c.stdin:
                    c.stdin.close()
                c.wait(60)
            for name in files:
                os.unlink(name)
    return _c_report(
        n,
        m,
        connects,
        received,
        server_cpu,
        redis_cpu,
        span,
        receivers,
        per_worker,
        2 if server == "gateway-w2" else 1,
    )


def _c_report(
    n: int,
    m: int,
    connects: list[dict[str, Any]],
    received: list[dict[str, Any]],
    server_cpu: float,
    redis_cpu: float,
    span: float,
    receivers: list[int],
    per_worker: dict[str, Any],
    workers: int,
) -> dict[str, Any]:
    """The C clients' reports merged: per publication over all clients, CPU per delivery."""
    if len(received) != len(connects) or not all("pubs" in r for r in received):
        raise RuntimeError(f"a C client failed: {received}")
    pubs = []
    for s in range(m):
        parts = [r["pubs"][s] for r in received if r["pubs"][s]["n"]]
        if parts:
            t = parts[0]["t"]
            pubs.append(
                {
                    "s": s,
                    "n": sum(p["n"] for p in parts),
                    "t": t,
                    "to_last_ms": round((max(p["last"] for p in parts) - t) * 1e3, 2),
                }
            )
    deliveries = sum(r["deliveries"] for r in received)
    first_t = min((p["t"] for p in pubs), default=0.0)
    last = max((r["last_arrival"] for r in received), default=0.0)
    client_cpu = sum(r["client_cpu_seconds"] for r in received)
    cores = os.cpu_count() or 1
    server_cores = workers * (WORKER_CPU[0] if WORKER_CPU else 1.0)
    per = {
        k: v / deliveries if deliveries else float("nan")
        for k, v in (("server", server_cpu), ("client", client_cpu), ("redis", redis_cpu))
    }
    bound = min(server_cores / per["server"], cores / sum(per.values())) if deliveries else 0.0
    to_last = sorted(p["to_last_ms"] for p in pubs)
    return {
        "c_receiver": True,
        "worker_cpu": WORKER_CPU[0] if WORKER_CPU else None,
        "connections": {
            "opened": sum(c.get("subscribed", 0) for c in connects),
            "failed": n - sum(c.get("subscribed", 0) for c in connects),
            "seconds": max((c.get("seconds", 0) for c in connects), default=0),
        },
        "connects": connects,
        "per_worker_connections": per_worker,
        "receivers_per_publication": receivers,
        "deliveries": {
            "expected": sum(c.get("subscribed", 0) for c in connects) * m,
            "delivered": deliveries,
            "lost": sum(r["lost"] for r in received),
            "duplicates": sum(r["duplicates"] for r in received),
            "closed": sum(r["closed"] for r in received),
            "per_second": round(deliveries / (last - first_t), 1) if last > first_t else 0.0,
        },
        "to_last_p50_ms": to_last[len(to_last) // 2] if to_last else float("nan"),
        "to_last_max_ms": to_last[-1] if to_last else float("nan"),
        "latency_p99_ms": max((r["latency_p99_ms"] for r in received), default=0.0),
        "publications": pubs,
        "server_cpu_seconds": round(server_cpu, 3),
        "client_cpu_seconds": round(client_cpu, 3),
        "redis_cpu_seconds": round(redis_cpu, 3),
        "span_seconds": round(span, 3),
        "us_per_delivery": {k: round(v * 1e6, 3) for k, v in per.items()},
        # How much of the CPU it may use the server used (near 1: CPU-bound, or quota-bound).
        "server_cpu_share": round(server_cpu / span / server_cores, 3) if span else 0.0,
        # Server CPU per publication and worker: a time to last that no contention inflates.
        "server_cpu_ms_per_publication": round(server_cpu / m / workers * 1e3, 1),
        # What the CPU allows: the server at most its cores (a worker one, or its quota),
        # everything together at most the machine's.
        "bound_per_s": round(bound, 1),
    }


def _connect_run(
    server: str, scenario: Scenario, log: Path, extra: dict[str, str] | None
) -> dict[str, Any]:
    """The ``connect`` scenario: one burst of the C client against a fresh ``server``."""
    with _server(server, log, extra) as (port, pid):
        channel = f"connect-{os.getpid()}-{time.monotonic_ns()}"
        burst = connrate.burst(port, pid, JWT_SECRET, scenario.connections, channel, pin=_pin(1),
                               hold=1.0)  # fmt: skip
    # What the CPU allows: the server at most its cores (a worker one, or its quota),
    # server and client together at most the machine's.
    done = burst["subscribed"]
    if done and burst["server_cpu_seconds"]:
        per_server = burst["server_cpu_seconds"] / done
        per_client = burst["client_cpu_seconds"] / done
        cores = (2 if server == "gateway-w2" else 1) * (WORKER_CPU[0] if WORKER_CPU else 1.0)
        burst["bound_per_s"] = round(
            min(cores / per_server, (os.cpu_count() or 1) / (per_server + per_client)), 1
        )
    burst["worker_cpu"] = WORKER_CPU[0] if WORKER_CPU else None
    return {"connect": burst}


def scrape(port: int) -> dict[str, float]:
    """The gateway's /metrics samples by name and labels (histogram buckets left out)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("gateway_") and "_bucket{" not in line:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def written_bytes(pids: list[int]) -> int:
    """Bytes processes ``pids`` have passed to write and send calls so far (``/proc``, wchar)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                total += int(line.split()[1])
    return total


def _figures(report: dict[str, Any]) -> dict[str, float]:
    if "connect" in report:
        b = report["connect"]
        return {"failed": b["failed"], "connect_s": b["seconds"], "connects_per_s": b["per_second"],
                "per_cpu_s": b["per_server_cpu_second"], "handshake_p50_ms": b["handshake_p50_ms"],
                "handshake_p99_ms": b["handshake_p99_ms"], "server_cpu_share": b["server_cpu_share"],
                "client_cpu_share": b["client_cpu_share"],
                "bound_per_s": b.get("bound_per_s", float("nan"))}  # fmt: skip
    if report.get("c_receiver"):
        d, us = report["deliveries"], report["us_per_delivery"]
        return {
            "opened": report["connections"]["opened"],
            "failed": report["connections"]["failed"],
            "connect_s": report["connections"]["seconds"],
            "deliveries_per_s": d["per_second"],
            "lost": d["lost"],
            "duplicates": d["duplicates"],
            "last_p50_ms": report["to_last_p50_ms"],
            "last_max_ms": report["to_last_max_ms"],
            "server_us": us["server"],
            "client_us": us["client"],
            "redis_us": us["redis"],
            "bound_per_s": report["bound_per_s"],
            "server_cpu_share": report.get("server_cpu_share", float("nan")),
            "cpu_ms_per_pub": report.get("server_cpu_ms_per_publication", float("nan")),
        }
    c, d = report["connections"], report["deliveries"]
    per = report["server_memory"]["bytes_per_connection"]
    return {
        "opened": c["opened"],
        "failed": c["failed"],
        "connect_s": c["seconds"],
        "kb_per_conn": round(per / 1000, 2) if per is not None else float("nan"),
        "lost": d["lost"],
        "deliveries_per_s": d["per_second"],
        "latency_p50_ms": report["latency"]["p50_ms"],
        "latency_p99_ms": report["latency"]["p99_ms"],
        "last_p50_ms": report["completion"]["p50_ms"],
        "last_max_ms": report["completion"]["max_ms"],
        "client_cpu_share": round(report.get("client_cpu_seconds", 0) / report["run_seconds"], 3)
        if report.get("run_seconds")
        else float("nan"),
    }


_CONNECT_COLUMNS = [
    ("connect_s", "seconds", "{:.2f}"),
    ("connects_per_s", "sockets/s", "{:,.0f}"),
    ("per_cpu_s", "per server CPU-s", "{:,.0f}"),
    ("handshake_p50_ms", "handshake p50 ms", "{:.1f}"),
    ("handshake_p99_ms", "handshake p99 ms", "{:.1f}"),
    ("server_cpu_share", "server CPU share", "{:.2f}"),
    ("client_cpu_share", "client CPU share", "{:.2f}"),
    ("bound_per_s", "CPU bound /s", "{:,.0f}"),
    ("failed", "failed", "{:.0f}"),
]

_C_COLUMNS = [
    ("connect_s", "connect s", "{:.2f}"),
    ("last_p50_ms", "to last p50 ms", "{:.1f}"),
    ("last_max_ms", "to last max ms", "{:.1f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("bound_per_s", "CPU bound /s", "{:,.0f}"),
    ("server_cpu_share", "server CPU share", "{:.2f}"),
    ("cpu_ms_per_pub", "CPU ms/pub/worker", "{:.1f}"),
    ("server_us", "server us/dlv", "{:.2f}"),
    ("client_us", "client us/dlv", "{:.2f}"),
    ("redis_us", "redis us/dlv", "{:.3f}"),
    ("lost", "lost", "{:.0f}"),
    ("duplicates", "duplicates", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
]

_COLUMNS = [
    ("connect_s", "connect s", "{:.2f}"),
    ("kb_per_conn", "KB/conn", "{:.2f}"),
    ("last_p50_ms", "to last p50 ms", "{:.1f}"),
    ("last_max_ms", "to last max ms", "{:.1f}"),
    ("latency_p99_ms", "p99 ms", "{:.1f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("lost", "lost", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("client_cpu_share", "client CPU share", "{:.2f}"),
]


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = []
    for name, per_server in results.items():
        lines.append(f"\n{name}: {SCENARIOS[name].connections:,} connections, "
                     f"{SCENARIOS[name].rate:g} publications/s; target {SCENARIOS[name].target}")  # fmt: skip
        columns = (
            _CONNECT_COLUMNS
            if name == "connect"
            else _C_COLUMNS
            if name in C_SCENARIOS
            else _COLUMNS
        )
        lines.append(f"  {'server':<9}" + "".join(f"{title:>17}" for _, title, _ in columns))
        medians: dict[str, dict[str, float]] = {}
        for server, runs in per_server.items():
            med = {k: statistics.median(r[k] for r in runs) for k, _, _ in columns}
            medians[server] = med
            cells = "".join(f"{fmt.format(med[k]):>17}" for k, _, fmt in columns)
            lines.append(f"  {server:<9}{cells}   ({len(runs)} runs)")
        ours = medians.get("gateway")
        if name == "connect":
            for server, med in medians.items():
                if server != "gateway" and ours and ours["connects_per_s"]:
                    lines.append(f"  {server} / gateway: sockets/s "
                                 f"{med['connects_per_s'] / ours['connects_per_s']:.2f}, per server "
                                 f"CPU-s {med['per_cpu_s'] / ours['per_cpu_s']:.2f}")  # fmt: skip
            continue
        for server, med in medians.items():
            if server == "gateway" or ours is None:
                continue
            if server in GATEWAYS or server in VARIANTS:  # the gateway, watched, before, or varied
                lines.append(
                    f"  {server} / gateway: "
                    + ", ".join(
                        f"{title} {med[key] / ours[key]:.3f}"
                        for key, title in (
                            ("connect_s", "connect s"),
                            ("kb_per_conn", "KB/conn"),
                            ("last_p50_ms", "to last p50"),
                            ("deliveries_per_s", "deliveries/s"),
                        )
                        if ours.get(key) and key in med
                    )
                )
                continue
            ratios = []
            for key, title, lower_better in (("kb_per_conn", "memory", True),
                                             ("last_p50_ms", "time to last", True),
                                             ("deliveries_per_s", "deliveries/s", False)):  # fmt: skip
                a, b = ours[key], med[key]
                if a and b and a == a and b == b:
                    ratios.append(f"{title} {(b / a if lower_better else a / b):.1f}x")
            lines.append(f"  gateway vs {server}: " + ", ".join(ratios) + " (>1: gateway better)")
    return "\n".join(lines)


def kernel_floor(n: int) -> dict[str, Any] | None:
    """`bench.sendfloor` pinned like the servers: the least time to reach ``n`` sockets;
    None (and why, on stderr) if it could not be measured: the runs' table is printed
    all the same."""
    argv = [*_pin(0), sys.executable, "-m", "bench.sendfloor", "-n", str(n)]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              check=True)  # fmt: skip
    except subprocess.SubprocessError as exc:
        # The last line of each traceback (the client process's, then its parent's).
        tail = [line for line in (getattr(exc, "stderr", None) or "").splitlines()
                if re.match(r"\w+(Error|Exception)\b", line)]  # fmt: skip
        print(f"kernel floor for {n:,} sockets not measured: {exc}", *tail, sep="\n  ",
              file=sys.stderr)  # fmt: skip
        return None
    floor: dict[str, Any] = json.loads(done.stdout)
    return floor


def kernel_floor_cores(n: int, cores: int = 2) -> dict[str, Any]:
    """The floor for ``n`` sockets over ``cores`` processes, one per core, sending at once."""
    argvs = [[*_pin(cpu), sys.executable, "-m", "bench.sendfloor", "-n", str(n // cores)]
             for cpu in range(cores)]  # fmt: skip
    procs = [subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, text=True) for a in argvs]
    parts = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    return {"sockets": n, "cores": cores, "ms": max(p["ms"] for p in parts), "parts": parts}


def _floor_ratios(
    results: dict[str, dict[str, list[dict[str, float]]]], floor: dict[str, Any]
) -> dict[str, float]:
    out = {}
    for name, per_server in results.items():
        runs = per_server.get("gateway-w2")
        if (
            runs
            and SCENARIOS[name].rate == 1  # one publication in flight: one send each
            and SCENARIOS[name].connections == floor["sockets"]
            and floor["ms"]
        ):
            out[name] = statistics.median(r["last_p50_ms"] for r in runs) / floor["ms"]
    return out


def save_results(name: str, report: dict[str, Any]) -> Path:
    """Write ``report`` and the machine's description to bench/results/<name>-<date>.json."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = RESULTS / f"{name}-{stamp}.json"
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, **report}, indent=1))
    print(f"\nsaved {out}", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--save", action="store_true", help="write bench/results/<name>-<date>.json")
    p.add_argument("--name", default="fanout", help="the saved file's name (default fanout)")
    p.add_argument("--baseline", type=Path, help="a checkout whose gateway runs as 'baseline'")
    p.add_argument(
        "--worker-cpu",
        type=float,
        help="hold each server process (each worker) to "
        "this many cores with a cgroup quota (bench.cpuquota)",
    )
    p.add_argument("--tabulate", type=Path, help="no runs: the table of a saved run's 'runs' "
                   "(or of fanout-partial.json), with floors measured now")  # fmt: skip
    args = p.parse_args()
    if args.baseline is not None:
        BASELINE.append(args.baseline.resolve())
    if args.worker_cpu is not None:
        WORKER_CPU.append(args.worker_cpu)
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [SCENARIOS[s] for s in args.scenarios.split(",") if s]
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "fanout-servers.log"
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    raw: list[dict[str, Any]] = []
    if args.tabulate is not None:
        saved = json.loads(args.tabulate.read_text())
        raw = saved["runs"] if isinstance(saved, dict) else saved
        for run in raw:
            figures = _figures(run["report"])
            results.setdefault(run["scenario"], {}).setdefault(run["server"], []).append(figures)
    for rnd in range(0 if args.tabulate else args.rounds):
        order = servers if rnd % 2 == 0 else list(reversed(servers))
        for scenario in scenarios:
            for server in order:
                if server not in ONLY.get(scenario.name, (server,)):
                    continue
                print(
                    f"round {rnd + 1}: {scenario.name} on {server}...", file=sys.stderr, flush=True
                )
                report = run_scenario(server, scenario, log)
                figures = _figures(report)
                print(f"  {figures}", file=sys.stderr, flush=True)
                results.setdefault(scenario.name, {}).setdefault(server, []).append(figures)
                raw.append(
                    {"round": rnd, "scenario": scenario.name, "server": server, "report": report}
                )
                # Kept as it goes: a failure later does not lose the runs so far.
                (RESULTS / "fanout-partial.json").write_text(json.dumps(raw, indent=1))
    # One process holds at most 20,000 descriptors: 39,000 sockets have only the two-core floor.
    # A floor is one send per socket: it bounds scenarios with one publication in flight.
    timed = [s for s in results if SCENARIOS[s].rate == 1]
    one_core = {SCENARIOS[s].connections for s in timed if s not in ("hold39k", "hold39k-c")}
    floors = [f for f in map(kernel_floor, sorted(one_core)) if f is not None]
    two_cores = [
        kernel_floor_cores(n)
        for n in sorted(
            {
                SCENARIOS[s].connections
                for s in timed
                if any(server == "gateway-w2" for server in results[s])
            }
        )
    ]
    text = (
        table(results)
        + ("\n\nkernel floor (bench.sendfloor, CPU 0): " if floors else "\n")
        + "; ".join(
            f"one send to each of {f['sockets']:,} sockets {f['ms']} ms ({f['us_per_send']} us each)"
            for f in floors
        )
        + "".join(
            f"\nkernel floor on both cores (two bench.sendfloor at once, half the sockets each): "
            f"{f['sockets']:,} sockets {f['ms']} ms"
            + "".join(
                f"; {name}: gateway-w2 to last p50 / floor {ratio:.2f}"
                for name, ratio in _floor_ratios(results, f).items()
            )
            for f in two_cores
        )
    )
    print(text)
    if args.save:
        save_results(args.name, {"floors": floors, "floors_two_cores": two_cores, "runs": raw,
                                 "worker_cpu": args.worker_cpu, "table": text})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
