"""Redis's own time per history script call: this checkout's Lua against a baseline's.

Runs ``publish_with_history.lua`` (one publication on one channel with
history, as a ``pub`` frame makes) ``--calls`` times in pipelines of 100 on a
real Redis (each with a fresh call id, as the gateway sends), for this
checkout's script and for the one at ``--baseline REF``
(``git show``), alternating rounds, and prints Redis's microseconds per call
from ``INFO commandstats`` (``usec_per_call`` of EVALSHA, reset before each
round): the time the script runs inside Redis, not the round trip, so other
load on the machine moves it little. The history read (a page of 10 of 100
entries) is measured the same way: this checkout's MULTI of
``history_top.lua`` and XRANGE against the baseline's (its MULTI of HMGET and
XRANGE where it has no such script), and the Redis Cluster variant, one
script that reads the entries itself. Inner commands count twice (in EVALSHA
and on their own): about a microsecond.

Rerun (about 10 s)::

    .venv/bin/python -m bench.historyscript --baseline 90c6b5c
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from core.infra.broker.cluster import HISTORY_READ
from core.infra.lua import script

LUA = Path(__file__).resolve().parent.parent / "core" / "infra" / "lua"
DATA = b'{"id":1,"name":"Harbour district retrofit","tags":["a","b"]}'
BATCH = 100


def baseline_script(ref: str, name: str) -> str | None:
    """``<name>.lua`` as it was at ``ref``, or None if it did not exist."""
    done = subprocess.run(
        ["git", "show", f"{ref}:core/infra/lua/{name}.lua"], capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else None


async def usec(r: aioredis.Redis, *commands: str) -> float:
    """Microseconds Redis spent in ``commands`` since the last reset (summed)."""
    stats = await r.info("commandstats")
    return sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in commands)


async def publish_round(r: aioredis.Redis, lua: str, calls: int) -> float:
    sha = await r.script_load(lua)
    ch = f"bench-hs-{uuid.uuid4().hex[:8]}"
    keys = [f"{ch}:h:{{x}}", f"{ch}:m:{{x}}"]
    await r.config_resetstat()
    for _ in range(calls // BATCH):
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(BATCH):
                # A call id as the gateway sends (a baseline without ids ignores it).
                call = uuid.uuid4().hex[:16]
                pipe.evalsha(sha, 2, *keys, f"{ch}:x", DATA, 100, 60, "e0e0e0e0", call)
            await pipe.execute()
    spent = await usec(r, "evalsha")
    await r.delete(*keys)
    return spent / calls


async def read_round(
    r: aioredis.Redis, top: str | None, calls: int, *, alone: bool = False
) -> float:
    """Redis's microseconds per history read: a MULTI of ``top`` (HMGET if None) and XRANGE,
    or ``top`` alone when it reads the entries itself (``alone``: the Redis Cluster variant)."""
    ch = f"bench-hs-{uuid.uuid4().hex[:8]}"
    stream, meta = f"{ch}:h:{{x}}", f"{ch}:m:{{x}}"
    publish = await r.script_load(script("publish_with_history"))
    for _ in range(100):  # a full history of 100 entries; pages of 10 from offset 50
        await r.evalsha(publish, 2, stream, meta, f"{ch}:x", DATA, 100, 60, "e0e0e0e0")
    sha = await r.script_load(top) if top is not None else None
    await r.config_resetstat()
    for _ in range(calls):
        if alone:
            assert sha is not None
            await r.evalsha(sha, 2, stream, meta, "e1e1e1e1", "51-0", 10)
            continue
        async with r.pipeline(transaction=True) as pipe:
            if sha is not None:
                pipe.evalsha(sha, 2, stream, meta, "e1e1e1e1")
            else:
                pipe.hmget(meta, "e", "o")
            pipe.xrange(stream, "51-0", "+", count=10)
            await pipe.execute()
    spent = await usec(r, "evalsha", "hmget", "xrange", "multi", "exec")
    await r.delete(stream, meta)
    return spent / calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a git ref to compare with")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    old_publish = baseline_script(args.baseline, "publish_with_history")
    assert old_publish is not None, f"no publish_with_history.lua at {args.baseline}"
    old_read = baseline_script(args.baseline, "history_top")
    new_publish, new_read = script("publish_with_history"), script("history_top")
    figures: dict[str, list[float]] = {}
    async with aioredis.from_url(args.url) as r:
        for _ in range(args.rounds):
            for name, lua in (
                ("publish, this checkout", new_publish),
                ("publish, baseline", old_publish),
            ):
                figures.setdefault(name, []).append(await publish_round(r, lua, args.calls))
            for name, read in (
                ("history read, this checkout", new_read),
                ("history read, baseline", old_read),
            ):
                figures.setdefault(name, []).append(await read_round(r, read, args.calls // 4))
            cluster = await read_round(r, HISTORY_READ, args.calls // 4, alone=True)
            figures.setdefault("history read, this checkout, Redis Cluster", []).append(cluster)
    for name, values in figures.items():
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"{name}: {statistics.median(values):.2f} us per call in Redis ({rounds})")


if __name__ == "__main__":
    asyncio.run(main())
