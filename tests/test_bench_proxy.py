"""bench/proxy.py runs end to end, so that it cannot rot.

One round of one-second runs of every part, on the test database and Redis.
No figure is checked against a bound: timed assertions flake on a shared
machine (docs/performance.md). What is checked is that every process
started, every request of every run succeeded (the bench exits 1 when one
failed) and the report holds its three tables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_the_proxy_bench_runs_every_part(clean_db, redis_url):
    argv = [sys.executable, "-m", "bench.proxy", "--duration", "1", "--warmup", "0"]
    argv += ["--rounds", "1", "--connections", "2", "--endpoints", "GET"]
    argv += ["--database-url", clean_db["database_url"], "--schema", clean_db["database_schema"]]
    argv += ["--redis-url", redis_url]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    tables = ("1. REST: straight to the core", "The hop and the serving", "2. Socket rpc")
    for table in (*tables, "3. REST through one gateway"):
        assert table in done.stdout
    assert "INVALID" not in done.stderr


def test_pg_cpu_holds_postgresql_to_one_cpu_and_gives_its_cpus_back(clean_db):
    from bench.proxy import _processes_of, postgres_on, postmaster

    pg = postmaster(clean_db["database_url"])
    assert pg is not None  # the tests' PostgreSQL runs here (the service, or pgserver's)
    before = {pid: os.sched_getaffinity(pid) for pid in _processes_of(pg)}
    with postgres_on("0", pg):  # backends forked meanwhile take the postmaster's CPUs
        assert all(os.sched_getaffinity(pid) == {0} for pid in _processes_of(pg))
    after = {pid: os.sched_getaffinity(pid) for pid in _processes_of(pg) if pid in before}
    assert after == {pid: cpus for pid, cpus in before.items() if pid in after}
