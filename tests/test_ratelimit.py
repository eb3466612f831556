"""One contract suite for every RateLimiter (memory always, Redis really), then Redis faults.

Every contract test passes ``now``: the limiters never read a clock there, so
nothing sleeps and nothing races.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid

import pytest
import redis.asyncio as aioredis

from core.infra.ratelimit import Decision, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tests.servers import UNIT

T0 = 1000.0


def rl_prefix() -> str:
    return f"gwtest:{uuid.uuid4().hex[:8]}:rl:"


@pytest.fixture(params=["memory", "redis"])
async def limiter(request):
    if request.param == "memory":
        made: RateLimiter = MemoryRateLimiter()
    else:
        made = RedisRateLimiter(request.getfixturevalue("redis_url"), rl_prefix())
    yield made
    await made.close()


async def hits(limiter: RateLimiter, n: int, key: str = "k", **kw) -> list[Decision]:
    return [await limiter.hit(key, **kw) for _ in range(n)]


async def test_burst_of_limit_then_refused(limiter):
    decisions = await hits(limiter, 6, limit=5, period=10, now=T0)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.retry_after for d in decisions[:5]] == [0.0] * 5
    assert decisions[5] == Decision(False, 0, 2.0)


async def test_remaining_counts_down(limiter):
    decisions = await hits(limiter, 4, limit=4, period=60, now=T0)
    assert [d.remaining for d in decisions] == [3, 2, 1, 0]


async def test_refills_smoothly_over_time(limiter):
    await hits(limiter, 4, limit=4, period=2, now=T0)  # one request per 0.5 s
    assert await limiter.hit("k", 4, 2, now=T0 + 0.5) == Decision(True, 0, 0.0)
    assert await limiter.hit("k", 4, 2, now=T0 + 0.5) == Decision(False, 0, 0.5)
    assert await limiter.hit("k", 4, 2, now=T0 + 1.5) == Decision(True, 1, 0.0)
    # Idle for longer than the period: a full burst again, not more.
    later = await hits(limiter, 5, limit=4, period=2, now=T0 + 100)
    assert [d.allowed for d in later] == [True] * 4 + [False]
    assert later[0].remaining == 3


@pytest.mark.parametrize(("limit", "period"), [(3, 1.0), (10, 60.0), (7, 0.1), (1, 3600.0)])
async def test_retry_after_is_exact(limiter, limit, period):
    await hits(limiter, limit, limit=limit, period=period, now=T0)
    refused = await limiter.hit("k", limit, period, now=T0)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(period / limit, abs=1e-6)
    early = await limiter.hit("k", limit, period, now=T0 + refused.retry_after - 1e-5)
    assert not early.allowed
    assert early.retry_after == pytest.approx(1e-5, abs=1e-6)
    on_time = await limiter.hit("k", limit, period, now=T0 + refused.retry_after)
    assert on_time == Decision(True, 0, 0.0)


@pytest.mark.parametrize(("limit", "period"), [(3, 1.0), (7, 0.1)])
async def test_sustained_rate_never_exceeds_limit_per_period(limiter, limit, period):
    await hits(limiter, limit, limit=limit, period=period, now=T0)
    now, allowed = T0, 0
    while allowed < 10 * limit:  # each as early as retry_after says
        decision = await limiter.hit("k", limit, period, now=now)
        if decision.allowed:
            allowed += 1
        else:
            now += decision.retry_after
    assert 10 * period <= now - T0 < 10 * period + 1e-3


async def test_keys_are_independent(limiter):
    await hits(limiter, 2, "a", limit=2, period=60, now=T0)
    assert not (await limiter.hit("a", 2, 60, now=T0)).allowed
    assert await limiter.hit("b", 2, 60, now=T0) == Decision(True, 1, 0.0)
    assert await limiter.hit("a:b", 2, 60, now=T0) == Decision(True, 1, 0.0)


async def test_reset_forgets_a_key(limiter):
    await hits(limiter, 3, "login", limit=3, period=60, now=T0)
    await hits(limiter, 3, "other", limit=3, period=60, now=T0)
    await limiter.reset("login")
    await limiter.reset("never-hit")
    assert await limiter.hit("login", 3, 60, now=T0) == Decision(True, 2, 0.0)
    assert not (await limiter.hit("other", 3, 60, now=T0)).allowed


async def test_cost_counts_several_requests(limiter):
    assert await limiter.hit("k", 10, 10, cost=4, now=T0) == Decision(True, 6, 0.0)
    assert await limiter.hit("k", 10, 10, cost=6, now=T0) == Decision(True, 0, 0.0)
    assert await limiter.hit("k", 10, 10, cost=3, now=T0) == Decision(False, 0, 3.0)
    assert await limiter.hit("k", 10, 10, cost=10, now=T0 + 10) == Decision(True, 0, 0.0)


async def test_refund_gives_back_what_an_allowed_hit_counted(limiter):
    await hits(limiter, 3, limit=3, period=60, now=T0)
    assert not (await limiter.hit("k", 3, 60, now=T0)).allowed
    await limiter.refund("k", 3, 60, now=T0)
    assert await limiter.hit("k", 3, 60, now=T0) == Decision(True, 0, 0.0)
    # Refunds never bank credit beyond a full burst, and unknown keys are no-ops.
    for _ in range(10):
        await limiter.refund("k", 3, 60, now=T0)
    await limiter.refund("never-hit", 3, 60, now=T0)
    decisions = await hits(limiter, 4, limit=3, period=60, now=T0)
    assert [d.allowed for d in decisions] == [True] * 3 + [False]


async def test_refused_hit_does_not_consume(limiter):
    await hits(limiter, 2, limit=2, period=4, now=T0)
    for _ in range(20):
        assert await limiter.hit("k", 2, 4, now=T0 + 1) == Decision(False, 0, 1.0)
    assert (await limiter.hit("k", 2, 4, now=T0 + 2)).allowed
    # A refused expensive hit leaves room for a cheaper one.
    assert await limiter.hit("c", 5, 5, cost=3, now=T0) == Decision(True, 2, 0.0)
    assert await limiter.hit("c", 5, 5, cost=3, now=T0) == Decision(False, 0, 1.0)
    assert await limiter.hit("c", 5, 5, cost=2, now=T0) == Decision(True, 0, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "period": 1.0},
        {"limit": -1, "period": 1.0},
        {"limit": 5, "period": 0.0},
        {"limit": 5, "period": -1.0},
        {"limit": 5, "period": math.nan},
        {"limit": 5, "period": math.inf},
        {"limit": 5, "period": 1.0, "cost": 0},
        {"limit": 5, "period": 1.0, "cost": 6},
    ],
)
async def test_bad_arguments_raise(limiter, kwargs):
    with pytest.raises(ValueError):
        await limiter.hit("k", now=T0, **kwargs)
    assert await limiter.hit("k", 1, 1, now=T0) == Decision(True, 0, 0.0)  # nothing counted


async def test_default_clock_limits_too(limiter):
    decisions = await hits(limiter, 4, limit=3, period=3600)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert 1199 < decisions[3].retry_after <= 1200


# -- memory only -------------------------------------------------------------------


async def test_memory_drops_expired_keys_before_live_ones():
    limiter = MemoryRateLimiter(max_keys=2)
    await limiter.hit("live", 1, 60, now=T0)
    await limiter.hit("expired", 1, 1, now=T0)
    await limiter.hit("new", 1, 60, now=T0 + 5)  # full: "expired" makes room
    assert not (await limiter.hit("live", 1, 60, now=T0 + 5)).allowed
    assert not (await limiter.hit("new", 1, 60, now=T0 + 5)).allowed


async def test_memory_forgets_the_least_recently_hit_when_full():
    limiter = MemoryRateLimiter(max_keys=2)
    await limiter.hit("a", 1, 60, now=T0)
    await limiter.hit("b", 1, 60, now=T0)
    assert not (await limiter.hit("a", 1, 60, now=T0)).allowed  # "a" is now the most recent
    await limiter.hit("c", 1, 60, now=T0)  # full, nothing expired: "b" goes
    assert not (await limiter.hit("a", 1, 60, now=T0)).allowed
    assert (await limiter.hit("b", 1, 60, now=T0)).allowed


def test_memory_refuses_a_bad_size():
    with pytest.raises(ValueError):
        MemoryRateLimiter(max_keys=0)


# -- Redis only --------------------------------------------------------------------


async def test_redis_limiters_share_one_limit(redis_url):
    prefix = rl_prefix()
    a, b = RedisRateLimiter(redis_url, prefix), RedisRateLimiter(redis_url, prefix)
    other = RedisRateLimiter(redis_url, rl_prefix())
    try:
        assert await a.hit("k", 3, 60, now=T0) == Decision(True, 2, 0.0)
        assert await b.hit("k", 3, 60, now=T0) == Decision(True, 1, 0.0)
        assert await a.hit("k", 3, 60, now=T0) == Decision(True, 0, 0.0)
        assert await b.hit("k", 3, 60, now=T0) == Decision(False, 0, 20.0)
        assert (await other.hit("k", 3, 60, now=T0)).allowed  # another prefix, another limit
        await a.reset("k")
        assert await b.hit("k", 3, 60, now=T0) == Decision(True, 2, 0.0)
    finally:
        for limiter in (a, b, other):
            await limiter.close()


async def test_a_redis_clock_stepped_back_refuses_no_one_for_the_step(redis_url):
    """Redis's clock stepped back an hour (NTP) under a gateway: every client that had made a
    request in the last period (one, or its whole allowance) was refused for an hour
    (20 of 20 REST clients, Retry-After 3552..3606 s). Now they count as having spent their
    allowance: one interval's wait at most, then the steady rate."""
    limiter = RedisRateLimiter(redis_url, rl_prefix())
    try:
        await limiter.hit("one", 10, 60, now=T0)
        await hits(limiter, 10, "all", limit=10, period=60, now=T0)
        back = T0 - 3600
        for key in ("one", "all"):
            assert await limiter.hit(key, 10, 60, now=back) == Decision(False, 0, 6.0)
            assert await limiter.hit(key, 10, 60, now=back + 6) == Decision(True, 0, 0.0)
    finally:
        await limiter.close()


