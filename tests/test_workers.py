"""Worker processes: N gateway processes on one port, supervised, with merged metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from websockets.exceptions import ConnectionClosed

from core.infra.metricsmerge import MAX_AGE, WorkerRegistry, scrape_view
from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.infra.workers import worker_count
from gateway.__main__ import _parser
from proto import CloseCode
from tests.harness import SECRET, unique_prefix, until, ws_client
from tests.servers import UNIT, free_port
from tests.test_processes import GatewayProcess, _read

TOKEN = mint_token(Settings(jwt_secret=SECRET), "alice", ["room:*"])
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
LISTENING = "gateway listening on"


@pytest.fixture
def gateway_env(redis_url, database_url, core_schema) -> dict[str, str]:
    return {
        "JWT_SECRET": SECRET,
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": core_schema,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": unique_prefix(),
    }


@pytest.fixture
def spawn(tmp_path, data_dir, gateway_env):
    """Start ``python -m gateway`` with Redis, PostgreSQL and the env given."""
    started: list[GatewayProcess] = []

    def start(*, redis: bool = True, **env: str) -> GatewayProcess:
        base = {k: v for k, v in gateway_env.items() if redis or not k.startswith("REDIS_")}
        gp = GatewayProcess(tmp_path, data_dir, **{**base, **env})
        started.append(gp)
        return gp.start()

    yield start
    for gp in started:
        if gp.proc is None or gp.proc.poll() is not None:
            continue
        try:
            gp.stop(signal.SIGTERM, 20 * UNIT)
        except subprocess.TimeoutExpired:
            for pid in worker_pids(gp).values():  # the master was killed: no orphan stays
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise


def worker_pids(gp: GatewayProcess) -> dict[int, int]:
    """index -> pid of the latest start of each worker, from the master's log."""
    return {int(m[1]): int(m[2]) for m in STARTED.finditer(gp.output())}


async def logged(gp: GatewayProcess, text: str, count: int = 1, timeout: float = 10 * UNIT) -> str:
    """The log, once ``text`` is in it ``count`` times."""
    deadline = time.monotonic() + timeout
    while (log := gp.output()).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count}x:\n{log}"
        await asyncio.sleep(0.05)
    return log


async def scrape(port: int) -> dict[str, list[Sample]]:
    """/metrics, parsed; every family appears once."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = (await asyncio.to_thread(_read, urllib.request.Request(url))).decode()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"a family appears twice: {sorted(names)}"
    return {f.name: f.samples for f in families}


async def per_worker(port: int, name: str, until, timeout: float = 5 * UNIT) -> dict[str, float]:
    """{worker: value} of metric ``name`` once ``until`` of it holds (snapshots lag ~1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = (await scrape(port))[name]
        values = {
            s.labels["worker"]: s.value
            for s in samples
            if s.labels.get("transport", "websocket") == "websocket"
        }
        if until(values):
            return values
        assert time.monotonic() < deadline, f"{name}: {values}"
        await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_share_the_port_fan_out_and_report_metrics(spawn, redis_url):
    gp = spawn(WORKERS="2")
    await logged(gp, LISTENING, 2)
    pids = worker_pids(gp)
    assert sorted(pids) == [0, 1] and pids[0] != pids[1] and gp.proc.pid not in pids.values()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_client(gp.port, TOKEN)) for _ in range(20)]
        for c in clients:
            assert (await c.request("sub", ch="room:1"))["ok"]
        # The kernel spread the 20 sockets over both processes.
        sockets = await per_worker(
            gp.port, "gateway_connections", lambda v: sum(v.values()) == 20 and len(v) == 2
        )
        assert sorted(sockets) == ["0", "1"] and min(sockets.values()) > 0, sockets
        client = aioredis.Redis.from_url(redis_url)
        try:
            # One Redis subscriber per worker process, and every socket gets the message.
            prefix = gp.env["REDIS_PREFIX"]
            assert await client.publish(f"{prefix}room:1", '{"to":"all"}') == 2
        finally:
            await client.aclose()
        for c in clients:
            assert await c.next_push() == {"op": "msg", "ch": "room:1", "data": {"to": "all"}}
    families = await scrape(gp.port)
    memory = {s.labels["worker"]: s.value for s in families["process_resident_memory_bytes"]}
    assert sorted(memory) == ["0", "1"] and min(memory.values()) > 0
    assert all("worker" in s.labels for samples in families.values() for s in samples)


