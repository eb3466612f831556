"""A gateway process that runs out of file descriptors: accept pauses, logs little, and recovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket
import time
import urllib.request

from tests.harness import SECRET
from tests.servers import UNIT
from tests.test_processes import GatewayProcess


def _get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2 * UNIT) as r:
        return r.status, r.read()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_out_of_file_descriptors_pauses_accept_with_bounded_logs_then_serves_again(
    tmp_path, data_dir, clean_db
):
    gp = GatewayProcess(
        tmp_path, data_dir, JWT_SECRET=SECRET, LOG_FORMAT="text",
        DATABASE_URL=clean_db["database_url"], DATABASE_SCHEMA=clean_db["database_schema"],
        HEADER_TIMEOUT="60", MAX_PENDING_PER_IP="100000",
    ).start()  # fmt: skip
    clients: list[socket.socket] = []
    try:
        assert gp.proc is not None
        pid = gp.proc.pid
        # A few descriptors to spare, then none: connections that never send a byte.
        limit = _open_fds(pid) + 8
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", gp.port), timeout=2 * UNIT)
            clients.append(s)
        await asyncio.sleep(2.5 * UNIT)  # unpatched, Tornado logs ~10,000 tracebacks a second
        assert gp.proc.poll() is None
        log = gp.output()
        paused = [line for line in log.splitlines() if "accept paused" in line]
        assert 1 <= len(paused) <= 4, log[-2000:]
        assert "Too many open files" in paused[0]
        assert len(log) < 20_000
        assert "Traceback" not in log
        assert _open_fds(pid) <= limit

        for s in clients:
            s.close()
        clients.clear()
        deadline = time.monotonic() + 5 * UNIT
        while True:
            try:
                status, _ = await asyncio.to_thread(_get, gp.port, "/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert status == 200
        _, metrics = await asyncio.to_thread(_get, gp.port, "/metrics")
        match = re.search(rb'gateway_accept_errors_total\{errno="EMFILE"\} (\d+)', metrics)
        assert match is not None and int(match.group(1)) >= 1
    finally:
        for s in clients:
            s.close()
        with contextlib.suppress(Exception):
            gp.stop()