async def test_redis_key_is_prefixed_and_expires_when_irrelevant(redis_url):
    prefix = rl_prefix()
    limiter = RedisRateLimiter(redis_url, prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await limiter.hit("k", 2, 10, now=T0)  # TAT 5 s ahead of now
        assert await client.get(prefix + "k") == str(round((T0 + 5) * 1_000_000)).encode()
        assert 4000 < await client.pttl(prefix + "k") <= 5000
        await limiter.hit("k", 2, 10, now=T0)
        assert 9000 < await client.pttl(prefix + "k") <= 10000
        await limiter.hit("k", 2, 10, now=T0)  # refused: nothing written
        assert await client.get(prefix + "k") == str(round((T0 + 10) * 1_000_000)).encode()
    finally:
        await client.aclose()
        await limiter.close()


async def test_redis_outage_fails_open_per_process_then_recovers(throwaway_redis, caplog):
    caplog.set_level(logging.INFO, logger="core.infra.ratelimit")
    url, prefix = throwaway_redis.url, rl_prefix()
    a = RedisRateLimiter(url, prefix, timeout=0.5 * UNIT, retry_interval=0.05)
    b = RedisRateLimiter(url, prefix, timeout=0.5 * UNIT, retry_interval=0.05)
    try:
        assert await a.hit("k", 3, 3600) == Decision(True, 2, 0.0)
        throwaway_redis.kill()

        loop = asyncio.get_running_loop()
        started = loop.time()
        during = await hits(a, 4, limit=3, period=3600)
        assert loop.time() - started < 1.0 * UNIT
        assert a.degraded
        # This process counts on its own: a fresh allowance, then refusals.
        assert [d.allowed for d in during] == [True, True, True, False]
        assert 1199 < during[3].retry_after <= 1200
        # Another process has its own fallback: the limit is per process now.
        assert (await b.hit("k", 3, 3600)).allowed
        await asyncio.sleep(0.1)  # past the retry interval: the next hit tries Redis again
        assert not (await a.hit("k", 3, 3600)).allowed
        warned = [
            r
            for r in caplog.records
            if r.name == "core.infra.ratelimit" and r.levelno == logging.WARNING
        ]
        assert len(warned) == 2  # one per limiter and outage, not one per hit
        await a.reset("k")  # never raises, outage or not

        throwaway_redis.start()
        # `a` tries Redis again within its retry interval; once it is back,
        # its hits are seen by `b` (the restarted Redis started empty).
        async with asyncio.timeout(5 * UNIT):
            n = 0
            while True:
                n += 1
                key = f"probe:{n}"
                await a.hit(key, 1, 3600)
                if not (await b.hit(key, 1, 3600)).allowed:
                    break
                await asyncio.sleep(0.02)
        assert not a.degraded and not b.degraded
        assert await a.hit("shared", 2, 3600) == Decision(True, 1, 0.0)
        assert await b.hit("shared", 2, 3600) == Decision(True, 0, 0.0)
        assert not (await a.hit("shared", 2, 3600)).allowed
        messages = [r.getMessage() for r in caplog.records if r.name == "core.infra.ratelimit"]
        assert sum("answers again" in m for m in messages) == 2
        assert sum("unavailable" in m for m in messages) == 2
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_answers_at_once():
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0", retry_interval=60)
    try:
        async with asyncio.timeout(1.0 * UNIT):
            decisions = await hits(limiter, 3, limit=2, period=60, now=T0)
        assert [d.allowed for d in decisions] == [True, True, False]
        assert limiter.degraded
    finally:
        await limiter.close()
