"""Kept-alive long-poll connections served off Tornado after their first poll (pollconn.py).

Every test speaks raw HTTP/1.1 over one socket, as a browser or the load
tool does, and checks that the connection is (or is not) adopted through
`Listener.adopted`, so that each exercises the path it names.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from gateway.transport.pollsessions import PollSession, Waits
from proto import CloseCode
from tests.harness import ApiClient, running_gateway, token_for, until
from tests.servers import UNIT

FEED = {"history_channels": ("feed:*",), "history_size": 50}


class Raw:
    """One client connection: requests written as given, answers read one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, dict[str, str], Any]:
        """(status, headers by lower-case name, decoded JSON body or None)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split(" ")[1]), headers, json.loads(body) if body else None

    async def ended(self, timeout: float = 5 * UNIT) -> bool:
        """Whether the server closes the connection within ``timeout`` (it sends nothing more)."""
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        assert data == b"", data
        return True

    def close(self) -> None:
        self.writer.close()


def poll(sid: str, cursor: int, token: str | None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /lp/{sid}?cursor={cursor} HTTP/1.1\r\nHost: gw\r\n{auth}{extra}\r\n".encode()


def post(sid: str, token: str, frames: list[dict[str, Any]]) -> bytes:
    body = json.dumps(frames).encode()
    return (f"POST /lp/{sid} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def session(gw, token: str, ch: str) -> str:
    """A long-poll session subscribed to ``ch`` whose ``sub`` reply waits in its outbox."""
    api = ApiClient(gw.port, token)
    try:
        status, _, body = await api.call("POST", "/lp", raw=b"")
        assert status == 201, body
        sid = body["session"]
        status, _, _ = await api.call("POST", f"/lp/{sid}", [{"id": 1, "op": "sub", "ch": ch}])
        assert status == 202
        return sid
    finally:
        api.close()


async def test_later_polls_on_a_kept_alive_connection_are_answered_off_tornado_alike():
    async with running_gateway(**FEED, longpoll_timeout=5.0) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:a")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token))
            status, first_headers, body = await c.answer()  # through Tornado, then adopted
            assert status == 200 and body["messages"] == [{"id": 1, "ok": True}]
            await until(lambda: gw.server.adopted == 1)
            cursor = body["cursor"]
            c.send(poll(sid, cursor, token))  # waits here, off Tornado
            await asyncio.sleep(0.1 * UNIT)
            await gw.ctx.node.publish("feed:a", b'{"n":1}')
            status, headers, body = await c.answer()
            assert status == 200 and [m["data"] for m in body["messages"]] == [{"n": 1}]
            assert body["cursor"] == cursor + 1
            assert (
                headers.keys()
                == first_headers.keys()
                == {
                    "cache-control",
                    "content-type",
                    "content-length",
                }
            )
            assert headers["cache-control"] == "no-store"
            assert headers["content-type"] == "application/json"
            assert gw.server.adopted == 1
        finally:
            c.close()


async def test_pipelined_polls_and_a_post_between_them_are_answered_in_order():
    async with running_gateway(**FEED, longpoll_timeout=5.0) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:b")
        for n in (1, 2, 3):
            await gw.ctx.node.publish("feed:b", b'{"n":%d}' % n)
        await asyncio.sleep(0.05 * UNIT)
        c = await Raw.open(gw.port)
        try:
            # One write: Tornado reads the first and may read ahead; the rest are served here.
            c.send(poll(sid, 0, token) + poll(sid, 2, token) + poll(sid, 3, token))
            counts = []
            for _ in range(3):
                status, _, body = await c.answer()
                assert status == 200
                counts.append((len(body["messages"]), body["cursor"]))
            assert counts == [(4, 4), (2, 4), (1, 4)]
            await until(lambda: gw.server.adopted == 1)
            # A POST on the same connection goes back to Tornado (its body with it), then
            # the next poll is adopted again.
            c.send(post(sid, token, [{"id": 9, "op": "ping"}]) + poll(sid, 4, token))
            status, _, body = await c.answer()
            assert status == 202 and body == {"accepted": 1}
            status, _, body = await c.answer()
            assert status == 200 and [m.get("id") for m in body["messages"]] == [9]
            await until(lambda: gw.server.adopted == 1)
            c.send(post(sid, token, [{"id": 10, "op": "ping"}]))  # alone, not pipelined
            assert (await c.answer())[0] == 202
            c.send(poll(sid, body["cursor"], token))
            status, _, body = await c.answer()
            assert [m.get("id") for m in body["messages"]] == [10]
        finally:
            c.close()


async def test_malformed_and_oversized_requests_get_tornados_answers_and_close():
    async with running_gateway(**FEED, max_header_bytes=2048) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:c")
        for bad, status, code in [
            (b"GARBAGE\r\n\r\n", 400, None),
            (poll(sid, 1, token, "X-Pad: " + "p" * 3000 + "\r\n"), 431, "headers_too_large"),
            (b"GET /lp/" + sid.encode() + b"?" + b"q" * 3000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        ]:  # fmt: skip
            fresh = await Raw.open(gw.port)  # today's answer on a new connection...
            fresh.send(bad)
            expected = await fresh.answer()
            assert await fresh.ended()
            fresh.close()
            c = await Raw.open(gw.port)
            try:
                c.send(poll(sid, 0, token))
                assert (await c.answer())[0] == 200
                await until(lambda: gw.server.adopted == 1)
                c.send(bad)  # ...is the answer on an adopted one
                got = await c.answer()
                assert got[0] == expected[0] == status
                assert got[2] == expected[2]
                if code is not None:
                    assert got[2]["error"]["code"] == code
                assert await c.ended()
            finally:
                c.close()
            await until(lambda: gw.server.adopted == 0)
        # A request line alone that outgrows the limit without its end is answered 414 as well.
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token))
            assert (await c.answer())[0] == 200
            await until(lambda: gw.server.adopted == 1)
            c.send(b"GET /lp/" + b"x" * 5000)
            got = await c.answer()
            assert got[0] == 414 and got[2]["error"]["code"] == "uri_too_long"
            assert await c.ended()
        finally:
            c.close()


async def test_another_users_session_a_forged_token_and_a_revoked_login_are_refused_as_before():
    async with running_gateway(**FEED, longpoll_timeout=0.5 * UNIT) as gw:
        alice_token = token_for(gw, "alice", channels=("feed:*",), extra={"sid": "login-a"})
        mallory_token = token_for(gw, "mallory", channels=("feed:*",))
        alice = await session(gw, alice_token, "feed:d")
        mallory = await session(gw, mallory_token, "feed:d")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(mallory, 0, mallory_token))
            assert (await c.answer())[0] == 200
            await until(lambda: gw.server.adopted == 1)
            c.send(poll(alice, 0, mallory_token))  # alice's session, mallory's token
            status, _, body = await c.answer()
            assert status == 404 and body["error"]["code"] == "not_found"
            c.send(poll(alice, 0, alice_token[:-4] + "AAAA"))
            status, headers, body = await c.answer()
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert headers["www-authenticate"] == "Bearer"
            c.send(poll(alice, 0, None))
            assert (await c.answer())[0] == 401
            # The connection lives on, and alice's session still holds her reply.
            c.send(poll(alice, 0, alice_token))
            status, _, body = await c.answer()
            assert status == 200 and body["messages"] == [{"id": 1, "ok": True}]
            await until(lambda: gw.server.adopted == 1)
            gw.ctx.verifier.revoked.apply(["login-a"])  # alice logs out
            c.send(poll(alice, body["cursor"], alice_token))
            status, _, body = await c.answer()
            assert status == 401 and body["error"]["code"] == "unauthorized"
        finally:
            c.close()


async def test_silence_past_header_timeout_closes_but_a_waiting_poll_is_not_cut():
    timeout = 0.6 * UNIT
    async with running_gateway(**FEED, header_timeout=timeout, longpoll_timeout=2 * timeout) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:e")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token))
            status, _, body = await c.answer()
            await until(lambda: gw.server.adopted == 1)
            started = time.monotonic()
            c.send(poll(sid, body["cursor"], token))  # waits longer than HEADER_TIMEOUT
            status, _, body = await c.answer()
            assert status == 200 and body["messages"] == []
            assert time.monotonic() - started >= 1.5 * timeout
            started = time.monotonic()
            c.send(b"GET /lp/")  # then part of a request, and silence
            assert await c.ended(5 * timeout)
            assert time.monotonic() - started >= 0.9 * timeout
            assert gw.server.adopted == 0
        finally:
            c.close()


async def test_connection_close_is_answered_then_closed():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:f")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token))
            _, _, body = await c.answer()
            await until(lambda: gw.server.adopted == 1)
            await gw.ctx.node.publish("feed:f", b'{"n":1}')
            c.send(poll(sid, body["cursor"], token, "Connection: close\r\n"))
            status, headers, body = await c.answer()
            assert status == 200 and headers["connection"] == "close"
            assert [m["data"] for m in body["messages"]] == [{"n": 1}]
            assert await c.ended()
            assert gw.server.adopted == 0
        finally:
            c.close()


async def test_a_client_gone_mid_poll_loses_nothing_and_a_closed_session_answers_410():
    async with running_gateway(**FEED, longpoll_timeout=5.0) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:g")
        c = await Raw.open(gw.port)
        c.send(poll(sid, 0, token))
        _, _, body = await c.answer()
        cursor = body["cursor"]
        await until(lambda: gw.server.adopted == 1)
        c.send(poll(sid, cursor, token))  # waits, then its client hangs up
        await asyncio.sleep(0.1 * UNIT)
        c.close()
        await until(lambda: gw.server.adopted == 0)
        await gw.ctx.node.publish("feed:g", b'{"n":1}')
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, cursor, token))
            status, _, body = await c.answer()
            assert status == 200 and [m["data"] for m in body["messages"]] == [{"n": 1}]
            await until(lambda: gw.server.adopted == 1)
            c.send(poll(sid, body["cursor"], token))
            await asyncio.sleep(0.1 * UNIT)
            polled = gw.ctx.longpoll.find(sid)
            assert polled is not None
            polled[1].disconnect(CloseCode.GOING_AWAY)
            status, _, body = await c.answer()
            assert status == 410 and body["close"] == {"code": CloseCode.GOING_AWAY}
        finally:
            c.close()


async def test_an_api_key_or_http_1_0_poll_stays_with_tornado_and_draining_answers_503():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:h")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token).replace(b"HTTP/1.1", b"HTTP/1.0", 1)[:-2]
                   + b"Connection: keep-alive\r\n\r\n")  # fmt: skip
            assert (await c.answer())[0] == 200
            await asyncio.sleep(0.1 * UNIT)
            assert gw.server.adopted == 0
            c.send(poll(sid, 0, token))
            assert (await c.answer())[0] == 200
            await until(lambda: gw.server.adopted == 1)
            gw.ctx.status.draining = True
            c.send(poll(sid, 0, token))
            status, headers, body = await c.answer()
            assert status == 503 and body["error"]["code"] == "draining"
            assert headers["retry-after"] == "1"
        finally:
            gw.ctx.status.draining = False
            c.close()


async def test_a_gateway_that_closes_closes_its_adopted_connections():
    async with running_gateway(**FEED) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:i")
        c = await Raw.open(gw.port)
        c.send(poll(sid, 0, token))
        await c.answer()
        await until(lambda: gw.server.adopted == 1)
    try:
        assert await c.ended()
    finally:
        c.close()


async def test_released_polls_run_together_and_one_failing_costs_the_others_nothing():
    waits = Waits()
    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("boom")

    first = PollSession("a", 1000, waits)
    second = PollSession("b", 1000, waits)
    first.wait(broken, 60)
    second.wait(lambda: ran.append("second"), 60)
    assert len(waits.waiting) == 2
    first.send(b"{}")
    second.send(b"{}")
    assert ran == [] and not waits.waiting  # called on the loop's next pass, not inside
    await asyncio.sleep(0)
    assert ran == ["broken", "second"]
    # The timeout is one sweep: a poll is answered (empty) once it has passed.
    third = PollSession("c", 1000, waits)
    third.wait(lambda: ran.append("timeout"), 0.2 * UNIT)
    await until(lambda: "timeout" in ran, 2 * UNIT)
    assert not waits.waiting


async def test_behind_a_trusted_proxy_an_adopted_poll_serves_the_forwarded_client():
    # ANSWER_BUFFER_TOTAL_BYTES groups stalled answers by whom they serve: behind an HTTP
    # reverse proxy, the client it forwards, poll by poll, not the proxy's own address.
    async with running_gateway(
        **FEED, longpoll_timeout=5.0, trusted_proxies=("127.0.0.0/8",)
    ) as gw:
        token = token_for(gw, channels=("feed:*",))
        sid = await session(gw, token, "feed:a")
        c = await Raw.open(gw.port)
        try:
            c.send(poll(sid, 0, token, "X-Forwarded-For: 203.0.113.9\r\n"))
            status, _, body = await c.answer()  # through Tornado, then adopted
            assert status == 200
            await until(lambda: gw.server.adopted == 1)
            c.send(poll(sid, body["cursor"], token, "X-Forwarded-For: 198.51.100.7\r\n"))
            (conn,) = gw.server._adopted
            await until(lambda: conn.client() == "198.51.100.7")
        finally:
            c.close()
