"""Hooks against a real backend process (examples/hooks_backend.py, through tests/hookbackend.py).

No mocks: the gateway signs and sends real HTTP requests, the backend checks
their signature with the shipped helper and answers as the example does, or
fails in one of the ways a backend can (slow, 500, not JSON, too large, the
wrong shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.infra.mint import mint_token
from core.infra.settings import Settings, SettingsError
from core.infra.verify import Verifier
from gateway.app import Gateway
from gateway.client import Backoff, State, Subscription
from gateway.client import Client as PythonClient
from gateway.client.polling import open_longpoll
from gateway.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signed_headers, verify_signature
from gateway.transport.sse import decode_positions, encode_positions
from proto import CloseCode
from tests import test_processes
from tests.harness import SECRET as JWT_SECRET
from tests.harness import (
    ApiClient,
    Client,
    http_url,
    running_gateway,
    token_for,
    unique_prefix,
    until,
    ws_client,
)
from tests.hookbackend import SECRET, HookBackend
from tests.servers import UNIT


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    started = HookBackend(tmp_path_factory.mktemp("hooks") / "backend.log")
    yield started
    started.stop()


def hooked(backend: HookBackend, **overrides: Any) -> dict[str, Any]:
    """Gateway settings with every hook on the backend, as the example's docstring has them."""
    values: dict[str, Any] = {
        "hook_secret": SECRET,
        "hook_connect_url": backend.url("/connect"),
        "hook_subscribe_url": backend.url("/subscribe"),
        "hook_subscribe_channels": ("private:*",),
        "hook_publish_url": backend.url("/publish"),
        "hook_publish_channels": ("chat:*",),
        "hook_call_url": backend.url("/call"),
        "hook_refresh_url": backend.url("/refresh"),
    }
    values.update(overrides)
    return values


@contextlib.asynccontextmanager
async def cookie_client(
    gw: Any, cookie: str | None, *, msgpack: bool = False, opened: bool = True, **headers: str
) -> AsyncIterator[Client]:
    """A socket with no token at all: a browser's cookie (and other headers) only.

    ``opened``: read the example hook's one server-side subscription first (its
    ``subscribed`` push, kept as ``client.opened``), before anything else comes.
    """
    if cookie is not None:
        headers["Cookie"] = cookie
    async with connect(
        f"ws://127.0.0.1:{gw.port}/ws",
        subprotocols=["gw.v1.msgpack" if msgpack else "gw.v1.json"],  # type: ignore[list-item]
        additional_headers=headers,
        proxy=None,
        compression=None,
        open_timeout=5 * UNIT,
    ) as ws:
        client = Client(ws, msgpack)
        if opened:
            client.opened = await client.recv()
            assert client.opened["op"] == "subscribed", client.opened
        yield client


