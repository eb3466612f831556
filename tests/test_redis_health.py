"""A Redis that stalls (alive, silent) is noticed like a lost one: gap, red readiness, recovery."""

from __future__ import annotations

import asyncio

from tornado.httpclient import AsyncHTTPClient

from core.infra.broker import RedisBroker
from tests.harness import http_url, running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT


async def _ready(gw) -> int:
    http = AsyncHTTPClient(force_instance=True)
    try:
        r = await http.fetch(http_url(gw, "/readyz"), raise_error=False, request_timeout=5 * UNIT)
    finally:
        http.close()
    return r.code


async def test_a_stalled_redis_is_a_lost_link_and_subscribers_are_told(throwaway_redis):
    broker = RedisBroker(
        throwaway_redis.url, unique_prefix(), health_interval=0.2 * UNIT, health_timeout=0.3 * UNIT
    )
    async with running_gateway(broker) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            # A quiet, healthy link is pinged, never dropped.
            await asyncio.sleep(1.0 * UNIT)
            assert broker.connected and broker.reconnects == 0
            throwaway_redis.pause()
            try:
                await until(lambda: not broker.connected, 5 * UNIT)
                assert await _ready(gw) == 503
            finally:
                throwaway_redis.resume()
            await until(lambda: broker.connected, 10 * UNIT)
            assert await c.recv(5 * UNIT) == {"op": "gap", "ch": "room:1"}
            assert (await c.request("pub", ch="room:1", data="after"))["ok"]
            assert (await c.next_push())["data"] == "after"
            await asyncio.sleep(1.0)  # readiness is checked at most once a second
            assert await _ready(gw) == 200