async def closed_with(client) -> int | None:
    try:
        await client.recv(timeout=5 * UNIT)
    except ConnectionClosed as closed:
        return None if closed.rcvd is None else closed.rcvd.code
    return None


async def test_sigterm_drains_every_worker_and_the_master_exits_0(spawn):
    gp = spawn(WORKERS="2")
    await logged(gp, LISTENING, 2)
    pids = worker_pids(gp)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_client(gp.port, TOKEN)) for _ in range(8)]
        gp.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(closed_with(c) for c in clients))
    assert codes == [CloseCode.SHUTDOWN] * 8  # every socket, whichever worker holds it
    assert await asyncio.to_thread(gp.proc.wait, 15 * UNIT) == 0
    assert not [pid for pid in pids.values() if alive(pid)]
    assert gp.output().count("shutting down") == 2


async def test_workers_stop_when_their_master_is_killed(spawn):
    """A master killed by SIGKILL (the OOM killer) runs no handler: its workers kept serving,
    orphaned, on its port, and the server started again exited 2, the port in use."""
    gp = spawn(WORKERS="2")
    await logged(gp, LISTENING, 2)
    pids = worker_pids(gp)
    gp.proc.kill()
    await asyncio.to_thread(gp.proc.wait, 5 * UNIT)
    await until(lambda: not [pid for pid in pids.values() if alive(pid)], 20 * UNIT)


async def test_a_second_gateway_cannot_share_a_port_in_use(spawn):
    # SO_REUSEPORT would let it: the two would split the port's connections.
    gp = spawn(WORKERS="2")
    await logged(gp, LISTENING, 2)
    with pytest.raises(
        RuntimeError, match=r"configuration error: PORT: .* is in use .*Address already in use"
    ):
        spawn(WORKERS="2", PORT=str(gp.port))


async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(spawn):
    gp = spawn(WORKERS="2")
    await logged(gp, LISTENING, 2)
    first = worker_pids(gp)[0]  # worker 0 serves on the socket the master bound
    os.kill(first, signal.SIGKILL)
    await logged(gp, f"worker 0 (pid {first}) killed by SIGKILL")
    for _ in range(10):
        url = f"http://127.0.0.1:{gp.port}/healthz"
        assert await asyncio.to_thread(_read, urllib.request.Request(url)) == b'{"status":"ok"}'
    await logged(gp, LISTENING, 3)
    again = worker_pids(gp)[0]
    assert again != first and alive(again) and gp.proc.poll() is None
    await per_worker(gp.port, "process_resident_memory_bytes", lambda v: sorted(v) == ["0", "1"])