async def metrics_of(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    http = AsyncHTTPClient(force_instance=True)
    try:
        text = (await http.fetch(http_url(gw, "/metrics"))).body.decode()
    finally:
        http.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def get_json(gw: Gateway, path: str, **kw: Any) -> tuple[int, Any]:
    http = AsyncHTTPClient(force_instance=True)
    try:
        r = await http.fetch(http_url(gw, path), raise_error=False, **kw)
    finally:
        http.close()
    return r.code, json.loads(r.body) if r.body else None


# -- connect ---------------------------------------------------------------------


async def test_a_client_without_a_token_is_admitted_by_its_session_cookie(backend):
    backend.forget()
    async with running_gateway(**hooked(backend)) as gw:
        async with cookie_client(gw, backend.login("ada"), **{"User-Agent": "test-browser"}) as c:
            assert (await c.request("call", method="whoami"))["data"] == {"user": "ada"}
            # Subscribed by the server to user:ada: no `sub` frame, no grant needed.
            await until(lambda: gw.hub.subscriber_count("user:ada") == 1)
            await gw.ctx.node.publish("user:ada", b'{"note": 1}')
            assert c.opened == {"op": "subscribed", "ch": "user:ada"}
            assert await c.next_push() == {"op": "msg", "ch": "user:ada", "data": {"note": 1}}
            # The hook's grants: room:* yes, admin:* no.
            assert (await c.request("sub", ch="room:1"))["ok"]
            assert (await c.request("sub", ch="admin:1"))["error"]["code"] == 103
    asked = backend.requests("connect")[-1]
    assert asked["user"] is None and "claims" not in asked
    assert asked["transport"] == "websocket" and asked["protocol"] == "gw.v1.json"
    assert asked["remote_addr"] == "127.0.0.1" and len(asked["client"]) == 16
    assert asked["headers"]["Cookie"].startswith("session=")
    assert asked["headers"]["User-Agent"] == "test-browser"
    assert "Authorization" not in asked["headers"]


async def test_a_hook_s_history_channel_says_where_it_stands_so_a_reconnect_reads_what_it_missed(
    backend,
):
    # A connect hook's subscriptions carried no position: a client back from a reconnect
    # could not know what it had missed on them (no `sub` with `since`: it is `104`).
    cookie = backend.login("ada")
    async with running_gateway(**hooked(backend, history_channels=("user:*",))) as gw:
        node = gw.ctx.node
        await node.publish("user:ada", b'{"n": 1}')
        async with cookie_client(gw, cookie) as c:
            opened = c.opened
            assert opened["op"] == "subscribed" and opened["offset"] == 1, opened
            epoch = opened["epoch"]
            assert "recovered" not in opened  # it gave no position to recover from
            await node.publish("user:ada", b'{"n": 2}')
            assert await c.next_push() == {
                "op": "msg", "ch": "user:ada", "data": {"n": 2}, "offset": 2, "epoch": epoch
            }  # fmt: skip
        await node.publish("user:ada", b'{"n": 3}')  # while it is away
        await node.publish("user:ada", b'{"n": 4}')
        async with cookie_client(gw, cookie) as c:
            assert c.opened == {
                "op": "subscribed", "ch": "user:ada", "offset": 4, "epoch": epoch
            }  # fmt: skip
            # What the client missed, from the last offset it saw: as after a `gap`.
            missed = await c.request("history", ch="user:ada", since=2)
            assert [p["data"] for p in missed["publications"]] == [{"n": 3}, {"n": 4}]
            assert (await c.request("sub", ch="user:ada"))["error"]["code"] == 104


async def test_the_python_client_reads_what_it_missed_on_a_hook_s_channel_across_a_reconnect(
    backend,
):
    cookie = backend.login("ada")
    async with running_gateway(**hooked(backend, history_channels=("user:*",))) as gw:
        node = gw.ctx.node
        made: list[Subscription] = []
        fast = Backoff(base=0.05, cap=0.2)
        async with PythonClient(f"ws://127.0.0.1:{gw.port}/ws", headers={"Cookie": cookie},
                          backoff=fast, on_subscribed=made.append) as c:  # fmt: skip
            await until(lambda: len(made) == 1)
            (mine,) = made
            assert mine.channel == "user:ada" and c.subscription("user:ada") is mine
            await node.publish("user:ada", b'{"n": 1}')
            assert (await asyncio.wait_for(anext(mine), 2 * UNIT)).data == {"n": 1}
            gw.ctx.status.draining = True  # reconnects refused (503) while publications go on
            assert gw.hub.close_subject("ada", CloseCode.SHUTDOWN) == 1
            await until(lambda: c.state is State.RECONNECTING)
            for n in (2, 3):
                await node.publish("user:ada", b'{"n": %d}' % n)
            gw.ctx.status.draining = False
            got = [await asyncio.wait_for(anext(mine), 2 * UNIT) for _ in range(2)]
            assert [(p.offset, p.data) for p in got] == [(2, {"n": 2}), (3, {"n": 3})]
            assert mine.recovered is True and c.connections == 2 and made == [mine]
            await node.publish("user:ada", b'{"n": 4}')
            assert (await asyncio.wait_for(anext(mine), 2 * UNIT)).data == {"n": 4}
            assert c.subscription("user:ada") is mine  # kept, not ended by the `sub`'s 104


async def test_the_python_client_s_long_poll_session_is_opened_by_cookie_then_its_secret(backend):
    got: list[bytes | str] = []
    async with running_gateway(**hooked(backend)) as gw:
        poll = await open_longpoll(
            f"ws://127.0.0.1:{gw.port}/ws", None, got.append, {"Cookie": backend.login("ada")}
        )
        try:
            await until(lambda: got)
            assert json.loads(got[0]) == {"op": "subscribed", "ch": "user:ada"}
        finally:
            poll.abort()


async def test_refused_and_disconnected_before_anything_opens(backend):
    async with running_gateway(**hooked(backend)) as gw:
        with pytest.raises(InvalidStatus) as refused:  # no session: the backend says 401
            async with cookie_client(gw, None):
                pass
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body)
        assert body["error"]["message"] == "log in first"
        with pytest.raises(InvalidStatus) as forged:  # a bad token never reaches the backend
            async with ws_client(gw.port, "not.a.token"):
                pass
        assert forged.value.response.status_code == 401
        # Banned: the socket opens only to be closed with the backend's code and reason.
        async with cookie_client(gw, backend.login("mallory"), opened=False) as c:
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4501, "banned")
        assert gw.hub.connection_count() == 0
        failures = await metrics_of(gw)
    for reason in ("hook_refused", "hook_disconnect"):
        assert sample(failures, "gateway_handshake_failures_total", reason=reason) == 1


