"""Connect rate: WebSocket handshakes per server CPU-second, with a client that is not the bottleneck.

`burst` starts ``bench/connclient.c`` (compiled with ``cc -O2`` on first use,
into a cache directory) pinned to its own core: one thread and one epoll
that open ``n`` sockets with at most ``window`` handshakes in flight, each
with its own HS256 token (minted here beforehand), wait for the 101, send
one subscribe frame and wait for its reply. Around the burst it reads from
``/proc`` the CPU seconds of the server's processes (a supervisor's workers
included) and the client's, so the report says both how fast the server
handshakes per CPU-second it spent and how busy the client's core was: a
client whose CPU share is well below 1 was waiting for the server, not the
other way round.

``python -m bench.fanout --scenarios connect`` runs it against fresh
servers (docs/performance.md); alone, against a running gateway::

    .venv/bin/python -m bench.connrate --port 8888 --secret "$JWT_SECRET" --pid <gateway pid> -n 10000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt

__all__ = ["burst", "client_binary", "process_tree_cpu"]

SOURCE = Path(__file__).resolve().parent / "connclient.c"
#: Handshakes in flight: at 5,000 a second, 500 in flight is 100 ms each (Little's law).
WINDOW = 500


def client_binary() -> Path:
    """``connclient`` built from its source (cached by the source's hash)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"gateway-bench-connclient-{digest}"
    if not out.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("bench/connrate.py needs a C compiler (cc or gcc) on PATH")
        part = out.with_suffix(".part")
        subprocess.run([cc, "-O2", "-o", str(part), str(SOURCE)], check=True)
        part.rename(out)
    return out


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in task.read_text().split()]
        except OSError:
            pass
    return kids


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, from ``/proc``."""
    return _cpu(pid) + sum(process_tree_cpu(k) for k in _children(pid))


def mint_tokens(secret: str, n: int, channel: str) -> list[str]:
    now = int(time.time())
    claims = {"channels": [channel], "iat": now, "exp": now + 3600}
    return [jwt.encode({**claims, "sub": f"conn-{i}"}, secret, algorithm="HS256") for i in range(n)]


def burst(
    port: int,
    server_pid: int,
    secret: str,
    n: int,
    channel: str,
    *,
    window: int = WINDOW,
    pin: list[str] | None = None,
    hold: float = 0.0,
) -> dict[str, Any]:
    """Open ``n`` subscribed sockets at once; the client's report with both sides' CPU seconds.

    The sockets stay open ``hold`` seconds after the last one subscribed, then close.
    """
    binary = client_binary()
    with tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False) as f:
        f.write("\n".join(mint_tokens(secret, n, channel)) + "\n")
    try:
        argv = [*(pin or []), str(binary), "127.0.0.1", str(port), str(n), str(window), f.name,
                channel]  # fmt: skip
        server_before = process_tree_cpu(server_pid)
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        server_cpu = process_tree_cpu(server_pid) - server_before
        if not line:
            raise RuntimeError("connclient failed (see its stderr)")
        report: dict[str, Any] = json.loads(line)
        time.sleep(hold)
        client.stdin.close()
        client.wait(60)
    finally:
        os.unlink(f.name)
    seconds = report["seconds"]
    report["server_cpu_seconds"] = round(server_cpu, 3)
    report["per_second"] = round(report["subscribed"] / seconds, 1) if seconds else 0.0
    report["per_server_cpu_second"] = (
        round(report["subscribed"] / server_cpu, 1) if server_cpu else float("nan")
    )
    report["server_cpu_share"] = round(server_cpu / seconds, 3) if seconds else 0.0
    report["client_cpu_share"] = round(report["client_cpu_seconds"] / seconds, 3) if seconds else 0
    return report


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--secret", required=True, help="the gateway's JWT_SECRET")
    p.add_argument("--pid", type=int, required=True, help="the gateway's process (its workers too)")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--window", type=int, default=WINDOW, help="handshakes in flight")
    p.add_argument("--channel", default="connrate")
    p.add_argument("--cpu", type=int, help="pin the client to this CPU")
    args = p.parse_args()
    pin = ["taskset", "-c", str(args.cpu)] if args.cpu is not None else None
    report = burst(args.port, args.pid, args.secret, args.n, args.channel, window=args.window,
                   pin=pin)  # fmt: skip
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
