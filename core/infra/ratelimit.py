"""Rate limits: at most ``limit`` requests per ``period`` seconds per key.

Both limiters use GCRA (the generic cell rate algorithm of redis-cell and
throttled): each key stores one *theoretical arrival time* (TAT). A request
of ``cost`` is allowed when ``max(TAT, now) + cost * period / limit`` is no
more than ``period`` ahead of now, and that becomes the new TAT. So an idle
key allows a burst of ``limit``, then one request every ``period / limit``
seconds: the long-run rate is ``limit / period``, but a window of ``period``
seconds that starts with a full burst can see up to ``2 * limit - 1``. A
refused request changes nothing: hammering does not lengthen the wait. (In
Redis, a TAT left more than the allowance ahead by a server clock that
stepped back is brought back to the allowance spent: lua/gcra.lua.)
Arithmetic is in integer microseconds, the interval rounded up (so the rate
is never exceeded), which makes ``retry_after`` exact: a hit at ``now +
retry_after`` is allowed, any earlier one refused.

Arguments: ``limit >= 1``, finite ``period > 0`` and ``1 <= cost <= limit``,
else ValueError. A cost above the limit could never be allowed, so it is a
caller's bug rather than a refusal with an infinite ``retry_after``.

`MemoryRateLimiter` holds the TATs of one process (single-process mode,
per-connection limits); its clock is ``time.monotonic()``. `RedisRateLimiter`
keeps them in Redis under ``prefix + key`` and updates them with one Lua
script, atomically, on the *Redis server's* clock (``TIME``) so that every
process agrees; each key expires when it no longer restricts anything. Both
take ``now`` (seconds) to override the clock in tests.

Failure policy: a rate limiter must neither take the gateway down with Redis
nor hang it. When Redis fails (an error, a refused connection or no answer
within ``timeout``), `RedisRateLimiter.hit` fails open to an in-process
`MemoryRateLimiter`, so limits still hold per process (N processes allow up
to N times the limit). It logs one warning per outage, tries Redis again at
most once per ``retry_interval`` meanwhile, and logs once when Redis answers
again; from then on it uses Redis, whose counts were kept (or were lost with
a restart). `reset` and `refund` never raise either; during an outage they
reach only the fallback.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import time
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.infra.broker.base import Broker
from core.infra.broker.redis import RedisBroker
from core.infra.lua import script
from core.infra.rate import US, Rate, interval_us
from core.infra.settings import Settings

__all__ = [
    "Decision",
    "LocalLimit",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "local_hit",
    "local_spend",
    "make_limiter",
    "over_limit",
]

log = logging.getLogger("core.infra.ratelimit")


class Decision(NamedTuple):
    allowed: bool
    remaining: int
    """Requests of cost 1 still allowed right now (0 when refused)."""
    retry_after: float
    """Seconds until this request would be allowed (0.0 when allowed)."""


class RateLimiter(abc.ABC):
    @abc.abstractmethod
    async def hit(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> Decision:
        """Count ``cost`` requests against ``key`` if the limit allows them."""

    @abc.abstractmethod
    async def reset(self, key: str) -> None:
        """Forget ``key`` (e.g. after a successful login): its next hit starts afresh."""

    @abc.abstractmethod
    async def refund(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> None:
        """Give back ``cost`` requests an allowed `hit` counted (e.g. a login that succeeded).

        Counting first and refunding after keeps concurrent requests from all
        passing one check; the TAT never moves back before ``now``.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""