async def test_a_token_s_claims_go_to_the_hook_and_its_grants_stand(backend):
    backend.forget()
    async with running_gateway(**hooked(backend)) as gw:
        token = token_for(gw, "alice", channels=("room:*",))
        async with ws_client(gw.port, token, via="header") as c:
            # The example answers {"result": {}} to a token: what it grants stands.
            assert (await c.request("sub", ch="room:1"))["ok"]
            assert (await c.request("sub", ch="chat:1"))["error"]["code"] == 103
            assert (await c.request("call", method="whoami"))["data"] == {"user": "alice"}
        asked = backend.requests("connect")[-1]
        assert asked["user"] == "alice" and asked["claims"]["channels"] == ["room:*"]
        assert asked["claims"]["sub"] == "alice" and "exp" in asked["claims"]
        assert asked["headers"]["Authorization"] == f"Bearer {token}"


def test_a_connect_result_cannot_make_a_token_someone_else():
    from core.infra.metrics import Metrics
    from gateway.hooks.answers import BadAnswer, ConnectResult
    from gateway.hooks.connect import _identity
    from gateway.hooks.service import Hooks

    settings = Settings(hook_secret=SECRET, hook_connect_url="http://127.0.0.1:1/connect")
    hooks = Hooks(settings, Metrics())
    token = Verifier(Settings(jwt_secret=JWT_SECRET)).verify(
        mint_token(Settings(jwt_secret=JWT_SECRET), "alice", ["room:*"])
    )
    for bad in (
        ConnectResult(user="bob"),  # another user than the token's
        ConnectResult(subscribe=["__control"]),  # the system's channel
        ConnectResult(subscribe=[f"c{n}" for n in range(200)]),  # over MAX_SUBSCRIPTIONS
        ConnectResult(info={"x": "y" * 2000}),  # over 1 KiB
        ConnectResult(info={"n": 2**70}),  # what MessagePack cannot carry
        ConnectResult(channels=["room:*"], pub=[1]),  # type: ignore[list-item]
    ):
        with pytest.raises(BadAnswer):
            _identity(hooks, bad, token, "c1")
    with pytest.raises(BadAnswer):  # without a token, the hook must name the user
        _identity(hooks, ConnectResult(), None, "c1")
    same = _identity(hooks, ConnectResult(user="alice", expire_at=5.0), token, "c1")
    assert (same.sub, same.exp, same.grants, same.client) == ("alice", 5.0, token.grants, "c1")
    assert token.exp != 5.0  # the verified (cached, shared) identity is untouched


