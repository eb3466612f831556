"""Long-poll: the socket's session over HTTP, with no loss between polls and no duplicates."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.exceptions import InvalidStatus

from proto import CloseCode
from tests.harness import ApiClient, running_gateway, token_for, ws_client

FEED = {"history_channels": ("feed:*",), "history_size": 50}


class Poller:
    def __init__(self, gw, token: str) -> None:
        self.api = ApiClient(gw.port, token)
        self.sid = ""
        self.cursor = 0

    async def open(self) -> Poller:
        status, _, body = await self.api.call("POST", "/lp", raw=b"")
        assert status == 201, body
        self.sid = body["session"]
        return self

    async def send(self, *frames: dict) -> int:
        status, _, _ = await self.api.call("POST", f"/lp/{self.sid}", list(frames))
        return status

    async def poll(self, cursor: int | None = None) -> tuple[int, dict]:
        at = self.cursor if cursor is None else cursor
        status, _, body = await self.api.call("GET", f"/lp/{self.sid}?cursor={at}")
        if cursor is None and body:
            self.cursor = body["cursor"]
        return status, body

    def close(self) -> None:
        self.api.close()


async def test_commands_replies_and_pushes_flow_through_polls():
    async with running_gateway(**FEED, longpoll_timeout=2.0) as gw:
        p = await Poller(gw, token_for(gw, channels=("feed:*",))).open()
        try:
            assert await p.send({"id": 1, "op": "sub", "ch": "feed:1"}) == 202
            status, body = await p.poll()
            assert status == 200 and body["messages"] == [{"id": 1, "ok": True}]
            waiting = asyncio.ensure_future(p.poll())  # waits: nothing yet
            await asyncio.sleep(0.2)
            await gw.ctx.node.publish("feed:1", b'{"n":1}')
            status, body = await asyncio.wait_for(waiting, 2)
            assert [m["data"] for m in body["messages"]] == [{"n": 1}]
        finally:
            p.close()


async def test_a_retried_poll_loses_nothing_and_moving_on_duplicates_nothing():
    async with running_gateway(**FEED, longpoll_timeout=0.3) as gw:
        p = await Poller(gw, token_for(gw, channels=("feed:*",))).open()
        try:
            await p.send({"id": 1, "op": "sub", "ch": "feed:2"})
            for n in (1, 2, 3):
                await gw.ctx.node.publish("feed:2", b'{"n":%d}' % n)
            await asyncio.sleep(0.05)
            _, first = await p.poll(cursor=0)
            _, again = await p.poll(cursor=0)  # the answer was "lost": ask again
            assert first == again and len(first["messages"]) == 4
            _, after = await p.poll(cursor=first["cursor"])
            assert after["messages"] == [] and after["cursor"] == first["cursor"]
        finally:
            p.close()


async def test_sessions_belong_to_their_subject_and_expire_when_not_polled():
    async with running_gateway(**FEED) as gw:
        p = await Poller(gw, token_for(gw, "alice", channels=("feed:*",))).open()
        mallory = ApiClient(gw.port, token_for(gw, "mallory"))
        try:
            assert (await mallory.call("GET", f"/lp/{p.sid}?cursor=0"))[0] == 404
            assert gw.hub.connection_count() == 1
            assert gw.ctx.longpoll.expire(time.monotonic() + 30, idle=60) == 0  # still fresh
            assert gw.ctx.longpoll.expire(time.monotonic() + 61, idle=60) == 1  # closed, freed
            assert gw.hub.connection_count() == 0
            assert (await p.api.call("GET", f"/lp/{p.sid}?cursor=0"))[0] == 404
        finally:
            p.close()
            mallory.close()


async def test_recovery_works_over_long_poll_too():
    async with running_gateway(**FEED, longpoll_timeout=0.3) as gw:
        token = token_for(gw, channels=("feed:*",))
        for n in (1, 2, 3):
            await gw.ctx.node.publish("feed:3", b'{"n":%d}' % n)
        epoch = (await gw.ctx.node.history("feed:3", 0, 1))[1].epoch
        p = await Poller(gw, token).open()
        try:
            await p.send({"id": 1, "op": "sub", "ch": "feed:3", "since": {"offset": 1, "epoch": epoch}})
            _, body = await p.poll()
            reply, *pushes = body["messages"]
            assert reply["recovered"] is True
            assert [m["offset"] for m in pushes] == [2, 3]
        finally:
            p.close()


async def test_a_client_that_stops_polling_is_closed_as_slow_consumer():
    async with running_gateway(**FEED, longpoll_outbox_bytes=2000, longpoll_timeout=0.3) as gw:
        p = await Poller(gw, token_for(gw, channels=("feed:*",))).open()
        try:
            await p.send({"id": 1, "op": "sub", "ch": "feed:4"})
            for n in range(100):
                await gw.ctx.node.publish("feed:4", json.dumps({"n": n, "pad": "x" * 50}).encode())
            await asyncio.sleep(0.1)
            status, body = await p.poll()
            assert status == 200 and body["messages"]  # what fit is still delivered
            status, body = await p.poll()
            assert status == 410 and body["close"] == {"code": CloseCode.SLOW_CONSUMER}
            assert await p.send({"id": 2, "op": "ping"}) == 410
        finally:
            p.close()


async def test_long_poll_sessions_are_capped_per_user():
    async with running_gateway(longpoll_max_per_user=2, longpoll_timeout=0.2) as gw:
        alice = [await Poller(gw, token_for(gw, "alice")).open() for _ in range(2)]
        extra = ApiClient(gw.port, token_for(gw, "alice"))
        try:
            status, headers, body = await extra.call("POST", "/lp", raw=b"")
            assert status == 429 and body["error"]["code"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1
            bob = await Poller(gw, token_for(gw, "bob")).open()  # another user is not held back
            bob.close()
            # A closed session gives its place up to the user's next one, and is forgotten.
            session = gw.ctx.longpoll.get(alice[0].sid, "alice")
            assert session is not None
            session.disconnect(CloseCode.GOING_AWAY)
            assert (await alice[0].poll())[0] == 410
            assert (await extra.call("POST", "/lp", raw=b""))[0] == 201
            assert (await alice[0].poll(0))[0] == 404
            assert (await alice[1].poll(0))[0] == 200  # the open one is untouched
            assert (await extra.call("POST", "/lp", raw=b""))[0] == 429
        finally:
            extra.close()
            for p in alice:
                p.close()


async def test_long_poll_sessions_have_their_own_capacity_apart_from_sockets():
    async with running_gateway(max_connections=2, max_longpoll_sessions=3) as gw:
        polls = [await Poller(gw, token_for(gw, f"user{i}")).open() for i in range(3)]
        extra = ApiClient(gw.port, token_for(gw, "user9"))
        try:
            status, _, body = await extra.call("POST", "/lp", raw=b"")
            assert status == 503 and body["error"]["code"] == "unavailable"
            # Three long-poll sessions take none of the two sockets.
            async with ws_client(gw.port, token_for(gw)) as a, ws_client(gw.port, token_for(gw)) as b:
                assert (await a.request("ping"))["ok"] and (await b.request("ping"))["ok"]
                with pytest.raises(InvalidStatus) as info:
                    async with ws_client(gw.port, token_for(gw)):
                        pass
                assert info.value.response.status_code == 503
        finally:
            extra.close()
            for p in polls:
                p.close()
