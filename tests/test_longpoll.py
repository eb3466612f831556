"""Long-poll: the socket's session over HTTP, with no loss between polls and no duplicates."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from websockets.exceptions import InvalidStatus

from gateway.transport.wsconn import FRAMES_PER_TURN
from proto import CloseCode
from tests.harness import ApiClient, CommandTurns, running_gateway, token_for, until, ws_client
from tests.servers import UNIT

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


async def test_commands_replies_and_pushes_flow_through_polls(monkeypatch):
    timeout = 5.0 * UNIT
    async with running_gateway(**FEED, longpoll_timeout=timeout) as gw:
        p = await Poller(gw, token_for(gw, channels=("feed:*",))).open()
        try:
            assert await p.send({"id": 1, "op": "sub", "ch": "feed:1"}) == 202
            status, body = await p.poll()
            assert status == 200 and body["messages"] == [{"id": 1, "ok": True}]
            session = gw.ctx.longpoll.get(p.sid, "alice")
            parked: list[float] = []  # when the gateway set the poll waiting
            wait = session.wait

            def recording_wait(*args) -> None:
                parked.append(time.monotonic())
                wait(*args)

            monkeypatch.setattr(session, "wait", recording_wait)
            waiting = asyncio.ensure_future(p.poll())  # waits: nothing yet
            await until(lambda: parked)
            await asyncio.sleep(0.2 * UNIT)  # the point: a poll that waits has not returned
            assert not waiting.done(), "the poll returned with nothing to carry"
            published = time.monotonic()
            await gw.ctx.node.publish("feed:1", b'{"n":1}')
            status, body = await asyncio.wait_for(waiting, 2 * timeout)
            woken = time.monotonic()
            assert status == 200 and [m["data"] for m in body["messages"]] == [{"n": 1}]
            late = woken - published
            assert woken - parked[0] < timeout, (
                f"woken by its timeout, {late:.2f} s after the publication"
            )
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
            await p.send(
                {"id": 1, "op": "sub", "ch": "feed:3", "since": {"offset": 1, "epoch": epoch}}
            )
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


async def test_a_slow_long_poll_session_closed_mid_fan_out_costs_the_others_nothing():
    # The slow session is closed while the publication is being handed out:
    # every other subscriber of the channel still gets it, and every later one.
    async with running_gateway(**FEED, longpoll_outbox_bytes=2000, longpoll_timeout=0.3) as gw:
        token = token_for(gw, channels=("feed:*",))
        slow = await Poller(gw, token).open()
        try:
            await slow.send({"id": 1, "op": "sub", "ch": "feed:5"})
            async with ws_client(gw.port, token) as ws:
                assert "error" not in await ws.request("sub", ch="feed:5")
                for n in range(60):
                    await gw.ctx.node.publish(
                        "feed:5", json.dumps({"n": n, "pad": "x" * 50}).encode()
                    )
                got = [(await ws.next_push())["data"]["n"] for _ in range(60)]
                assert got == list(range(60))
            await slow.poll()
            status, body = await slow.poll()
            assert status == 410 and body["close"] == {"code": CloseCode.SLOW_CONSUMER}
        finally:
            slow.close()


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
            async with (
                ws_client(gw.port, token_for(gw)) as a,
                ws_client(gw.port, token_for(gw)) as b,
            ):
                assert (await a.request("ping"))["ok"] and (await b.request("ping"))["ok"]
                with pytest.raises(InvalidStatus) as info:
                    async with ws_client(gw.port, token_for(gw)):
                        pass
                assert info.value.response.status_code == 503
        finally:
            extra.close()
            for p in polls:
                p.close()


# -- polls are answered below tornado.web (gateway/transport/polls.py) ----------


async def test_a_poll_proves_its_token_each_time_and_another_users_token_finds_nothing():
    async with running_gateway(**FEED, longpoll_timeout=0.2) as gw:
        token = token_for(gw, "alice", channels=("feed:*",))
        p = await Poller(gw, token).open()
        mallory = ApiClient(gw.port, token_for(gw, "mallory", channels=("feed:*",)))
        forged = ApiClient(gw.port, token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
        anonymous = ApiClient(gw.port, None)
        try:
            assert (await p.poll())[0] == 200  # verified once, then held by the session
            assert (await p.poll())[0] == 200
            status, _, body = await mallory.call("GET", f"/lp/{p.sid}?cursor=0")
            assert status == 404 and body["error"]["code"] == "not_found"
            status, headers, body = await forged.call("GET", f"/lp/{p.sid}?cursor=0")
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert headers["WWW-Authenticate"] == "Bearer"
            assert (await anonymous.call("GET", f"/lp/{p.sid}?cursor=0"))[0] == 401
            assert (await anonymous.call("GET", f"/lp/{p.sid}?cursor=0&token={token}"))[0] == 200
            # Another token of the same user (a refreshed one) is verified and then held.
            p.api.token = token_for(gw, "alice", channels=("feed:*",), ttl=7200)
            assert (await p.poll())[0] == 200
            assert (await mallory.call("GET", "/lp/nosuchsession?cursor=0"))[0] == 404
            status, _, body = await p.api.call("GET", f"/lp/{p.sid}?cursor=x")
            assert status == 422 and body["error"]["code"] == "validation_error"
            # Other methods still go to the web layer.
            assert (await p.api.call("PUT", f"/lp/{p.sid}", raw=b""))[0] == 405
            assert await p.send({"id": 1, "op": "ping"}) == 202
            _, body = await p.poll()
            assert body["messages"][0]["id"] == 1
        finally:
            for c in (mallory, forged, anonymous):
                c.close()
            p.close()


async def test_a_token_that_expires_during_a_session_no_longer_polls():
    async with running_gateway(**FEED, longpoll_timeout=0.2, token_grace=30) as gw:
        token = token_for(gw, "alice", channels=("feed:*",), ttl=2)
        exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
        p = await Poller(gw, token).open()
        try:
            assert (await p.poll())[0] == 200
            assert (await p.poll())[0] == 200  # the session's held token
            await asyncio.sleep(max(0.0, exp - time.time()) + 0.1)
            status, body = await p.poll(0)
            assert status == 401 and "expired" in body["error"]["message"]
        finally:
            p.close()


async def test_a_revoked_login_session_no_longer_polls():
    async with running_gateway(**FEED, longpoll_timeout=0.2) as gw:
        token = token_for(gw, "alice", channels=("feed:*",), extra={"sid": "login-1"})
        other = await Poller(gw, token_for(gw, "alice", channels=("feed:*",))).open()
        p = await Poller(gw, token).open()
        try:
            assert (await p.poll())[0] == 200
            assert (await p.poll())[0] == 200
            gw.ctx.verifier.revoked.apply(["login-1"])  # what a logout does
            status, body = await p.poll(0)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert (await other.poll())[0] == 200  # the user's other login is untouched
        finally:
            other.close()
            p.close()


async def test_a_waiting_poll_is_answered_by_a_publication_or_a_close():
    async with running_gateway(**FEED, longpoll_timeout=5.0) as gw:
        p = await Poller(gw, token_for(gw, channels=("feed:*",))).open()
        try:
            await p.send({"id": 1, "op": "sub", "ch": "feed:5"})
            await p.poll()
            started = time.monotonic()
            waiting = asyncio.ensure_future(p.poll())
            await asyncio.sleep(0.2)
            await gw.ctx.node.publish("feed:5", b'{"n":1}')
            status, body = await asyncio.wait_for(waiting, 2)
            assert status == 200 and [m["data"] for m in body["messages"]] == [{"n": 1}]
            waiting = asyncio.ensure_future(p.poll())
            await asyncio.sleep(0.2)
            session = gw.ctx.longpoll.get(p.sid, "alice")
            assert session is not None
            session.disconnect(CloseCode.GOING_AWAY)
            status, body = await asyncio.wait_for(waiting, 2)
            assert status == 410 and body["close"] == {"code": CloseCode.GOING_AWAY}
            assert time.monotonic() - started < 3  # neither waited for the timeout
        finally:
            p.close()


async def test_a_poll_whose_client_went_away_loses_nothing_and_a_second_poll_ends_the_first():
    async with running_gateway(**FEED, longpoll_timeout=5.0) as gw:
        token = token_for(gw, channels=("feed:*",))
        p = await Poller(gw, token).open()
        try:
            await p.send({"id": 1, "op": "sub", "ch": "feed:6"})
            await p.poll()
            # A poll waits, then its client hangs up before anything arrives.
            _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(f"GET /lp/{p.sid}?cursor={p.cursor} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())  # fmt: skip
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.sleep(0.2)
            await gw.ctx.node.publish("feed:6", b'{"n":1}')
            status, body = await p.poll()
            assert status == 200 and [m["data"] for m in body["messages"]] == [{"n": 1}]
            # Two polls at once: the second answers the first (empty), then gets the next message.
            first = asyncio.ensure_future(p.poll(body["cursor"]))
            await asyncio.sleep(0.2)
            second = asyncio.ensure_future(p.poll(body["cursor"]))
            status, early = await asyncio.wait_for(first, 2)
            assert status == 200 and early == {"messages": [], "cursor": body["cursor"]}
            await gw.ctx.node.publish("feed:6", b'{"n":2}')
            status, late = await asyncio.wait_for(second, 2)
            assert [m["data"] for m in late["messages"]] == [{"n": 2}]
        finally:
            p.close()


async def test_a_poll_body_nested_too_deeply_is_a_400_not_a_500(caplog):
    async with running_gateway() as gw:
        api = ApiClient(gw.port, token_for(gw))
        try:
            status, _, body = await api.call("POST", "/lp", raw=b"")
            assert status == 201, body
            deep = b"[" * 2000 + b"]" * 2000
            status, _, body = await api.call("POST", f"/lp/{body['session']}", raw=deep)
            assert status == 400 and body["error"]["code"] == "malformed_json", body
        finally:
            api.close()
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_post_of_many_frames_runs_in_turns_as_a_sockets_frames_do(monkeypatch):
    # Before, one POST of 1 MiB of frames `0` (~500,000, each failing at once, so
    # no `await` ever yielded) held the process's event loop for ~15 s.
    turns = CommandTurns(monkeypatch)
    # No rate limit and an outbox that holds every reply: nothing ends the session early.
    async with running_gateway(rate_socket_commands=None, longpoll_outbox_bytes=1 << 20) as gw:
        p = await Poller(gw, token_for(gw)).open()
        try:
            n = 5 * FRAMES_PER_TURN
            raw = b"[" + b",".join([b"0"] * n) + b"]"
            sent = asyncio.ensure_future(p.api.call("POST", f"/lp/{p.sid}", raw=raw))
            most = await turns.most_per_turn(sent.done)
            status, _, body = await sent
            assert status == 202 and body == {"accepted": n} and turns.calls == n
            assert most <= FRAMES_PER_TURN
        finally:
            p.close()


async def test_a_post_that_passes_the_command_allowance_ends_the_session_at_once():
    async with running_gateway() as gw:  # RATE_SOCKET_COMMANDS: 100/s
        p = await Poller(gw, token_for(gw)).open()
        try:
            n = 20_000
            raw = b"[" + b",".join([b"0"] * n) + b"]"
            status, _, body = await p.api.call("POST", f"/lp/{p.sid}", raw=raw)
            assert status == 202 and body["accepted"] < 1000  # the rest were never run
            status, body = await p.poll()
            # BAD_FRAME replies: the allowance (100), and what it regained meanwhile
            assert status == 200 and 100 <= len(body["messages"]) < 200
            status, body = await p.poll()
            assert status == 410 and body["close"]["code"] == CloseCode.RATE_LIMITED
        finally:
            p.close()
