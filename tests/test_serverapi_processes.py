"""The server API across real gateway processes: what is asked of A happens on B.

Two ``python -m gateway`` processes on one Redis and one PostgreSQL. Every
call of /api/server/ is made to process A about a user connected to
process B (or read back through B), with an API key of the ``server`` scope
created on A; a process killed without a word is named ``missing`` until
its heartbeat expires, then no longer waited for.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.infra.mint import mint_token
from core.infra.settings import Settings
from gateway.serverapi.registry import TTL
from proto import CloseCode
from tests import test_processes
from tests.harness import SECRET, ApiClient, unique_prefix, until, ws_client
from tests.servers import UNIT
from tests.test_processes import GatewayProcess, start_together

pytestmark = pytest.mark.timeout(int(120 * UNIT))
processes = test_processes.processes  # the fixture: real `python -m gateway` processes

SETTINGS = Settings(jwt_secret=SECRET)
#: History on feed:*, presence on room:* (besides the defaults).
FEATURES = {"HISTORY_CHANNELS": "feed:*", "PRESENCE_CHANNELS": "room:*"}


def gateway_env(redis_url: str, clean_db: dict[str, str] | None = None, **extra: str) -> dict:
    """The environment of gateway processes sharing one Redis (and one database)."""
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": unique_prefix(), "JWT_SECRET": SECRET}
    if clean_db is not None:
        env.update(
            DATABASE_URL=clean_db["database_url"], DATABASE_SCHEMA=clean_db["database_schema"]
        )
    return {**env, **extra}


@pytest.fixture
def two_processes(tmp_path, data_dir, redis_url, clean_db):
    env = gateway_env(redis_url, clean_db, **FEATURES)
    started = start_together(*(GatewayProcess(tmp_path, data_dir, **env) for _ in range(2)))
    yield started
    for gp in started:
        gp.stop()


def token(sub: str, channels: tuple[str, ...] = ("room:*", "feed:*"), **extra: Any) -> str:
    return mint_token(SETTINGS, sub, list(channels), extra=extra or None)


class Server:
    """The server API of one process, as one caller."""

    def __init__(self, gp: GatewayProcess, credential: str) -> None:
        self.api = ApiClient(gp.port, credential)

    async def __call__(self, name: str, **body: Any) -> dict[str, Any]:
        status, _, answer = await self.api.call("POST", f"/api/server/{name}", body)
        assert status == 200, (name, status, answer)
        return answer

    def close(self) -> None:
        self.api.close()


async def _next(c, op: str) -> dict[str, Any]:
    while True:
        msg = await c.recv(5 * UNIT)
        if msg.get("op") == op:
            return msg


async def _server_key(gp: GatewayProcess) -> str:
    admin = ApiClient(gp.port, token("root", role="admin"))
    try:
        status, _, key = await admin.call("POST", "/api/keys", {"name": "ops", "server": True})
    finally:
        admin.close()
    assert status == 201 and key["server"] is True, key
    return key["key"]


@pytest.mark.timeout(int(120 * UNIT))
async def test_every_call_made_to_a_acts_on_b(two_processes):
    a, b = two_processes
    key = await _server_key(a)
    on_a, on_b = Server(a, key), Server(b, key)
    try:
        # The key reaches B's verifier (api_keys_changed), and both nodes see each other.
        async def both_listed() -> bool:
            status, _, info = await on_b.api.call("POST", "/api/server/info", {})
            return status == 200 and len(info["nodes"]) == 2

        await until(both_listed, timeout=10 * UNIT, step=0.1)
        alice = token("alice")
        async with ws_client(b.port, alice) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]

            # connections: listed through A, held by B.
            (conn,) = (await on_a("connections", user="alice"))["connections"]
            assert conn["subscriptions"] == ["room:1"] and conn["transport"] == "websocket"
            info = {n["node"]: n for n in (await on_a("info"))["nodes"]}
            assert info[conn["node"]]["connections"]["websocket"] == 1
            assert sum(n["connections"]["websocket"] for n in info.values()) == 1

            # subscribe / publish / broadcast / channels / unsubscribe, all through A.
            done = await on_a("subscribe", user="alice", ch="feed:1")
            assert done["count"] == 1 and done["missing"] == [] and done["nodes"][conn["node"]] == 1
            assert (await _next(c, "subscribed"))["ch"] == "feed:1"
            published = await on_a("publish", ch="feed:1", data={"n": 1})
            assert published["offset"] == 1
            msg = await _next(c, "msg")
            assert msg["data"] == {"n": 1} and msg["offset"] == 1
            sent = await on_a("broadcast", channels=["room:1", "feed:1"], data="both")
            assert [r["ch"] for r in sent["results"]] == ["room:1", "feed:1"]
            got = {(await _next(c, "msg"))["ch"] for _ in range(2)}
            assert got == {"room:1", "feed:1"}
            channels = (await on_a("channels", pattern="*"))["channels"]
            assert {"ch": "feed:1", "subscribers": 1} in channels
            page = await on_b("history", ch="feed:1")
            assert [p["data"] for p in page["publications"]] == [{"n": 1}, "both"]
            assert (await on_a("unsubscribe", user="alice", ch="feed:1"))["count"] == 1
            gone = await _next(c, "unsubscribed")
            assert gone["ch"] == "feed:1" and gone["code"] == 118

            # presence: alice, on B, read through A.
            assert [p["user"] for p in (await on_a("presence", ch="room:1"))["presence"]] == [
                "alice"
            ]
            assert await on_a("presence_stats", ch="room:1") == {"num_clients": 1, "num_users": 1}
            status, _, refused = await on_a.api.call(
                "POST", "/api/server/presence", {"ch": "feed:1"}
            )
            assert status == 404 and "keeps no presence" in refused["error"]["message"]

            # disconnect, with a block: B closes, and neither process takes alice back.
            done = await on_a("disconnect", user="alice", reason="bye", block_seconds=30)
            assert done["count"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv(5 * UNIT)
            assert closed.value.rcvd.code == CloseCode.DISCONNECTED
            assert closed.value.rcvd.reason == "bye"
        for gp in (a, b):
            with pytest.raises(InvalidStatus) as blocked:
                async with ws_client(gp.port, alice):
                    pass
            assert blocked.value.response.status_code == 403
        assert (await on_a("connections", user="alice"))["connections"] == []
    finally:
        on_a.close()
        on_b.close()
    for gp in (a, b):
        log = gp.output()
        assert "server API disconnect by apikey:" in log and "'bye'" in log


async def test_presence_across_processes_and_a_killed_node_named_until_it_expires(
    processes, redis_url, data_dir, database_url, core_schema
):
    db = {"database_url": database_url, "database_schema": core_schema}  # no embedded one
    env = gateway_env(redis_url, db, **FEATURES)
    a, b = processes.together(2, **env)
    on_a = Server(a, token("root", role="admin"))
    try:
        async with ws_client(b.port, token("alice")) as c, ws_client(a.port, token("bob")) as d:
            for ws in (c, d):
                assert (await ws.request("sub", ch="room:5"))["ok"]
            who = sorted(p["user"] for p in (await on_a("presence", ch="room:5"))["presence"])
            assert who == ["alice", "bob"]
            assert await on_a("presence_stats", ch="room:5") == {"num_clients": 2, "num_users": 2}
            assert (await on_a("channels", pattern="room:*"))["channels"] == [
                {"ch": "room:5", "subscribers": 2}
            ]
        nodes = {n["node"] for n in (await on_a("info"))["nodes"]}
        assert len(nodes) == 2
        b.stop(signal.SIGKILL)  # no leave, no goodbye: its heartbeat simply stops
        info = await on_a("info", timeout=0.5 * UNIT)
        assert len(info["nodes"]) == 1 and len(info["missing"]) == 1
        assert set(info["missing"]) | {n["node"] for n in info["nodes"]} == nodes
        started = time.monotonic()

        async def forgotten() -> bool:
            return (await on_a("info", timeout=0.5 * UNIT))["missing"] == []

        await until(forgotten, timeout=(TTL + 5) * UNIT, step=0.5)
        assert time.monotonic() - started <= (TTL + 5) * UNIT
        # A node that shuts down leaves the registry at once.
        c2 = processes(**env)
        await until(lambda: _count(on_a, 2), timeout=10 * UNIT, step=0.2)
        await asyncio.to_thread(c2.stop)
        assert (await on_a("info", timeout=0.5 * UNIT))["missing"] == []
    finally:
        on_a.close()


async def _count(server: Server, n: int) -> bool:
    return len((await server("info"))["nodes"]) == n
