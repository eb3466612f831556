"""The server API from Python (`gateway.publisher.ServerClient`, `Publisher.broadcast`) and
from the terminal (``python -m gateway.client server …``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from gateway.client import Client, SubscriptionEnded
from gateway.publisher import Publisher, ServerClient, ServerError
from proto import InvalidData, Position
from tests.harness import running_gateway, token_for, unique_prefix, ws_client
from tests.servers import UNIT

ROOT = Path(__file__).resolve().parent.parent
FEATURES = {"presence_channels": ("room:*",), "history_channels": ("feed:*",)}


async def test_every_call_of_the_python_library(redis_url):
    async with running_gateway(redis_url=redis_url, redis_prefix=unique_prefix(), **FEATURES) as gw:
        url = f"http://127.0.0.1:{gw.port}"
        async with (
            ServerClient(url, token_for(gw, "root", extra={"role": "admin"})) as api,
            ws_client(gw.port, token_for(gw, "alice", channels=("room:*", "feed:*"))) as c,
        ):
            assert (await c.request("sub", ch="room:1"))["ok"]
            (conn,) = (await api.connections(user="alice")).connections
            assert conn.user == "alice" and conn.subscriptions == ["room:1"]
            assert (await api.connections("alice", conn.client)).connections == [conn]
            assert (await api.subscribe("feed:1", user="alice")).count == 1
            position = await api.publish("feed:1", {"n": 1})
            assert position is not None and position.offset == 1
            assert await api.publish("room:1", "plain") is None
            sent = await api.broadcast(["room:1", "feed:1"], [1])
            assert [r.ch for r in sent.results] == ["room:1", "feed:1"]
            assert sent.results[1].offset == 2
            sent_again = [await api.publish("feed:1", 3, key="k") for _ in range(2)]
            assert [p.offset for p in sent_again if p] == [3, 3]  # sent again: published once
            twice = [await api.broadcast(["feed:1"], 4, key="k4") for _ in range(2)]
            assert [out.results[0].offset for out in twice] == [4, 4]
            assert [ch.ch for ch in (await api.channels(pattern="feed:*")).channels] == ["feed:1"]
            assert [p.user for p in await api.presence("room:1")] == ["alice"]
            assert (await api.presence_stats("room:1")).num_clients == 1
            page = await api.history("feed:1", limit=1)
            assert page.next == 1 and bytes(page.publications[0].data) == b'{"n":1}'
            (node,) = (await api.info()).nodes
            assert node.connections["websocket"] == 1
            assert (await api.unsubscribe("feed:1", "alice", conn.client)).count == 1
            done = await api.disconnect(user="alice", reason="bye", block=60)
            assert done.count == 1 and done.missing == []
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.recv()
            assert (await api.unblock("alice")).missing == []
            async with ws_client(gw.port, token_for(gw, "alice")) as again:
                assert (await again.request("ping"))["ok"]
            with pytest.raises(ServerError) as refused:
                await api.publish("__admin", 1)
            assert refused.value.status == 403 and refused.value.code == "forbidden"
        async with ServerClient(url, token_for(gw, "mallory")) as api:
            with pytest.raises(ServerError) as refused:
                await api.info()
            assert refused.value.status == 403


async def test_the_python_client_follows_server_side_subscriptions(redis_url):
    async with running_gateway(redis_url=redis_url, redis_prefix=unique_prefix(), **FEATURES) as gw:
        made = asyncio.Queue()
        token = token_for(gw, "alice", channels=("feed:*",))
        async with (
            Client(
                f"ws://127.0.0.1:{gw.port}/ws", token=token, on_subscribed=made.put_nowait
            ) as client,
            ServerClient(
                f"http://127.0.0.1:{gw.port}", token_for(gw, "root", extra={"role": "admin"})
            ) as api,
        ):
            first = await api.publish("feed:3", 1)
            assert (await api.subscribe("feed:3", user="alice")).count == 1
            sub = await asyncio.wait_for(made.get(), 2 * UNIT)
            assert sub.channel == "feed:3" and sub.position == first
            await api.publish("feed:3", 2)
            event = await asyncio.wait_for(anext(sub), 2 * UNIT)
            assert event.data == 2 and event.offset == 2
            assert client.subscription("feed:3") is sub
            await api.unsubscribe("feed:3", user="alice")
            with pytest.raises(SubscriptionEnded) as ended:
                await asyncio.wait_for(anext(sub), 2 * UNIT)
            assert ended.value.code == 118
            assert client.subscription("feed:3") is None


async def test_publisher_broadcast_keeps_history_per_channel(redis_url):
    prefix = unique_prefix()
    async with Publisher(redis_url, prefix, history_channels=("feed:*",)) as pub:
        positions = await pub.broadcast(["feed:a", "room:a", "feed:b"], {"x": 1})
        assert positions[0] == Position(1, positions[0].epoch) and positions[1] is None
        assert positions[2].offset == 1
        with pytest.raises(InvalidData):
            await pub.broadcast(["feed:a"], b'{"x": 1e999}')


async def test_a_publication_sent_again_with_its_key_is_published_once(redis_url):
    """A Redis that stalls past the publisher's wait (a slow script, a fork) runs the
    publication when it wakes, though `publish` raised (`DEBUG SLEEP 7`: raised after
    5 s, in history all the same): sent again with its key, it is not published twice."""
    async with Publisher(redis_url, unique_prefix(), history_channels=("feed:*",)) as pub:
        first = await pub.publish("feed:k", {"n": 1}, key="order-7")
        again = await pub.publish("feed:k", {"n": 1}, key="order-7")
        other = await pub.publish("feed:k", {"n": 2}, key="order-8")
        assert first is not None and other is not None
        assert (again, other.offset) == (first, first.offset + 1)
        twice = [await pub.broadcast(["feed:k", "feed:l"], 3, key="all-9") for _ in range(2)]
        assert twice[0] == twice[1] and twice[0][0] == Position(3, first.epoch)


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.client",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_server_commands_of_the_cli():
    async with running_gateway(**FEATURES) as gw:
        base = ["--url", f"ws://127.0.0.1:{gw.port}/ws"]
        admin = [*base, "--token", token_for(gw, "root", extra={"role": "admin"})]
        async with ws_client(gw.port, token_for(gw, "alice")) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            code, out, _ = await _cli(*admin, "server", "connections", "--user", "alice")
            assert code == 0 and json.loads(out)["connections"][0]["subscriptions"] == ["room:1"]
            code, out, _ = await _cli(*admin, "server", "broadcast", '{"a": 1}', "room:1", "room:2")
            assert code == 0 and len(json.loads(out)["results"]) == 2
            code, out, _ = await _cli(
                *admin, "server", "disconnect", "--user", "alice", "--reason", "cli", "--block", "5"
            )
            assert code == 0 and json.loads(out)["count"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await c.recv()
            assert closed.value.rcvd.reason == "cli"
        code, out, _ = await _cli(*admin, "server", "info")
        assert code == 0 and len(json.loads(out)["nodes"]) == 1
        code, _, err = await _cli(*base, "--token", token_for(gw, "bob"), "server", "info")
        assert code == 1 and json.loads(err)["error"]["status"] == 403
        code, _, err = await _cli(*admin, "server", "subscribe", "__admin", "--user", "x")
        assert code == 1 and json.loads(err)["error"]["code"] == "forbidden"
