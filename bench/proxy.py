"""A separate core tier (CORE_URL): what the gateway's hop to the core costs, in one run.

Three measurements, each run ``--rounds`` times, the two modes side by side
in each round (their order alternating), reported as medians over rounds; the
added p50 and the ratios are the medians of each round's own pair, which a
machine whose load changes by the minute upsets less. A run with any failed
request is left out (and the exit status is 1).

1. **REST, through the gateway or straight to the core.** ``wrk`` (one thread,
   keep-alive, ``--latency``) on ``GET /api/projects?limit=20`` and ``POST
   /api/projects`` (bench/rest.py's endpoints, body and seed of 2,000
   projects), with each ``--connections`` level, against the core (``python
   -m core serve``) and against a gateway with ``CORE_URL`` pointing at that
   core: requests/s, p50, p99, and the p50 the hop adds (goal: at most 15%).
2. **Socket ``rpc``, in both modes.** The same GET as ``rpc`` frames from
   ``bench/rpcload.py`` (closed loop, one frame in flight per socket) to a
   gateway hosting the core on ``DATABASE_URL`` and to the ``CORE_URL``
   gateway. The client reports its own CPU share, to show it is not the limit.
3. **One and two core processes behind one gateway process.** REST
   requests/s through the gateway with ``python -m core`` at ``WORKERS=1``
   and at ``WORKERS=2`` (two processes on one port, SO_REUSEPORT), every
   process unpinned, the load generator unpinned and then pinned to CPU 0
   (goal: two give at least 1.6x one); then (``--core-quota``, as root) with
   each core process held to the same slice of a CPU by a cgroup quota
   (bench/cpuquota.py), so that the core tier is the bottleneck, as when it
   has hosts of its own, and the ratio says whether the gateway spreads the
   load over the core processes. ``--quota-only`` runs only that layout.

``--baseline REF`` adds to measurements 1 and 2 the gateway of commit REF
(``git archive``) with ``CORE_URL`` at the same core, in the same rounds: an
A/B of the gateway's CPU per request and p50, for REST and for ``rpc``; and
to measurement 1 the core of REF alone beside this tree's (the direct runs).

Placement (``taskset``) for 1 and 2: the process that queries PostgreSQL
(the core, or the gateway hosting it) on CPU 1; the load generator, and the
``CORE_URL`` gateway beside it, on CPU 0; PostgreSQL and Redis unpinned.
With ``--pg-cpu 1`` PostgreSQL is held to CPU 1 too, so each tier has a CPU
of its own (front: the load and the gateway; back: the core and its
database), as when they run on hosts of their own. Unpinned, PostgreSQL
also runs on CPU 0: straight to the core, the back tier then has more than
one CPU, and through the gateway the gateway competes with it for CPU 0.
Neither layout is the deployment (each process on hosts of its own, which
takes four CPUs or more); the report says which one ran.
Every run records the CPU share of each process (of one CPU: 1.0 is a whole
core), of PostgreSQL (all of its processes, other users' included), of the
load generator, and of everything else on the machine ("other"), so a
machine that is full, or busy with other work, shows in the report, with
each process's CPU time per request. From those the report derives what
the machine cannot show with 2 CPUs: the gateway's hop as a fraction of the
core's serving (CPU per request), and the throughput each would reach with
a CPU of its own.

Rerun (from the repository root; PostgreSQL, Redis on 127.0.0.1:6379 unless
``--redis-url ''``, ``wrk``, and ``pip install -e '.[bench]'``)::

    .venv/bin/python -m bench.proxy --duration 10 --rounds 5 --save

(about 25 minutes; ``--duration 5 --rounds 2`` about 7; docs/performance.md, "A separate core tier (CORE_URL)",
has the figures and what they mean). ``--table-from FILE`` draws the tables
of a saved report again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import cpuquota
from bench.fanout import save_results
from bench.rest import (
    JWT_SECRET,
    ROOT,
    SEED_ROWS,
    Endpoint,
    Server,
    add_database_arguments,
    baseline_server,
    children_cpu_seconds,
    cpu_seconds,
    create_schema,
    free_port,
    machine_info,
    make_endpoints,
    mint_token,
    parse_wrk,
    pinned,
    reseed,
    seed_records,
    serve,
    wrk,
)

#: The load generator (wrk, bench/rpcload.py) and the CORE_URL gateway beside it.
LOAD_CPU = "0"
FRONT_CPU = "0"
#: The process that queries PostgreSQL: the core, or the gateway hosting it.
BACK_CPU = "1"
#: Goals of issue 16, item 5.
MAX_ADDED_P50 = 0.15
MIN_SCALING = 1.6
#: Settings the bench sets itself: never inherited from the caller's environment.
_OURS = frozenset(
    {
        "DATABASE_URL",
        "DATABASE_SCHEMA",
        "CORE_URL",
        "REDIS_URL",
        "REDIS_PREFIX",
        "WORKERS",
        "PORT",
        "HOST",
        "DATA_DIR",
        "TRUSTED_PROXIES",
    }
)


# -- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """How to start the bench's processes: their common environment and the database's."""

    env: dict[str, str]
    db: dict[str, str]
    data_dir: Path

    def core(self, port: int, workers: int = 1, key: str = "core") -> Server:
        """``python -m core serve`` with ``WORKERS=workers`` (processes on one port)."""
        env = self.env | self.db | {"PORT": str(port), "TRUSTED_PROXIES": "127.0.0.1/32"}
        env["WORKERS"] = str(workers)
        return Server(key, "core", (sys.executable, "-m", "core", "serve"), env)

    def gateway(self, port: int, core_port: int | None, key: str = "gateway") -> Server:
        """``python -m gateway``: with ``CORE_URL`` and no database, or hosting the core."""
        where = {"CORE_URL": f"http://127.0.0.1:{core_port}"} if core_port else self.db
        env = self.env | where | {"PORT": str(port), "DATA_DIR": str(self.data_dir)}
        return Server(key, "gateway", (sys.executable, "-m", "gateway"), env)


def make_tier(database_url: str, schema: str, redis_url: str, data_dir: Path) -> Tier:
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env |= {
        "JWT_SECRET": JWT_SECRET,
        "HOST": "127.0.0.1",
        "WORKERS": "1",
        "LOG_LEVEL": "WARNING",
        # One token sends every request (bench/rest.py): per-identity and per-socket
        # limits are off; everything else runs as shipped.
        "RATE_REST": "off",
        "RATE_SOCKET_COMMANDS": "off",
        "RATE_CONNECT_IP": "off",
        "MAX_CONNECTIONS_PER_USER": "0",
        "MAX_PENDING_PER_IP": "1000000",
    }
    if redis_url:
        env |= {"REDIS_URL": redis_url, "REDIS_PREFIX": f"bench-proxy-{secrets.token_hex(4)}:"}
    return Tier(env, {"DATABASE_URL": database_url, "DATABASE_SCHEMA": schema}, data_dir)


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port`` (IPv4)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
            if fields[9] in inodes:
                return True
    return False


@contextmanager
def serve_workers(
    server: Server, workers: int, port: int, token: str, logs: Path, cpu: str | None
) -> Iterator[list[int]]:
    """`serve` for ``workers`` processes on one port: their PIDs, once each listens there."""
    with serve(server, port, token, logs, cpu) as proc:
        deadline = time.monotonic() + 30
        while True:
            pids = [proc.pid] if workers == 1 else _processes_of(proc.pid)[1:]
            if len(pids) == workers and all(listening(pid, port) for pid in pids):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.key}: {workers} processes not listening on {port}")
            time.sleep(0.1)
        yield pids


# -- CPU -------------------------------------------------------------------------------------


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _parent_if_postgres(pid: int) -> int | None:
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
            return _ppid(pid)
    except OSError:
        pass
    return None  # PostgreSQL is not on this machine


def postmaster(database_url: str) -> int | None:
    """The PID of PostgreSQL's postmaster when it runs on this machine, else None."""

    async def parent_of_backend() -> int | None:
        conn = await asyncpg.connect(database_url)
        try:  # while the backend lives: it exits with the connection
            return _parent_if_postgres(await conn.fetchval("select pg_backend_pid()"))
        finally:
            await conn.close()

    return asyncio.run(parent_of_backend())


