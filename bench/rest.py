"""REST benchmark: our gateway and core against two FastAPI peers, in the same run.

What it measures: requests/s and p99 latency, from wrk (one thread, ``--latency``,
keep-alive connections), of two endpoints served by four servers:

* ``gateway``: ``python -m gateway`` hosting the core (``DATABASE_URL``), with
  Redis, so every write publishes its change events (history on, as shipped);
* ``core``: the standalone core, ``python -m core serve`` (no Redis: no events);
* ``fastapi``: ``bench/peers/fastapi_projects.py``, a FastAPI + pydantic v2 +
  asyncpg peer that checks what our core checks (e-mail, bounds, dates);
* ``tutorial``: ``bench/peers/fastapi_tutorial.py``, the same endpoints written
  as FastAPI's tutorials show (OAuth2PasswordBearer, ``get_current_user``
  decoding the HS256 token with pyjwt, plain models, ``response_model``).

The peers run under uvicorn, one worker, uvloop and httptools. The endpoints:

* ``GET /api/projects?limit=20``: one keyset page of 20 projects as JSON;
* ``POST /api/projects``: validate a realistic project body, insert it, 201.

All servers use one PostgreSQL schema (``--schema``), migrated by our core
(or by applying ``core/migrations/*.sql`` with ``--self-migrate``) and reseeded
with 2,000 projects at the start of every round. Each server is pinned to CPU 1
and wrk to CPU 0 with ``taskset``; PostgreSQL is not pinned. Every round runs,
per endpoint and for each server (the order alternates between rounds), a 2 s
warm-up and then the measured run. The table shows medians over rounds; a run
with any non-2xx response or socket error is invalid and left out of them.

The report gives each of ours against each peer: the ratio of the medians
and the range of the ratios of the same round's runs.

Rerun (from the repository root; needs ``wrk``, Redis on 127.0.0.1 and
``pip install -e '.[bench]'``; about 6 minutes with these arguments, 8 with
``--baseline``)::

    .venv/bin/python -m bench.rest --duration 10 --connections 64 --rounds 3 --save

``--baseline main`` adds the gateway and the core of that commit (``git archive``) to
every round, for a before/after measured under the same load; ``--only``
picks servers.
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
import secrets
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
    #: Where it runs from: another checkout runs that checkout's code (``--baseline``).
    cwd: Path = ROOT


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
            cwd=server.cwd,
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


#: Ours, then the peers; ratios are ours / each peer.
OURS = ("gateway", "core")
#: The gateway and the core of another commit (``--baseline``), beside ours in the same run.
BASELINE = "gateway-baseline"
CORE_BASELINE = "core-baseline"
PEERS = ("tutorial", "fastapi")


def uvicorn_server(key: str, label: str, module: str, port: int, env: dict[str, str]) -> Server:
    """A FastAPI peer as people run one: uvicorn, one worker, uvloop, httptools."""
    argv = (
        *(sys.executable, "-m", "uvicorn", f"{module}:app"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
        *("--log-level", "warning"),
    )
    return Server(key, label, argv, env)


def make_servers(
    only: list[str] | None,
    env: dict[str, str],
    ports: dict[str, int],
    redis_url: str,
    data_dir: Path,
) -> list[Server]:
    # One token sends every request: the per-identity REST limit is off, as
    # the peers have none (equal work); everything else runs as shipped.
    ours = env | {
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "RATE_REST": "off",
        "MAX_PENDING_PER_IP": "1000000",  # wrk opens its 64 connections at once
    }
    gateway = Server(
        "gateway",
        "gateway",
        (sys.executable, "-m", "gateway"),
        ours
        | {
            "PORT": str(ports["gateway"]),
            "WORKERS": "1",
            "DATA_DIR": str(data_dir),
            # Change events on: every write publishes to Redis (with history).
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": f"bench-rest-{secrets.token_hex(4)}:",
        },
    )
    core = Server("core", "core", (sys.executable, "-m", "core", "serve"),
                  ours | {"PORT": str(ports["core"])})  # fmt: skip
    fastapi = uvicorn_server(
        "fastapi", "FastAPI", "bench.peers.fastapi_projects", ports["fastapi"], env
    )
    tutorial = uvicorn_server(
        "tutorial", "FastAPI tutorial", "bench.peers.fastapi_tutorial", ports["tutorial"], env
    )
    every = (gateway, core, tutorial, fastapi)
    return [s for s in every if only is None or s.key in only]


def baseline_server(ref: str, server: Server, key: str, port: int, tmp: Path) -> Server:
    """``server`` as of commit ``ref`` (from ``git archive``), on ``port``."""
    where = tmp / "baseline"
    if not where.exists():
        where.mkdir()
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    env = server.env | {"PORT": str(port), "DATA_DIR": str(tmp / f"{key}-data")}
    return Server(key, f"{server.label} @ {ref}", server.argv, env, where)


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


def markdown(results: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str]) -> str:
    """Per endpoint, each server's medians; then each of ours against each peer."""
    lines = [
        "| endpoint | server | req/s | p99 | server CPU | CPU per request |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for endpoint, by_server in results.items():
        for key, summary in by_server.items():
            cpu = statistics.median(r["server_cpu"] for r in summary["runs"])
            # The server's CPU seconds (/proc) over the requests it answered, per run.
            per_request = statistics.median(
                1000 * r["server_cpu"] / r["requests_per_s"] for r in summary["runs"]
            )
            lines.append(
                f"| {endpoint} | {labels[key]}"
                f" | {cell(summary, 'median_requests_per_s', '{:,.0f}')}"
                f" | {cell(summary, 'median_p99_ms', '{:.2f} ms')} | {cpu:.0%}"
                f" | {per_request:.3f} ms |"
            )
    lines += [
        "",
        "| endpoint | ours | peer | ratio of medians | same-round ratios |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for endpoint, by_server in results.items():
        for ours in (*OURS, BASELINE, CORE_BASELINE):
            for peer in PEERS:
                if ours in by_server and peer in by_server:
                    ratio, rounds = ratios(by_server[ours], by_server[peer])
                    lines.append(
                        f"| {endpoint} | {labels[ours]} | {labels[peer]} | {ratio} | {rounds} |"
                    )
    return "\n".join(lines)


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> tuple[str, str]:
    """Ours / peer: of the medians, and the range over rounds of valid runs."""
    a, b = ours["median_requests_per_s"], peer["median_requests_per_s"]
    median = f"**{a / b:.2f}x**" if a and b else "—"
    peer_by_round = {r["round"]: r for r in peer["runs"] if r["non_2xx"] + r["socket_errors"] == 0}
    per_round = [
        r["requests_per_s"] / peer_by_round[r["round"]]["requests_per_s"]
        for r in ours["runs"]
        if r["non_2xx"] + r["socket_errors"] == 0 and r["round"] in peer_by_round
    ]
    span = f"{min(per_round):.2f} to {max(per_round):.2f}x" if per_round else "—"
    return median, span


def add_database_arguments(parser: argparse.ArgumentParser, schema: str) -> None:
    """``--database-url`` (DATABASE_URL, else the local test database) and ``--schema``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    )
    parser.add_argument("--schema", default=schema)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rest",
        description="Benchmark our gateway and REST core against two FastAPI peers.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=WARMUP_S, help="seconds of warm-up before each run"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*OURS, *PEERS],
        help="benchmark these servers only (default: all four)",
    )
    add_database_arguments(parser, "bench_rest")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the gateway's Redis (its change events)",
    )
    parser.add_argument(
        "--self-migrate",
        action="store_true",
        help="apply core/migrations/*.sql directly (when projects is missing) instead of "
        "running `python -m core migrate`; core's migrate cannot take over such a schema later",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the gateway of this commit (e.g. main), for a before/after in one run",
    )
    parser.add_argument("--save", action="store_true", help="write bench/results/rest-<date>.json")
    parser.add_argument(
        "--name", default="", help="with --save: bench/results/rest-<date>-<name>.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    command = shlex.join(
        [str(python), "-m", "bench.rest", *(sys.argv[1:] if argv is None else argv)]
    )
    ports = {key: free_port() for key in (*OURS, BASELINE, CORE_BASELINE, *PEERS)}
    env = base_env(args.database_url, args.schema)
    asyncio.run(create_schema(args.database_url, args.schema, args.self_migrate))
    if not args.self_migrate:
        subprocess.run([sys.executable, "-m", "core", "migrate"], cwd=ROOT, env=env, check=True)
    records = seed_records(SEED_ROWS)
    asyncio.run(reseed(args.database_url, args.schema, records))
    machine = machine_info(args.database_url)
    token = mint_token()
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp, ExitStack() as stack:
        servers = make_servers(args.only, env, ports, args.redis_url, Path(tmp))
        if args.baseline:
            for ours, key in (("gateway", BASELINE), ("core", CORE_BASELINE)):
                if args.only is None or ours in args.only:
                    now = make_servers([ours], env, ports, args.redis_url, Path(tmp))[0]
                    at = [s.key for s in servers].index(ours)
                    then = baseline_server(args.baseline, now, key, ports[key], Path(tmp))
                    servers.insert(at + 1, then)
        labels = {s.key: s.label for s in servers}
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
                    if args.warmup:
                        wrk(url, endpoint, args.warmup, args.connections)
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
    table = markdown(results, labels)
    print(table)
    print(f"\nCommand: `{command}`")
    print(
        f"Machine: nproc {machine['nproc']} ({machine['cpu']}), Python {machine['python']}, "
        f"{machine['wrk']}, PostgreSQL {machine['postgresql']}, Linux {machine['kernel']}, "
        f"load average at start {machine['loadavg_at_start']}; "
        f"servers on CPU {SERVER_CPU}, wrk -t1 on CPU {WRK_CPU}, PostgreSQL unpinned; "
        f"{args.connections} connections, {args.duration} s runs after {args.warmup} s warm-up, "
        f"medians of {args.rounds} round(s); ratio = ours / peer req/s; the gateway with "
        f"change events on (Redis), the core without."
    )
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        stem = f"rest-{now.date().isoformat()}" + (f"-{args.name}" if args.name else "")
        path = RESULTS / f"{stem}.json"
        for n in range(2, 100):  # never over an earlier report of the same day
            if not path.exists():
                break
            path = RESULTS / f"{stem}-{n}.json"
        document = {
            "date": now.isoformat(timespec="seconds"),
            "command": command,
            "machine": machine,
            "settings": {
                "duration_s": args.duration,
                "warmup_s": args.warmup,
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
