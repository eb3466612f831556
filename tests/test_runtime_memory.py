"""`core.infra.runtime.return_large_allocations`: freed large answers leave the process.

Slow readers holding large answers until ``ANSWER_BUFFER_TOTAL_BYTES``
resets them (bench/answers.py): with glibc's dynamic mmap threshold, large
blocks come from the heap once one of their size was freed, and stay
resident when freed between smaller live objects. Run in a fresh
interpreter, so that the threshold starts as glibc sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Frees one 16 MiB block (glibc then takes blocks under that from the heap), holds ten
#: 9 MiB blocks with small malloc'd objects between them, frees the blocks, and prints
#: how much of their 90 MiB stayed resident.
_PROGRAM = """
import sys
from core.infra.runtime import return_large_allocations

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

print(return_large_allocations() if sys.argv[1] == "fixed" else None)
del_me = b"x" * (16 << 20)
del del_me
base = rss()
blocks, small = [], []
for _ in range(10):
    blocks.append(b"x" * (9 << 20))
    small.append(bytes(2000))  # malloc'd (over pymalloc's 512 bytes), after the block
del blocks
print(max(0, rss() - base) >> 20)
"""


def _kept_mib(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    applied, kept = done.stdout.split()
    return applied, int(kept)


def test_large_blocks_freed_between_live_objects_leave_the_process():
    applied, kept = _kept_mib("fixed")
    assert applied == "True"
    assert kept < 20  # of 90 MiB freed
    _, kept_by_default = _kept_mib("default")
    assert kept_by_default > 60  # what the fix saves: glibc kept them


def test_an_operators_malloc_setting_wins():
    applied, kept = _kept_mib("fixed", MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert applied == "False"
    assert kept > 60  # the operator asked for the heap