def _gcra(tat: int, now: int, interval: int, limit: int, cost: int) -> tuple[Decision, int]:
    """The decision and the TAT to store; the Lua script below is this, line for line, but
    for one bound: a TAT more than the allowance ahead of the Redis server's clock, stored
    before that clock stepped back, counts there as the allowance spent. (Here the clock is
    monotonic, and such a TAT is a debt `local_spend` left on purpose.)"""
    tat = max(tat, now)
    new_tat = tat + cost * interval
    over = new_tat - now - interval * limit
    if over > 0:
        return Decision(False, 0, over / US), tat
    return Decision(True, (interval * limit - (new_tat - now)) // interval, 0.0), new_tat


def local_hit(rate: Rate, tat: int, now: float | None = None) -> tuple[Decision, int]:
    """One hit on an allowance its owner holds as a TAT (an int): the decision and the new TAT.

    No dict, no lock, no await; and no object per owner: a socket's session
    keeps its TATs in its own slots (`LocalLimit` wraps one).
    """
    interval = interval_us(rate.limit, rate.period, 1)
    now_us = round((time.monotonic() if now is None else now) * US)
    return _gcra(tat, now_us, interval, rate.limit, 1)


def local_spend(rate: Rate, tat: int, cost: int, now: float | None = None) -> int:
    """The TAT after ``cost`` more hits, taken whatever the allowance (work that turned
    out dearer than one hit): the hits after it wait until it is paid back."""
    interval = interval_us(rate.limit, rate.period, 1)
    now_us = round((time.monotonic() if now is None else now) * US)
    return max(tat, now_us) + cost * interval


class LocalLimit:
    """One allowance held by its owner: `local_hit` on a TAT of its own."""

    __slots__ = ("_tat", "rate")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._tat = 0

    def hit(self, now: float | None = None) -> Decision:
        decision, self._tat = local_hit(self.rate, self._tat, now)
        return decision


async def over_limit(
    limiter: RateLimiter, key: str, rate: Rate | None, cost: int = 1
) -> float | None:
    """Seconds ``key`` must wait when over ``rate``; None when allowed (or no limit).

    ``cost``: requests this one counts as (at most the rate's whole allowance).
    """
    if rate is None:
        return None
    decision = await limiter.hit(key, *rate, cost=max(1, min(cost, rate.limit)))
    return None if decision.allowed else decision.retry_after


class MemoryRateLimiter(RateLimiter):
    """TATs in a dict, in order of last hit, holding at most ``max_keys`` keys.

    When full, a new key first drops the expired entries; if more than 15/16
    of ``max_keys`` are still live, the least recently hit are forgotten down
    to that (one sweep per max_keys/16 new keys, however many keys are sprayed).
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self._max_keys = max_keys
        self._tats: dict[str, int] = {}

    async def hit(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> Decision:
        interval = interval_us(limit, period, cost)
        now_us = round((time.monotonic() if now is None else now) * US)
        old = self._tats.pop(key, None)
        if old is None and len(self._tats) >= self._max_keys:
            self._make_room(now_us)
        decision, tat = _gcra(now_us if old is None else old, now_us, interval, limit, cost)
        self._tats[key] = tat
        return decision

    def _make_room(self, now: int) -> None:
        tats = self._tats
        for key in [k for k, tat in tats.items() if tat <= now]:
            del tats[key]
        excess = len(tats) - (self._max_keys - max(1, self._max_keys // 16))
        for key in list(itertools.islice(tats, max(0, excess))):
            del tats[key]

    async def reset(self, key: str) -> None:
        self._tats.pop(key, None)

    async def refund(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> None:
        interval = interval_us(limit, period, cost)
        now_us = round((time.monotonic() if now is None else now) * US)
        tat = self._tats.get(key)
        if tat is None:
            return
        if tat - cost * interval <= now_us:
            del self._tats[key]
        else:
            self._tats[key] = tat - cost * interval

    async def close(self) -> None:
        self._tats.clear()


_GCRA_LUA = script("gcra")

_REFUND_LUA = script("gcra_refund")


class RedisRateLimiter(RateLimiter):
    """Limits shared by every process using the same Redis and ``prefix``.

    ``timeout`` bounds one Redis round trip; ``retry_interval`` is how often
    Redis is tried again during an outage (see the module's failure policy).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "gw:rl:",
        *,
        timeout: float = 0.5,
        retry_interval: float = 1.0,
        max_keys: int = 100_000,
        cluster: bool = False,
        client: aioredis.Redis | None = None,
    ) -> None:
        """``client``: a Redis client to share (the broker's command pool), which
        this limiter then never closes; else it opens its own from ``url``."""
        self._prefix = prefix
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._max_keys = max_keys
        self._fallback = MemoryRateLimiter(max_keys)
        self._down_until: float | None = None
        # One immediate retry replaces a pooled connection that a Redis
        # restart closed; more would only delay the fallback.
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # Each key is its own slot on a cluster: the client sends it to its shard.
        self._owned = client is None
        self._client: aioredis.Redis | aioredis.RedisCluster = (
            client
            if client is not None
            else aioredis.RedisCluster.from_url(url, **options)
            if cluster
            else aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
        )
        self._script = self._client.register_script(_GCRA_LUA)
        self._refund = self._client.register_script(_REFUND_LUA)

    @property
    def degraded(self) -> bool:
        """True during an outage, while hits are counted in this process only."""
        return self._down_until is not None

    async def hit(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> Decision:
        interval = interval_us(limit, period, cost)
        if self._down_until is None or time.monotonic() >= self._down_until:
            args = (interval, limit, cost, "" if now is None else round(now * US))
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._script(keys=[self._prefix + key], args=args)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
            else:
                self._recovered()
                allowed, remaining, over = (int(v) for v in reply)
                return Decision(bool(allowed), remaining, over / US)
        return await self._fallback.hit(key, limit, period, cost=cost, now=now)

    async def reset(self, key: str) -> None:
        await self._fallback.reset(key)
        if self._down_until is not None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.delete(self._prefix + key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)

    async def refund(
        self, key: str, limit: int, period: float, *, cost: int = 1, now: float | None = None
    ) -> None:
        interval = interval_us(limit, period, cost)
        if self._down_until is None:
            args = (interval, cost, "" if now is None else round(now * US))
            try:
                async with asyncio.timeout(self._timeout):
                    await self._refund(keys=[self._prefix + key], args=args)
                return
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
        await self._fallback.refund(key, limit, period, cost=cost, now=now)

    async def close(self) -> None:
        await self._fallback.close()
        if self._owned:
            await self._client.aclose()

    def _failed(self, exc: BaseException) -> None:
        if self._down_until is None:
            log.warning(
                "Redis rate limiter unavailable (%s); limiting per process until it answers",
                str(exc) or type(exc).__name__,
            )
        self._down_until = time.monotonic() + self._retry_interval

    def _recovered(self) -> None:
        if self._down_until is not None:
            log.info("Redis rate limiter answers again; limits are shared again")
            self._down_until = None
            # Counts made during the outage are stale once Redis has them again.
            self._fallback = MemoryRateLimiter(self._max_keys)


def make_limiter(settings: Settings, broker: Broker | None = None) -> RateLimiter:
    """Limits shared by every process through Redis, or this process's own.

    With a (single-node) Redis broker, the limiter uses its command pool:
    one bounded pool per process (REDIS_POOL_SIZE) for every Redis user.
    """
    if settings.redis_url:
        shared = broker.command_client if isinstance(broker, RedisBroker) else None
        return RedisRateLimiter(
            settings.redis_url,
            settings.redis_prefix + "rl:",
            cluster=settings.redis_cluster,
            client=shared,
        )
    return MemoryRateLimiter()