async def test_without_so_reuseport_workers_accept_on_one_shared_socket(spawn, tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import socket\n\ndel socket.SO_REUSEPORT\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    gp = spawn(WORKERS="2", PYTHONPATH=path)
    log = await logged(gp, LISTENING, 2)
    assert "one shared socket" in log
    await per_worker(gp.port, "process_resident_memory_bytes", lambda v: sorted(v) == ["0", "1"])
    assert await asyncio.to_thread(gp.stop) == 0


def test_workers_that_die_at_start_again_and_again_stop_the_gateway(
    tmp_path, data_dir, gateway_env
):
    unreachable = f"postgresql://127.0.0.1:{free_port()}/none"
    gp = GatewayProcess(
        tmp_path, data_dir, **{**gateway_env, "DATABASE_URL": unreachable, "WORKERS": "3"}
    )
    try:
        with pytest.raises(RuntimeError, match="5 quick deaths in a row, giving up"):
            gp.start()
        assert gp.proc.wait(5 * UNIT) == 1
    finally:
        gp.stop()
    assert "restarting in 1s" in gp.output()


async def test_workers_without_redis_run_one_process_and_say_why(spawn):
    gp = spawn(redis=False, WORKERS="3")
    log = gp.output()
    assert "REDIS_URL not set" in log and "not the 3 workers asked for" in log
    assert "worker processes" not in log and not worker_pids(gp)
    samples = [s for family in (await scrape(gp.port)).values() for s in family]
    assert samples and not [s for s in samples if "worker" in s.labels]


def test_worker_count_defaults_to_one_per_core_and_needs_redis():
    redis = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert worker_count(redis.replace(workers=3)) == (3, None)
    count, why = worker_count(redis)
    assert count == len(os.sched_getaffinity(0)) and why is None
    count, why = worker_count(Settings(workers=4))
    assert count == 1 and why is not None and "REDIS_URL not set" in why


@pytest.mark.parametrize(
    ("argv", "workers"),
    [
        ([], None),
        (["--workers", "2"], 2),
        (["run", "--workers", "3"], 3),
        (["--workers", "4", "run"], 4),
    ],
)
def test_workers_flag_on_the_command_line(argv, workers):
    assert _parser().parse_args(argv).workers == workers


def _registry(registry: CollectorRegistry, connections: float, messages: int) -> None:
    Gauge("gw_connections", "Open connections.", ["transport"], registry=registry).labels(
        "websocket"
    ).set(connections)
    Counter("gw_messages", "Messages.", registry=registry).inc(messages)


def test_scrape_merges_sibling_snapshots_with_a_worker_label(tmp_path):
    mine, sibling = WorkerRegistry(0, str(tmp_path)), WorkerRegistry(1, str(tmp_path))
    _registry(mine, 3, 1)
    _registry(sibling, float("inf"), 5)
    sibling.save()
    text = generate_latest(scrape_view(mine, time.time())).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE gw_connections gauge") == 1
    assert {(s.labels["worker"], s.value) for s in families["gw_connections"].samples} == {
        ("0", 3.0),
        ("1", float("inf")),
    }
    totals = [s for s in families["gw_messages"].samples if s.name == "gw_messages_total"]
    assert {(s.labels["worker"], s.value) for s in totals} == {("0", 1.0), ("1", 5.0)}
    # A sibling that stopped writing no longer counts; one that stopped is removed.
    later = generate_latest(scrape_view(mine, time.time() + MAX_AGE + 1)).decode()
    assert 'worker="0"' in later and 'worker="1"' not in later
    sibling.remove()
    assert 'worker="1"' not in generate_latest(scrape_view(mine, time.time())).decode()


def test_one_process_scrape_is_the_registry_unlabelled():
    registry = CollectorRegistry()
    _registry(registry, 2, 1)
    assert generate_latest(scrape_view(registry, time.time())) == generate_latest(registry)


async def test_the_rest_core_runs_workers_on_one_port_as_the_gateway_does(
    tmp_path, data_dir, gateway_env
):
    core = GatewayProcess(tmp_path, data_dir, "core", **gateway_env, WORKERS="2").start()
    try:
        await logged(core, "REST core listening on", 2)
        pids = worker_pids(core)
        assert sorted(pids) == [0, 1] and core.proc.pid not in pids.values()
        memory = await per_worker(
            core.port, "process_resident_memory_bytes", lambda v: sorted(v) == ["0", "1"]
        )
        assert min(memory.values()) > 0  # either worker's /metrics shows both
        core.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(core.proc.wait, 15 * UNIT) == 0
        assert not [pid for pid in pids.values() if alive(pid)]
    finally:
        if core.proc.poll() is None:
            core.stop(signal.SIGKILL)


def test_the_rest_core_takes_a_workers_flag(monkeypatch):
    from core.__main__ import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["--workers", "2", "serve"]) == 2  # parsed; refused for want of a database
    with pytest.raises(SystemExit):
        main(["--workers", "two"])
