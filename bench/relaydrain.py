"""How fast the outbox relay drains a backlog: this checkout's `core.relay` against a baseline's.

A backlog builds while Redis is out (docs/rest.md, live resources); once it
is back, every core's relay publishes it. This bench fills the ``outbox``
of its own schema with ``--rows`` change events (each for its own
``projects:<id>`` channel and ``projects``, as a write makes them, older
than the relay's grace), then runs relay rounds until the table is empty,
and prints rows per second. Redis at ``REDIS_URL`` (its own prefix),
PostgreSQL at ``DATABASE_URL``. Each side runs in its own interpreter from
its own checkout (``--baseline REF``: a detached worktree of REF made for
the run), alternating, ``--rounds`` times; medians.

Rerun (about a minute)::

    .venv/bin/python -m bench.relaydrain --baseline 9e3b56e
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Runs inside the checkout measured (its ``core`` on the path): prints rows per second.
_DRAIN = r"""
import asyncio, json, os, sys, time, uuid
import asyncpg
from core.db import Database
from core.events import Events
from core.infra.broker import RedisBroker
from core.infra.history import HistoryPolicy, HistoryPublisher
from core.infra.settings import Settings
from core.relay import Relay

ROWS = int(sys.argv[1])
SCHEMA = "bench_relaydrain"

async def main():
    url = os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/test")
    settings = Settings(jwt_secret="x" * 32, database_url=url, database_schema=SCHEMA,
                        migrate_on_start=True, redis_url=None)
    db = await Database.open(settings)
    prefix = "relaydrain-" + uuid.uuid4().hex[:8] + ":"
    broker = RedisBroker(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix)
    events = Events(HistoryPublisher(broker, HistoryPolicy(("*",), 100, 60)))
    relay = Relay(db.pool, events)
    payload = json.dumps({"type": "updated", "id": 1, "version": 2, "data": {"name": "x" * 200}})
    try:
        await db.pool.execute("truncate outbox")
        await db.pool.executemany(
            "insert into outbox (channels, payload, created_at)"
            " values ($1, $2, now() - interval '1 minute')",
            [([f"projects:{n}", "projects"], payload.encode()) for n in range(ROWS)],
        )
        started = time.perf_counter()
        left = ROWS
        while left:
            await relay.round()
            left = await db.pool.fetchval("select count(*) from outbox")
        print(ROWS / (time.perf_counter() - started))
    finally:
        await broker.close()
        await db.close()

asyncio.run(main())
"""


def _drain(checkout: Path, rows: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "-c", _DRAIN, str(rows)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a commit to compare with")
    args = parser.parse_args()
    sides: dict[str, Path] = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory(prefix="relaydrain-") as tmp:
        if args.baseline:
            base = Path(tmp) / "base"
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(base), args.baseline],
                cwd=ROOT,
                check=True,
            )
            sides[f"baseline {args.baseline}"] = base
        try:
            rates: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, checkout in sides.items():
                    rates[name].append(_drain(checkout, args.rows))
        finally:
            if args.baseline:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(sides.popitem()[1])],
                    cwd=ROOT,
                    check=False,
                )
    for name, values in rates.items():
        print(
            f"{name}: {statistics.median(values):,.0f} rows/s "
            f"({', '.join(f'{v:,.0f}' for v in values)}), {args.rows:,} rows"
        )
    print(json.dumps({name: statistics.median(v) for name, v in rates.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
