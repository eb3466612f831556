"""The socket's inbound path per frame: ``data_received`` of one command frame to its session.

One `WSConnection` on a wire that writes nothing, its session's ``handle`` a
no-op, one frame per event-loop turn (a client with one command in flight):
what parsing, the inbox and the command task cost a frame, without Redis,
the core or the kernel. With ``--baseline DIR`` the same runs in a checkout
of another commit too, alternating, in fresh processes::

    git worktree add /tmp/base <commit>
    .venv/bin/python -m bench.inbound --baseline /tmp/base --runs 6

It prints each run's median microseconds per frame, then the medians of them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

__all__ = ["NullSession", "main"]

ROOT = Path(__file__).resolve().parent.parent
_FRAME_JSON = b'{"id":1,"op":"rpc","method":"GET","path":"/api/projects?limit=20"}'


class _Wire:
    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class NullSession:
    """What a `WSConnection` needs of a session, doing nothing; ``handle`` counts."""

    client_id = "c1"
    identity = types.SimpleNamespace(sub="1")

    def __init__(self, conn: Any) -> None:
        self.handled: Any = 0

    def open(self) -> None:
        pass

    def boot(self) -> None:
        return None

    def closed(self, code: int, reason: str = "") -> None:
        pass

    async def handle(self, payload: bytes) -> None:
        self.handled += 1


async def _measure(frames: int, repeats: int) -> float:
    """Median microseconds per frame over ``repeats`` batches (this process's checkout)."""
    from core.infra.metrics import Metrics
    from gateway.loadtest.wsclient import client_frame
    from gateway.transport.wsconn import Coalescer, WSConnection
    from proto.codec import JSON

    made: list[NullSession] = []

    def make(conn: Any) -> NullSession:
        made.append(NullSession(conn))
        return made[0]

    conn = WSConnection(b"", JSON, make, Metrics(), 1 << 16, Coalescer())  # type: ignore[arg-type]
    conn.connection_made(_Wire())  # type: ignore[arg-type]
    frame = client_frame(_FRAME_JSON)
    per_frame = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(frames):
            conn.data_received(frame)
            await asyncio.sleep(0)
        per_frame.append((time.perf_counter() - started) / frames * 1e6)
    assert made[0].handled == frames * repeats
    return statistics.median(per_frame)


def _run(checkout: Path, frames: int, repeats: int) -> float:
    # This file by its path (a baseline may predate it); the gateway of ``checkout``.
    code = (
        f"import sys, asyncio, importlib.util; sys.path.insert(0, {str(checkout)!r}); "
        f"spec = importlib.util.spec_from_file_location('_inbound', {__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"print(asyncio.run(m._measure({frames}, {repeats})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inbound", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit (A/B)")
    parser.add_argument("--runs", type=int, default=6, help="processes per checkout")
    parser.add_argument("--frames", type=int, default=20_000, help="frames per batch")
    parser.add_argument("--repeats", type=int, default=7, help="batches per process")
    args = parser.parse_args(argv)
    sides = {"now": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[str, list[float]] = {name: [] for name in sides}
    for n in range(args.runs):
        order = list(sides.items()) if n % 2 == 0 else list(reversed(sides.items()))
        for name, checkout in order:
            value = _run(checkout, args.frames, args.repeats)
            results[name].append(value)
            print(f"run {n + 1} {name}: {value:.2f} us per frame", flush=True)
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.2f} us per frame "
              f"(runs {', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()
