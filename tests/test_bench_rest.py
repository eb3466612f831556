"""bench/rest.py runs end to end with all four servers, so that it cannot rot.

One round of one-second runs on the test database and Redis. No figure is
checked against a bound (timed assertions flake on a shared machine); what
is checked is that every server started, every request of every run
succeeded (the bench exits 1 when one failed) and the report holds each of
ours against each peer.
"""

from __future__ import annotations

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
def test_the_rest_bench_runs_our_two_servers_and_both_peers(clean_db, redis_url):
    argv = [sys.executable, "-m", "bench.rest", "--duration", "1", "--rounds", "1", "--warmup", "0"]
    argv += ["--connections", "2", "--redis-url", redis_url]
    argv += ["--database-url", clean_db["database_url"], "--schema", clean_db["database_schema"]]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    for ours in ("gateway", "core"):
        for peer in ("FastAPI tutorial", "FastAPI"):
            for endpoint in ("GET /api/projects?limit=20", "POST /api/projects"):
                assert f"| {endpoint} | {ours} | {peer} | **" in done.stdout
    assert "INVALID" not in done.stderr