@pytest.mark.parametrize(
    "info",
    [b'{"n": 1180591620717411303424}', b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", b'"text"'],
)
def test_a_subscribe_hooks_info_every_codec_cannot_carry_is_a_bad_answer(info):
    """Every subscriber of the channel reads the info in presence, in its own codec: an
    integer beyond MessagePack's range failed every MessagePack client's ``presence``."""
    from gateway.hooks.answers import BadAnswer
    from gateway.hooks.session import _read_subscribe

    with pytest.raises(BadAnswer):
        _read_subscribe(b'{"result": {"info": ' + info + b"}}")
    assert _read_subscribe(b'{"result": {"info": {"n": 1}}}').result is not None


async def test_a_spoofed_user_in_frames_or_headers_changes_nothing(backend):
    backend.forget()
    async with running_gateway(**hooked(backend)) as gw:
        spoof = {"X-Gateway-Signature": "sha256=00", "X-Forwarded-For": "6.6.6.6", "User": "bob"}
        async with cookie_client(gw, backend.login("ada"), **spoof) as c:
            reply = await c.request("call", method="echo", data={"user": "bob"})
            assert reply["data"] == {"user": "bob"}  # data is the client's; the user is not
            assert (await c.request("call", method="whoami"))["data"] == {"user": "ada"}
            refused = await c.request("sub", ch="private:bob", data={"user": "bob"})
            assert refused["error"]["code"] == 403
    connect_asked = backend.requests("connect")[-1]
    # Only HOOK_FORWARD_HEADERS (here the cookie and the library's User-Agent), in the body.
    assert set(connect_asked["headers"]) == {"Cookie", "User-Agent"}
    assert connect_asked["remote_addr"] == "127.0.0.1"  # not a forwarded address: no trusted proxy
    assert all(r["user"] == "ada" for r in backend.requests() if "channel" in r or "method" in r)


# -- subscribe, publish, call ---------------------------------------------------------


async def test_a_subscription_the_backend_refuses_is_not_made(backend):
    async with running_gateway(**hooked(backend, presence_channels=("private:*",))) as gw:
        async with cookie_client(gw, backend.login("ada")) as c:
            refused = await c.request("sub", ch="private:bob")
            assert refused["ok"] is False
            for op in ("history", "presence", "presence_stats"):  # no reading around the hook
                assert (await c.request(op, ch="private:bob"))["error"]["code"] == 103
            assert refused["error"] == {
                "code": 403,
                "message": "not your private channel",
                "temporary": False,
            }
            assert gw.hub.subscriber_count("private:bob") == 0
            assert await gw.ctx.node.publish("private:bob", b'"secret"') is None
            ok = await c.request("sub", ch="private:ada")
            assert ok == {"id": ok["id"], "ok": True, "data": {"welcome": "ada"}}
            await gw.ctx.node.publish("private:ada", b'"mine"')
            while (push := await c.next_push())["op"] != "msg":  # presence: a join first
                assert push["op"] == "join"
            assert push["data"] == "mine"  # never "secret"
            who = await c.request("presence", ch="private:ada")  # subscribed: allowed
            assert [p["info"] for p in who["presence"]] == [{"owner": True}]  # the hook's info


async def test_a_publication_is_rewritten_or_refused_by_the_backend(backend):
    async with running_gateway(**hooked(backend)) as gw:
        async with (
            cookie_client(gw, backend.login("ada")) as ada,
            cookie_client(gw, backend.login("bob"), msgpack=True) as bob,
        ):
            for c in (ada, bob):
                assert (await c.request("sub", ch="chat:lobby"))["ok"]
            assert (await ada.request("pub", ch="chat:lobby", data={"text": "darn it"}))["ok"]
            expected = {"from": "ada", "text": "**** it"}
            for c in (ada, bob):
                assert (await c.next_push())["data"] == expected
            empty = await bob.request("pub", ch="chat:lobby", data={"text": "  "})
            assert empty["error"]["code"] == 400 and empty["error"]["message"] == "empty message"
            # room:* is not a hooked channel: published as sent.
            assert (await ada.request("sub", ch="room:1"))["ok"]
            assert (await ada.request("pub", ch="room:1", data={"text": "darn"}))["ok"]
            assert (await ada.next_push())["data"] == {"text": "darn"}


async def test_skip_history_keeps_a_rewritten_publication_out_of_history(backend):
    async with running_gateway(**hooked(backend, history_channels=("chat:*",))) as gw:
        async with cookie_client(gw, backend.login("ada")) as c:
            assert (await c.request("sub", ch="chat:h"))["ok"]
            assert (await c.request("pub", ch="chat:h", data={"text": "kept"}))["ok"]
            kept = await c.next_push()
            assert (await c.request("pub", ch="chat:h", data={"text": "gone", "ephemeral": True}))[
                "ok"
            ]
            gone = await c.next_push()
            assert kept["offset"] == 1 and "offset" not in gone and gone["data"]["text"] == "gone"
            page = await c.request("history", ch="chat:h")
            assert [p["data"]["text"] for p in page["publications"]] == ["kept"]


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_a_call_is_answered_by_the_backend(backend, msgpack):
    async with running_gateway(**hooked(backend)) as gw:
        async with cookie_client(gw, backend.login("ada"), msgpack=msgpack) as c:
            assert (await c.request("call", method="add", data=[1, 2, 3.5]))["data"] == 6.5
            echoed = await c.request("call", method="echo", data={"deep": [None, "é"]})
            assert echoed["data"] == {"deep": [None, "é"]}
            bare = await c.request("call", method="echo")
            assert bare == {"id": bare["id"], "ok": True, "data": None}  # it echoed nothing
            unknown = await c.request("call", method="nope")
            assert unknown["error"] == {
                "code": 404,
                "message": "no method nope",
                "temporary": False,
            }
            bad = await c.request("call", method="bad name")
            assert bad["error"]["code"] == 100  # refused by the gateway, never sent


async def test_without_a_call_hook_a_call_is_unavailable():
    async with running_gateway() as gw, ws_client(gw.port, token_for(gw)) as c:
        reply = await c.request("call", method="whoami")
        assert reply["error"]["code"] == 110 and reply["error"]["temporary"] is True


async def test_the_python_client_calls(backend):
    from gateway.client import Client as GatewayClient
    from gateway.client import ReplyError

    async with running_gateway(**hooked(backend)) as gw:
        url = f"ws://127.0.0.1:{gw.port}/ws"
        async with GatewayClient(url, token=token_for(gw, "carol")) as client:
            assert await client.call("whoami") == {"user": "carol"}
            assert await client.call("echo") is None
            with pytest.raises(ReplyError) as refused:
                await client.call("missing", [1])
            assert refused.value.code == 404


# -- other transports ---------------------------------------------------------------


async def test_sse_and_long_poll_are_admitted_by_cookie_too(backend):
    cookie = backend.login("ada")
    async with running_gateway(**hooked(backend)) as gw:
        http = AsyncHTTPClient(force_instance=True)
        chunks: list[bytes] = []
        stream = http.fetch(
            http_url(gw, "/sse?ch=room:1"),
            headers={"Cookie": cookie},
            streaming_callback=chunks.append,
            request_timeout=10 * UNIT,
        )
        try:
            await until(lambda: gw.hub.subscriber_count("room:1") == 1)
            await gw.ctx.node.publish("room:1", b'{"via":"sse"}')
            await until(lambda: b'"via":"sse"' in b"".join(chunks))
            assert b'event: reply\ndata: {"id":1,"ok":true}' in b"".join(chunks)
            assert gw.hub.close_subject("ada", CloseCode.SHUTDOWN) == 1  # the stream ends
            await stream
            assert b'event: close\ndata: {"code":4000}' in b"".join(chunks)
        finally:
            http.close()
        status, opened = await _http(gw, "POST", "/lp", headers={"Cookie": cookie})
        assert status == 201 and opened["token"].startswith("gwlp_")
        secret = {"Authorization": f"Bearer {opened['token']}"}
        frames = [
            {"id": 1, "op": "call", "method": "whoami"},
            {"id": 2, "op": "sub", "ch": "room:2"},
        ]
        status, _ = await _http(gw, "POST", f"/lp/{opened['session']}", frames, headers=secret)
        assert status == 202
        status, polled = await _http(gw, "GET", f"/lp/{opened['session']}?cursor=0", headers=secret)
        assert status == 200
        assert polled["messages"][:2] == [
            {"op": "subscribed", "ch": "user:ada"},  # the connect hook's, first
            {"id": 1, "ok": True, "data": {"user": "ada"}},
        ]
        # The cookie alone is no credential for a session; nor is another session's secret.
        status, _ = await _http(
            gw, "GET", f"/lp/{opened['session']}?cursor=0", headers={"Cookie": cookie}
        )
        assert status == 401
        status, other = await _http(gw, "POST", "/lp", headers={"Cookie": backend.login("bob")})
        status, _ = await _http(gw, "GET", f"/lp/{other['session']}?cursor=0", headers=secret)
        assert status in (401, 404)


async def test_an_event_stream_recovers_its_hook_s_channels_from_last_event_id(backend):
    # The browser's own reconnect sends the last `id:`, which holds the position of the
    # hook's history channel too: the stream picks it up from there, as for its `ch`.
    cookie = backend.login("ada")
    settings = hooked(backend, history_channels=("user:*", "room:*"))
    async with running_gateway(**settings) as gw:
        node = gw.ctx.node
        for n in (1, 2):
            await node.publish("user:ada", b'{"n": %d}' % n)

        async def stream(last_event_id: str | None, until_text: bytes) -> bytes:
            http = AsyncHTTPClient(force_instance=True)
            chunks: list[bytes] = []
            headers = {"Cookie": cookie}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            fetch = http.fetch(http_url(gw, "/sse?ch=room:1"), headers=headers,
                               streaming_callback=chunks.append, request_timeout=10 * UNIT)  # fmt: skip
            try:
                await until(lambda: until_text in b"".join(chunks))
                gw.hub.close_subject("ada", CloseCode.SHUTDOWN)
                await fetch
            finally:
                http.close()
            return b"".join(chunks)

        first = await stream(None, b'event: reply\ndata: {"id":1,"ok":true')
        subscribed = json.loads(first.split(b"event: subscribed\ndata: ")[1].split(b"\n")[0])
        assert subscribed["offset"] == 2 and "recovered" not in subscribed
        epoch = subscribed["epoch"]
        await node.publish("user:ada", b'{"n": 3}')  # what a stream keeps, then misses
        kept = encode_positions({"user:ada": (2, epoch)})
        await node.publish("user:ada", b'{"n": 4}')
        body = await stream(kept, b'event: reply\ndata: {"id":1,"ok":true')
        subscribed = json.loads(body.split(b"event: subscribed\ndata: ")[1].split(b"\n")[0])
        assert subscribed == {
            "op": "subscribed", "ch": "user:ada", "offset": 4, "epoch": epoch, "recovered": True
        }  # fmt: skip
        got = [json.loads(line[6:])["data"] for line in body.split(b"\n")
               if line.startswith(b'data: {"op":"msg"')]  # fmt: skip
        assert got == [{"n": 3}, {"n": 4}]  # what it missed, after the push, in order
        ids = [line[4:] for line in body.split(b"\n") if line.startswith(b"id: ")]
        assert decode_positions(ids[-1].decode()) == {"user:ada": (4, epoch)}
        # A position that is none (a crafted id) is left out: subscribed from now on.
        bad = encode_positions({"user:ada": (-5, "x" * 100)})
        body = await stream(bad, b'event: reply\ndata: {"id":1,"ok":true')
        subscribed = json.loads(body.split(b"event: subscribed\ndata: ")[1].split(b"\n")[0])
        assert subscribed["offset"] == 4 and "recovered" not in subscribed
        assert b'"op":"msg"' not in body


async def _http(
    gw: Gateway, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    payload = None if body is None else json.dumps(body).encode()
    if payload is None and method == "POST":
        payload = b""
    return await get_json(gw, path, method=method, body=payload, headers=headers or {})


# -- refresh -------------------------------------------------------------------------


async def test_the_refresh_hook_extends_a_connection_or_ends_it(backend):
    overrides = hooked(backend, hook_connect_url=None, token_grace=0.2, token_notice=60.0)
    async with running_gateway(**overrides) as gw:
        alice = token_for(gw, "alice", ttl=2)
        mallory = token_for(gw, "mallory", ttl=2)
        async with ws_client(gw.port, alice) as a, ws_client(gw.port, mallory) as m:
            # TOKEN_NOTICE (60 s) is more than they have: asked at the next sweep.
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await m.recv(timeout=5 * UNIT)
            assert closed.value.rcvd.code == 4501
            await asyncio.sleep(2.5 * UNIT)  # past the token's exp and grace
            assert (await a.request("ping"))["ok"]  # the backend gave it another hour
            (session,) = gw.hub.connections
            assert session.identity.exp > time.time() + 3000
    asked = backend.requests("refresh")
    assert {r["user"] for r in asked} >= {"alice", "mallory"} and asked[-1][
        "transport"
    ] == "websocket"


# -- failure -------------------------------------------------------------------------


async def test_timeouts_open_the_breaker_and_connections_without_hooks_go_on(backend):
    overrides = hooked(
        backend,
        hook_connect_url=None,
        hook_subscribe_url=backend.url("/slow/subscribe?seconds=3"),
        hook_timeout=0.3,
        hook_breaker_failures=2,
        hook_breaker_seconds=30.0,
    )
    async with running_gateway(**overrides) as gw:
        async with ws_client(gw.port, token_for(gw, "ada", channels=("private:*", "room:*"))) as c:
            for _ in range(2):
                started = time.monotonic()
                reply = await c.request("sub", ch="private:ada")
                assert reply["error"]["code"] == 110 and reply["error"]["temporary"]
                assert 0.25 < time.monotonic() - started < 2 * UNIT
            started = time.monotonic()
            reply = await c.request("sub", ch="private:ada")  # the breaker is open: at once
            assert reply["error"]["code"] == 110 and time.monotonic() - started < 0.2 * UNIT
            # Channels without a hook, and everything else, are served as ever.
            assert (await c.request("sub", ch="room:1"))["ok"]
            assert (await c.request("pub", ch="room:1", data=1))["ok"]
            assert (await c.next_push())["data"] == 1
            async with ws_client(gw.port, token_for(gw, "bob")) as other:
                assert (await other.request("ping"))["ok"]
            status, ready = await get_json(gw, "/readyz")
            assert status == 200 and ready["status"] == "ok"
            assert ready["hooks"]["subscribe"]["breaker"] == "open"
            assert ready["hooks"]["subscribe"]["last_error"].startswith("timeout")
            assert "?" not in ready["hooks"]["subscribe"]["url"]
            found = await metrics_of(gw)
    assert sample(found, "gateway_hook_breaker_open", hook="subscribe") == 1
    assert sample(found, "gateway_hook_errors_total", hook="subscribe", kind="timeout") == 2
    assert sample(found, "gateway_hook_errors_total", hook="subscribe", kind="breaker_open") == 1
    assert sample(found, "gateway_hook_calls_total", hook="subscribe", answer="none") == 2
    assert sample(found, "gateway_hook_seconds_count", hook="subscribe") == 2


async def test_fail_open_subscribes_and_publishes_when_the_backend_fails(backend):
    overrides = hooked(
        backend,
        hook_connect_url=None,
        hook_subscribe_url=backend.url("/fail/subscribe"),
        hook_publish_url=backend.url("/fail/publish"),
        hook_subscribe_fail_open=True,
        hook_publish_fail_open=True,
    )
    async with running_gateway(**overrides) as gw:
        async with ws_client(gw.port, token_for(gw, "ada", channels=("chat:*", "private:*"))) as c:
            assert (await c.request("sub", ch="private:bob"))["ok"]  # the backend could not say no
            assert (await c.request("sub", ch="chat:1"))["ok"]
            assert (await c.request("pub", ch="chat:1", data={"text": "darn"}))["ok"]
            assert (await c.next_push())["data"] == {"text": "darn"}  # unchanged
        found = await metrics_of(gw)
    assert sample(found, "gateway_hook_errors_total", hook="publish", kind="status") == 1


@pytest.mark.parametrize(
    ("how", "kind"),
    [("garbage", "bad_answer"), ("wrong", "bad_answer"), ("huge", "too_large"), ("fail", "status")],
)
async def test_a_bad_answer_is_a_failure_with_a_log_line_never_a_crash(backend, caplog, how, kind):
    overrides = hooked(backend, hook_connect_url=None, hook_call_url=backend.url(f"/{how}/call"))
    async with running_gateway(**overrides) as gw, ws_client(gw.port, token_for(gw)) as c:
        reply = await c.request("call", method="whoami")
        assert reply["error"]["code"] == 110
        assert (await c.request("ping"))["ok"]
        found = await metrics_of(gw)
    assert sample(found, "gateway_hook_errors_total", hook="call", kind=kind) == 1
    assert any("call hook failed" in r.getMessage() for r in caplog.records)


async def test_a_failing_connect_hook_refuses_with_503_and_tokens_wait_for_it(backend):
    overrides = hooked(backend, hook_connect_url=backend.url("/fail/connect"))
    async with running_gateway(**overrides) as gw:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_client(gw.port, token_for(gw)):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"


async def test_calls_beyond_the_concurrency_fail_at_once_rather_than_queue(backend):
    overrides = hooked(
        backend,
        hook_connect_url=None,
        hook_call_url=backend.url("/slow/call?seconds=0.5"),
        hook_concurrency=1,
        hook_queue=1,
        hook_timeout=3.0,
    )
    async with running_gateway(**overrides) as gw:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(ws_client(gw.port, token_for(gw, f"u{n}")))
                for n in range(3)
            ]
            replies = await asyncio.gather(
                *(c.request("call", method="whoami", timeout=5 * UNIT) for c in clients)
            )
        found = await metrics_of(gw)
    answered = [r["data"] for r in replies if r["ok"]]
    assert len(answered) == 2  # one in flight, one waiting for its slot
    assert [r["error"]["code"] for r in replies if not r["ok"]] == [110]
    assert sample(found, "gateway_hook_errors_total", hook="call", kind="overloaded") == 1


async def test_commands_that_would_call_hooks_are_rate_limited_first(backend):
    from core.infra.rate import Rate

    backend.forget()
    overrides = hooked(backend, hook_connect_url=None, rate_socket_commands=Rate(3, 60.0))
    async with running_gateway(**overrides) as gw, ws_client(gw.port, token_for(gw)) as c:
        codes = [
            (await c.request("call", method="whoami")).get("error", {}).get("code")
            for _ in range(5)
        ]
    assert codes == [None, None, None, 112, 112]
    assert len(backend.requests("call")) == 3


# -- signatures ----------------------------------------------------------------------


def test_the_signature_helper_accepts_what_the_gateway_signs_and_nothing_else():
    body = b'{"client":"c1"}'
    headers = signed_headers(SECRET, body, now=1_800_000_000)
    ts, sig = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    assert ts == "1800000000" and sig == sign(SECRET, ts, body) and sig.startswith("sha256=")
    assert verify_signature(SECRET, ts, body, sig, now=1_800_000_100)
    assert not verify_signature(SECRET, ts, body + b" ", sig, now=1_800_000_100)  # tampered body
    assert not verify_signature("another" + SECRET, ts, body, sig, now=1_800_000_100)
    assert not verify_signature(SECRET, "1800000001", body, sig, now=1_800_000_100)  # other time
    assert not verify_signature(SECRET, ts, body, sig, now=1_800_000_301)  # replayed too late
    assert not verify_signature(SECRET, ts, body, sig, now=1_799_999_699)  # from the future
    for bad in (None, "", "sha256=", sig.upper(), sig[:-1], "md5=" + sig[7:], "é" * 71):
        assert not verify_signature(SECRET, ts, body, bad, now=1_800_000_100)
    # 5,000 digits: a ValueError out of int() (Python's 4,300 digits), a 500 from a backend.
    for stamp in (None, "", "-1", "1e9", "١٨٠٠٠٠٠٠٠٠", " 1800000000", "9" * 5000):
        assert not verify_signature(SECRET, stamp, body, sig, now=1_800_000_100)


async def test_the_backend_refuses_a_tampered_request_and_answers_a_signed_one(backend):
    http = AsyncHTTPClient(force_instance=True)
    body = json.dumps({"client": "c", "user": "ada", "method": "whoami"}).encode()
    try:
        signed = signed_headers(SECRET, body)
        good = await http.fetch(backend.url("/call"), method="POST", body=body, headers=signed)
        assert json.loads(good.body) == {"result": {"data": {"user": "ada"}}}
        forged = body.replace(b"ada", b"bob")
        with pytest.raises(HTTPClientError) as refused:
            await http.fetch(backend.url("/call"), method="POST", body=forged, headers=signed)
        assert refused.value.code == 401
        with pytest.raises(HTTPClientError) as stale:
            old = signed_headers(SECRET, body, now=time.time() - 600)
            await http.fetch(backend.url("/call"), method="POST", body=body, headers=old)
        assert stale.value.code == 401
        with pytest.raises(HTTPClientError) as huge:
            endless = {**signed, TIMESTAMP_HEADER: "9" * 5000}
            await http.fetch(backend.url("/call"), method="POST", body=body, headers=endless)
        assert huge.value.code == 401
    finally:
        http.close()


async def test_a_gateway_with_the_wrong_secret_is_refused_by_the_backend(backend):
    overrides = hooked(backend, hook_connect_url=None, hook_secret="x" * 40)
    async with running_gateway(**overrides) as gw, ws_client(gw.port, token_for(gw)) as c:
        reply = await c.request("call", method="whoami")
        assert reply["error"]["code"] == 110
        found = await metrics_of(gw)
    assert sample(found, "gateway_hook_errors_total", hook="call", kind="status") == 1


def test_hooks_need_a_long_secret():
    with pytest.raises(SettingsError, match="HOOK_SECRET"):
        Settings(hook_call_url="http://127.0.0.1:1/call")
    with pytest.raises(SettingsError, match="HOOK_SECRET"):
        Settings(hook_call_url="http://127.0.0.1:1/call", hook_secret="short")
    with pytest.raises(SettingsError, match="HOOK_CONNECT_URL"):
        Settings.from_env({"HOOK_CONNECT_URL": "file:///etc/passwd", "HOOK_SECRET": SECRET})
    with pytest.raises(SettingsError, match="HOOK_FORWARD_HEADERS"):
        Settings.from_env({"HOOK_FORWARD_HEADERS": "Cookie, Bad\r\nHeader"})
    assert Settings().hook_urls() == {}


def test_a_hook_request_is_one_small_json_object():
    from gateway.hooks.answers import PublishRequest

    body = msgspec.json.encode(PublishRequest("c1", "ada", "chat:1", msgspec.Raw(b'{"a":1}')))
    assert json.loads(body) == {
        "client": "c1",
        "user": "ada",
        "channel": "chat:1",
        "data": {"a": 1},
    }


# -- real gateway processes ------------------------------------------------------------

processes = test_processes.processes  # the fixture: real `python -m gateway` processes


async def test_a_rewritten_publication_reaches_every_subscriber_on_two_processes(
    processes, redis_url, database_url, core_schema, backend
):
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": unique_prefix(),
        "JWT_SECRET": JWT_SECRET,
        "DATABASE_URL": database_url,  # no embedded PostgreSQL
        "DATABASE_SCHEMA": core_schema,
        "HOOK_SECRET": SECRET,
        "HOOK_CONNECT_URL": backend.url("/connect"),
        "HOOK_PUBLISH_URL": backend.url("/publish"),
        "HOOK_PUBLISH_CHANNELS": "chat:*",
    }
    a, b = processes.together(2, **env)
    carol = mint_token(Settings(jwt_secret=JWT_SECRET), "carol", ["chat:*"])
    async with (
        cookie_client(a, backend.login("ada")) as ada,
        cookie_client(b, backend.login("bob"), msgpack=True) as bob,
        ws_client(b.port, carol) as carol_socket,
    ):
        everyone = (ada, bob, carol_socket)
        for c in everyone:
            assert (await c.request("sub", ch="chat:lobby"))["ok"]
        assert (await ada.request("pub", ch="chat:lobby", data={"text": "darn, on a"}))["ok"]
        for c in everyone:
            assert (await c.next_push())["data"] == {"from": "ada", "text": "****, on a"}
        assert (await carol_socket.request("pub", ch="chat:lobby", data="heck, on b"))["ok"]
        for c in everyone:
            assert (await c.next_push())["data"] == {"from": "carol", "text": "****, on b"}


