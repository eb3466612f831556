"""What a `presence` ask on a big room costs: each ask read alone, against one read a second.

Puts ``--entries`` entries (5,000 by default) in a room on a real Redis,
then asks `gateway.presence.Presence.who` for it ``--asks`` times, as that
many sockets of one process would, in two ways in the same run:

* ``each``: every ask reads the whole list from Redis and decodes it, as
  before the eleventh session (`READ_EVERY` set to 0);
* ``shared``: as shipped, a channel's list read at most once a second and
  kept up to date meanwhile.

For each it prints the process's wall time per ask and Redis's CPU per ask
(``INFO cpu``: Redis's whole CPU, so other users of a shared Redis add to
it), the medians of ``--rounds`` rounds.

Rerun (about 15 s)::

    .venv/bin/python -m bench.presence
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import msgspec
import redis.asyncio as aioredis

import gateway.presence
from core.infra.broker import RedisBroker
from gateway.presence import Presence, PresenceEntry

CH = "room:big"


async def redis_cpu(r: aioredis.Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_round(url: str, entries: int, asks: int, read_every: float) -> tuple[float, float]:
    """Milliseconds of wall time and of Redis CPU per ask."""
    prefix = f"bench-pr-{uuid.uuid4().hex[:8]}:"
    broker = RedisBroker(url, prefix)
    await broker.start(lambda *_: None)
    r = aioredis.from_url(url)
    try:
        room = {
            f"{i:016x}": msgspec.json.encode(PresenceEntry(f"user{i}", f"{i:016x}"))
            for i in range(entries)
        }
        await broker.presence_add(CH, room, 600)
        gateway.presence.READ_EVERY = read_every
        presence = Presence(broker, ("room:*",), 600)
        before, started = await redis_cpu(r), time.perf_counter()
        for _ in range(asks):
            assert len(await presence.who(CH)) == entries
        wall = time.perf_counter() - started
        spent = await redis_cpu(r) - before
        await presence.close()
        return wall / asks * 1000, spent / asks * 1000
    finally:
        gateway.presence.READ_EVERY = 1.0
        async for key in r.scan_iter(f"{prefix}*", count=10_000):  # few round trips on a full Redis
            await r.delete(key)
        await r.aclose()
        await broker.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--asks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"each": [], "shared": []}
    for _ in range(args.rounds):
        for name, read_every in (("each", 0.0), ("shared", 1.0)):
            results[name].append(
                await one_round(args.redis_url, args.entries, args.asks, read_every)
            )
    print(f"{args.asks} asks of a room of {args.entries} entries, {args.rounds} rounds (medians)")
    for name, rounds in results.items():
        wall = statistics.median(w for w, _ in rounds)
        cpu = statistics.median(c for _, c in rounds)
        walls = " ".join(f"{w:.2f}" for w, _ in rounds)
        print(f"{name}: {wall:.3f} ms per ask ({walls}), Redis CPU {cpu:.3f} ms per ask")


if __name__ == "__main__":
    asyncio.run(main())
