"""bench/eventcost.py runs end to end on the test Redis, so that it cannot rot (no figure is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent


def test_the_event_cost_bench_runs_and_reports_both_figures(redis_url):
    argv = [sys.executable, "-m", "bench.eventcost", "--rounds", "1", "--redis-url", redis_url]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU per write's change events:" in done.stdout and "Redis:" in done.stdout
