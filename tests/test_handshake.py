"""The WebSocket handshake as a raw client sees it (issue 14, item 4).

Each test drives bytes by hand over a socket to a real gateway: a dripped
upgrade is cut by ``HEADER_TIMEOUT``; ``Sec-WebSocket-Key`` must be base64 of
16 bytes; the upgrade needs HTTP/1.1; a request line or headers over
``MAX_HEADER_BYTES`` get 414/431 on every route, however far over; bytes sent
right behind the upgrade request reach the socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from typing import Any

import pytest

from gateway.loadtest.handshake import handshake_request, new_key
from gateway.loadtest.wsclient import client_frame
from tests.conformance.wire import accept_for
from tests.harness import SECRET, running_gateway, token_for, unique_prefix
from tests.servers import UNIT
from tests.test_listener import Raw, raw, request
from tests.test_longpoll import Poller
from tests.test_processes import GatewayProcess


async def _cut_while_dripping(c: Raw, data: bytes, every: float) -> float | None:
    """Send ``data`` a byte every ``every`` s; the seconds until the server cut, None if never."""
    started = time.monotonic()
    for i in range(len(data)):
        try:
            await c.send(data[i : i + 1])
        except ConnectionError:
            return time.monotonic() - started
        if await c.closed_within(every):
            return time.monotonic() - started
    return None


# -- a dripped upgrade ----------------------------------------------------------


async def test_an_upgrade_dripped_a_byte_a_second_is_cut_within_the_header_timeout():
    async with running_gateway(header_timeout=2.0 * UNIT) as gw, raw(gw.port) as c:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        cut = await _cut_while_dripping(c, upgrade, 1.0)
        # The deadline is checked every quarter of the timeout: cut after 2 s, before 3 s.
        assert cut is not None and 2.0 * UNIT - 0.1 <= cut < 3.0 * UNIT, cut
        assert gw.hub.connection_count() == 0


async def test_a_gateway_process_cuts_a_dripped_upgrade_too(
    tmp_path, data_dir, redis_url, database_url, core_schema
):
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": unique_prefix(), "JWT_SECRET": SECRET,
           "DATABASE_URL": database_url, "DATABASE_SCHEMA": core_schema}  # fmt: skip
    gp = GatewayProcess(tmp_path, data_dir, HEADER_TIMEOUT=str(2.0 * UNIT), **env).start()
    try:
        async with raw(gp.port) as c:
            upgrade = handshake_request(f"127.0.0.1:{gp.port}", "/ws", "a-token-never-read")
            cut = await _cut_while_dripping(c, upgrade, 1.0)
            assert cut is not None and 2.0 * UNIT - 0.1 <= cut < 3.0 * UNIT, cut
    finally:
        gp.stop(signal.SIGKILL)


# -- Sec-WebSocket-Key and the HTTP version ---------------------------------------


async def _answer(port: int, data: bytes) -> tuple[int, dict[str, str], Any]:
    async with raw(port) as c:
        await c.send(data)
        return await c.response()


def _key_of(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


@pytest.mark.parametrize(
    "key",
    [
        _key_of(17),  # 24 characters, valid base64, but 17 bytes
        _key_of(18),  # 24 characters, no padding, 18 bytes
        "!" * 22 + "==",  # 24 characters outside the alphabet
        _key_of(16)[:-2] + "=A",  # padding inside
        _key_of(16).replace("A", "-"),  # the URL-safe alphabet is not base64's
        _key_of(12),  # valid, 12 bytes
        _key_of(16) + ", " + _key_of(16),  # two keys
        "",
    ],
)
async def test_a_key_that_is_not_base64_of_16_bytes_is_refused_with_400(key):
    async with running_gateway() as gw:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw), key="KEY")
        status, headers, body = await _answer(gw.port, upgrade.replace(b"KEY", key.encode()))
        assert status == 400 and headers["content-type"] == "application/json"
        assert body["error"]["code"] == "bad_request"
        assert "Sec-WebSocket-Key" in body["error"]["message"]
        assert gw.hub.connection_count() == 0
        failures = gw.ctx.metrics.handshake_failures.labels("malformed")._value.get()
        assert failures == 1


async def test_a_key_without_the_header_is_refused_and_a_valid_one_is_accepted():
    async with running_gateway() as gw:
        host, token = f"127.0.0.1:{gw.port}", token_for(gw)
        missing = handshake_request(host, "/ws", token).replace(b"Sec-WebSocket-Key", b"X-Key")
        assert (await _answer(gw.port, missing))[0] == 400
        key = new_key()
        status, headers, _ = await _answer(gw.port, handshake_request(host, "/ws", token, key=key))
        assert status == 101 and headers["sec-websocket-accept"] == accept_for(key)


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.2"])
async def test_an_upgrade_over_another_http_version_is_refused_with_505(version):
    async with running_gateway() as gw:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        status, headers, body = await _answer(
            gw.port, upgrade.replace(b"HTTP/1.1", version.encode(), 1)
        )
        assert status == 505 and headers["content-type"] == "application/json"
        assert body["error"]["code"] == "http_version_not_supported"
        assert "HTTP/1.1" in body["error"]["message"]
        assert gw.hub.connection_count() == 0


# -- oversized request lines and headers ------------------------------------------

LIMIT = 4096


@pytest.mark.parametrize("path", ["/ws", "/api/projects", "/healthz", "/lp/abc", "/nowhere"])
@pytest.mark.parametrize("over", [2, 16, 256])
async def test_an_oversized_request_line_is_answered_414_on_every_route(path, over):
    async with running_gateway(max_header_bytes=LIMIT) as gw, raw(gw.port) as c:
        await c.send(request("GET", f"{path}?q={'a' * (over * LIMIT)}"))
        status, headers, body = await c.response()
        assert status == 414 and body["error"]["code"] == "uri_too_long"
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert await c.closed_within(1 * UNIT)


@pytest.mark.parametrize("path", ["/ws", "/api/projects", "/healthz", "/lp/abc"])
@pytest.mark.parametrize("over", [2, 16, 256])
async def test_oversized_headers_are_answered_431_on_every_route(path, over):
    async with running_gateway(max_header_bytes=LIMIT) as gw, raw(gw.port) as c:
        big = {f"X-Big-{i}": "b" * 1000 for i in range(over * LIMIT // 1000)}
        await c.send(request("GET", path, big))
        status, headers, body = await c.response()
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert await c.closed_within(1 * UNIT)


async def test_headers_within_the_limit_pass_and_a_kept_alive_connection_is_answered_too():
    async with running_gateway(max_header_bytes=LIMIT) as gw, raw(gw.port) as c:
        await c.send(request("GET", "/healthz", {"X-Fine": "f" * (LIMIT - 200)}))
        assert (await c.response())[0] == 200
        await c.send(request("GET", "/healthz", {"X-Huge": "h" * (4 * LIMIT)}))
        status, _, body = await c.response()
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        assert await c.closed_within(1 * UNIT)


async def test_a_request_sent_behind_an_oversized_one_is_not_served():
    async with running_gateway(max_header_bytes=LIMIT) as gw, raw(gw.port) as c:
        huge = request("GET", "/healthz", {"X-Huge": "h" * (4 * LIMIT)})
        await c.send(huge + request("GET", "/healthz"))
        assert (await c.response())[0] == 431
        assert await c.closed_within(1 * UNIT)  # and no second answer came


# -- bytes behind the upgrade request ---------------------------------------------


#: The fast route's two ways: the connect limit (or a hook) awaited in a task,
#: or, with neither, every check at the accept (`_handshake_now`).
ADMISSIONS = {"limited": {}, "at once": {"rate_connect_ip": None}}


@pytest.mark.parametrize("admission", ADMISSIONS)
@pytest.mark.parametrize("writes", ["one write", "two writes", "before the accept"])
async def test_a_command_sent_with_the_upgrade_request_is_answered(writes, admission):
    async with running_gateway(**ADMISSIONS[admission]) as gw:
        if writes == "before the accept":
            upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
            command = client_frame(b'{"op":"ping","id":1}') + client_frame(b'{"op":"ping","id":2}')
            async with raw(gw.port, before_accept=upgrade + command) as c:
                reader, writer = c.reader, c.writer
                await _two_pongs(reader)
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
            command = client_frame(b'{"op":"ping","id":1}') + client_frame(b'{"op":"ping","id":2}')
            if writes == "one write":
                writer.write(upgrade + command)
            else:  # the frames arrive while the upgrade is being admitted
                writer.write(upgrade)
                await writer.drain()
                writer.write(command)
            await _two_pongs(reader)
        finally:
            writer.close()


async def _two_pongs(reader: asyncio.StreamReader) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    for cid in (1, 2):
        frame = await asyncio.wait_for(reader.readexactly(2), 5 * UNIT)
        assert frame[0] == 0x81, frame  # a text frame, unmasked
        payload = await asyncio.wait_for(reader.readexactly(frame[1]), 5 * UNIT)
        assert json.loads(payload) == {"id": cid, "ok": True}


@pytest.mark.parametrize("admission", ADMISSIONS)
@pytest.mark.parametrize(
    ("fault", "status"),
    [("a 12-byte key", 400), ("no token", 401), ("no Host", 400), ("two Hosts", 400),
     ("a bad token", 401), ("POST", 405), ("HTTP/1.0", 505)],
)  # fmt: skip
async def test_an_upgrade_already_sent_at_the_accept_is_checked_as_any_other(
    fault, status, admission
):
    """The listener's fast route refuses what Tornado's path refuses, with the same answers."""
    async with running_gateway(**ADMISSIONS[admission]) as gw:
        host = f"127.0.0.1:{gw.port}"
        token = None if fault == "no token" else token_for(gw)
        upgrade = handshake_request(host, "/ws", token, key=_key_of(12) if "key" in fault else None)
        if fault == "no Host":
            upgrade = upgrade.replace(f"Host: {host}\r\n".encode(), b"")
        elif fault == "two Hosts":
            upgrade = upgrade.replace(b"Host: ", b"Host: a.example\r\nHost: ")
        elif fault == "a bad token":
            upgrade = upgrade.replace(b"Bearer ", b"Bearer x")
        elif fault in ("POST", "HTTP/1.0"):
            line = b"POST /ws HTTP/1.1" if fault == "POST" else b"GET /ws HTTP/1.0"
            upgrade = upgrade.replace(b"GET /ws HTTP/1.1", line)
        async with raw(gw.port, before_accept=upgrade) as c:
            answer, _, body = await c.response()
            assert answer == status, body
            assert await c.closed_within(2 * UNIT)
        assert gw.hub.connection_count() == 0


@pytest.mark.parametrize("kind", ["healthz", "another path", "a partial upgrade"])
async def test_other_requests_already_sent_at_the_accept_are_served_by_tornado(kind):
    async with running_gateway() as gw:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        first = {"healthz": request("GET", "/healthz"), "another path": request("GET", "/ws/x"),
                 "a partial upgrade": upgrade[:30]}[kind]  # fmt: skip
        async with raw(gw.port, before_accept=first) as c:
            if kind == "a partial upgrade":  # Tornado reads the rest after what the accept read
                await c.send(upgrade[30:])
                assert (await c.response())[0] == 101
            else:
                assert (await c.response())[0] == (200 if kind == "healthz" else 404)


async def test_requests_pipelined_behind_a_poll_are_still_served_in_order():
    # A poll is answered on Tornado's connection (no detach): what follows it is the next request.
    async with running_gateway() as gw:
        token = token_for(gw)
        p = await Poller(gw, token).open()
        try:
            assert await p.send({"id": 1, "op": "ping"}) == 202
            auth = {"Authorization": f"Bearer {token}"}
            async with raw(gw.port) as c:
                await c.send(
                    request("GET", f"/lp/{p.sid}?cursor=0", auth) + request("GET", "/healthz")
                )
                status, _, body = await c.response()
                assert status == 200 and body["messages"] == [{"id": 1, "ok": True}]
                assert (await c.response())[0] == 200
        finally:
            p.close()


async def test_an_upgrade_admitted_at_once_is_checked_at_the_accept(monkeypatch):
    """Without a connect limit or hook, the fast route runs no admission task: all at the accept."""
    import gateway.transport.websocket as websocket

    def no_task(*args: object) -> None:
        raise AssertionError("an admission task for an upgrade admitted at once")

    monkeypatch.setattr(websocket, "_handshake_on", no_task)
    async with running_gateway(rate_connect_ip=None) as gw:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        async with raw(gw.port, before_accept=upgrade) as c:
            assert (await c.response())[0] == 101
        refused = handshake_request(f"127.0.0.1:{gw.port}", "/ws", "not-a-token")
        async with raw(gw.port, before_accept=refused) as c:
            assert (await c.response())[0] == 401


async def test_an_upgrade_whose_head_tornado_ends_sooner_is_cut_where_tornado_cuts_it():
    """A bare LF pair ends a head for Tornado: the fast route must not read past it (one
    reading of where a request ends, whoever serves it)."""
    async with running_gateway() as gw:
        upgrade = handshake_request(f"127.0.0.1:{gw.port}", "/ws", token_for(gw))
        early = upgrade.replace(b"\r\nUpgrade:", b"\n\nUpgrade:", 1)  # ends after the Host
        async with raw(gw.port, before_accept=early) as c:
            status, _, _ = await c.response()
        assert status != 101 and gw.hub.connection_count() == 0


def test_a_head_of_bare_lf_lines_said_within_the_limit_is_not_oversized():
    from tornado import httputil

    from core.infra.listener import _oversized
    from core.infra.requesthead import within

    data = (
        b"GET /ws HTTP/1.1\r\nHost: a" + b"".join(b"\nX%d:" % n for n in range(560)) + b"\r\n\r\n"
    )
    end = data.find(b"\r\n\r\n")
    text = data[:end].decode()
    start = httputil.parse_request_start_line(text.partition("\r\n")[0])
    headers = httputil.HTTPHeaders.parse(text.partition("\r\n")[2])
    assert _oversized(start, headers, 4096) is not None  # the measure says 431
    assert not within(data, end, 4096)  # so it must not be spared
