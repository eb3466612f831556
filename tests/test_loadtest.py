"""The shipped load-test tool, run as users run it, against a real gateway."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from gateway.loadtest.cli import parse_sources
from gateway.loadtest.stats import Histogram
from tests.harness import SECRET, running_gateway
from tests.servers import UNIT


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
    assert (conns["opened"], conns["failed"], conns["subscribed"], conns["closed_early"]) == (40, 0, 40, 0)
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