async def test_the_connect_hook_s_disconnect_and_a_refused_sub_over_sse_and_long_poll(backend):
    async with running_gateway(**hooked(backend)) as gw:
        banned = {"Cookie": backend.login("mallory")}
        http = AsyncHTTPClient(force_instance=True)
        try:
            stream = await http.fetch(http_url(gw, "/sse?ch=room:1"), headers=banned)
            assert stream.body == b'event: close\ndata: {"code":4501,"reason":"banned"}\n\n'
            ada = {"Cookie": backend.login("ada")}
            chunks: list[bytes] = []
            refused = http.fetch(
                http_url(gw, "/sse?ch=private:bob"), headers=ada, streaming_callback=chunks.append
            )
            await until(
                lambda: b'"code":403,"message":"not your private channel"' in b"".join(chunks)
            )
            gw.hub.close_subject("ada", CloseCode.SHUTDOWN)  # the stream stays open: user:ada
            await refused
        finally:
            http.close()
        status, closed = await _http(gw, "POST", "/lp", headers=banned)
        assert status == 410
        assert closed == {"messages": [], "cursor": 0, "close": {"code": 4501, "reason": "banned"}}
        assert gw.hub.connection_count() == 0


async def test_a_client_publishing_over_http_is_asked_about_too(backend):
    backend.forget()
    async with running_gateway(**hooked(backend, hook_connect_url=None)) as gw:
        token = token_for(gw, "ada", channels=("chat:*",))
        api = ApiClient(gw.port, token)
        try:
            async with ws_client(gw.port, token) as c:
                assert (await c.request("sub", ch="chat:1"))["ok"]
                publish = {"ch": "chat:1", "data": {"text": "darn, over http"}}
                status, _, _ = await api.call("POST", "/api/publish", publish)
                assert status == 200
                assert (await c.next_push())["data"] == {"from": "ada", "text": "****, over http"}
                empty = {"ch": "chat:1", "data": {"text": " "}}
                status, _, body = await api.call("POST", "/api/publish", empty)
                assert status == 400 and body["error"]["message"] == "empty message"
        finally:
            api.close()
    assert backend.requests("publish")[0] == {
        "client": "",  # no connection: an HTTP request
        "user": "ada",
        "channel": "chat:1",
        "data": {"text": "darn, over http"},
    }
