"""bench/presence.py runs end to end, so that it cannot rot (no figure is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_presence_bench_reports_both_ways(redis_url):
    argv = [sys.executable, "-m", "bench.presence", "--redis-url", redis_url]
    argv += ["--entries", "200", "--asks", "10", "--rounds", "1"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for way in ("each", "shared"):
        assert f"{way}: " in done.stdout and "ms per ask" in done.stdout
