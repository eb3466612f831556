"""Slow consumers: sockets that stop reading, against the gateway's send budget.

Starts ``python -m gateway`` (one worker, Redis broker) with a process-wide
send budget (``SEND_BUFFER_TOTAL_BYTES``), runs the load tool against it
with some sockets stalled (``--stall``: they stop reading once subscribed
and stay open), samples the gateway's RSS (``/proc/PID/status``) every
100 ms and its ``gateway_send_buffered_bytes`` from ``/metrics`` as often as
it answers, and prints, per run: RSS before publishing, its peak, the
peak's growth, the peak of the buffered sum, the sockets shed (4001) and
dropped as dead peers, and the readers' account (lost, late, exactly once).

Scenarios (each run three ways: ``baseline``, the readers alone, no
laggard opened (what the fan-out itself needs); ``budget``, with the
laggards and the default budget of 256 MiB; ``unbudgeted``, the same with a
budget of 4 GiB that never binds, to show what the budget saves). A run is
stopped if the machine's TCP memory (shared with everyone on it) passes 60%
of its pressure threshold (``net.ipv4.tcp_mem``).

``stalled``
    10,000 sockets on one channel, 1,000 of them stalled; 16 KiB
    publications at 1/s (16 KiB/s a socket, 160 MB/s of fan-out: this shared
    2-core machine sustains ~280 MB/s) for 90 s, so 1,000 stalled
    buffers would hold 1,000 x 1 MiB without the budget. ``PING_INTERVAL``
    is raised to 120 s so that liveness does not drop the stalled sockets
    before their buffers fill: the budget alone is measured.
``fast``
    500 sockets on one channel: 300 stalled and 100 slow (reading 256 KiB/s)
    receiving 1 MiB/s each (32 KiB publications at 32/s, for 10 s), and 100
    readers: the laggards' buffers fill within ~1-2 s, far sooner than
    liveness (the default 25 + 10 s) would drop them.

Laggards connect with a network path's MSS and a 16 KiB receive buffer
(``--laggard-mss 1448 --laggard-rcvbuf 16384``): on loopback each stalled
socket would otherwise hide ~4 MB in the kernel before the gateway's own
buffer grows (and 1,000 of them would press on the machine's TCP memory).

Rerun (from the repository root; Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.slow --save
    .venv/bin/python -m bench.slow --scenario fast --runs budget
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fanout import save_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-slow-fixed-secret-0123456789abcdef"
MIB = 1 << 20


def _tcp_guard() -> int:
    """Pages of TCP memory (the whole machine's) past which a run is stopped: 60% of pressure."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1]) * 6 // 10
    except (OSError, ValueError, IndexError):
        return 1 << 62


_TCP_GUARD = _tcp_guard()


@dataclass(frozen=True)
class Scenario:
    sockets: int
    stalled: int
    payload: int  # bytes of padding per publication
    rate: float  # publications a second
    messages: int
    env: tuple[tuple[str, str], ...] = ()
    slow: int = 0
    slow_rate: float = 0.0  # bytes a second a slow socket reads
    processes: int = 2  # the load tool's: one process cannot read 100 MB/s on a busy machine


SCENARIOS = {
    "stalled": Scenario(10_000, 1_000, 16 * 1024, 1, 90, (("PING_INTERVAL", "120"),)),
    "fast": Scenario(500, 300, 32 * 1024, 32, 320, slow=100, slow_rate=256 * 1024),
}
#: run name -> (laggards opened?, SEND_BUFFER_TOTAL_BYTES); without laggards, only the readers
#: are opened: what the fan-out to them needs.
RUNS = {
    "baseline": (False, 256 * MIB),
    "budget": (True, 256 * MIB),
    "unbudgeted": (True, 4096 * MIB),
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _gateway(
    port: int, prefix: str, budget: int, extra: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JWT_SECRET": SECRET,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "REDIS_PREFIX": prefix,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WORKERS": "1",
        "RATE_CONNECT_IP": "off",
        "MAX_PENDING_PER_IP": "1000000",  # the load tool is one address
        "SEND_BUFFER_TOTAL_BYTES": str(budget),
        "LOG_LEVEL": "warning",  # a line per slow consumer, with the reason
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
        **extra,
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gateway on {port} did not start: see {log}")


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


class Sampler:
    """RSS every 100 ms from /proc; the gateway's /metrics as often as it answers."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.rss: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self.tcp_pages: list[tuple[float, int]] = []  # the machine's TCP memory, pages
        self.fds: list[tuple[float, int]] = []  # open descriptors, every second
        self.buffered: list[tuple[float, float]] = []  # gateway_send_buffered_bytes
        self.counters: dict[str, float] = {}
        self.stop = threading.Event()
        self.tripped = False
        self.on_pressure: Callable[[], None] = lambda: None
        self.start = time.monotonic()
        self.threads = [threading.Thread(target=self._proc, daemon=True),
                        threading.Thread(target=self._metrics, daemon=True)]  # fmt: skip

    def __enter__(self) -> Sampler:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _proc(self) -> None:
        while not self.stop.wait(0.1):
            now = time.monotonic() - self.start
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            found = re.search(r"VmRSS:\s+(\d+) kB", status)
            if found:
                self.rss.append((now, int(found.group(1)) * 1024))
            if len(self.rss) % 10 == 1:
                try:
                    self.fds.append((now, len(os.listdir(f"/proc/{self.pid}/fd"))))
                except OSError:
                    pass
            tcp = re.search(r"^TCP:.* mem (\d+)", Path("/proc/net/sockstat").read_text(), re.M)
            if tcp:
                self.tcp_pages.append((now, int(tcp.group(1))))
                if int(tcp.group(1)) > _TCP_GUARD and not self.tripped:
                    self.tripped = True  # other people's sockets share this memory: stop
                    self.on_pressure()

    def _metrics(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    text = response.read().decode()
            except OSError:
                self.stop.wait(0.1)
                continue
            self.buffered.append((began - self.start, _metric(text, "gateway_send_buffered_bytes")))
            self.counters = {
                "slow_consumers": _metric(text, "gateway_slow_consumer_disconnects_total"),
                "dead_peers": _metric(text, "gateway_dead_peer_disconnects_total"),
            }
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - began)))


def run(
    name: str, scenario: str, run_name: str, log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    sc = SCENARIOS[scenario]
    keep_stalled, budget = RUNS[run_name]
    stalled = sc.stalled if keep_stalled else 0
    slow = sc.slow if keep_stalled else 0
    sockets = sc.sockets - (sc.stalled + sc.slow - stalled - slow)
    port = _free_port()
    prefix = f"slow{uuid.uuid4().hex[:6]}:"
    mark = log.stat().st_size if log.exists() else 0
    proc = _gateway(port, prefix, budget, {**dict(sc.env), **(env or {})}, log)
    try:
        tool = [
            sys.executable, "-m", "gateway.loadtest", "--json", "--quiet",
            "--url", f"http://127.0.0.1:{port}", "--secret", SECRET, "--prefix", prefix,
            "-n", str(sockets), "--stall", str(stalled),
            "--slow", str(slow), "--slow-rate", str(sc.slow_rate),
            "--laggard-mss", "1448", "--laggard-rcvbuf", "16384", "--processes", str(sc.processes),
            "--publish", "redis", "--rate", str(sc.rate), "--messages", str(sc.messages),
            "--payload-bytes", str(sc.payload), "--server-pid", str(proc.pid),
            "--drain", "30", "--late-wait", "30", "--laggard-wait", "15",
        ]  # fmt: skip
        with Sampler(proc.pid, port) as sampler:
            tool_proc = subprocess.Popen(
                tool, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            sampler.on_pressure = tool_proc.terminate
            out, err = tool_proc.communicate()
            time.sleep(1.0)  # the last /metrics after the tool's sockets closed
        if sampler.tripped:
            raise RuntimeError("stopped: the machine's TCP memory neared its pressure threshold")
        if not out.strip():
            raise RuntimeError(f"the load tool printed no report: {err[-2000:]}")
        report = json.loads(out)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(log, "rb") as lines:
        lines.seek(mark)
        text = lines.read().decode(errors="replace")
    reasons = {"send buffer full": text.count("(send buffer full)"),
               "over the budget": text.count("over SEND_BUFFER_TOTAL_BYTES")}  # fmt: skip
    before = report["server_memory"]["rss_after_bytes"]  # after connecting, before publishing
    peak = max(v for _, v in sampler.rss)
    tcp0 = sampler.tcp_pages[0][1] if sampler.tcp_pages else 0
    return {
        "name": name,
        "scenario": scenario,
        "run": run_name,
        "sockets": sockets,
        "stalled": stalled,
        "slow": slow,
        "slow_rate": sc.slow_rate,
        "budget_bytes": budget,
        "payload_bytes": sc.payload,
        "rate": sc.rate,
        "messages": sc.messages,
        "env": {**dict(sc.env), **(env or {})},
        "rss_before_publishing": before,
        "rss_peak": peak,
        "rss_growth": peak - before,
        "rss_end": sampler.rss[-1][1],
        "buffered_peak": max((v for _, v in sampler.buffered), default=0.0),
        "metrics_samples": len(sampler.buffered),
        "tcp_mem_peak_bytes": (max(v for _, v in sampler.tcp_pages) - tcp0)
        * os.sysconf("SC_PAGE_SIZE"),
        "counters": sampler.counters,
        "shed_reasons": reasons,
        "exit_status": tool_proc.returncode,
        "load": os.getloadavg(),
        "report": report,
        "rss_series": sampler.rss[::5],  # every 0.5 s
        "buffered_series": sampler.buffered,
    }


def _laggards(lag: dict[str, Any] | None, messages: int) -> str:
    if not lag:
        return "-"
    closed = sum(lag["closed"].values())
    return (
        f"{lag['subscribed']:,}: {closed:,} read their 4001, {lag['dropped']:,} dropped, "
        f"{lag['open_at_end']:,} open; got {lag['publications']['median']:g} of {messages} "
        f"(median), {lag['seconds_subscribed']['median']:g} s"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | sockets | budget | RSS before | peak | growth | buffered peak | TCP mem peak | "
        "shed 4001 | dead peers | readers exact | lost / late | stalled | slow | load |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        rep = r["report"]
        d, sk = rep["deliveries"], rep["sockets"]
        lag = rep.get("laggards", {})
        lines.append(
            f"| {r['scenario']} {r['run']} | {r['sockets']:,} | "
            f"{r['budget_bytes'] // MIB:,} MiB | {r['rss_before_publishing'] / MIB:,.0f} MiB | "
            f"{r['rss_peak'] / MIB:,.0f} MiB | **{r['rss_growth'] / MIB:,.0f} MiB** | "
            f"{r['buffered_peak'] / MIB:,.0f} MiB | {r['tcp_mem_peak_bytes'] / MIB:,.0f} MiB | "
            f"{r['counters'].get('slow_consumers', 0):,.0f} ({r['shed_reasons']['over the budget']:,} "
            "by the budget) | "
            f"{r['counters'].get('dead_peers', 0):,.0f} | {sk['exact']:,} of {sk['accounted']:,} | "
            f"{d['lost']:,} / {d['late']:,} | {_laggards(lag.get('stalled'), r['messages'])} | "
            f"{_laggards(lag.get('slow'), r['messages'])} | {r['load'][0]:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="(repeatable; default all)"
    )
    p.add_argument(
        "--runs", default="baseline,budget,unbudgeted", help="comma list of " + ", ".join(RUNS)
    )
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more environment for the gateway (repeatable), e.g. MALLOC_MMAP_THRESHOLD_=65536",
    )
    p.add_argument("--save", action="store_true", help="write bench/results/slow-<date>.json")
    p.add_argument("--tag", default="", help="with --save: slow-<date>-<tag>.json")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "slow-servers.log"
    rows = []
    for scenario in args.scenario or list(SCENARIOS):
        for run_name in [r for r in args.runs.split(",") if r]:
            print(
                f"{scenario} {run_name}: running (load {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
            env = dict(item.split("=", 1) for item in args.gateway_env)
            row = run(f"{scenario}-{run_name}", scenario, run_name, log, env)
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.save:
        save_results("slow" + ("-" + args.tag if args.tag else ""), {"runs": rows, "table": text})
    return 0 if all(r["report"]["deliveries"]["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
