"""Long-poll benchmark: N long-poll sessions on one channel, one broadcast a second.

The gateway (``python -m gateway``, one worker, Redis broker, JWT HS256) is
pinned to CPU 0 and the load tool (``python -m gateway.loadtest --mode
longpoll``) to CPU 1, as /work/notes/lp_run.sh does. Each run opens N
sessions (each one token, subscribed to one channel), publishes 10 messages
at 1/s and reports, per N, the medians over ``--rounds``:

* time from a publication to its last subscriber (p50, max) [target for
  10,000 sessions: p50 <= 1.5 s];
* deliveries per second, server memory per session, lost messages, failed
  or refused sessions (``110 UNAVAILABLE`` and the like) [target: none];
* CPU seconds used by the server and by the load tool during the run, to
  tell which side limits (a side near the run's wall time is saturated),
  and the seconds the server was ready to run but waited for its CPU
  (``/proc/<pid>/schedstat``): other processes on a shared machine.

Rerun (from the repository root; needs Redis on 127.0.0.1:6379 and
``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.longpoll --sessions 2000 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.fanout import JWT_SECRET, ROOT, _free_port, _pin

__all__ = ["main", "run"]


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waited_seconds(pid: int) -> float:
    """Seconds the process's main thread has spent runnable but waiting for a CPU (schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(sessions: int, log: Path) -> dict[str, Any]:
    """One run with ``sessions`` long-poll sessions; the load tool's report and CPU figures."""
    port = _free_port()
    prefix = f"lpbench{os.getpid()}-{time.monotonic_ns()}:"
    env = {**os.environ, "JWT_SECRET": JWT_SECRET, "PYTHONUNBUFFERED": "1",
           "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
           "REDIS_PREFIX": prefix, "PORT": str(port), "HOST": "127.0.0.1", "WORKERS": "1",
           "RATE_CONNECT_IP": "off", "MAX_PENDING_PER_IP": "1000000", "RATE_REST": "off",
           "MAX_LONGPOLL_SESSIONS": str(2 * sessions), "LONGPOLL_MAX_PER_USER": "100000",
           "LOG_LEVEL": "warning",
           "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")}  # fmt: skip
    env["MIGRATE_ON_START"] = "true"  # a bench database: migrated at start, as `make run`
    with open(log, "ab") as out:
        server = subprocess.Popen([*_pin(0), sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                  stdout=out, stderr=out)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start; see {log}") from None
                time.sleep(0.2)
        time.sleep(1)
        server_cpu, client_cpu, started = (
            _cpu_seconds(server.pid),
            _children_cpu(),
            time.monotonic(),
        )
        server_wait = _waited_seconds(server.pid)
        argv = [
            *_pin(1), sys.executable, "-W", "ignore", "-m", "gateway.loadtest", "--json", "--quiet",
            "--url", f"http://127.0.0.1:{port}", "--mode", "longpoll", "--secret", JWT_SECRET,
            "--prefix", prefix, "-n", str(sessions), "--rate", "1", "--messages", "10",
            "--server-pid", str(server.pid), "--timeout", "60",
        ]  # fmt: skip
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - started
        server_cpu = _cpu_seconds(server.pid) - server_cpu
        server_wait = _waited_seconds(server.pid) - server_wait
        client_cpu = _children_cpu() - client_cpu
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if not done.stdout.strip():
        raise RuntimeError(f"load tool failed: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    c, d = report["connections"], report["deliveries"]
    per = report["server_memory"]["bytes_per_connection"]
    return {
        "last_p50_ms": report["completion"]["p50_ms"],
        "last_max_ms": report["completion"]["max_ms"],
        "deliveries_per_s": d["per_second"],
        "kb_per_session": round(per / 1000, 2) if per is not None else float("nan"),
        "lost": d["lost"],
        "failed": c["failed"],
        "server_cpu_s": round(server_cpu, 1),
        "server_wait_s": round(server_wait, 1),
        "client_cpu_s": round(client_cpu, 1),
        "wall_s": round(wall, 1),
    }


_COLUMNS = [
    ("last_p50_ms", "to last p50 ms", "{:.0f}"),
    ("last_max_ms", "to last max ms", "{:.0f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("kb_per_session", "KB/session", "{:.2f}"),
    ("lost", "lost", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("server_cpu_s", "server CPU s", "{:.1f}"),
    ("server_wait_s", "server waited s", "{:.1f}"),
    ("client_cpu_s", "client CPU s", "{:.1f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


def table(results: dict[int, list[dict[str, Any]]]) -> str:
    lines = ["sessions" + "".join(f"{title:>16}" for _, title, _ in _COLUMNS)]
    for sessions, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k, _, _ in _COLUMNS}
        cells = "".join(f"{fmt.format(med[k]):>16}" for k, _, fmt in _COLUMNS)
        lines.append(f"{sessions:>8,}{cells}   (median of {len(runs)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log", type=Path, default=Path("/tmp/bench-longpoll.log"))
    args = p.parse_args(argv)
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sessions}
    for _ in range(args.rounds):
        for n in args.sessions:
            figures = run(n, args.log)
            print(n, figures, file=sys.stderr, flush=True)
            results[n].append(figures)
    print(table(results))


if __name__ == "__main__":
    main()
