"""bench/frameparse.py runs end to end, so that it cannot rot (no figure is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_frame_parsing_bench_reports_both_sides():
    argv = [sys.executable, "-m", "bench.frameparse", "--runs", "1", "--frames", "300"]
    done = subprocess.run([*argv, "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for side in ("server", "client"):
        assert f"{side} now: median " in done.stdout
