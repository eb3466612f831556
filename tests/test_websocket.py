"""End to end over real sockets on 127.0.0.1 (in-process gateway, memory broker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.infra.mint import mint_token
from proto import CloseCode, ErrorCode
from tests.harness import SECRET, http_url, running_gateway, token_for, until, ws_client
from tests.servers import UNIT


@pytest.fixture
async def gw():
    async with running_gateway() as gateway:
        yield gateway


@pytest.fixture
async def http():
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


async def fetch(http, url, **kw) -> HTTPResponse:
    return await http.fetch(url, raise_error=False, request_timeout=5 * UNIT, **kw)


async def handshake_status(gw, token, **kw) -> tuple[int, dict]:
    with pytest.raises(InvalidStatus) as info:
        async with ws_client(gw.port, token, **kw):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)


# -- handshake ---------------------------------------------------------------


async def shed_one(gw, ch: str, pause: float = 0.001) -> None:
    """Broadcast 60 KB publications on ``ch`` until a subscriber that reads nothing is
    shed as a slow consumer (the process budget, or its own buffer)."""
    chunk = json.dumps("z" * 60_000).encode()
    for _ in range(2000):
        gw.hub.broadcast(ch, chunk)
        if gw.ctx.metrics.slow_consumers._value.get():
            break
        await asyncio.sleep(pause)
    assert gw.ctx.metrics.slow_consumers._value.get() == 1


async def test_missing_token_is_401_before_upgrade(gw):
    status, body = await handshake_status(gw, None)
    assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_bad_and_expired_tokens_are_401(gw):
    assert (await handshake_status(gw, "garbage"))[0] == 401
    expired = mint_token(gw.settings, "alice", ["room:*"], ttl=-10)
    status, body = await handshake_status(gw, expired)
    assert status == 401 and body["error"]["message"] == "token expired"
    metrics = gw.ctx.metrics.handshake_failures
    assert metrics.labels("expired")._value.get() == 1


async def test_bearer_header_and_query_token_both_work(gw):
    for via in ("query", "header"):
        async with ws_client(gw.port, token_for(gw), via=via) as c:
            assert (await c.request("ping"))["ok"] is True


async def test_disallowed_origin_is_refused():
    async with running_gateway(allowed_origins=("https://app.example",)) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with ws_client(gw.port, token_for(gw), origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403
        assert info.value.response.headers["Vary"] == "Origin"  # not cached for other origins
        async with ws_client(gw.port, token_for(gw), origin="https://app.example") as c:
            assert (await c.request("ping"))["ok"]


# -- commands and fan-out ------------------------------------------------------


@pytest.mark.parametrize("msgpack", [False, True])
async def test_publish_reaches_every_subscriber(gw, msgpack):
    async with (
        ws_client(gw.port, token_for(gw), msgpack=msgpack) as a,
        ws_client(gw.port, token_for(gw, "bob")) as b,
    ):
        assert await a.request("sub", ch="room:1") == {"id": 1, "ok": True}
        assert (await b.request("sub", ch="room:1"))["ok"]
        data = {"text": "hi", "n": [1, 2.5, None], "nested": {"ok": True}}
        assert (await b.request("pub", ch="room:1", data=data))["ok"]
        assert await a.next_push() == {"op": "msg", "ch": "room:1", "data": data}
        assert await b.next_push() == {"op": "msg", "ch": "room:1", "data": data}


async def test_channel_outside_claims_is_an_error_reply(gw):
    async with ws_client(gw.port, token_for(gw, channels=("room:*",))) as c:
        reply = await c.request("sub", ch="admin:secrets")
        assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.PERMISSION_DENIED
        reply = await c.request("pub", ch="admin:secrets", data=1)
        assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED


async def test_pub_claim_false_forbids_client_publishing(gw):
    async with ws_client(gw.port, token_for(gw, pub=False)) as c:
        assert (await c.request("sub", ch="room:1"))["ok"]
        assert (await c.request("pub", ch="room:1", data=1))["error"][
            "code"
        ] == ErrorCode.PERMISSION_DENIED


async def test_malformed_frames_get_error_replies_and_the_socket_lives(gw):
    async with ws_client(gw.port, token_for(gw)) as c:
        for raw, code in [
            ("{not json", ErrorCode.BAD_FRAME),
            ('{"id": 1, "op": "explode"}', ErrorCode.UNKNOWN_OP),
            ('{"id": 2, "op": "sub", "ch": "bad channel"}', ErrorCode.INVALID_CHANNEL),
            ('{"id": 3, "op": "sub"}', ErrorCode.BAD_FRAME),
            (b"\x00\x01binary", ErrorCode.BAD_FRAME),
            ("null", ErrorCode.BAD_FRAME),
        ]:
            await c.send_raw(raw)
            reply = await c.recv()
            assert reply["ok"] is False and reply["error"]["code"] == code, raw
        assert (await c.request("ping"))["ok"] is True


async def test_oversized_frame_closes_with_1009():
    async with running_gateway(max_frame_bytes=1024) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            await c.send_raw(json.dumps({"id": 1, "op": "pub", "ch": "room:1", "data": "x" * 2000}))
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == CloseCode.MESSAGE_TOO_BIG
        async with ws_client(gw.port, token_for(gw)) as c:  # the gateway lives on
            assert (await c.request("ping"))["ok"]


async def test_publication_over_data_limit_is_an_error_reply():
    async with running_gateway(max_publish_bytes=100) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            reply = await c.request("pub", ch="room:1", data="y" * 200)
            assert reply["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE


async def test_token_expiry_is_announced_then_closes_the_socket_with_4002():
    async with running_gateway(token_grace=0.5) as gw:
        async with ws_client(gw.port, token_for(gw, ttl=1)) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            seen = []
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    seen.append(await c.recv(timeout=4 * UNIT))
            assert info.value.rcvd.code == CloseCode.TOKEN_EXPIRED
            assert [m["op"] for m in seen] == ["expiring"] and isinstance(seen[0]["exp"], int)
        await asyncio.wait_for(gw.hub.wait_idle(), 2 * UNIT)
        assert gw.hub.channels() == []


async def test_refresh_in_band_extends_the_socket_and_regrants():
    async with running_gateway(token_grace=0.2) as gw:
        first = token_for(gw, ttl=1, channels=("room:*", "user:alice"))
        async with ws_client(gw.port, first) as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
            assert (await c.request("sub", ch="user:alice"))["ok"]
            fresh = token_for(gw, ttl=60, channels=("room:*",))
            assert (await c.request("refresh", token=fresh))["ok"] is True
            # The refreshed grants drop what they no longer allow, with a reason.
            dropped = [m for m in c.pushes if m["op"] == "unsubscribed"]
            assert dropped == [
                {"op": "unsubscribed", "ch": "user:alice", "code": ErrorCode.PERMISSION_DENIED,
                 "message": "the refreshed token does not allow this channel"}
            ]  # fmt: skip
            assert gw.hub.subscriber_count("user:alice") == 0
            await asyncio.sleep(2.0 * UNIT)  # past the first token's exp + grace
            assert (await c.request("ping"))["ok"]
            assert (await c.request("sub", ch="user:alice"))["error"]["code"] == (
                ErrorCode.PERMISSION_DENIED
            )


async def test_refresh_refuses_bad_tokens_and_other_subjects(gw):
    async with ws_client(gw.port, token_for(gw, "alice")) as c:
        bad = await c.request("refresh", token="garbage")
        assert bad["ok"] is False and bad["error"]["code"] == ErrorCode.TOKEN_INVALID
        expired = await c.request("refresh", token=token_for(gw, "alice", ttl=-5))
        assert expired["error"]["code"] == ErrorCode.TOKEN_INVALID
        assert "expired" in expired["error"]["message"]
        other = await c.request("refresh", token=token_for(gw, "mallory"))
        assert other["error"]["code"] == ErrorCode.PERMISSION_DENIED
        assert (await c.request("ping"))["ok"]  # the socket lives on, as it was


async def test_shutdown_closes_sockets_with_reconnect_code():
    async with running_gateway() as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("ping"))["ok"]
            closing = asyncio.ensure_future(gw.close())
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == CloseCode.SHUTDOWN
            await asyncio.wait_for(closing, 5 * UNIT)


async def test_slow_consumer_is_closed_and_released():
    limit = 64 * 1024
    async with running_gateway(send_buffer_bytes=limit) as gw:
        # max_queue=1: the client library stops reading the socket once one
        # message waits, so the gateway's writes back up.
        async with ws_client(gw.port, token_for(gw), max_queue=1, max_size=None) as slow:
            assert (await slow.request("sub", ch="room:big"))["ok"]
            chunk = json.dumps("z" * 60_000).encode()
            sent = 0
            for _ in range(2000):  # far past kernel buffers + the 64 KiB bound
                gw.hub.broadcast("room:big", chunk)
                sent += len(chunk)
                if gw.ctx.metrics.slow_consumers._value.get():
                    break
                await asyncio.sleep(0)
            assert gw.ctx.metrics.slow_consumers._value.get() == 1, f"not closed after {sent} bytes"
            await asyncio.sleep(0.05)
            # It left the hub at once: nothing more is queued for it.
            assert gw.hub.subscriber_count("room:big") == 0
            assert gw.hub.broadcast("room:big", chunk) == 0
            # Reading again, the client gets what was queued, then the close code.
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await slow.ws.recv()
            assert info.value.rcvd.code == CloseCode.SLOW_CONSUMER
        await asyncio.wait_for(gw.hub.wait_idle(), 2 * UNIT)


# -- HTTP ------------------------------------------------------------------------


async def test_http_publish_reaches_sockets(gw, http):
    async with ws_client(gw.port, token_for(gw)) as c:
        assert (await c.request("sub", ch="room:7"))["ok"]
        r = await fetch(
            http,
            http_url(gw, "/api/publish"),
            method="POST",
            headers={"Authorization": f"Bearer {token_for(gw, 'svc')}"},
            body=json.dumps({"ch": "room:7", "data": {"from": "http"}}),
        )
        assert r.code == 200 and json.loads(r.body) == {"ok": True}
        assert await c.next_push() == {"op": "msg", "ch": "room:7", "data": {"from": "http"}}


@pytest.mark.parametrize(
    "token, body, status, code",
    [
        (None, '{"ch": "room:1", "data": 1}', 401, "unauthorized"),
        ("garbage", '{"ch": "room:1", "data": 1}', 401, "unauthorized"),
        ("ok", '{"ch": "admin:1", "data": 1}', 403, "forbidden"),
        ("ok", "{nope", 400, "malformed_json"),
        ("ok", '{"ch": "room:1"}', 422, "validation_error"),
        ("ok", '{"ch": "bad ch", "data": 1}', 422, "validation_error"),
        ("ok", '{"ch": "room:1", "data": 1, "extra": 2}', 422, "validation_error"),
        ("ok", '{"ch": "room:1", "data": "' + "x" * 70000 + '"}', 413, "payload_too_large"),
    ],
)
async def test_http_publish_errors_are_json(gw, http, token, body, status, code):
    headers = {}
    if token == "ok":
        headers["Authorization"] = f"Bearer {token_for(gw)}"
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    r = await fetch(http, http_url(gw, "/api/publish"), method="POST", headers=headers, body=body)
    assert r.code == status
    assert r.headers["Content-Type"] == "application/json"
    err = json.loads(r.body)["error"]
    assert err["status"] == status and err["code"] == code and err["message"]
    if status == 422:
        assert err["details"][0]["path"].startswith("$")


async def test_unknown_route_and_wrong_method_are_json(gw, http):
    r = await fetch(http, http_url(gw, "/nope"))
    assert r.code == 404 and json.loads(r.body)["error"]["code"] == "not_found"
    r = await fetch(http, http_url(gw, "/api/publish"))
    assert r.code == 405 and json.loads(r.body)["error"]["code"] == "method_not_allowed"


async def test_health_readiness_and_metrics(gw, http):
    assert json.loads((await fetch(http, http_url(gw, "/healthz"))).body) == {"status": "ok"}
    assert (await fetch(http, http_url(gw, "/readyz"))).code == 200
    async with ws_client(gw.port, token_for(gw)) as c:
        await c.request("sub", ch="room:1")
        await c.request("pub", ch="room:1", data=1)
        await c.next_push()
        text = (await fetch(http, http_url(gw, "/metrics"))).body.decode()
    for line in (
        'gateway_connections{transport="websocket"} 1.0',
        "gateway_subscriptions 1.0",
        "gateway_channels 1.0",
        'gateway_messages_in_total{op="pub"} 1.0',
        "gateway_messages_out_total 1.0",
        "gateway_fanout_seconds_count 1.0",
    ):
        assert line in text.splitlines(), line


async def test_tokens_never_reach_the_logs(gw, caplog):
    token = token_for(gw)
    with (
        caplog.at_level(logging.DEBUG, logger="gateway"),
        caplog.at_level(logging.DEBUG, logger="tornado"),
    ):
        async with ws_client(gw.port, token) as c:
            await c.request("ping")
        with pytest.raises(InvalidStatus):
            async with ws_client(gw.port, token + "x"):
                pass
    # Server-side records only: the test's own client library logs its request.
    server = "\n".join(
        r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("gateway", "tornado")
    )
    assert "token=[redacted]" in server
    assert token[-20:] not in server


def test_harness_secret_is_long_enough_for_hs256():
    assert len(SECRET) >= 32


async def test_peers_that_answer_stay_and_silent_ones_are_dropped():
    async with running_gateway(ping_interval=0.3, pong_timeout=0.3) as gw:
        # One sweep a second visits every connection (interval < tick).
        async with ws_client(gw.port, token_for(gw), ping_interval=None) as alive:
            with contextlib.suppress(ConnectionClosed):  # the silent side never learns
                async with ws_client(
                    gw.port, token_for(gw), ping_interval=None, close_timeout=0.1
                ) as silent:
                    silent.ws.transport.pause_reading()  # reads nothing, answers no ping
                    await until(
                        lambda: (
                            gw.ctx.metrics.dead_peers._value.get() == 1
                            and gw.hub.connection_count() == 1
                        ),
                        timeout=5.0 * UNIT,
                    )
                    silent.ws.transport.abort()
            await asyncio.sleep(2.0 * UNIT)  # more sweeps: the live one is never dropped
            assert (await alive.request("ping"))["ok"]
            assert gw.ctx.metrics.dead_peers._value.get() == 1


async def test_a_socket_is_never_dropped_before_it_was_pinged():
    # A socket that joins in the middle of a liveness round can wait for its
    # first visit longer than PING_INTERVAL + PONG_TIMEOUT: it is pinged then,
    # not dropped (seen with 39,000 sockets connecting over 50 s).
    async with running_gateway(ping_interval=25, pong_timeout=10) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            later = time.monotonic() + 100
            assert gw.hub.heartbeat(later, 25, 10, tick=25) == 1
            assert gw.ctx.metrics.dead_peers._value.get() == 0
            assert (await c.request("ping"))["ok"]


async def test_a_process_wide_send_budget_sheds_the_biggest_backlogs_first():
    """Per-socket bounds alone would let 10,000 sockets hold 10 GB: the budget holds all of them."""
    budget = 512 * 1024
    async with running_gateway(send_buffer_bytes=64 << 20, send_buffer_total_bytes=budget) as gw:
        token = token_for(gw)
        async with contextlib.AsyncExitStack() as stack:
            slow = [
                await stack.enter_async_context(
                    ws_client(gw.port, token, max_queue=1, max_size=None)
                )
                for _ in range(4)
            ]
            fast = await stack.enter_async_context(ws_client(gw.port, token, max_size=None))
            for c in (*slow, fast):
                assert (await c.request("sub", ch="room:big"))["ok"]
            received = 0

            async def read_all() -> None:
                nonlocal received
                while True:
                    msg = await fast.recv(10 * UNIT)
                    if msg.get("op") == "msg":
                        received += 1

            reader = asyncio.ensure_future(read_all())
            chunk = json.dumps("z" * 60_000).encode()
            sent = 0
            for _ in range(800):  # 48 MB: past the budget, short of the per-socket bound
                gw.hub.broadcast("room:big", chunk)
                sent += 1
                if gw.ctx.metrics.slow_consumers._value.get() == len(slow):
                    break
                await asyncio.sleep(0.001)
            assert gw.ctx.metrics.slow_consumers._value.get() == len(slow), "the budget shed no one"
            assert gw.hub.subscriber_count("room:big") == 1  # only the reader is left
            await until(lambda: received == sent, 10 * UNIT)
            reader.cancel()
            for c in slow:
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await c.ws.recv()
                assert info.value.rcvd.code == CloseCode.SLOW_CONSUMER


async def test_a_shed_socket_that_reads_nothing_is_reset_and_its_kernel_queue_freed(monkeypatch):
    # A plain close would leave the queue to an orphan probing the peer's zero window for
    # minutes; the peer would still see an open connection. A reset ends both at once.
    from gateway.loadtest.handshake import handshake_request
    from gateway.loadtest.wsclient import client_frame
    from gateway.transport import wsconn

    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.2 * UNIT)
    loop = asyncio.get_running_loop()
    async with running_gateway(send_buffer_bytes=64 * 1024) as gw:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, handshake_request(f"127.0.0.1:{gw.port}", "/ws",
                                                            token_for(gw)))  # fmt: skip
            assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
            await loop.sock_sendall(sock, client_frame(b'{"id":1,"op":"sub","ch":"room:big"}'))
            await until(lambda: gw.hub.subscriber_count("room:big") == 1)
            await shed_one(gw, "room:big", pause=0)  # it reads nothing from here on

            def reset() -> bool:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 7  # CLOSE

            await until(reset, 5 * UNIT)
        finally:
            sock.close()


async def test_a_closed_slow_consumer_that_reads_slowly_still_gets_its_close_frame(monkeypatch):
    from gateway.transport import wsconn

    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.3 * UNIT)  # far less than the reading takes
    # Shed by the process budget with 2 MiB queued in the gateway itself (not the kernel's).
    settings = {"send_buffer_bytes": 64 << 20, "send_buffer_total_bytes": 2 << 20}
    async with running_gateway(**settings) as gw:
        async with ws_client(gw.port, token_for(gw), max_queue=1, max_size=None) as slow:
            assert (await slow.request("sub", ch="room:big"))["ok"]
            await shed_one(gw, "room:big")
            started, n = asyncio.get_running_loop().time(), 0
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await slow.ws.recv()
                    n += 1
                    await asyncio.sleep(0.02 * UNIT)  # a slow reader, but a reader
            took = asyncio.get_running_loop().time() - started
            assert info.value.rcvd is not None, f"dropped without a close frame after {n} messages"
            assert info.value.rcvd.code == CloseCode.SLOW_CONSUMER
            assert took > 0.6 * UNIT, "the test must read for longer than the close timeout"
