"""Slow readers of large HTTP answers, against ``ANSWER_BUFFER_TOTAL_BYTES``.

Starts ``python -m gateway`` (one worker, embedded core on the PostgreSQL
at ``DATABASE_URL``, its own schema), creates 100 large projects (a page of
100 is ~9.6 MB of JSON), then opens ``--connections`` kept-alive
connections from an ordinary account, each with a 4 KiB receive buffer:
one ``GET /api/projects?limit=1`` read whole (the connection is then served
off Tornado, core/fastrest.py), then ``GET /api/projects?limit=100`` of
which it reads nothing. ``WRITE_TIMEOUT`` is raised to 600 s, as if each
read the 2 KiB/s it allows. It prints the gateway's RSS (``/proc/PID``)
before and once the last page is asked, ``gateway_answer_buffered_bytes``
and the connections reset by the budget.

Runs (each a new gateway, the projects made anew): ``budget`` (the default
64 MiB), ``unbudgeted`` (a budget of 1 TB that never binds: what the budget
saves) and ``heap`` (the budget, with large allocations from the heap, as
glibc's dynamic threshold has them once a block of their size was freed:
``MALLOC_MMAP_THRESHOLD_`` at 32 MiB, which `core.infra.runtime.run`
leaves as the operator set it: what `return_large_allocations` saves).

Rerun (from the repository root; PostgreSQL on 127.0.0.1:5432)::

    .venv/bin/python -m bench.answers --save
    .venv/bin/python -m bench.answers --connections 40 --runs budget,unbudgeted
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt

from bench.rest import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-answers-secret-0123456789abcdef"
SCHEMA = "bench_answers"
MIB = 1 << 20

#: run -> extra environment of the gateway.
RUNS: dict[str, dict[str, str]] = {
    "budget": {},
    "unbudgeted": {"ANSWER_BUFFER_TOTAL_BYTES": str(10**12)},
    "heap": {"MALLOC_MMAP_THRESHOLD_": str(32 * MIB)},
}

_TITLE = "\x01" * 200
#: A project of the largest kind, each character escaped six times over: ~96 KB of JSON.
LARGE_PROJECT = {
    "name": _TITLE,
    "description": "\x01" * 5000,
    "owner_email": "ada@example.com",
    "budget": 1,
    "starts_on": "2026-01-01",
    "milestones": [{"title": _TITLE, "due": "2026-06-01"}] * 50,
}


def _token(sub: str, **extra: Any) -> str:
    claims = {"sub": sub, "channels": [], "exp": int(time.time()) + 3600, **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _gateway(port: int, extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(
        {
            "JWT_SECRET": SECRET,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "WORKERS": "1",
            "DATABASE_URL": os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
            "DATABASE_SCHEMA": SCHEMA,
            "MIGRATE_ON_START": "true",
            "WRITE_TIMEOUT": "600",
            "RATE_REST": "off",
            "LOG_LEVEL": "warning",
            **extra,
        }
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    wait_ready(proc, f"http://127.0.0.1:{port}/healthz", "", log)
    return proc


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _request(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _read_answer(sock: socket.socket) -> int:
    """Read one answer off a blocking ``sock``; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def _empty_projects() -> None:
    import asyncio

    import asyncpg

    async def truncate() -> None:
        conn = await asyncpg.connect(
            os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")
        )
        try:
            await conn.execute(f'truncate "{SCHEMA}".projects restart identity cascade')
        finally:
            await conn.close()

    asyncio.run(truncate())


def _create_projects(port: int, count: int) -> None:
    admin = _token("bench-admin", role="admin")
    body = json.dumps(LARGE_PROJECT).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(count):
            sock.sendall(_request("POST", "/api/projects", admin, body))
            status = _read_answer(sock)
            if status != 201:
                raise RuntimeError(f"POST /api/projects: {status}")


def run(name: str, connections: int, logs: Path) -> dict[str, Any]:
    port = free_port()
    proc = _gateway(port, RUNS[name], logs / f"{name}.log")
    socks: list[socket.socket] = []
    try:
        _empty_projects()
        _create_projects(port, 100)
        reader = _token("bench-reader")
        time.sleep(1)
        before = _rss_mb(proc.pid)
        for _ in range(connections):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(_request("GET", "/api/projects?limit=1", reader))
            if _read_answer(sock) != 200:
                raise RuntimeError("GET /api/projects?limit=1 failed")
            sock.sendall(_request("GET", "/api/projects?limit=100", reader))
            socks.append(sock)
        time.sleep(3)
        return {
            "run": name,
            "connections": connections,
            "rss_before_mb": round(before, 1),
            "rss_after_mb": round(_rss_mb(proc.pid), 1),
            "held_mb": round(_metric(port, "gateway_answer_buffered_bytes") / 1e6, 1),
            "reset": int(_metric(port, "gateway_answer_budget_resets_total")),
        }
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | connections | RSS before (MB) | RSS after | growth | held unsent (MB) | reset |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        growth = row["rss_after_mb"] - row["rss_before_mb"]
        lines.append(
            f"| {row['run']} | {row['connections']} | {row['rss_before_mb']:.0f} | "
            f"{row['rss_after_mb']:.0f} | +{growth:.0f} | {row['held_mb']:.0f} | {row['reset']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=120)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write bench/results/answers-*.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-answers-") as tmp:
        for _ in range(args.rounds):
            for name in args.runs.split(","):
                row = run(name, args.connections, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.save:
        out = ROOT / "bench" / "results" / f"answers-{time.strftime('%Y-%m-%d')}.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
