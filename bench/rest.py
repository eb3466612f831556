"""REST benchmark: our core against an idiomatic FastAPI peer, in the same run.

What it measures: requests/s and p99 latency, from wrk (one thread, ``--latency``,
keep-alive connections), of two endpoints served by our core (``python -m core
serve``) and by the FastAPI + pydantic v2 + asyncpg peer in
``bench/peers/fastapi_projects.py`` (uvicorn, one worker, uvloop, httptools):

* ``GET /api/projects?limit=20``: one keyset page of 20 projects as JSON;
* ``POST /api/projects``: validate a realistic project body, insert it, 201.

Both servers use one PostgreSQL schema (``--schema``), migrated by our core
(or by applying ``core/migrations/*.sql`` with ``--self-migrate``) and reseeded
with 2,000 projects at the start of every round. Each server is pinned to CPU 1
and wrk to CPU 0 with ``taskset``; PostgreSQL is not pinned. Every round runs,
per endpoint and for each server (the order alternates between rounds), a 2 s
warm-up and then the measured run. The table shows medians over rounds; a run
with any non-2xx response or socket error is invalid and left out of them.

Rerun (from the repository root; needs ``wrk`` and ``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.rest --duration 10 --connections 64 --rounds 3 --save
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import jwt

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "core" / "migrations"
RESULTS = ROOT / "bench" / "results"
JWT_SECRET = "bench-rest-fixed-secret-0123456789abcdef"
SEED_ROWS = 2000
WARMUP_S = 2
READY_TIMEOUT_S = 30.0
SERVER_CPU = "1"
WRK_CPU = "0"
COPY_COLUMNS = (
    "name",
    "description",
    "owner_email",
    "budget",
    "status",
    "tags",
    "starts_on",
    "ends_on",
    "milestones",
)
POST_BODY: dict[str, Any] = {
    "name": "Harbour district retrofit",
    "description": (
        "Retrofit the harbour district's pumping stations with variable-speed drives, "
        "replace the telemetry on the east quay and publish a public dashboard of flow "
        "rates, so that the council can plan the next phase on measured data."
    ),
    "owner_email": "ines.moreau@example.org",
    "budget": 12500.5,
    "status": "active",
    "tags": ["infrastructure", "water", "telemetry"],
    "starts_on": "2025-03-01",
    "ends_on": "2025-11-30",
    "milestones": [
        {"title": "Survey of the pumping stations", "due": "2025-04-15", "done": True},
        {"title": "Drives installed on the east quay", "due": "2025-08-01", "done": False},
        {"title": "Dashboard published", "due": "2025-11-15", "done": False},
    ],
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    wrk_args: tuple[str, ...]


@dataclass(frozen=True)
class Server:
    key: str
    label: str
    argv: tuple[str, ...]
    env: dict[str, str]


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run reports: throughput, latency percentiles, failures."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def valid(self) -> bool:
        return self.non_2xx == 0 and self.socket_errors == 0


@dataclass(frozen=True)
class Run(WrkResult):
    round: int
    server_cpu: float
    wrk_cpu: float


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_schema(url: str, schema: str, self_migrate: bool) -> None:
    """Create the schema; with ``self_migrate``, apply our migrations if it has no projects."""
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        await conn.execute(f"create schema if not exists {quote_ident(schema)}")
        if self_migrate and await conn.fetchval("select to_regclass('projects')") is None:
            async with conn.transaction():
                for migration in sorted(MIGRATIONS.glob("*.sql")):
                    await conn.execute(migration.read_text())
    finally:
        await conn.close()


def seed_records(count: int) -> list[tuple[Any, ...]]:
    rng = random.Random(20250301)
    firsts = ["ines", "tomas", "aiko", "liam", "sara", "noah", "mei", "omar", "eva", "ravi"]
    lasts = ["moreau", "novak", "tanaka", "byrne", "lind", "okafor", "chen", "haddad", "costa"]
    domains = ["example.org", "example.com", "example.net"]
    subjects = ["Harbour", "Library", "Transit", "Clinic", "School", "Bridge", "Park", "Archive"]
    works = ["retrofit", "migration", "redesign", "audit", "expansion", "rollout", "survey"]
    words = (
        "plan the work with the teams on site and report progress weekly to the board while "
        "keeping costs inside the approved budget and the public informed of every change"
    ).split()
    tags = ["infrastructure", "water", "telemetry", "design", "research", "ops", "public", "q3"]
    records: list[tuple[Any, ...]] = []
    for i in range(count):
        starts_on = date(2024, 1, 1) + timedelta(days=rng.randrange(730))
        ends_on = starts_on + timedelta(days=rng.randrange(60, 400))
        span = (ends_on - starts_on).days
        milestones = [
            {
                "title": f"Phase {n + 1}: {' '.join(rng.sample(words, 4))}",
                "due": (starts_on + timedelta(days=span * (n + 1) // 3)).isoformat(),
                "done": rng.random() < 0.4,
            }
            for n in range(3)
        ]
        records.append(
            (
                f"{rng.choice(subjects)} {rng.choice(works)} {i + 1}",
                " ".join(rng.choices(words, k=34))[:200].capitalize() + ".",
                f"{rng.choice(firsts)}.{rng.choice(lasts)}@{rng.choice(domains)}",
                Decimal(rng.randrange(100_000, 500_000_000)).scaleb(-2),
                rng.choices(["draft", "active", "done"], weights=[2, 5, 3])[0],
                rng.sample(tags, rng.randint(1, 4)),
                starts_on,
                ends_on if rng.random() < 0.9 else None,
                json.dumps(milestones),
            )
        )
    return records


async def reseed(url: str, schema: str, records: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        async with conn.transaction():
            await conn.execute("truncate projects restart identity")
            await conn.copy_records_to_table(
                "projects", records=records, columns=COPY_COLUMNS, schema_name=schema
            )
    finally:
        await conn.close()


def mint_token() -> str:
    # An admin: writes any project without an ownership lookup, the peer's work.
    # (A user's POST adds one indexed lookup of its e-mail: docs/security.md.)
    claims = {"sub": "bench", "role": "admin", "channels": ["*"], "exp": int(time.time()) + 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(proc: subprocess.Popen[bytes], url: str, token: str, log: Path) -> None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not 200 after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()}")


def pinned(cpu: str | None, argv: list[str] | tuple[str, ...]) -> list[str]:
    """``argv`` run on CPU ``cpu`` with ``taskset``; as it is when ``cpu`` is None."""
    return [*argv] if cpu is None else ["taskset", "-c", cpu, *argv]


@contextmanager
def serve(
    server: Server, port: int, token: str, logs: Path, cpu: str | None = SERVER_CPU
) -> Iterator[subprocess.Popen[bytes]]:
    """``server`` started (on CPU ``cpu``), once it answers an authenticated GET; stopped after."""
    log = logs / f"{server.key}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(cpu, server.argv),
            cwd=ROOT,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/api/projects?limit=1", token, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_LATENCY_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(
    url: str, endpoint: Endpoint, duration: float, connections: int, cpu: str | None = WRK_CPU
) -> str:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    argv += [*endpoint.wrk_args, url + endpoint.path]
    return subprocess.run(pinned(cpu, argv), capture_output=True, text=True, check=True).stdout


def parse_wrk(out: str) -> WrkResult:
    """The figures of wrk's ``--latency`` report."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    p50, p99 = (
        re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE) for p in (50, 99)
    )
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests_per_s=float(rps[1]),
        p50_ms=float(p50[1]) * _LATENCY_UNITS_MS[p50[2]],
        p99_ms=float(p99[1]) * _LATENCY_UNITS_MS[p99[2]],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(map(int, errors.groups())) if errors else 0,
    )


