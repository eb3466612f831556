"""What a warm Lambda container's look at recent revocations adds to an invocation.

With ``REDIS_URL``, a warm container that has not looked for
``RECENT_CHECK`` (1 s) reads the session revocations stored since its last
look before answering (one ``ZRANGEBYSCORE`` on ``revoked_sessions``, from
the last look's time, less a 10 s overlap). This times warm invocations of
``GET /api/projects?limit=20`` (bench/lambda_cold.py's event, 20 projects)
in one process, alternating invocations that look (the container's last
look moved back) with invocations that do not, and reports the medians and
their difference, for a set holding 0, 100 and 1,000 revocations made in the
last few seconds (all returned by the read: the worst case, a burst of
logouts). Measured on this machine against its Redis and PostgreSQL over
loopback, not on AWS, where a round trip to ElastiCache in the same zone
adds a few hundred microseconds more.

Rerun (from the repository root; PostgreSQL at DATABASE_URL, Redis at
REDIS_URL, defaults on 127.0.0.1)::

    .venv/bin/python -m bench.lambda_revocheck --invocations 2000
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid

from bench.lambda_cold import _execute, arguments, event, fresh_schema, prepare


def _timed(handler: object, ev: dict[str, object]) -> float:
    t0 = time.perf_counter()
    reply = handler(ev, None)  # type: ignore[operator]
    elapsed = time.perf_counter() - t0
    if reply["statusCode"] != 200:
        raise SystemExit(f"unexpected answer: {reply}")
    return elapsed


def measure(token: str, invocations: int, held: int) -> tuple[float, float, int]:
    """(median µs without a look, median µs with one, sessions the look returned)."""
    from core import lambda_handler
    from core.infra.revocation import REVOKED_KEY

    ev = event(token)
    _timed(lambda_handler.handler, ev)  # opens the core
    container, stack = lambda_handler._container, lambda_handler.opened()
    assert container is not None and stack is not None and stack.broker is not None
    revocations = stack.core.revocations
    until = time.time() + revocations.ttl
    members = {f"bench-{held}-{i}": until for i in range(held)}
    container.loop.run_until_complete(stack.broker.expiring_add_many(REVOKED_KEY, members))
    returned = len(
        container.loop.run_until_complete(
            stack.broker.expiring_members_from(REVOKED_KEY, time.time() + revocations.ttl - 10.0)
        )
    )
    plain: list[float] = []
    looked: list[float] = []
    for i in range(invocations):
        if i % 2:
            container.checked = -1e9  # a second and more since the last look
            container.seen = time.time() - 1.0
            looked.append(_timed(lambda_handler.handler, ev))
        else:
            plain.append(_timed(lambda_handler.handler, ev))
    lambda_handler.shutdown()
    return 1e6 * statistics.median(plain), 1e6 * statistics.median(looked), returned


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--invocations", type=int, default=2000)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    )
    args = parser.parse_args()
    env, token = fresh_schema(args.database_url)
    env["RATE_REST"] = "100000000/60"  # still checked (one Redis call), never reached
    schema = env["DATABASE_SCHEMA"]
    rows = []
    prefixes: list[str] = []
    try:
        prepare(env, token)
        os.environ.update(env)
        os.environ["REDIS_URL"] = args.redis_url
        for held in (0, 100, 1000):
            prefixes.append(f"bench-revocheck-{uuid.uuid4().hex[:8]}:")
            os.environ["REDIS_PREFIX"] = prefixes[-1]
            rows.append((held, *measure(token, args.invocations, held)))
            print(f"held {held}: {rows[-1]}", file=sys.stderr)
    finally:
        asyncio.run(_execute(args.database_url, f'drop schema if exists "{schema}" cascade'))
        import redis

        client = redis.Redis.from_url(args.redis_url)
        for prefix in prefixes:  # this run's own keys alone
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
        client.close()
    print(
        f"warm GET /api/projects on Lambda (in process), {args.invocations // 2} invocations "
        f"each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]} (µs, medians)"
    )
    print(f"{'revocations read':>17} {'no look':>9} {'a look':>9} {'added':>7}")
    for _held, plain, looked, returned in rows:
        print(f"{returned:>17} {plain:9.0f} {looked:9.0f} {looked - plain:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
