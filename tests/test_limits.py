"""Rate limits as users meet them: 429 with Retry-After, error replies, and a close for abuse."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.infra.broker import RedisBroker
from core.infra.rate import Rate
from proto import CloseCode, ErrorCode
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
from tests.test_accounts import ADA, login, register
from tests.test_sse import sse


def per_minute(n: int) -> Rate:
    return Rate(n, 60.0)


async def test_login_attempts_per_account_then_429_and_success_resets(clean_db):
    async with running_gateway(**clean_db, rate_login_account=per_minute(2)) as gw:
        anon = ApiClient(gw.port, None)
        try:
            await register(anon)
            assert (await login(anon, ADA["email"], "wrong one 1"))[0] == 400
            assert (await login(anon, ADA["email"], ADA["password"]))[0] == 200  # resets
            assert (await login(anon, ADA["email"], "wrong one 2"))[0] == 400
            assert (await login(anon, ADA["email"], "wrong one 3"))[0] == 400
            status, body = await login(anon, ADA["email"], ADA["password"])
            assert status == 429 and body["error"]["code"] == "rate_limited"
            # Another account is not locked out by this one's attempts.
            assert (await login(anon, "other@example.com", "whatever 123"))[0] == 400
        finally:
            anon.close()


async def test_login_attempts_per_ip(clean_db):
    async with running_gateway(**clean_db, rate_login_ip=per_minute(3)) as gw:
        anon = ApiClient(gw.port, None)
        try:
            for i in range(3):
                assert (await login(anon, f"u{i}@example.com", "nope nope"))[0] == 400
            status, headers, body = await anon.call(
                "POST",
                "/api/auth/token",
                raw=b"grant_type=password&username=z@example.com&password=x",
            )
            assert status == 429 and body["error"]["code"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1
        finally:
            anon.close()


async def test_rest_requests_per_identity_answer_429_with_retry_after(clean_db):
    async with running_gateway(**clean_db, rate_rest=per_minute(3)) as gw:
        alice, bob = (
            ApiClient(gw.port, token_for(gw, "alice")),
            ApiClient(gw.port, token_for(gw, "bob")),
        )
        try:
            for _ in range(3):
                assert (await alice.call("GET", "/api/projects"))[0] == 200
            status, headers, body = await alice.call("GET", "/api/projects")
            assert status == 429 and body["error"]["code"] == "rate_limited"
            assert 1 <= int(headers["Retry-After"]) <= 20
            assert (await bob.call("GET", "/api/projects"))[0] == 200
            status, _, _ = await alice.call("POST", "/api/publish", {"ch": "room:1", "data": 1})
            assert status == 429  # the same allowance covers HTTP publishing
        finally:
            alice.close()
            bob.close()


async def test_new_connections_per_ip():
    async with running_gateway(rate_connect_ip=per_minute(2)) as gw:
        for _ in range(2):
            async with ws_client(gw.port, token_for(gw)) as c:
                assert (await c.request("ping"))["ok"]
        with pytest.raises(InvalidStatus) as info:
            async with ws_client(gw.port, token_for(gw)):
                pass
        response = info.value.response
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1


async def test_one_user_holds_at_most_max_connections_per_user_in_a_process():
    # Before, one ordinary account could take all of a process's MAX_CONNECTIONS
    # (from one address, within RATE_CONNECT_IP: 10,000 in under six minutes),
    # and every other user was refused with 503.
    async with running_gateway(max_connections_per_user=2) as gw:
        alice = token_for(gw, "alice")
        async with ws_client(gw.port, alice), sse(gw.port, alice, ["room:1"]) as stream:
            assert stream.status == 200
            with pytest.raises(InvalidStatus) as info:
                async with ws_client(gw.port, alice):
                    pass
            response = info.value.response
            assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
            async with sse(gw.port, alice, ["room:2"]) as third:
                assert third.status == 429
            status, _, body = await call_once(gw.port, alice, "POST", "/lp", raw=b"")
            assert status == 429 and body["error"]["code"] == "rate_limited"
            async with ws_client(gw.port, token_for(gw, "bob")) as bob:
                assert (await bob.request("ping"))["ok"]  # others are not refused
        await until(lambda: gw.ctx.node.hub.connection_count() == 0)
        async with ws_client(gw.port, alice) as again:  # counted down as they closed
            assert (await again.request("ping"))["ok"]
        assert gw.ctx.metrics.handshake_failures.labels("per_user")._value.get() == 3


async def test_socket_commands_are_refused_then_the_abuser_is_closed():
    async with running_gateway(rate_socket_commands=per_minute(5)) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            for _ in range(5):
                assert (await c.request("ping"))["ok"]
            refused = await c.request("ping")
            assert refused["ok"] is False and refused["error"]["code"] == ErrorCode.RATE_LIMITED
            assert refused["error"]["temporary"] is True
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(10):
                    await c.request("ping")
            assert info.value.rcvd.code == CloseCode.RATE_LIMITED


async def test_frames_that_are_no_command_spend_the_allowance_too():
    # Before, a frame that failed to decode was answered before the limit was
    # consulted: 1,000 of them in one write got 1,000 replies and the socket lived.
    async with running_gateway(rate_socket_commands=per_minute(5)) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            for _ in range(200):
                await c.send_raw("x")
            codes = []
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(200):
                    codes.append((await c.recv())["error"]["code"])
            assert info.value.rcvd.code == CloseCode.RATE_LIMITED
            assert codes == [ErrorCode.BAD_FRAME] * 5  # the allowance; the rest unanswered


async def test_a_client_that_paces_its_refusals_is_closed_all_the_same():
    # Before, an allowed command started the count of refusals anew: a client at
    # a few times its rate was refused forever and never closed. Each burst of
    # three here gets about one allowed (10/s) and two refused.
    async with running_gateway(rate_socket_commands=Rate(5, 0.5)) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:

            async def read() -> list[bool]:
                oks = []
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        oks.append((await c.recv(10 * UNIT))["ok"])
                return oks

            reading = asyncio.ensure_future(read())
            for _ in range(100):  # 10 s at most; closed within a second or so
                if reading.done():
                    break
                for _ in range(3):
                    await c.send_raw(json.dumps({"id": 1, "op": "ping"}))
                await asyncio.sleep(0.1)
            oks = await reading
            assert c.ws.close_code == CloseCode.RATE_LIMITED
            assert True in oks[5:], "allowed commands came between the refusals"


async def test_publishes_have_their_own_smaller_allowance():
    async with running_gateway(rate_socket_publish=per_minute(2)) as gw:
        async with ws_client(gw.port, token_for(gw)) as c:
            assert (await c.request("pub", ch="room:1", data=1))["ok"]
            assert (await c.request("pub", ch="room:1", data=2))["ok"]
            third = await c.request("pub", ch="room:1", data=3)
            assert third["error"]["code"] == ErrorCode.RATE_LIMITED
            assert (await c.request("ping"))["ok"]  # other commands go on


async def test_limits_hold_across_processes_through_redis(clean_db, redis_url):
    prefix = unique_prefix()
    shared = {"redis_url": redis_url, "redis_prefix": prefix, "rate_rest": per_minute(3)}
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **clean_db, **shared) as a,
        running_gateway(RedisBroker(redis_url, prefix), **clean_db, **shared) as b,
    ):
        on_a, on_b = (
            ApiClient(a.port, token_for(a, "carol")),
            ApiClient(b.port, token_for(b, "carol")),
        )
        try:
            assert (await on_a.call("GET", "/api/projects"))[0] == 200
            assert (await on_a.call("GET", "/api/projects"))[0] == 200
            assert (await on_b.call("GET", "/api/projects"))[0] == 200
            assert (await on_b.call("GET", "/api/projects"))[0] == 429
            assert (await on_a.call("GET", "/api/projects"))[0] == 429
        finally:
            on_a.close()
            on_b.close()
