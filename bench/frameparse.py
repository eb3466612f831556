"""Parsing frames that come many to a read: µs per frame, server side and client side.

`WebSocketProtocol.receive` on 20,000 frames of a publication's size, cut into
64 KiB reads (so each read ends inside a frame, as a busy socket's do):
masked client frames parsed by the server's protocol object, and unmasked
server frames parsed by a client's (the load tool's, the Python client's).
With ``--baseline DIR`` the same runs in a checkout of another commit too,
alternating, in fresh processes::

    git worktree add /tmp/base <commit>
    .venv/bin/python -m bench.frameparse --baseline /tmp/base --runs 6

It prints each run's median µs per frame, then the medians of them.
(`bench/inbound.py` times one frame per loop turn through the connection.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
_PAYLOAD = b'{"op":"msg","ch":"load:0","data":{"n":12345,"t":1733150000.123,"pad":"%s"}}' % (
    b"x" * 80
)

# Run in a fresh process whose sys.path starts with the checkout to time.
_CHILD = """
import statistics, sys, time
from proto.wsframe import frame
from proto.wsprotocol import WebSocketProtocol, masked_frame
client = sys.argv[1] == "client"
payload, frames, repeats = eval(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
one = frame(payload, False) if client else masked_frame(1, payload, b"abcd")
stream = one * frames
reads = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

def once():
    p = WebSocketProtocol(1 << 16, client=client)
    started = time.perf_counter()
    n = sum(len(p.receive(r)) for r in reads)
    assert n == frames, n
    return (time.perf_counter() - started) / n * 1e6

print(statistics.median(once() for _ in range(repeats)))
"""


def _run(checkout: Path, side: str, frames: int, repeats: int) -> float:
    argv = [sys.executable, "-c", _CHILD, side, repr(_PAYLOAD), str(frames), str(repeats)]
    env = {"PYTHONPATH": str(checkout)}
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit (A/B)")
    parser.add_argument("--runs", type=int, default=6, help="processes per checkout and side")
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15, help="parses per process")
    args = parser.parse_args()
    targets = {"now": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    for side in ("server", "client"):
        runs: dict[str, list[float]] = {name: [] for name in targets}
        for n in range(args.runs):
            order = list(targets.items()) if n % 2 == 0 else list(targets.items())[::-1]
            for name, checkout in order:
                us = _run(checkout, side, args.frames, args.repeats)
                runs[name].append(us)
                print(f"{side} run {n + 1} {name}: {us:.3f} us per frame", flush=True)
        for name, values in runs.items():
            spread = ", ".join(f"{v:.2f}" for v in values)
            print(f"{side} {name}: median {statistics.median(values):.3f} us per frame ({spread})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