def _processes_of(parent: int) -> list[int]:
    pids = [parent]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if _ppid(int(stat.parent.name)) == parent:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return pids


@contextmanager
def postgres_on(cpu: str | None, pg: int | None) -> Iterator[None]:
    """PostgreSQL's processes held to ``cpu`` meanwhile (``--pg-cpu``), as they were after.

    New backends are forked by the postmaster and take its CPUs. Needs the
    right to set their affinity (root, or their owner); None: left alone.
    """
    if cpu is None or pg is None:
        yield
        return
    before = {pid: os.sched_getaffinity(pid) for pid in _processes_of(pg)}
    try:
        for pid in before:
            os.sched_setaffinity(pid, {int(cpu)})
        yield
    finally:
        for pid in _processes_of(pg):
            try:
                os.sched_setaffinity(pid, before.get(pid, before[pg]))
            except OSError:
                pass  # a backend that exited meanwhile


def _machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """The CPU share (of one CPU) each role's processes used over a window.

    Roles: the bench's servers by name, ``postgres`` (every process of the
    postmaster), ``load`` (the load generator: wrk as a finished child, or
    the rpc client's own figure), ``machine`` (all CPUs busy) and ``other``
    (the machine less all of those).
    """

    def __init__(self, roles: Mapping[str, Sequence[int]], pg: int | None) -> None:
        self.roles = dict(roles)
        if pg is not None:
            self.roles["postgres"] = []  # found again at each snapshot: backends come and go
        self.pg = pg

    def _snapshot(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for role, pids in self.roles.items():
            found = _processes_of(self.pg) if role == "postgres" and self.pg else pids
            out[role] = {}
            for pid in found:
                try:
                    out[role][pid] = cpu_seconds(pid)
                except (OSError, IndexError):
                    continue
        return out

    def __enter__(self) -> CpuWatch:
        self._before = self._snapshot()
        self._children = children_cpu_seconds()
        self._machine = _machine_busy_seconds()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self._started
        after = self._snapshot()
        self.shares = {
            role: sum(cpu - self._before[role].get(pid, 0.0) for pid, cpu in pids.items()) / elapsed
            for role, pids in after.items()
        }
        self.shares["load"] = (children_cpu_seconds() - self._children) / elapsed
        self.shares["machine"] = (_machine_busy_seconds() - self._machine) / elapsed

    def result(self, load: float | None = None) -> dict[str, float]:
        """The shares, with ``load`` as the load generator's when it measured itself."""
        shares = dict(self.shares)
        if load is not None:
            shares["load"] = load
        ours = sum(v for k, v in shares.items() if k != "machine")
        shares["other"] = max(0.0, shares["machine"] - ours)
        return {k: round(v, 3) for k, v in shares.items()}


# -- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failures: int
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.failures == 0


def wrk_sample(
    url: str,
    endpoint: Endpoint,
    args: argparse.Namespace,
    connections: int,
    watch: CpuWatch,
    round_: int,
    load_cpu: str | None = LOAD_CPU,
) -> Sample:
    """A warm-up, then one timed wrk run with the processes' CPU."""
    if args.warmup:
        wrk(url, endpoint, args.warmup, connections, load_cpu)
    with watch:
        result = parse_wrk(wrk(url, endpoint, args.duration, connections, load_cpu))
    return Sample(
        round_,
        result.requests_per_s,
        result.p50_ms,
        result.p99_ms,
        result.non_2xx + result.socket_errors,
        watch.result(),
    )


def rpc_sample(
    port: int, token: str, args: argparse.Namespace, connections: int, watch: CpuWatch, round_: int
) -> Sample:
    """One run of bench/rpcload.py (its warm-up included), CPU watched while it times."""
    argv = [sys.executable, "-u", "-m", "bench.rpcload", "--url", f"ws://127.0.0.1:{port}/ws"]
    argv += ["--token", token, "--connections", str(connections), "--signal"]
    argv += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    with subprocess.Popen(pinned(LOAD_CPU, argv), cwd=ROOT, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"timing":
            raise RuntimeError("bench.rpcload did not start timing")
        with watch:
            line = proc.stdout.readline()
    report = json.loads(line)
    failures = sum(report["failures"].values()) + connections - report["connections"]
    return Sample(
        round_,
        report["requests_per_s"],
        report["p50_ms"],
        report["p99_ms"],
        failures,
        watch.result(load=report["client_cpu"]),
    )


def log_sample(what: str, sample: Sample) -> None:
    cpu = ", ".join(f"{k} {v:.0%}" for k, v in sample.cpu.items())
    print(
        f"round {sample.round} {what}: {sample.requests_per_s:,.0f} req/s, "
        f"p50 {sample.p50_ms:.2f} ms, p99 {sample.p99_ms:.2f} ms; CPU {cpu}"
        + ("" if sample.valid else f"  INVALID ({sample.failures} failed)"),
        file=sys.stderr,
        flush=True,
    )


Results = dict[str, list[Sample]]


def add(results: Results, key: str, sample: Sample) -> None:
    results.setdefault(key, []).append(sample)
    log_sample(key, sample)


def alternate(modes: list[str], round_: int) -> list[str]:
    return modes if round_ % 2 else modes[::-1]


# -- the three measurements -----------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every measurement is given."""

    tier: Tier
    args: argparse.Namespace
    token: str
    endpoints: list[Endpoint]
    logs: Path
    pg: int | None  # PostgreSQL's postmaster, when it runs here
    records: list[tuple[Any, ...]]  # the seed, written again at each round


#: Measurement 2's modes: the core in the gateway, behind CORE_URL, and ``--baseline``'s.
RPC_MODES = ("in-process", "CORE_URL", "baseline")


def measure_rest_and_rpc(setup: Setup) -> Results:
    """Measurements 1 and 2: one core, the CORE_URL gateway in front, a gateway hosting the core."""
    tier, args, token, logs, pg = setup.tier, setup.args, setup.token, setup.logs, setup.pg
    results: Results = {}
    ports = {"core": free_port(), "front": free_port(), "hosting": free_port()}
    with ExitStack() as stack:
        core = stack.enter_context(
            serve(tier.core(ports["core"]), ports["core"], token, logs, BACK_CPU)
        )
        front_server = tier.gateway(ports["front"], ports["core"], key="gateway-core-url")
        front = stack.enter_context(serve(front_server, ports["front"], token, logs, FRONT_CPU))
        modes = ["direct", "gateway"]
        if args.baseline:  # the gateway of another commit, in front of the same core
            port = ports["baseline"] = free_port()
            before = baseline_server(args.baseline, front_server, "gateway-baseline", port, logs)
            old = stack.enter_context(serve(before, port, token, logs, FRONT_CPU))
            modes.append("baseline")
            # and the core of REF alone, as the direct runs (the same database)
            port = ports["core-baseline"] = free_port()
            core_before = baseline_server(
                args.baseline, tier.core(port), "core-baseline", port, logs
            )
            old_core = stack.enter_context(serve(core_before, port, token, logs, BACK_CPU))
            modes.append("core-baseline")
        hosting = None
        if "rpc" in args.parts:
            hosting_server = tier.gateway(ports["hosting"], None, key="gateway-hosting")
            hosting = stack.enter_context(
                serve(hosting_server, ports["hosting"], token, logs, BACK_CPU)
            )
        proxied = (ports["front"], CpuWatch({"gateway": [front.pid], "core": [core.pid]}, pg))
        rest = {"direct": (ports["core"], CpuWatch({"core": [core.pid]}, pg)), "gateway": proxied}
        if args.baseline:
            rest["baseline"] = (
                ports["baseline"],
                CpuWatch({"gateway": [old.pid], "core": [core.pid]}, pg),
            )
            rest["core-baseline"] = (
                ports["core-baseline"],
                CpuWatch({"core": [old_core.pid]}, pg),
            )
        rpc = {"CORE_URL": proxied}
        if hosting is not None:
            rpc["in-process"] = (ports["hosting"], CpuWatch({"gateway": [hosting.pid]}, pg))
        if args.baseline:  # its rpc path too, behind the same core
            rpc["baseline"] = rest["baseline"]
        for round_ in range(1, args.rounds + 1):
            asyncio.run(reseed(args.database_url, args.schema, setup.records))
            for endpoint in setup.endpoints if "rest" in args.parts else []:
                for n in args.connections:
                    for mode in alternate(modes, round_):
                        port, watch = rest[mode]
                        url = f"http://127.0.0.1:{port}"
                        sample = wrk_sample(url, endpoint, args, n, watch, round_)
                        add(results, f"rest|{endpoint.name}|{n}|{mode}", sample)
            for n in args.connections if hosting is not None else []:
                for mode in alternate([m for m in RPC_MODES if m in rpc], round_):
                    port, watch = rpc[mode]
                    add(results, f"rpc|{n}|{mode}", rpc_sample(port, token, args, n, watch, round_))
    return results


def measure_scaling(setup: Setup) -> Results:
    """Measurement 3: one gateway process in front of one, then two, core processes."""
    tier, args, token, logs = setup.tier, setup.args, setup.token, setup.logs
    results: Results = {}
    n = max(args.connections)
    loads = {"unpinned": None, "load on CPU 0": LOAD_CPU}
    loads = {k: v for k, v in loads.items() if not args.quota_only}
    for round_ in range(1, args.rounds + 1):
        asyncio.run(reseed(args.database_url, args.schema, setup.records))
        for cores in alternate(["1", "2"], round_):
            core_port, front_port = free_port(), free_port()
            with ExitStack() as stack:
                core = tier.core(core_port, workers=int(cores))
                pids = stack.enter_context(
                    serve_workers(core, int(cores), core_port, token, logs, None)
                )
                front = stack.enter_context(
                    serve(tier.gateway(front_port, core_port), front_port, token, logs, None)
                )
                watch = CpuWatch({"gateway": [front.pid], "core": pids}, setup.pg)
                url = f"http://127.0.0.1:{front_port}"
                for load, cpu in loads.items():
                    for endpoint in setup.endpoints:
                        sample = wrk_sample(url, endpoint, args, n, watch, round_, cpu)
                        add(results, f"scaling|{load}|{endpoint.name}|{cores}", sample)
                if args.core_quota:
                    load = f"core processes held to {args.core_quota:g} CPU each"
                    with ExitStack() as quotas:
                        for i, pid in enumerate(pids):
                            name = f"bench-proxy-core{i}"
                            quotas.enter_context(cpuquota.CpuQuota(name, args.core_quota)).add(pid)
                        for endpoint in setup.endpoints:
                            sample = wrk_sample(url, endpoint, args, n, watch, round_, None)
                            add(results, f"scaling|{load}|{endpoint.name}|{cores}", sample)
    return results


# -- the report ------------------------------------------------------------------------------


def summary(samples: list[Sample]) -> dict[str, Any]:
    valid = [s for s in samples if s.valid]

    def median(key: str) -> float | None:
        return statistics.median(getattr(s, key) for s in valid) if valid else None

    roles = {role for s in valid for role in s.cpu}
    return {
        "runs": [asdict(s) for s in samples],
        "valid_runs": len(valid),
        "requests_per_s": median("requests_per_s"),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "cpu": {r: statistics.median(s.cpu.get(r, 0.0) for s in valid) for r in sorted(roles)},
    }


def _num(value: float | None, fmt: str) -> str:
    return "invalid" if value is None else fmt.format(value)


def _added(base: dict[str, Any], other: dict[str, Any]) -> tuple[str, str]:
    """The p50 ``other`` adds to ``base``, in ms and in % with the goal's verdict.

    Medians over rounds of each round's pair of runs (made one after the
    other), which a machine whose load changes by the minute upsets less
    than a difference of medians taken over all rounds.
    """
    pairs = _by_round(base, other)
    if not pairs:
        return "—", "—"
    ms = statistics.median(y["p50_ms"] - x["p50_ms"] for x, y in pairs)
    share = statistics.median(y["p50_ms"] / x["p50_ms"] - 1 for x, y in pairs)
    verdict = "met" if share <= MAX_ADDED_P50 else "missed"
    return f"{ms:+.2f} ms", f"{share:+.1%} ({verdict})"


_ROLES = ("gateway", "core", "postgres", "load")


def _cpu(run: dict[str, Any]) -> str:
    """Each role's share of one CPU, with its CPU time per request for our processes."""
    cpu, rps = run["cpu"], run["requests_per_s"]
    parts = [
        f"{k} {cpu[k]:.2f}" + (f" ({1000 * cpu[k] / rps:.2f} ms/req)" if rps else "")
        for k in _ROLES
        if k in cpu
    ]
    parts += [f"{k} {cpu[k]:.2f}" for k in ("other", "machine") if k in cpu]
    return ", ".join(parts)


def _per_request(run: dict[str, Any], *roles: str) -> float | None:
    """CPU seconds per request of ``roles`` together, None when not measured."""
    if not run["requests_per_s"] or not all(r in run["cpu"] for r in roles):
        return None
    return sum(run["cpu"][r] for r in roles) / run["requests_per_s"]


def _cost(summary_: dict[str, Any], role: str) -> float | None:
    """``role``'s CPU seconds per request: the median over the valid runs."""
    costs = [
        r["cpu"][role] / r["requests_per_s"]
        for r in summary_["runs"]
        if not r["failures"] and r["requests_per_s"] and role in r["cpu"]
    ]
    return statistics.median(costs) if costs else None


def _hop_table(rows: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[str]:
    """The hop against the serving, in CPU per request, and what that projects.

    The gateway's cost comes from the runs through it, the core's from the
    runs straight to it (its serving without the hop); both are medians of
    each run's CPU seconds over its requests. "Projected" is what a CPU each
    would give, PostgreSQL not the limit: one core process serves 1/core
    req/s, one gateway process forwards 1/gateway req/s, so N core
    processes behind one gateway give min(N/core, 1/gateway).
    """
    lines = [
        "**The hop and the serving: CPU per request (from /proc/<pid>/stat)**",
        "",
        "| endpoint | connections | gateway hop | core serving | hop / serving "
        "| hop req per CPU-s | serving req per CPU-s | projected 2 cores / 1 behind one gateway |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, direct, through in rows:
        hop, serving = _cost(through, "gateway"), _cost(direct, "core")
        if hop is None or serving is None:
            continue
        projected = min(2.0 / serving, 1.0 / hop) / min(1.0 / serving, 1.0 / hop)
        lines.append(
            f"| {label} | {1000 * hop:.3f} ms | {1000 * serving:.3f} ms | {hop / serving:.2f} "
            f"| {1 / hop:,.0f} | {1 / serving:,.0f} | {projected:.2f}x |"
        )
    return [*lines, ""]


def _by_round(x: dict[str, Any], y: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The runs of ``x`` and ``y`` made in the same round (side by side), both valid."""
    ys = {r["round"]: r for r in y["runs"] if not r["failures"]}
    return [(r, ys[r["round"]]) for r in x["runs"] if not r["failures"] and r["round"] in ys]


def _pair_table(
    title: str,
    head: tuple[str, ...],
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]],
    names: tuple[str, str],
) -> list[str]:
    a, b = names
    lines = [
        f"**{title}**",
        "",
        f"| {' | '.join(head)} | {a} req/s | {b} req/s | {a} p50 | {b} p50 | added p50 | "
        f"added p50 % (goal ≤ {MAX_ADDED_P50:.0%}) | {a} p99 | {b} p99 |",
        "|" + " --- |" * len(head) + " ---: |" * 8,
    ]
    for label, x, y in rows:
        cells = [label, *(_num(r["requests_per_s"], "{:,.0f}") for r in (x, y))]
        cells += [_num(r["p50_ms"], "{:.2f} ms") for r in (x, y)]
        cells += _added(x, y)
        cells += [_num(r["p99_ms"], "{:.2f} ms") for r in (x, y)]
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", f"Round by round, {b} against {a} in the same round: added p50, req/s ratio:", ""]
    for label, x, y in rows:
        pairs = _by_round(x, y)
        added = ", ".join(f"{ry['p50_ms'] / rx['p50_ms'] - 1:+.0%}" for rx, ry in pairs)
        ratio = ", ".join(f"{ry['requests_per_s'] / rx['requests_per_s']:.2f}x" for rx, ry in pairs)
        lines.append(f"* {label}: {added}; {ratio}")
    lines += ["", f"CPU, median shares of one CPU ({a}; {b}):", ""]
    lines += [f"* {label}: {_cpu(x)}; {_cpu(y)}" for label, x, y in rows]
    return [*lines, ""]


def _scaling_table(s: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "**3. REST through one gateway process: one and two core processes**",
        "",
        "| load generator | endpoint | 1 core req/s | 2 cores req/s "
        f"| ratio (goal ≥ {MIN_SCALING}x) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    keys = sorted({k.rpartition("|")[0] for k in s if k.startswith("scaling|")}, reverse=True)
    cpu_lines = []
    for key in keys:
        _, load, endpoint = key.split("|")
        one, two = s[f"{key}|1"], s[f"{key}|2"]
        r1, r2 = one["requests_per_s"], two["requests_per_s"]
        pairs = _by_round(one, two)  # as _added: the median of the rounds' own ratios
        ratio = "—"
        if pairs:
            median = statistics.median(b["requests_per_s"] / a["requests_per_s"] for a, b in pairs)
            ratio = f"{median:.2f}x ({'met' if median >= MIN_SCALING else 'missed'})"
        lines.append(
            f"| {load} | {endpoint} | {_num(r1, '{:,.0f}')} | {_num(r2, '{:,.0f}')} | {ratio} |"
        )
        rounds = ", ".join(
            f"{r2['requests_per_s'] / r1['requests_per_s']:.2f}x" for r1, r2 in _by_round(one, two)
        )
        cpu_lines.append(f"* {load}, {endpoint}: round by round {rounds}")
        cpu_lines.append(f"  * 1 core: {_cpu(one)}; 2 cores: {_cpu(two)}")
        gateway, core = _cost(two, "gateway"), _cost(one, "core")
        everything = _per_request(two, "gateway", "core", "postgres", "load")
        if gateway and core:
            cpu_lines.append(
                f"  * extrapolated, not measured: with a whole CPU each and PostgreSQL not the"
                f" limit, one core process would serve ~{1 / core:,.0f} req/s and one gateway"
                f" process forward ~{1 / gateway:,.0f} req/s, so two core processes behind one"
                f" gateway process could give at most {min(2.0, core / gateway):.2f}x one"
            )
        if everything:
            cpu_lines.append(
                f"  * this machine's bound: {os.cpu_count()} CPUs shared by the gateway, the core"
                f" processes, PostgreSQL and the load generator, at"
                f" {1000 * everything:.3f} CPU-ms per request together, allow at most"
                f" ~{(os.cpu_count() or 1) / everything:,.0f} req/s through the gateway"
            )
    return [*lines, "", "CPU, median shares of one CPU:", "", *cpu_lines, ""]


def _ab_table(
    title: str, rows: list[tuple[str, dict[str, Any], dict[str, Any]]], role: str = "gateway"
) -> list[str]:
    """``role`` before (``--baseline``) and now, in the same rounds."""
    lines = [
        f"**{title}**",
        "",
        "| endpoint | connections | before req/s | now req/s | before p50 | now p50 | now - before p50 "
        f"| before p99 | now p99 | {role} CPU/request before | now | change |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, before, now in rows:
        pairs = _by_round(before, now)
        added = (
            f"{statistics.median(y['p50_ms'] - x['p50_ms'] for x, y in pairs):+.2f} ms"
            if pairs
            else "—"
        )
        hop0, hop1 = _cost(before, role), _cost(now, role)
        change = f"{hop1 / hop0 - 1:+.0%}" if hop0 and hop1 else "—"
        cells = [label, *(_num(r["requests_per_s"], "{:,.0f}") for r in (before, now))]
        cells += [_num(r["p50_ms"], "{:.2f} ms") for r in (before, now)] + [added]
        cells += [_num(r["p99_ms"], "{:.2f} ms") for r in (before, now)]
        cells += [_num(h and 1000 * h, "{:.3f} ms") for h in (hop0, hop1)] + [change]
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", f"Round by round, now against before: p50 change, {role} CPU/request change:", ""]
    for label, before, now in rows:
        pairs = _by_round(before, now)
        p50 = ", ".join(f"{y['p50_ms'] / x['p50_ms'] - 1:+.0%}" for x, y in pairs)
        cpu = ", ".join(
            f"{(y['cpu'][role] / y['requests_per_s']) / (x['cpu'][role] / x['requests_per_s']) - 1:+.0%}"
            for x, y in pairs
            if x["requests_per_s"] and y["requests_per_s"] and x["cpu"].get(role)
        )
        lines.append(f"* {label}: p50 {p50}; {role} CPU/request {cpu}")
    return [*lines, ""]


def render(s: dict[str, dict[str, Any]]) -> str:
    """The tables of the summaries ``s`` (a saved report's ``results``)."""
    lines: list[str] = []
    rest = sorted({k.rpartition("|")[0] for k in s if k.startswith("rest|")}, reverse=True)
    if rest:
        ordered = sorted(rest, key=lambda k: (k.split("|")[1], int(k.split("|")[2])))
        rows = [
            (f"{k.split('|')[1]} | {k.split('|')[2]}", s[f"{k}|direct"], s[f"{k}|gateway"])
            for k in ordered
        ]
        lines += _pair_table(
            "1. REST: straight to the core, and through the gateway (CORE_URL)",
            ("endpoint", "connections"),
            rows,
            ("core", "gateway → core"),
        )
        lines += _hop_table(rows)
        ab = [
            (label, s[f"{k}|baseline"], s[f"{k}|gateway"])
            for (label, _, _), k in zip(rows, ordered, strict=True)
            if f"{k}|baseline" in s
        ]
        if ab:
            title = (
                "1b. A/B, REST: the gateway of --baseline and this one, in front of the same core"
            )
            lines += _ab_table(title, ab)
        alone = [
            (label, s[f"{k}|core-baseline"], s[f"{k}|direct"])
            for (label, _, _), k in zip(rows, ordered, strict=True)
            if f"{k}|core-baseline" in s
        ]
        if alone:
            lines += _ab_table(
                "1c. A/B, REST: the core of --baseline and this one, alone", alone, "core"
            )
    rpc = sorted({int(k.split("|")[1]) for k in s if k.startswith("rpc|")})
    if rpc:
        rows = [(str(n), s[f"rpc|{n}|in-process"], s[f"rpc|{n}|CORE_URL"]) for n in rpc]
        lines += _pair_table(
            "2. Socket rpc (GET /api/projects?limit=20): core in the gateway, and behind CORE_URL",
            ("sockets",),
            rows,
            ("in-process", "CORE_URL"),
        )
        if all(f"rpc|{n}|baseline" in s for n in rpc):
            ab = [(f"rpc | {n}", s[f"rpc|{n}|baseline"], s[f"rpc|{n}|CORE_URL"]) for n in rpc]
            title = "2b. A/B, socket rpc: the gateway of --baseline and this one, in front of the same core"
            lines += _ab_table(title, ab)
    if any(k.startswith("scaling|") for k in s):
        lines += _scaling_table(s)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--connections",
        default="1,64",
        help="comma-separated connection (socket) counts; 3 uses the largest",
    )
    parser.add_argument("--parts", default="rest,rpc,scaling", help="which of rest,rpc,scaling")
    parser.add_argument("--endpoints", default="GET,POST", help="GET, POST or both (REST runs)")
    add_database_arguments(parser, "bench_proxy")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for every process (change events, control channel); '' for none",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the gateway of commit REF (git archive) in front of the same core, "
        "in the same rounds (A/B)",
    )
    parser.add_argument(
        "--core-quota",
        type=float,
        default=0.2 if cpuquota.available() else 0.0,
        metavar="CPUS",
        help="measurement 3 also with each core process held to CPUS of a CPU by a cgroup quota "
        "(bench/cpuquota.py; needs root; 0: not), default 0.2 where available",
    )
    parser.add_argument(
        "--quota-only",
        action="store_true",
        help="measurement 3 only with --core-quota (not unpinned, not with the load on CPU 0)",
    )
    parser.add_argument(
        "--pg-cpu",
        metavar="CPU",
        help="hold PostgreSQL (a server on this machine) to CPU for the run, beside the core "
        f"(BACK_CPU is {BACK_CPU}): each tier on a CPU of its own, the load and the gateway on "
        "the other; its CPUs are given back after. Default: PostgreSQL unpinned",
    )
    parser.add_argument("--save", action="store_true", help="write bench/results/proxy-<date>.json")
    parser.add_argument(
        "--table-from",
        type=Path,
        metavar="JSON",
        help="run nothing: print the tables of a saved report again",
    )
    args = parser.parse_args(argv)
    args.connections = [int(n) for n in args.connections.split(",")]
    args.parts = set(args.parts.split(","))
    args.endpoints = set(args.endpoints.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from:
        print(render(json.loads(args.table_from.read_text())["results"]))
        return 0
    # SIGTERM (or SIGINT, which a shell's background job ignores) unwinds: servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([str(python), "-m", "bench.proxy", *given])
    asyncio.run(create_schema(args.database_url, args.schema, self_migrate=False))
    records = seed_records(SEED_ROWS)
    machine = machine_info(args.database_url)
    pg = postmaster(args.database_url)
    token = mint_token()
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        logs = Path(tmp)
        tier = make_tier(args.database_url, args.schema, args.redis_url, logs)
        migrate = [sys.executable, "-m", "core", "migrate"]
        subprocess.run(migrate, cwd=ROOT, env=tier.env | tier.db, check=True, capture_output=True)
        endpoints = [e for e in make_endpoints(token, logs) if e.name.split()[0] in args.endpoints]
        setup = Setup(tier, args, token, endpoints, logs, pg, records)
        with postgres_on(args.pg_cpu, pg):
            if args.parts & {"rest", "rpc"}:
                results |= measure_rest_and_rpc(setup)
            if "scaling" in args.parts:
                results |= measure_scaling(setup)
    summaries = {key: summary(samples) for key, samples in results.items()}
    table = render(summaries)
    print(table)
    print(f"Command: `{command}`")
    print(
        f"Machine: nproc {machine['nproc']} ({machine['cpu']}), Python {machine['python']}, "
        f"{machine['wrk']}, PostgreSQL {machine['postgresql']}, Linux {machine['kernel']}, "
        f"load average at start {machine['loadavg_at_start']}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.duration} s runs after "
        f"{args.warmup} s warm-up, medians of {args.rounds} round(s); PostgreSQL "
        f"{'on CPU ' + args.pg_cpu if args.pg_cpu is not None else 'unpinned'}; Redis "
        f"{'on' if args.redis_url else 'off'}. CPU shares are of one CPU (this machine has "
        f"{os.cpu_count()}): 'machine' is all of them busy, 'other' what none of ours used."
    )
    if args.save:
        settings = {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}
        save_results(
            "proxy",
            {
                "command": command,
                "host": machine,
                "settings": settings,
                "results": summaries,
                "table": table,
            },
        )
    valid = all(s.valid for samples in results.values() for s in samples)
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
