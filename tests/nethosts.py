"""Services on the hosts of a tests/netns.py network, and how a test reaches them.

Gateways (``python -m gateway``, port 8000 on every host, the short liveness and Redis
health intervals these tests need), Redis, a Redis Cluster of three primaries with a replica
each, PostgreSQL run as an unprivileged user, a TCP load balancer that follows readiness;
plain HTTP and /metrics over asyncio streams, so that the request leaves from whichever
host's loop awaits it (`Host.run`). No pytest here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.infra.mint import mint_token
from core.infra.settings import Settings
from tests.harness import SECRET
from tests.netns import Host, Process
from tests.servers import UNIT, pipe, redis_cluster_executable

PORT = 8000  # every host has its own ports: the same one everywhere
PING_INTERVAL = 1.0
PONG_TIMEOUT = 2.0
SWEEP = 1.0  # gateway/app.py: liveness is checked once a second
TOKEN = mint_token(Settings(jwt_secret=SECRET), "netfault", ["nf:*"], ttl=None)
#: Inherited settings that would point a gateway at the machine's own servers.
FOREIGN = ("REDIS_URL", "REDIS_CLUSTER", "DATABASE_URL", "DATABASE_SCHEMA", "CORE_URL")
#: The REST core elsewhere, as gateway pods have it (docs/deploy.md); none answers here,
#: which leaves the sockets and readiness alone, and starts no embedded PostgreSQL.
NO_CORE = "http://127.0.0.1:9"


def start_gateway(host: Host, **env: str) -> Process:
    """``python -m gateway`` on ``host``, port 8000, with the short intervals of these tests."""
    environ = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    environ.update(
        PORT=str(PORT), HOST="0.0.0.0", WORKERS="1", JWT_SECRET=SECRET, PYTHONUNBUFFERED="1",
        DATA_DIR=str(host.network.workdir / f"data-{host.name}"), LOG_FORMAT="json",
        PING_INTERVAL=str(PING_INTERVAL), PONG_TIMEOUT=str(PONG_TIMEOUT),
        REDIS_HEALTH_INTERVAL="0.5", REDIS_HEALTH_TIMEOUT="0.5",
        HISTORY_CHANNELS="nf:*", HISTORY_SIZE="5000", PRESENCE_CHANNELS="nf:presence",
        PRESENCE_TTL="5", RATE_CONNECT_IP="off", RATE_SOCKET_COMMANDS="off",
        RATE_SOCKET_PUBLISH="off", RATE_REST="off", DRAIN_SECONDS="1", SHUTDOWN_TIMEOUT="5",
        CORE_URL=NO_CORE,
    )  # fmt: skip
    environ.update(env)
    environ = {k: v for k, v in environ.items() if v != ""}  # "": unset
    return host.spawn("gateway", [sys.executable, "-m", "gateway"], environ)


def start_redis(host: Host, port: int = 6379, *args: str) -> Process:
    executable, why = redis_cluster_executable()
    assert executable is not None, why
    directory = host.network.workdir / f"redis-{host.name}-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [executable, "--port", str(port), "--bind", host.ip, "--protected-mode", "no",
            "--save", "", "--appendonly", "no", "--dir", str(directory), *args]  # fmt: skip
    return host.spawn(f"redis-{port}", argv)


CLUSTER_PORTS = tuple(range(7000, 7006))  # three primaries, then their replicas


def start_cluster(host: Host) -> dict[int, Process]:
    """Six cluster nodes on ``host``, joined as three primaries with one replica each."""
    nodes = {
        port: start_redis(
            host,
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        )
        for port in CLUSTER_PORTS
    }
    for port in CLUSTER_PORTS:
        wait_sync(lambda port=port: "PONG" in cli(host, port, "ping"), 10)
    host.exec(redis_cli(), "--cluster", "create", *(f"{host.ip}:{p}" for p in CLUSTER_PORTS),
              "--cluster-replicas", "1", "--cluster-yes")  # fmt: skip
    for port in CLUSTER_PORTS:
        wait_sync(lambda port=port: "cluster_state:ok" in cli(host, port, "cluster", "info"), 20)
    wait_sync(lambda: len(replicas_in_sync(host)) == 3, 20)
    return nodes


def redis_cli() -> str:
    executable, _ = redis_cluster_executable()
    beside = Path(executable or "").with_name("redis-cli")
    return str(beside) if beside.is_file() else shutil.which("redis-cli") or "redis-cli"


def cli(host: Host, port: int, *args: str) -> str:
    return host.exec(redis_cli(), "-h", host.ip, "-p", str(port), *args, check=False)


def wait_sync(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout * UNIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout * UNIT:.1f} s: {check}")
        time.sleep(0.05)


def replicas_in_sync(host: Host) -> list[int]:
    return [
        port
        for port in CLUSTER_PORTS
        if "master_link_status:up" in cli(host, port, "info", "replication")
    ]


def owner(host: Host, ask: int, slot: int) -> int | None:
    """The port of the primary serving ``slot``, as node ``ask`` sees the cluster."""
    for line in cli(host, ask, "cluster", "nodes").splitlines():
        words = line.split()
        if len(words) < 9 or "master" not in words[2] or "fail" in words[2]:
            continue
        for span in words[8:]:
            first, _, last = span.partition("-")
            if first.isdigit() and int(first) <= slot <= int(last or first):
                return int(words[1].split("@")[0].rsplit(":", 1)[1])
    return None


def postgres_binaries() -> Path | None:
    """Debian's PostgreSQL (/usr/lib/postgresql/N/bin), else the one in the pgserver wheel."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").is_file():
            return candidate
    spec = importlib.util.find_spec("pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    return None


def start_postgres(host: Host, directory: Path) -> Process:
    """PostgreSQL on ``host``:5432, trusting the test network, run as an unprivileged user."""
    binaries = postgres_binaries()
    assert binaries is not None, "no PostgreSQL binaries (Debian postgresql, or pgserver)"
    user = (
        "postgres"
        if shutil.which("id") and host.exec("id", "-u", "postgres", check=False)
        else "nobody"
    )
    data = directory / "data"
    directory.chmod(0o777)
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    host.exec(*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust",
              "-U", "postgres", "--no-sync")  # fmt: skip
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write("host all all 10.231.0.0/16 trust\n")
    return host.spawn("postgres", [*as_user, str(binaries / "postgres"), "-D", str(data),
                                    "-k", str(directory), "-h", host.ip, "-p", "5432",
                                    "-c", "fsync=off"])  # fmt: skip


def base(host: Host, port: int = PORT) -> str:
    return f"http://{host.ip}:{port}"


def ws_url(host: Host, port: int = PORT) -> str:
    return f"ws://{host.ip}:{port}/ws"


async def http(
    url: str, timeout: float = 2.0, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.0 request with asyncio streams (in whichever host's loop awaits it)."""
    found = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert found, url
    lines = [f"{method} {found[3]} HTTP/1.0", f"Host: {found[1]}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(found[1], int(found[2]))
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    words = head.split(maxsplit=2)
    if len(words) < 2 or not words[1].isdigit():
        # A server that closes while answering (a gateway shutting down): no answer, as when
        # the connection is refused. Once an IndexError here ended balance()'s health check,
        # and with it the load balancer, while the gateway behind it drained.
        raise ConnectionError(f"no HTTP answer from {url}: {raw[:60]!r}")
    return int(words[1]), body


async def status(url: str, timeout: float = 1.0) -> int:
    """The HTTP status at ``url``, 0 when nothing answered in time."""
    try:
        return (await http(url, timeout))[0]
    except (OSError, TimeoutError):
        return 0


async def accepts(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def wait_for(
    check: Callable[[], Any],
    timeout: float,
    step: float = 0.05,
    state: Callable[[], object] | None = None,
) -> float:
    """Poll ``check`` (maybe async) until true; the seconds it took. Fails after ``timeout``,
    saying what ``state()`` then returns (what a failure in CI needs to be understood)."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout * UNIT:
            seen = f"; then: {state()!r}" if state is not None else ""
            raise AssertionError(f"not within {timeout * UNIT:.1f} s: {check}{seen}")
        await asyncio.sleep(step)


async def ready(client_host: Host, *gateways: Host) -> None:
    for gw in gateways:

        async def up(gw: Host = gw) -> bool:
            return await client_host.run(status(base(gw) + "/readyz")) == 200

        await wait_for(up, 20)


async def unready(gw: Host) -> bool:
    # Readiness waits up to 1 s for PostgreSQL: give it more.
    return await status(base(gw) + "/readyz", 3.0) == 503


async def is_ready(gw: Host) -> bool:
    return await status(base(gw) + "/readyz") == 200


async def samples(host: Host, via: Host, name: str) -> dict[str, float]:
    """The samples of ``name`` on ``host``'s /metrics (``{"name{labels}": value}``), from ``via``."""
    code, body = await via.run(http(base(host) + "/metrics"))
    assert code == 200
    found = {}
    for line in body.decode().splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            sample, _, value = line.rpartition(" ")
            found[sample] = float(value)
    return found


async def metric(host: Host, via: Host, name: str) -> float:
    """The sum of the samples of ``name`` on ``host``'s /metrics, read from ``via``."""
    return sum((await samples(host, via, name)).values())


async def metric_at_most(host: Host, via: Host, name: str, most: float) -> bool:
    return await metric(host, via, name) <= most


def log_lines(process: Process, *words: str, limit: int = 3) -> list[str]:
    """The first messages of ``process``'s JSON log that mention one of ``words``."""
    found = []
    for line in process.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = f"{entry.get('level', '')} {entry.get('msg', entry.get('message', ''))}"
        if any(w in message.lower() for w in words) and message not in found:
            found.append(message)
    return found[:limit]


async def balance(listen: Host, backends: tuple[Host, ...], chosen: list[str]) -> None:
    """A TCP load balancer, as in front of gateway pods: new connections go to the first
    backend whose /readyz said 200 at the last check (every 0.1 s); open ones are left be."""
    healthy = list(backends)

    async def check() -> None:
        while True:
            answers = await asyncio.gather(*(status(base(b) + "/readyz", 0.5) for b in backends))
            healthy[:] = [b for b, code in zip(backends, answers, strict=True) if code == 200]
            await asyncio.sleep(0.1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not healthy:
            writer.close()
            return
        target = healthy[0]
        chosen.append(target.name)
        try:
            up_reader, up_writer = await asyncio.open_connection(target.ip, PORT)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen.ip, PORT)
    async with server:
        await asyncio.gather(server.serve_forever(), check())
