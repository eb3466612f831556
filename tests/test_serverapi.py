"""The server API (/api/server/) in-process: who may call it, bad input, and every call.

Two gateways in this process share one Redis (a prefix of their own), so a
user connected to B is listed, subscribed, unsubscribed and disconnected
through A; real processes are tests/test_serverapi_processes.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from core.infra.control import ServerReply
from gateway.app import Gateway
from gateway.serverapi.registry import KEY
from proto import CloseCode
from tests.harness import (
    ApiClient,
    call_once,
    running_gateway,
    token_for,
    unique_prefix,
    until,
    ws_client,
)
from tests.servers import UNIT
from tests.test_longpoll import Poller
from tests.test_sse import sse

ROUTES: dict[str, dict[str, Any]] = {
    "publish": {"ch": "room:1", "data": {"n": 1}},
    "broadcast": {"channels": ["room:1", "room:2"], "data": 1},
    "disconnect": {"user": "nobody"},
    "unblock": {"user": "nobody"},
    "subscribe": {"user": "nobody", "ch": "room:1"},
    "unsubscribe": {"user": "nobody", "ch": "room:1"},
    "connections": {"user": "nobody"},
    "channels": {},
    "presence": {"ch": "room:1"},
    "presence_stats": {"ch": "room:1"},
    "history": {"ch": "feed:1"},
    "info": {},
}
FEATURES = {"presence_channels": ("room:*",), "history_channels": ("feed:*",)}


def admin_token(gw: Gateway, sub: str = "root") -> str:
    return token_for(gw, sub, extra={"role": "admin"})


async def call(gw: Gateway, token: str | None, name: str, body: Any = None, **kw: Any):
    api = ApiClient(gw.port, token)
    try:
        return await api.call("POST", f"/api/server/{name}", body, **kw)
    finally:
        api.close()


# -- Who may call it -------------------------------------------------------------------


@pytest.fixture
async def keyed(clean_db):
    """A gateway with a database, and API keys: with the server scope, with rest only, bare."""
    async with running_gateway(**clean_db, **FEATURES) as gw:
        keys = {}
        for name, scopes in (("server", {"server": True}), ("rest", {"rest": True}), ("bare", {})):
            status, _, key = await call_keys(gw, {"name": name, "channels": ["room:*"], **scopes})
            assert status == 201 and key["server"] is scopes.get("server", False), key
            keys[name] = key["key"]
        yield gw, keys


async def call_keys(gw: Gateway, body: dict[str, Any]):
    api = ApiClient(gw.port, admin_token(gw))
    try:
        return await api.call("POST", "/api/keys", body)
    finally:
        api.close()


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_every_route_takes_admins_and_server_keys_and_refuses_everyone_else(keyed, route):
    gw, keys = keyed
    callers = {
        None: 401,
        "not-a-token": 401,
        token_for(gw, "mallory", channels=("*",)): 403,
        keys["bare"]: 403,
        keys["rest"]: 403,
        keys["server"]: 200,
        admin_token(gw): 200,
    }
    for token, expected in callers.items():
        # With a body (refused at the headers, unread), and with none (refused by the route).
        for body in (ROUTES[route], None):
            status, headers, answer = await call(gw, token, route, body)
            if expected == 200 and body is None:  # allowed, but a call is a JSON body
                assert status == 400 and answer["error"]["code"] == "malformed_json", route
                continue
            assert status == expected, (route, token, body, answer)
            if expected != 200:
                assert answer["error"]["status"] == expected
            if expected == 401:
                assert headers["WWW-Authenticate"] == "Bearer"


async def test_every_call_is_logged_with_who_made_it(keyed, caplog):
    gw, keys = keyed
    caplog.set_level(logging.INFO, "gateway.serverapi")
    async with ws_client(gw.port, token_for(gw, "bob")) as c:
        assert (await call(gw, admin_token(gw, "ops-1"), "disconnect", {"user": "bob"}))[0] == 200
        with pytest.raises(ConnectionClosed):
            await c.recv()
    assert (await call(gw, keys["rest"], "info", {}))[0] == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.serverapi"]
    assert "server API serverDisconnect by ops-1 (admin): 200" in lines
    assert any(
        line.startswith("server API disconnect by ops-1 (admin) (via ")
        and "user 'bob' with 4511 'disconnected by the server', 1 connection(s) here" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("server API serverInfo by apikey:") and ": 403" in line for line in lines
    )


# -- Bad input -----------------------------------------------------------------------


BAD: list[tuple[str, bytes, int, str]] = [
    ("publish", b"{", 400, "malformed_json"),
    ("publish", b"[]", 422, "validation_error"),
    ("publish", b'{"ch": "room:1", "data": 1, "x": 2}', 422, "validation_error"),
    ("publish", b'{"ch": "room 1", "data": 1}', 422, "validation_error"),
    ("publish", b'{"ch": "room:1", "data": 1e999}', 422, "validation_error"),
    (
        "publish",
        b'{"ch": "room:1", "data": ' + b"[" * 100 + b"]" * 100 + b"}",
        422,
        "validation_error",
    ),
    ("publish", b'{"ch": "__admin", "data": 1}', 403, "forbidden"),
    ("publish", b'{"ch": "projects", "data": 1}', 403, "forbidden"),
    ("broadcast", b'{"channels": [], "data": 1}', 422, "validation_error"),
    ("broadcast", b'{"channels": ["room:1", "__control"], "data": 1}', 403, "forbidden"),
    ("disconnect", b"{}", 422, "validation_error"),
    ("disconnect", b'{"client": "ab"}', 422, "validation_error"),
    ("disconnect", b'{"user": "a", "block_seconds": -1}', 422, "validation_error"),
    ("disconnect", b'{"user": "a", "code": 1000}', 422, "validation_error"),
    (
        "disconnect",
        ('{"user": "a", "reason": "' + "é" * 124 + '"}').encode(),
        422,
        "validation_error",
    ),
    ("disconnect", b'{"user": "a", "timeout": 0}', 422, "validation_error"),
    ("subscribe", b'{"user": "a", "ch": "__admin"}', 403, "forbidden"),
    ("unsubscribe", b'{"user": "root", "ch": "__admin"}', 403, "forbidden"),  # admins' consoles
    ("connections", b'{"user": "a", "client": "not hex"}', 422, "validation_error"),
    ("info", b"", 400, "malformed_json"),
    ("channels", b'{"limit": 0}', 422, "validation_error"),
    ("presence", b'{"ch": "other:1"}', 404, "not_found"),
    ("history", b'{"ch": "room:1"}', 404, "not_found"),
    ("history", b'{"ch": "feed:1", "limit": 101}', 422, "validation_error"),
    ("channels", b'{"limit": 1.5}', 422, "validation_error"),
    ("channels", b'{"limit": "7"}', 422, "validation_error"),
    ("channels", b'{"pattern": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400, "malformed_json"),
    ("nope", b"{}", 404, "not_found"),
]


async def test_bad_input_gets_a_json_error_and_changes_nothing():
    async with running_gateway(**FEATURES) as gw:
        token = admin_token(gw)
        for route, raw, status, code in BAD:
            got, _, body = await call(gw, token, route, raw=raw)
            assert (got, body["error"]["code"]) == (status, code), (route, raw, body)
            assert body["error"]["status"] == status
        api = ApiClient(gw.port, token)
        try:
            status, headers, body = await api.call("GET", "/api/server/info")
        finally:
            api.close()
        assert status == 405 and headers["Allow"] == "POST" and body["error"]["status"] == 405
        # Integral numbers are integers, as JSON Schema says; still serving.
        status, _, found = await call(gw, token, "channels", raw=b'{"limit": 5.0}')
        assert status == 200 and found["channels"] == []
        assert (await call(gw, token, "info", {}))[0] == 200


async def test_the_server_api_is_in_the_openapi_document():
    async with running_gateway() as gw:
        api = ApiClient(gw.port, None)
        try:
            _, _, doc = await api.call("GET", "/openapi.json")
        finally:
            api.close()
    for route in ROUTES:
        op = doc["paths"][f"/api/server/{route}"]["post"]
        assert op["tags"] == ["server"] and {"200", "401", "403", "422"} <= set(op["responses"])
    assert "nodes" in doc["components"]["schemas"]["InfoOut"]["properties"]


# -- Every call, across two gateways ---------------------------------------------------


@contextlib.asynccontextmanager
async def two_gateways(redis_url: str, **extra: Any) -> AsyncIterator[tuple[Gateway, Gateway]]:
    shared = {"redis_url": redis_url, "redis_prefix": unique_prefix(), **FEATURES, **extra}
    async with running_gateway(**shared) as a, running_gateway(**shared) as b:
        both = {a.ctx.ops.node_id, b.ctx.ops.node_id}

        async def listed() -> bool:  # each is listed once its first heartbeat is in
            return await a.ctx.ops.registry.live() >= both

        await until(listed)
        yield a, b


async def next_op(c, op: str, timeout: float = 3 * UNIT) -> dict[str, Any]:
    while True:
        msg = await c.recv(timeout)
        if msg.get("op") == op:
            return msg


async def test_a_user_on_b_is_listed_subscribed_and_unsubscribed_through_a(redis_url):
    async with two_gateways(redis_url) as (a, b):
        root = admin_token(a)
        b_id = b.ctx.ops.node_id
        async with (
            ws_client(b.port, token_for(b, "alice")) as c,
            ws_client(a.port, token_for(a, "bob")) as d,
        ):
            assert (await c.request("sub", ch="room:9"))["ok"]
            status, _, listed = await call(a, root, "connections", {"user": "alice"})
            assert status == 200 and listed["missing"] == [] and listed["failed"] == {}
            (conn,) = listed["connections"]
            assert conn["user"] == "alice" and conn["node"] == b_id
            assert conn["transport"] == "websocket" and conn["codec"] == "gw.v1.json"
            assert conn["remote"] == "127.0.0.1" and conn["subscriptions"] == ["room:9"]
            assert abs(conn["since"] - time.time()) < 60
            by_client = (
                await call(a, root, "connections", {"user": "alice", "client": conn["client"]})
            )[2]
            assert by_client["connections"] == [conn]

            # Server-side subscription: not in alice's grants' way, told by a push.
            status, _, done = await call(a, root, "subscribe", {"user": "alice", "ch": "news:1"})
            assert (
                status == 200
                and done["count"] == 1
                and done["nodes"] == {a.ctx.ops.node_id: 0, b_id: 1}
            )
            assert await next_op(c, "subscribed") == {"op": "subscribed", "ch": "news:1"}
            assert (await call(a, root, "publish", {"ch": "news:1", "data": "hi"}))[0] == 200
            assert await c.next_push() == {"op": "msg", "ch": "news:1", "data": "hi"}
            again = (await call(a, root, "subscribe", {"user": "alice", "ch": "news:1"}))[2]
            assert again["count"] == 0  # held already

            # Channels: counts summed over both gateways.
            assert (await d.request("sub", ch="room:9"))["ok"]
            status, _, found = await call(a, root, "channels", {"pattern": "room:*"})
            assert status == 200 and found["channels"] == [{"ch": "room:9", "subscribers": 2}]
            everything = (await call(b, root, "channels", {}))[2]["channels"]
            assert {"ch": "news:1", "subscribers": 1} in everything

            status, _, done = await call(a, root, "unsubscribe", {"user": "alice", "ch": "news:1"})
            assert status == 200 and done["count"] == 1
            pushed = await next_op(c, "unsubscribed")
            assert pushed["ch"] == "news:1" and pushed["code"] == 118
            await call(a, root, "publish", {"ch": "news:1", "data": "gone"})
            await call(a, root, "publish", {"ch": "room:9", "data": "still"})
            assert await c.next_push() == {"op": "msg", "ch": "room:9", "data": "still"}
            # The client's own unsub of a server-side channel it no longer holds is refused.
            assert (await c.request("unsub", ch="news:1"))["error"]["code"] == 105


async def test_a_server_side_subscription_to_a_history_channel_carries_its_position(redis_url):
    async with two_gateways(redis_url) as (a, b):
        root = admin_token(a)
        _, _, published = await call(a, root, "publish", {"ch": "feed:1", "data": 1})
        assert published["offset"] == 1
        async with ws_client(b.port, token_for(b, "alice", channels=("feed:*",))) as c:
            assert (await call(a, root, "subscribe", {"user": "alice", "ch": "feed:1"}))[2][
                "count"
            ] == 1
            pushed = await next_op(c, "subscribed")
            assert pushed == {
                "op": "subscribed",
                "ch": "feed:1",
                "offset": 1,
                "epoch": published["epoch"],
            }
            await call(a, root, "publish", {"ch": "feed:1", "data": 2})
            msg = await c.next_push()
            assert msg["data"] == 2 and msg["offset"] == 2
            # A reconnecting client recovers from the pushed position, as from any.
        async with ws_client(a.port, token_for(a, "alice", channels=("feed:*",))) as c:
            since = {"offset": 1, "epoch": published["epoch"]}
            reply = await c.request("sub", ch="feed:1", since=since)
            assert reply["recovered"] is True
            assert (await c.next_push())["data"] == 2


async def test_disconnect_closes_every_transport_everywhere_and_blocks_reconnects(redis_url):
    async with two_gateways(redis_url) as (a, b):
        root = admin_token(a)
        token = token_for(b, "alice")
        poller = await Poller(b, token).open()
        try:
            async with (
                ws_client(b.port, token) as c,
                ws_client(a.port, token) as d,
                sse(b.port, token, ["room:1"]) as s,
            ):
                await s.next_of("reply")
                body = {"user": "alice", "reason": "banned for spam", "block_seconds": 60}
                status, _, done = await call(a, root, "disconnect", body)
                assert status == 200 and done["count"] == 4 and done["missing"] == []
                for ws in (c, d):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.recv()
                    assert closed.value.rcvd.code == CloseCode.DISCONNECTED
                    assert closed.value.rcvd.reason == "banned for spam"
                close = json.loads((await s.next_of("close"))["data"])
                assert close == {"code": 4511, "reason": "banned for spam"}
            status, polled = await poller.poll()
            assert status == 410 and polled["close"] == {"code": 4511, "reason": "banned for spam"}
        finally:
            poller.close()
        for gw in (a, b):
            with pytest.raises(Exception) as refused:
                async with ws_client(gw.port, token):
                    pass
            assert refused.value.response.status_code == 403
            status, headers, body = await call_once(gw.port, token, "POST", "/lp", raw=b"")
            assert status == 403 and body["error"]["code"] == "blocked"
            assert 0 < int(headers["Retry-After"]) <= 60
        # Unblocked through one gateway, taken again by both at once.
        done = (await call(b, root, "unblock", {"user": "alice"}))[2]
        assert done["missing"] == [] and done["count"] == 0
        for gw in (a, b):
            async with ws_client(gw.port, token) as again:
                assert (await again.request("ping"))["ok"]
        # Someone else still connects; a disconnect without a block blocks no one, and
        # a reason longer than a close frame carries is cut at a character.
        async with ws_client(b.port, token_for(b, "dave")) as f:
            long = {"user": "dave", "reason": "é" * 100}
            assert (await call(a, root, "disconnect", long))[2]["count"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                await f.recv()
            assert closed.value.rcvd.reason == "é" * 61  # 122 bytes
        async with ws_client(b.port, token_for(b, "carol")) as e:
            client = (await call(a, root, "connections", {"user": "carol"}))[2]["connections"][0]
            one = {"user": "carol", "client": client["client"], "code": 4000}
            done = (await call(a, root, "disconnect", one))[2]
            assert done["count"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                await e.recv()
            assert closed.value.rcvd.code == 4000 and closed.value.rcvd.reason.startswith("server")
        async with ws_client(b.port, token_for(b, "carol")):
            pass


async def test_a_gateway_started_after_a_block_refuses_the_user_too(redis_url):
    shared = {"redis_url": redis_url, "redis_prefix": unique_prefix()}
    async with running_gateway(**shared) as a:
        body = {"user": "alice", "block_seconds": 60}
        assert (await call(a, admin_token(a), "disconnect", body))[0] == 200
        async with running_gateway(**shared) as late:
            with pytest.raises(Exception) as refused:
                async with ws_client(late.port, token_for(late, "alice")):
                    pass
            assert refused.value.response.status_code == 403


async def test_info_lists_every_gateway_and_a_silent_one_is_named_missing(redis_url):
    async with two_gateways(redis_url) as (a, b):
        root = admin_token(a)
        async with ws_client(b.port, token_for(b, "alice")) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            status, _, info = await call(a, root, "info", {})
        assert status == 200 and info["missing"] == [] and info["failed"] == {}
        nodes = {n["node"]: n for n in info["nodes"]}
        assert set(nodes) == {a.ctx.ops.node_id, b.ctx.ops.node_id}
        on_b = nodes[b.ctx.ops.node_id]
        assert on_b["connections"] == {"websocket": 1, "sse": 0, "longpoll": 0}
        assert on_b["subscriptions"] == 1 and on_b["channels"] == 1
        assert on_b["redis"] is True and on_b["postgres"] is None and on_b["hooks"] == {}
        assert on_b["memory_bytes"] > 10_000_000 and on_b["uptime"] >= 0
        assert on_b["version"] and on_b["deliveries_per_second"] >= 0

        # A node listed alive that never answers (a partition, a hung process).
        await a.ctx.node.broker.expiring_add(KEY, "ghost", 4e9)
        status, _, info = await call(a, root, "info", {"timeout": 0.3 * UNIT})
        assert status == 200 and info["missing"] == ["ghost"] and len(info["nodes"]) == 2
        status, _, done = await call(a, root, "disconnect", {"user": "x", "timeout": 0.3 * UNIT})
        assert status == 200 and done["missing"] == ["ghost"] and done["count"] == 0
        await a.ctx.node.broker.expiring_remove(KEY, "ghost")


async def test_a_gateway_that_fails_says_so_without_internals(redis_url, monkeypatch):
    async with two_gateways(redis_url) as (a, b):

        async def broken(action):
            raise RuntimeError("secret detail")

        monkeypatch.setattr(b.ctx.ops.agent, "run", broken)
        status, _, info = await call(a, admin_token(a), "info", {})
        assert status == 200 and info["failed"] == {b.ctx.ops.node_id: "internal error"}
        assert [n["node"] for n in info["nodes"]] == [a.ctx.ops.node_id]
        # A stray reply (a request no longer waited for) changes nothing.
        stray = ServerReply(id="not-waited-for", node="x")
        a.ctx.ops.fleet.on_reply(b"not json")
        a.ctx.ops.fleet.on_reply(json.dumps({"id": stray.id, "node": "x"}).encode())


async def test_broadcast_presence_and_history(redis_url):
    async with two_gateways(redis_url) as (a, b):
        root = admin_token(a)
        async with ws_client(b.port, token_for(b, "alice", channels=("room:*", "feed:*"))) as c:
            for ch in ("room:1", "feed:2"):
                assert (await c.request("sub", ch=ch))["ok"]
            c.pushes.clear()  # presence joins
            status, _, sent = await call(
                a, root, "broadcast", {"channels": ["room:1", "feed:2", "room:1"], "data": [1]}
            )
            assert status == 200
            assert sent["results"][0] == {"ch": "room:1"}
            assert sent["results"][1]["ch"] == "feed:2" and sent["results"][1]["offset"] == 1
            assert len(sent["results"]) == 2  # one publication per channel, even named twice
            got = {(await next_op(c, "msg"))["ch"] for _ in range(2)}
            assert got == {"room:1", "feed:2"}

            status, _, who = await call(a, root, "presence", {"ch": "room:1"})
            assert status == 200 and [p["user"] for p in who["presence"]] == ["alice"]
            status, _, stats = await call(a, root, "presence_stats", {"ch": "room:1"})
            assert stats == {"num_clients": 1, "num_users": 1}

        for n in range(2, 6):
            await call(a, root, "publish", {"ch": "feed:2", "data": n})
        status, _, page = await call(b, root, "history", {"ch": "feed:2", "limit": 2})
        assert status == 200 and [p["offset"] for p in page["publications"]] == [1, 2]
        assert page["publications"][0]["data"] == [1] and page["next"] == 2
        assert page["offset"] == 5 and page["epoch"] == sent["results"][1]["epoch"]
        last = (await call(b, root, "history", {"ch": "feed:2", "since": 4}))[2]
        assert [p["data"] for p in last["publications"]] == [5] and "next" not in last


async def test_a_refresh_keeps_a_server_side_subscription_and_a_client_unsub_ends_it(redis_url):
    """A refresh with the very grants of before ended what the server API had subscribed
    (``unsubscribed`` 103: "the refreshed token does not allow this channel")."""
    async with running_gateway(redis_url=redis_url, redis_prefix=unique_prefix()) as gw:
        root = admin_token(gw)
        async with ws_client(gw.port, token_for(gw, "alice")) as c:
            assert (await c.request("ping"))["ok"]
            status, _, done = await call(gw, root, "subscribe", {"user": "alice", "ch": "news:1"})
            assert status == 200 and done["count"] == 1
            assert await next_op(c, "subscribed") == {"op": "subscribed", "ch": "news:1"}
            assert (await c.request("refresh", token=token_for(gw, "alice")))["ok"]
            await call(gw, root, "publish", {"ch": "news:1", "data": "kept"})
            assert await c.next_push() == {"op": "msg", "ch": "news:1", "data": "kept"}
            # Once the client leaves it, its own grants decide again.
            assert (await c.request("unsub", ch="news:1"))["ok"]
            assert (await c.request("sub", ch="news:1"))["error"]["code"] == 103


async def test_a_server_side_subscribe_and_the_clients_own_sub_at_once_subscribe_once(caplog):
    """The server API subscribed a connection to a history channel while its own ``sub``
    of it was under way: both recovered into one buffer, and the one that finished
    second failed (111 internal to the client, with a KeyError logged)."""
    import asyncio

    from gateway.session import Session

    async with running_gateway(**FEATURES) as gw:
        broker = gw.ctx.node.broker
        original = broker.subscribe

        async def slow_subscribe(ch: str) -> None:
            await asyncio.sleep(0.2 * UNIT)
            await original(ch)

        broker.subscribe = slow_subscribe  # type: ignore[method-assign]
        await gw.ctx.node.publish("feed:1", b'{"n":1}')
        async with ws_client(gw.port, token_for(gw, "alice", channels=("feed:*",))) as c:
            assert (await c.request("ping"))["ok"]
            (session,) = [m for m in gw.hub.connections if isinstance(m, Session)]
            await c.ws.send('{"id": 50, "op": "sub", "ch": "feed:1"}')
            await asyncio.sleep(0.05 * UNIT)  # the client's sub waits for its SUBSCRIBE
            assert await session.server_subscribe("feed:1") is False  # under way already
            reply = await next_reply(c, 50)
            assert reply["ok"] and reply["offset"] == 1, reply
            assert await session.server_subscribe("feed:1") is False  # held
            held = asyncio.ensure_future(session.server_subscribe("feed:2"))
            await asyncio.sleep(0.05 * UNIT)
            assert (await c.request("sub", ch="feed:2"))["error"]["code"] == 104
            assert await held is True
        assert not [r for r in caplog.records if r.exc_info], caplog.text


async def next_reply(c, id: int, timeout: float = 3 * UNIT) -> dict[str, Any]:
    while True:
        msg = await c.recv(timeout)
        if msg.get("id") == id:
            return msg


@pytest.mark.parametrize("entry", ["unpublishable", "a backend's own"])
async def test_history_pages_lead_on_past_an_entry_left_out(redis_url, entry):
    """A page short of an entry left out (a backend's malformed publication, or an entry
    it added itself) said no ``next``: a backend paging with it stopped there."""
    import redis.asyncio as aioredis

    async with running_gateway(redis_url=redis_url, redis_prefix=unique_prefix(), **FEATURES) as gw:
        node = gw.ctx.node
        await node.publish("feed:p", b'{"n":1}')
        stream, meta = node.broker._history_keys("feed:p")
        async with aioredis.Redis.from_url(redis_url) as backend:
            if entry == "unpublishable":
                await backend.hincrby(meta, "o", 1)  # offset 2, as the script would
                await backend.xadd(stream, {"d": "{broken"}, id="2-1")
            else:
                await backend.xadd(stream, {"data": "x"}, id="1-2")
        while (await node.publish("feed:p", b'{"n":0}')).offset < 5:
            pass
        seen, since, page = [], 0, {}
        for _ in range(6):
            body = {"ch": "feed:p", "since": since, "limit": 2}
            status, _, page = await call(gw, admin_token(gw), "history", body)
            assert status == 200, page
            seen += [p["offset"] for p in page["publications"]]
            if "next" not in page:
                break
            since = page["next"]
        assert seen == ([1, 3, 4, 5] if entry == "unpublishable" else [1, 2, 3, 4, 5]), page


async def test_a_publication_sent_again_with_its_idempotency_key_keeps_its_one_offset():
    """The server API's publish, sent again after a lost answer with the same
    ``Idempotency-Key``, answers the first one's position and publishes nothing more."""
    async with running_gateway(**FEATURES) as gw:
        token, key = admin_token(gw), {"Idempotency-Key": "invoice-41"}
        body = {"ch": "feed:4", "data": {"n": 1}}
        first = await call(gw, token, "publish", body, headers=key)
        again = await call(gw, token, "publish", body, headers=key)
        other = await call(gw, token, "publish", {"ch": "feed:4", "data": {"n": 2}})
        offsets = [answer[2]["offset"] for answer in (first, again, other)]
        assert offsets == [1, 1, 2]
        assert (await call(gw, token, "publish", body, headers={"Idempotency-Key": ""}))[0] == 422


async def test_a_broadcast_sent_again_with_its_idempotency_key_publishes_each_channel_once():
    """A broadcast answers per channel, ``error`` where the broker failed, which invites
    sending it again; so does a lost answer. Its ``Idempotency-Key`` was ignored: every
    channel that had it got it twice, at two offsets."""
    async with running_gateway(**FEATURES) as gw:
        token, key = admin_token(gw), {"Idempotency-Key": "newsletter-12"}
        body = {"channels": ["feed:5", "feed:6"], "data": {"n": 1}}
        first = await call(gw, token, "broadcast", body, headers=key)
        again = await call(gw, token, "broadcast", body, headers=key)
        offsets = [[r["offset"] for r in answer[2]["results"]] for answer in (first, again)]
        assert offsets == [[1, 1], [1, 1]]
        assert (await call(gw, token, "broadcast", body, headers={"Idempotency-Key": ""}))[0] == 422
