"""Reconnect storm: a gateway holding thousands of sockets is SIGKILLed mid-stream.

Two gateway processes on one Redis; the shipped load tool opens
``--channels`` x ``--group`` sockets on the first (each on its channel and on
the shared ``everyone``, all history channels), publishes ``--rate``
publications a second through Redis, SIGKILLs the first gateway after 2 s,
and its clients reconnect with jittered backoff to the second and recover
with ``since``. The report says whether every socket came back and got
every publication exactly once, and how many refusals (``110``) there were.

Rerun (from the repository root; Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.storm --channels 80 --group 100 --rate 100 --messages 1500
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-storm-fixed-secret-0123456789abcdef"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _gateway(port: int, prefix: str, log: Path) -> subprocess.Popen[bytes]:
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
        "HISTORY_CHANNELS": "load:*,everyone",
        "HISTORY_SIZE": "1000",
        "LOG_LEVEL": "warning",
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    }
    env["MIGRATE_ON_START"] = "true"  # a bench database: migrated at start, as `make run`
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gateway on {port} did not start: {log.read_text()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=80)
    p.add_argument("--group", type=int, default=100)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--messages", type=int, default=1500)
    p.add_argument("--kill-after", type=float, default=2.0)
    args = p.parse_args()
    prefix = f"storm{uuid.uuid4().hex[:6]}:"
    with tempfile.TemporaryDirectory() as tmp:
        ports = [_free_port(), _free_port()]
        procs = [_gateway(port, prefix, Path(tmp) / f"gw-{port}.log") for port in ports]
        try:
            tool = [
                sys.executable, "-m", "gateway.loadtest", "--secret", SECRET, "--prefix", prefix,
                "--urls", ",".join(f"http://127.0.0.1:{port}" for port in ports),
                "--channels", str(args.channels), "--group", str(args.group),
                "--broadcast", "everyone", "--rate", str(args.rate),
                "--messages", str(args.messages), "--publish", "redis",
                "--history-channels", "load:*,everyone",
                "--kill-after", str(args.kill_after), "--kill-pid", str(procs[0].pid),
                "--backoff", "1",
            ]  # fmt: skip
            status = subprocess.run(tool, cwd=ROOT).returncode
            refusals = (Path(tmp) / f"gw-{ports[1]}.log").read_text().count("command Sub failed")
            print(f"subscriptions refused by the surviving gateway: {refusals}")
            return status or (1 if refusals else 0)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(15)


if __name__ == "__main__":
    sys.exit(main())