def measure(
    url: str, endpoint: Endpoint, server_pid: int, duration: int, connections: int, round_: int
) -> Run:
    started, server_before, wrk_before = (
        time.monotonic(),
        cpu_seconds(server_pid),
        children_cpu_seconds(),
    )
    result = parse_wrk(wrk(url, endpoint, duration, connections))
    elapsed = time.monotonic() - started
    server_cpu = (cpu_seconds(server_pid) - server_before) / elapsed
    wrk_cpu = (children_cpu_seconds() - wrk_before) / elapsed
    return Run(
        **asdict(result),
        round=round_,
        server_cpu=round(server_cpu, 3),
        wrk_cpu=round(wrk_cpu, 3),
    )


def make_endpoints(token: str, tmp: Path) -> list[Endpoint]:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [==[{json.dumps(POST_BODY)}]==]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    return [
        Endpoint(
            "GET /api/projects?limit=20",
            "/api/projects?limit=20",
            ("-H", f"Authorization: Bearer {token}"),
        ),
        Endpoint("POST /api/projects", "/api/projects", ("-s", str(script))),
    ]


def base_env(url: str, schema: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return env | {"DATABASE_URL": url, "DATABASE_SCHEMA": schema, "JWT_SECRET": JWT_SECRET}


def make_servers(only: str | None, env: dict[str, str], ports: dict[str, int]) -> list[Server]:
    core = Server(
        "core",
        "core",
        (sys.executable, "-m", "core", "serve"),
        # One token sends every request: the per-identity REST limit is off, as
        # the peer has none (equal work); everything else runs as shipped.
        env
        | {
            "PORT": str(ports["core"]),
            "HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
            "RATE_REST": "off",
            "MAX_PENDING_PER_IP": "1000000",  # wrk opens its 64 connections at once
        },
    )
    fastapi = Server(
        "fastapi",
        "FastAPI",
        (
            *(sys.executable, "-m", "uvicorn", "bench.peers.fastapi_projects:app"),
            *("--host", "127.0.0.1", "--port", str(ports["fastapi"])),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
            *("--log-level", "warning"),
        ),
        env,
    )
    return [s for s in (core, fastapi) if only in (None, s.key)]


def machine_info(url: str) -> dict[str, str]:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout

    async def postgres_version() -> str:
        conn = await asyncpg.connect(url)
        try:
            version: str = await conn.fetchval("show server_version")
            return version
        finally:
            await conn.close()

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu[1] if cpu else "unknown",
        "python": platform.python_version(),
        "wrk": wrk_version.split(" [")[0].strip(),
        "postgresql": asyncio.run(postgres_version()),
        "kernel": platform.release(),
        "loadavg_at_start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def summarize(runs: list[Run]) -> dict[str, Any]:
    valid = [r for r in runs if r.valid]
    return {
        "runs": [asdict(r) for r in runs],
        "valid_runs": len(valid),
        "median_requests_per_s": statistics.median(r.requests_per_s for r in valid)
        if valid
        else None,
        "median_p99_ms": statistics.median(r.p99_ms for r in valid) if valid else None,
    }


def cell(summary: dict[str, Any] | None, key: str, fmt: str) -> str:
    if summary is None:
        return "—"
    value = summary[key]
    total = len(summary["runs"])
    if value is None:
        return f"invalid (0/{total} valid)"
    text = fmt.format(value)
    return text if summary["valid_runs"] == total else f"{text} ({summary['valid_runs']}/{total})"


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| endpoint | core req/s | FastAPI req/s | ratio | core p99 | FastAPI p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for endpoint, by_server in results.items():
        core, peer = by_server.get("core"), by_server.get("fastapi")
        core_rps = core and core["median_requests_per_s"]
        peer_rps = peer and peer["median_requests_per_s"]
        ratio = f"{core_rps / peer_rps:.2f}x" if core_rps and peer_rps else "—"
        lines.append(
            f"| {endpoint} | {cell(core, 'median_requests_per_s', '{:,.0f}')}"
            f" | {cell(peer, 'median_requests_per_s', '{:,.0f}')} | {ratio}"
            f" | {cell(core, 'median_p99_ms', '{:.2f} ms')}"
            f" | {cell(peer, 'median_p99_ms', '{:.2f} ms')} |"
        )
    return "\n".join(lines)


def add_database_arguments(parser: argparse.ArgumentParser, schema: str) -> None:
    """``--database-url`` (DATABASE_URL, else the local test database) and ``--schema``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    )
    parser.add_argument("--schema", default=schema)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rest", description="Benchmark our REST core against a FastAPI peer."
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["core", "fastapi"], help="benchmark one server")
    add_database_arguments(parser, "bench_rest")
    parser.add_argument(
        "--self-migrate",
        action="store_true",
        help="apply core/migrations/*.sql directly (when projects is missing) instead of "
        "running `python -m core migrate`; core's migrate cannot take over such a schema later",
    )
    parser.add_argument("--save", action="store_true", help="write bench/results/rest-<date>.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    command = shlex.join(
        [str(python), "-m", "bench.rest", *(sys.argv[1:] if argv is None else argv)]
    )
    ports = {"core": free_port(), "fastapi": free_port()}
    env = base_env(args.database_url, args.schema)
    servers = make_servers(args.only, env, ports)
    asyncio.run(create_schema(args.database_url, args.schema, args.self_migrate))
    if not args.self_migrate:
        subprocess.run([sys.executable, "-m", "core", "migrate"], cwd=ROOT, env=env, check=True)
    records = seed_records(SEED_ROWS)
    asyncio.run(reseed(args.database_url, args.schema, records))
    machine = machine_info(args.database_url)
    token = mint_token()
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp, ExitStack() as stack:
        endpoints = make_endpoints(token, Path(tmp))
        pids = {
            s.key: stack.enter_context(serve(s, ports[s.key], token, Path(tmp))).pid
            for s in servers
        }
        for round_ in range(1, args.rounds + 1):
            if round_ > 1:
                asyncio.run(reseed(args.database_url, args.schema, records))
            order = servers if round_ % 2 else servers[::-1]
            for endpoint in endpoints:
                for server in order:
                    url = f"http://127.0.0.1:{ports[server.key]}"
                    wrk(url, endpoint, WARMUP_S, args.connections)
                    run = measure(
                        url, endpoint, pids[server.key], args.duration, args.connections, round_
                    )
                    runs.setdefault((endpoint.name, server.key), []).append(run)
                    print(
                        f"round {round_} {endpoint.name} {server.label}: "
                        f"{run.requests_per_s:,.0f} req/s, p99 {run.p99_ms:.2f} ms, "
                        f"non-2xx {run.non_2xx}, socket errors {run.socket_errors}, "
                        f"CPU server {run.server_cpu:.0%} wrk {run.wrk_cpu:.0%}"
                        + ("" if run.valid else "  INVALID"),
                        file=sys.stderr,
                        flush=True,
                    )
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (endpoint_name, key), endpoint_runs in runs.items():
        results.setdefault(endpoint_name, {})[key] = summarize(endpoint_runs)
    table = markdown(results)
    print(table)
    print(f"\nCommand: `{command}`")
    print(
        f"Machine: nproc {machine['nproc']} ({machine['cpu']}), Python {machine['python']}, "
        f"{machine['wrk']}, PostgreSQL {machine['postgresql']}, Linux {machine['kernel']}, "
        f"load average at start {machine['loadavg_at_start']}; "
        f"servers on CPU {SERVER_CPU}, wrk -t1 on CPU {WRK_CPU}, PostgreSQL unpinned; "
        f"{args.connections} connections, {args.duration} s runs after {WARMUP_S} s warm-up, "
        f"medians of {args.rounds} round(s); ratio = core / FastAPI req/s."
    )
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        path = RESULTS / f"rest-{now.date().isoformat()}.json"
        document = {
            "date": now.isoformat(timespec="seconds"),
            "command": command,
            "machine": machine,
            "settings": {
                "duration_s": args.duration,
                "warmup_s": WARMUP_S,
                "connections": args.connections,
                "rounds": args.rounds,
                "seed_rows": SEED_ROWS,
                "server_cpu": SERVER_CPU,
                "wrk_cpu": WRK_CPU,
            },
            "results": results,
            "table": table,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"Saved {path.relative_to(ROOT)}")
    return 0 if all(r.valid for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
