"""What feeds the admin console: figures on ``__admin`` while someone watches, and nothing else.

In-process gateways; the page itself is tests/test_console.py.
"""

from __future__ import annotations

import time

import pytest

from gateway import console
from gateway.app import Gateway
from gateway.nodestats import NodeStats
from proto import ADMIN_CHANNEL
from tests.harness import running_gateway, token_for, unique_prefix, until, ws_client
from tests.servers import UNIT


def admin(gw: Gateway) -> str:
    return token_for(gw, "root", channels=(), extra={"role": "admin"})


async def test_only_admins_read_the_console_channel_and_nobody_publishes_there():
    async with running_gateway() as gw:
        async with ws_client(gw.port, token_for(gw, "mallory", channels=("*",))) as c:
            for op in ("sub", "history", "presence"):
                assert (await c.request(op, ch=ADMIN_CHANNEL))["error"]["code"] == 103
            assert (await c.request("pub", ch=ADMIN_CHANNEL, data=1))["error"]["code"] == 103
        async with ws_client(gw.port, admin(gw)) as c:
            assert (await c.request("sub", ch=ADMIN_CHANNEL))["ok"]
            assert (await c.request("pub", ch=ADMIN_CHANNEL, data=1))["error"]["code"] == 103
            assert (await c.request("sub", ch="__control"))["error"]["code"] == 103


async def test_figures_flow_once_a_second_per_gateway_while_watched_then_stop(
    redis_url, monkeypatch
):
    monkeypatch.setattr(console, "ANNOUNCE", 0.5)
    monkeypatch.setattr(console, "WATCH", 2.0)
    shared = {"redis_url": redis_url, "redis_prefix": unique_prefix()}
    async with running_gateway(**shared) as a, running_gateway(**shared) as b:
        node = b.ctx.node
        assert node._broadcast == node.hub.broadcast  # nobody watches: the hub, straight
        async with ws_client(b.port, token_for(b, "alice")) as user:
            assert (await user.request("sub", ch="room:1"))["ok"]
            async with ws_client(a.port, admin(a)) as watcher:
                assert (await watcher.request("sub", ch=ADMIN_CHANNEL))["ok"]
                seen: list[dict] = []
                started = time.monotonic()
                while time.monotonic() - started < 4 * UNIT:
                    await b.ctx.node.publish("room:1", b"1")
                    try:
                        msg = await watcher.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    if msg.get("ch") == ADMIN_CHANNEL:
                        seen.append(msg["data"])
                elapsed = time.monotonic() - started
            by_node: dict[str, list[dict]] = {}
            for figures in seen:
                by_node.setdefault(figures["node"], []).append(figures)
            assert set(by_node) == {a.ctx.ops.node_id, b.ctx.ops.node_id}
            for figures in by_node.values():  # at most one a second each (and a sweep's slack)
                assert len(figures) <= elapsed + 2
            last = by_node[b.ctx.ops.node_id][-1]
            assert last["connections"]["websocket"] == 1
            assert [c["ch"] for c in last["busiest"]] == ["room:1"]
            assert last["redis"] is True and last["memory_bytes"] > 0
            assert by_node[a.ctx.ops.node_id][-1]["busiest"] == []  # the watcher's own: not shown

            await drain(user)

            # The watcher left: each gateway stops within WATCH, and stops counting.
            def quiet() -> bool:
                return all(gw.ctx.node._broadcast == gw.ctx.node.hub.broadcast for gw in (a, b))

            await until(quiet, timeout=6 * UNIT)
            assert node.take_tally() == {}


async def drain(c) -> None:
    """Read what the socket holds (the client stops reading past 16 unread messages)."""
    while True:
        try:
            await c.recv(timeout=0.1)
        except TimeoutError:
            return


async def test_figures_are_rates_of_the_last_second():
    async with running_gateway() as gw:
        # Its own sampler: the gateway's sweep ticks the one in `ops` every second.
        stats = NodeStats("n", "1", gw.hub, gw.ctx.metrics)
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            stats.tick(time.monotonic())
            for _ in range(10):
                gw.hub.broadcast("room:1", b"1")
            await drain(c)
            stats.tick(time.monotonic())
            info = stats.info(True, None, {"connect": False})
        assert 10 / 2 < stats.deliveries_per_second < 10 / 0.05  # 10 in 0.1 to 2 s
        assert stats.lag_ms > 0 and stats.lag_p99_ms > 0
        assert info.connections == {"websocket": 1, "sse": 0, "longpoll": 0}
        assert info.subscriptions == 1 and info.channels == 1 and info.redis is True
        assert info.hooks == {"connect": False}


@pytest.mark.parametrize("watched", [False, True])
async def test_a_console_costs_nothing_per_message_unless_watched(watched):
    async with running_gateway() as gw:
        node = gw.ctx.node
        if watched:
            gw.ctx.ops.console.watched(60)
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("sub", ch="room:2"))["ok"]
            await node.publish("room:2", b"2")
            await c.next_push()
        assert node.take_tally() == ({"room:2": 1} if watched else {})
