"""CPU per REST write's change events, in-process: what the events add to a POST.

Calls ``Events.changed`` (the two channels ``projects`` and ``projects:<id>``,
both with history, as shipped) from 64 tasks at once, 200 writes each, on a
real Redis, and prints the process's CPU time (``time.process_time``) per
write, for each round and their median, and Redis's CPU per write (from
``INFO cpu``: Redis's whole CPU, so other users of a shared Redis add to
it). No HTTP and no PostgreSQL, so it isolates the events' path from
everything else a POST does, and moves much less with other people's load
than req/s.

``--baseline REF`` measures the code of commit REF too (a ``git archive``
of it), alternating rounds with this checkout's, each round in a fresh
process.

Rerun (about 10 s, 30 s with ``--baseline``)::

    taskset -c 1 .venv/bin/python -m bench.eventcost --baseline fda4a47
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from core.events import Events
from core.infra.broker import RedisBroker
from core.infra.history import HistoryPolicy, HistoryPublisher

#: About the size of bench/rest.py's project as the core encodes it.
DATA = b'{"id":1,"name":"Harbour district retrofit","description":"%s","tags":["a","b"]}' % (
    b"x" * 600
)
TASKS = 64
WRITES_PER_TASK = 200


async def redis_cpu(client: aioredis.Redis) -> float:
    """Redis's CPU seconds so far (user and system, every thread)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(url: str, rounds: int) -> tuple[list[float], list[float]]:
    """Per round: our CPU per write's events, and Redis's (microseconds)."""
    broker = RedisBroker(url, f"bench-events-{uuid.uuid4().hex[:8]}:")
    await broker.start(lambda *_: None)
    events = Events(HistoryPublisher(broker, HistoryPolicy(("projects", "projects:*"), 100, 60)))
    admin = aioredis.Redis.from_url(url)
    per_write: list[float] = []
    redis_per_write: list[float] = []
    writes = TASKS * WRITES_PER_TASK
    try:
        for _ in range(rounds):
            redis_before = await redis_cpu(admin)
            started = time.process_time()

            async def writer(task: int) -> None:
                for i in range(WRITES_PER_TASK):
                    await events.changed("projects", "created", task * 1000 + i, 1, DATA)

            await asyncio.gather(*(writer(task) for task in range(TASKS)))
            cpu = time.process_time() - started
            per_write.append(1e6 * cpu / writes)
            redis_per_write.append(1e6 * (await redis_cpu(admin) - redis_before) / writes)
        if events.failures:
            raise SystemExit(f"{events.failures} events not published: is Redis up?")
    finally:
        await admin.aclose()
        await broker.close()
    return per_write, redis_per_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eventcost", description=__doc__)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="REF", help="also measure the code of commit REF")
    parser.add_argument("--quiet", action="store_true", help="print only the median (microseconds)")
    args = parser.parse_args(argv)
    if args.baseline:
        return compare(args.baseline, args.redis_url, args.rounds)
    per_write, redis_per_write = uvloop.run(measure(args.redis_url, args.rounds))
    if args.quiet:
        print(f"{statistics.median(per_write):.3f} {statistics.median(redis_per_write):.3f}")
        return 0
    rounds = " ".join(f"{us:.1f}" for us in per_write)
    print(
        f"CPU per write's change events: {statistics.median(per_write):.1f} us "
        f"(median of {len(per_write)} rounds: {rounds}); "
        f"Redis: {statistics.median(redis_per_write):.1f} us"
    )
    return 0


def compare(ref: str, url: str, rounds: int) -> int:
    """This checkout against commit ``ref``, alternating, a fresh process a round."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-eventcost-") as tmp:
        archive = subprocess.run(["git", "archive", ref], cwd=root, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        codes = {"this checkout": root, ref: Path(tmp)}
        got: dict[str, list[float]] = {name: [] for name in codes}
        on_redis: dict[str, list[float]] = {name: [] for name in codes}
        for round_ in range(rounds):
            for name, code in codes.items() if round_ % 2 == 0 else reversed(codes.items()):
                out = subprocess.run(
                    [sys.executable, __file__, "--rounds", "1", "--quiet", "--redis-url", url],
                    cwd=code,
                    env=os.environ | {"PYTHONPATH": str(code)},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                ours, redis = out.stdout.strip().splitlines()[-1].split()
                got[name].append(float(ours))
                on_redis[name].append(float(redis))
    for name, values in got.items():
        rounds_text = " ".join(f"{us:.1f}" for us in values)
        print(
            f"{name}: {statistics.median(values):.1f} us per write's events ({rounds_text}); "
            f"Redis: {statistics.median(on_redis[name]):.1f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
