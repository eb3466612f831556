"""The shipped load-test tool, run as users run it, against a real gateway."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import socket
import sys
import threading
import time

import pytest

from core.infra.runtime import run
from gateway.loadtest.laggard import Throttle, roles
from gateway.loadtest.ledger import Ledger
from gateway.loadtest.options import parse_sources
from gateway.loadtest.sources import IP_BIND_ADDRESS_NO_PORT, connected
from gateway.loadtest.stats import Histogram
from gateway.loadtest.worker import WorkerSpec, _Worker
from gateway.transport import wsconn
from tests.harness import SECRET, running_gateway, unique_prefix
from tests.servers import UNIT
from tests.test_processes import GatewayProcess, start_together


async def loadtest(*args: str) -> tuple[int, dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "ignore", "-m", "gateway.loadtest", "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60 * UNIT)
    assert out, err.decode()
    return proc.returncode or 0, json.loads(out)


@pytest.mark.parametrize("mode", ["ws", "sse", "longpoll"])
async def test_every_transport_is_loaded_timed_and_counted(mode):
    async with running_gateway(rate_connect_ip=None) as gw:
        code, report = await loadtest(
            "--url", f"http://127.0.0.1:{gw.port}", "--secret", SECRET, "--mode", mode,
            "-n", "40", "--processes", "2", "--sources", "127.0.0.2-127.0.0.3",
            "--publish", "http", "--rate", "50", "--messages", "5", "--settle", "0.2",
        )  # fmt: skip
    assert code == 0, report
    conns, deliveries = report["connections"], report["deliveries"]
    assert (conns["opened"], conns["failed"], conns["subscribed"], conns["closed_early"]) == (
        40,
        0,
        40,
        0,
    )
    assert (deliveries["expected"], deliveries["received"], deliveries["lost"]) == (200, 200, 0)
    assert 0 < report["latency"]["p50_ms"] <= report["latency"]["max_ms"]
    assert report["completion"]["count"] == 5
    assert report["server_memory"]["rss_after_bytes"] > 0


async def test_refused_connections_and_lost_messages_fail_the_run():
    async with running_gateway(rate_connect_ip=None) as gw:
        code, report = await loadtest(
            "--url", f"http://127.0.0.1:{gw.port}", "--secret", "not-the-gateways-secret-0123456789",
            "-n", "10", "--publish", "none", "--settle", "0",
        )  # fmt: skip
    assert code == 1
    assert report["connections"]["failed"] == 10
    assert report["errors"] == {"HTTP 401": 10}


def test_source_ranges_and_percentiles():
    assert parse_sources("127.0.0.2-127.0.0.4,127.0.0.9") == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9",
    ]  # fmt: skip
    h = Histogram()
    for ms in range(1, 101):
        h.add(ms / 1000)
    assert h.quantile(0.5) == pytest.approx(0.050, rel=0.02)
    assert h.quantile(0.99) == pytest.approx(0.099, rel=0.02)
    assert h.max == 0.1


async def test_many_channels_each_socket_gets_each_publication_exactly_once():
    async with running_gateway(rate_connect_ip=None, rate_rest=None) as gw:
        code, report = await loadtest(
            "--url", f"http://127.0.0.1:{gw.port}", "--secret", SECRET,
            "--channels", "10", "--group", "6", "--broadcast", "everyone", "--spread", "random",
            "--processes", "2", "--sources", "127.0.0.2-127.0.0.3",
            "--publish", "http", "--rate", "100", "--messages", "66", "--settle", "0.2",
        )  # fmt: skip
    assert code == 0, report
    assert report["connections"]["subscribed"] == 60
    sent = {c["name"]: c["sent"] for c in report["channels"]["per_channel"]}
    assert sum(sent.values()) == 66 and set(sent) == {f"load:{i}" for i in range(10)} | {"everyone"}
    for channel in report["channels"]["per_channel"]:
        members = 60 if channel["name"] == "everyone" else 6
        assert channel["members"] == members
        assert channel["min_received"] == channel["sent"]
        assert channel["received"] == channel["sent"] * members
    deliveries = report["deliveries"]
    assert deliveries["expected"] == sum(sent.values()) * 6 + sent["everyone"] * 54
    assert (deliveries["lost"], deliveries["late"], deliveries["duplicates"]) == (0, 0, 0)
    assert report["sockets"] == {
        "accounted": 60, "exact": 60, "gaps": 0, "duplicates": 0, "out_of_order": 0,
    }  # fmt: skip
    assert report["channels"]["dead"] == [] and report["channels"]["starved"] == []


@pytest.mark.parametrize("mode", ["ws", "sse"])
async def test_a_killed_gateways_sockets_reconnect_to_another_and_recover_late_not_lost(
    tmp_path, data_dir, redis_url, database_url, core_schema, mode
):
    prefix = unique_prefix()
    env = {
        "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET,
        "RATE_CONNECT_IP": "off", "HISTORY_CHANNELS": "load:*,everyone",
        "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema,  # no embedded one
    }  # fmt: skip
    a, b = start_together(*(GatewayProcess(tmp_path, data_dir, **env) for _ in range(2)))
    try:
        assert a.proc is not None
        # 200 sockets on A; A is SIGKILLed 1.5 s into 3 s of publishing (when every channel
        # has had a publication: a socket must have a position to recover from). The sockets
        # come back on B 1-2 s later (backoff 2 s x jitter), after the drain window of 0.3 s
        # has closed for the last publications: what they recover then is late, not lost.
        code, report = await loadtest(
            "--urls", f"http://127.0.0.1:{a.port},http://127.0.0.1:{b.port}", "--mode", mode,
            "--secret", SECRET, "--channels", "20", "--group", "10", "--broadcast", "everyone",
            "--processes", "2", "--publish", "redis", "--redis-url", redis_url,
            "--prefix", prefix, "--history-channels", "load:*,everyone",
            "--rate", "20", "--messages", "60", "--settle", "0.2",
            "--drain", "0.3", "--backoff", "2", "--backoff-max", "2",
            "--kill-after", "1.5", "--kill-pid", str(a.proc.pid), "--server-pid", str(b.proc.pid),
        )  # fmt: skip
        assert a.proc.wait(5 * UNIT) == -signal.SIGKILL
    finally:
        for gp in (a, b):
            if gp.proc is not None and gp.proc.poll() is None:
                gp.stop(signal.SIGKILL)
    assert code == 0, json.dumps(report, indent=1)
    assert report["kill"]["outcome"] == f"SIGKILL {a.proc.pid}"
    assert report["connections"]["subscribed"] == 200
    assert report["reconnects"]["reconnects"] == 200
    assert report["reconnects"]["recovered"] == 400  # each socket's two channels
    assert report["reconnects"]["not_recovered"] == report["reconnects"]["no_history"] == 0
    deliveries = report["deliveries"]
    broadcast = report["channels"]["per_channel"][-1]
    assert broadcast["name"] == "everyone" and broadcast["min_received"] == broadcast["sent"] > 0
    assert deliveries["expected"] == (60 - broadcast["sent"]) * 10 + broadcast["sent"] * 200
    assert deliveries["lost"] == 0 and deliveries["duplicates"] == 0
    assert deliveries["late"] > 0
    assert report["latency"]["count"] == deliveries["expected"]  # late ones timed too
    assert report["sockets"]["exact"] == 200


@pytest.mark.parametrize("history", ["none", "too short"])
async def test_what_recovery_cannot_bring_back_is_reported(
    tmp_path, data_dir, redis_url, database_url, core_schema, history
):
    prefix = unique_prefix()
    patterns = "elsewhere" if history == "none" else "load:*"
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "JWT_SECRET": SECRET,
           "RATE_CONNECT_IP": "off", "HISTORY_CHANNELS": patterns, "HISTORY_SIZE": "2",
           "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema}  # fmt: skip
    a, b = start_together(*(GatewayProcess(tmp_path, data_dir, **env) for _ in range(2)))
    try:
        assert a.proc is not None
        # Away for 0.5-1 s at 20 publications/s over 2 channels: more than 2 per channel.
        code, report = await loadtest(
            "--urls", f"http://127.0.0.1:{a.port},http://127.0.0.1:{b.port}",
            "--secret", SECRET, "--channels", "2", "--group", "5", "--processes", "1",
            "--publish", "redis", "--redis-url", redis_url, "--prefix", prefix,
            "--history-channels", patterns, "--history-size", "2",
            "--rate", "20", "--messages", "40", "--settle", "0.2", "--drain", "1",
            "--late-wait", "0", "--backoff", "1", "--backoff-max", "1",
            "--kill-after", "0.5", "--kill-pid", str(a.proc.pid),
        )  # fmt: skip
    finally:
        for gp in (a, b):
            if gp.proc is not None and gp.proc.poll() is None:
                gp.stop(signal.SIGKILL)
    assert code == 1
    reconnects, deliveries = report["reconnects"], report["deliveries"]
    assert reconnects["reconnects"] == 10 and reconnects["recovered"] == 0
    assert report["sockets"]["gaps"] == 10 and deliveries["lost"] > 0
    if history == "none":
        assert reconnects["no_history"] == 10
        assert deliveries["lost_silent"] == deliveries["lost"]
        assert any("HISTORY_CHANNELS" in note for note in report["notes"])
    else:
        assert reconnects["not_recovered"] == 10
        assert deliveries["lost_explicit"] == deliveries["lost"]  # the server said so
        assert any("recovered: false" in note for note in report["notes"])


def test_the_ledger_tells_gaps_duplicates_and_reordering_apart():
    ledger = Ledger((3, 7))
    for c, s in [(3, 0), (3, 1), (3, 3), (3, 2), (3, 3), (7, 0), (7, 2)]:
        ledger.record(c, s)
    assert ledger.record(5, 0) is None  # not one of its channels
    assert (ledger.dups, ledger.disorder) == (1, 1)
    assert ledger.got(0, 4) == 4 and ledger.lost(0, 4) == 0
    assert ledger.got(1, 4) == 2 and ledger.lost(1, 4) == 2  # 1 skipped, 3 never came
    assert not ledger.complete([0, 0, 0, 4, 0, 0, 0, 3])
    ledger.record(7, 1)
    assert ledger.complete([0, 0, 0, 4, 0, 0, 0, 3])
    assert ledger.since(0) is None
    ledger.position(1, 42, "e1")
    assert ledger.since(1) is not None and ledger.since(1).offset == 42


def test_laggards_are_spread_evenly_and_throttled_to_their_rate():
    assert roles(10, 2, 3) == [2, 0, 2, 0, 1, 0, 2, 0, 1, 0]
    assert roles(4, 0, 0) == [0, 0, 0, 0]
    assert roles(3, 3, 0) == [1, 1, 1]
    throttle = Throttle(1000.0)
    throttle.restart(10.0)
    assert throttle.pause_for(500, 10.25) == pytest.approx(0.25)  # 500 bytes are 0.5 s' worth
    assert throttle.pause_for(500, 11.5) == 0.0  # behind its rate: read on


async def test_stalled_and_slow_sockets_are_shed_and_counted_apart_while_readers_lose_nothing(
    monkeypatch,
):
    # A 32 KiB send buffer per socket; 32 KiB publications at 100/s (3.2 MB/s a socket) fill
    # it (and the ~300 KB the kernel holds on the way) within a second for a socket that does
    # not read, or reads 100 KB/s. A shed socket that reads nothing is dropped CLOSE_TIMEOUT
    # after its 4001; one that reads on gets its backlog, then the close frame.
    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.5 * UNIT)
    async with running_gateway(rate_connect_ip=None, send_buffer_bytes=32768) as gw:
        code, report = await loadtest(
            "--url", f"http://127.0.0.1:{gw.port}", "--secret", SECRET, "-n", "30",
            "--stall", "5", "--slow", "5", "--slow-rate", "100000",
            "--laggard-mss", "1448", "--laggard-rcvbuf", "16384", "--processes", "1",
            "--publish", "http", "--rate", "100", "--messages", "100", "--payload-bytes", "32768",
            "--settle", "0.2", "--laggard-wait", str(10 * UNIT),
        )  # fmt: skip
        shed = gw.ctx.metrics.slow_consumers._value.get()
    assert code == 0, json.dumps(report, indent=1)
    assert report["connections"]["subscribed"] == 30 and report["connections"]["failed"] == 0
    assert report["sockets"] == {
        "accounted": 20, "exact": 20, "gaps": 0, "duplicates": 0, "out_of_order": 0,
    }  # fmt: skip
    assert report["deliveries"]["expected"] == report["deliveries"]["received"] == 20 * 100
    stalled, slow = report["laggards"]["stalled"], report["laggards"]["slow"]
    assert (stalled["subscribed"], stalled["closed"], stalled["dropped"]) == (5, {}, 5)
    assert (slow["subscribed"], slow["closed"], slow["dropped"]) == (5, {"4001": 5}, 0)
    for lag in (stalled, slow):
        assert lag["open_at_end"] == 0
        assert lag["publications"]["max"] < 100  # not all
    assert stalled["publications"]["max"] < slow["publications"]["min"]  # the slow read on
    assert shed == 10


def test_a_process_sends_its_result_whole_however_large():
    # The result holds a time per publication (a 10-minute soak: 30,000); the pipe, which the
    # process's event loop watches, must not refuse it half-written (EAGAIN) while the
    # driver, busy, is not reading.
    mine, theirs = multiprocessing.Pipe()
    spec = WorkerSpec(0, [("127.0.0.1", 1)], "/ws", "ws", [], [], ["load"], [], 1, 0.0)
    worker = _Worker(spec, theirs)
    worker.tally.last_arrival = {i: float(i) for i in range(200_000)}
    errors: list[BaseException] = []

    def process() -> None:
        try:
            run(worker.main())
        except BaseException as exc:
            errors.append(exc)

    def receive() -> tuple:
        assert mine.poll(10 * UNIT), "the process sent nothing more"
        return mine.recv()

    thread = threading.Thread(target=process)
    thread.start()
    try:
        assert [receive()[0], receive()[0]] == ["window", "connected"]
        mine.send("stop")
        time.sleep(0.5 * UNIT)  # not reading yet
        assert not errors
        while (message := receive())[0] != "result":
            pass
        assert len(message[1]["last_arrival"]) == 200_000
    finally:
        thread.join(10 * UNIT)
    assert not thread.is_alive() and not errors


async def test_compression_is_offered_and_compressed_publications_are_counted(tmp_path):
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps({"items": [{"id": i, "name": "widget", "tag": "x"} for i in range(30)]})
    )
    async with running_gateway(rate_connect_ip=None, compression=True) as gw:
        code, report = await loadtest(
            "--url", f"http://127.0.0.1:{gw.port}", "--secret", SECRET, "-n", "20",
            "--compression", "--payload-json", str(body),
            "--publish", "http", "--rate", "50", "--messages", "5", "--settle", "0.2",
        )  # fmt: skip
        compressor = gw.ctx.compressor
        assert compressor is not None
    assert code == 0, report
    assert report["deliveries"]["received"] == 100 and report["deliveries"]["lost"] == 0
    # Every delivery went out as the frame compressed once per publication.
    assert compressor.delivered == 100 and compressor.frames >= 5
    assert compressor.delivered_bytes < compressor.delivered_plain / 3


async def test_a_load_socket_from_a_source_takes_its_port_at_the_connect():
    # Bound to (source, 0) before its connect, each load socket held a port of the
    # machine's ephemeral range against every other connect: after bench.fanout's
    # 19,500 load sockets, bench.sendfloor's own connects failed (EADDRNOTAVAIL) after
    # 13,232 of 19,000. Its port is now chosen at the connect, per address pair.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = await connected("127.0.0.1", listener.getsockname()[1], "127.0.0.2")
        try:
            assert sock.getsockname()[0] == "127.0.0.2"
            assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
        finally:
            sock.close()
