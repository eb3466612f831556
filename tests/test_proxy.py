"""A gateway without a database in front of a separate core (CORE_URL): real processes.

The gateway runs with ``CORE_URL`` and no ``DATABASE_URL``; the core runs
alone (``python -m core``) with the database, trusting ``X-Forwarded-For``
only from 127.0.0.1 (the gateway's address here). Other loopback addresses
play clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proto import CloseCode
from tests.harness import SECRET, ApiClient, unique_prefix, until, ws_client
from tests.hookbackend import SECRET as HOOK_SECRET
from tests.hookbackend import HookBackend
from tests.servers import UNIT, postgres_dir
from tests.test_accounts import ADA, login, register
from tests.test_apikeys import promote
from tests.test_authz_attacks import _closed_with
from tests.test_core_rest import PROJECT, project
from tests.test_processes import GatewayProcess, start_together
from tests.test_sse import sse

GRACE = {"email": "grace@example.com", "display_name": "Grace", "password": "another long phrase"}


class Tier:
    """One core process and one gateway process in front of it."""

    def __init__(
        self,
        tmp_path: Any,
        data_dir: Any,
        redis_url: str,
        clean_db: dict[str, str],
        **core_env: str,
    ) -> None:
        self.shared = {
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": unique_prefix(),
            "JWT_SECRET": SECRET,
        }
        self.db = {
            "DATABASE_URL": clean_db["database_url"],
            "DATABASE_SCHEMA": clean_db["database_schema"],
        }
        self.tmp_path, self.data_dir = tmp_path, data_dir
        self.core_env = {"TRUSTED_PROXIES": "127.0.0.1/32", **core_env}
        self.core = GatewayProcess(
            tmp_path, data_dir, "core", **self.shared, **self.db, **self.core_env
        )
        self.gateway = GatewayProcess(
            tmp_path,
            data_dir,
            "gateway",
            **self.shared,
            CORE_URL=f"http://127.0.0.1:{self.core.port}",
            CORE_BREAKER_FAILURES="2",
            CORE_BREAKER_SECONDS="1",
            CORE_TIMEOUT="3",
        )
        start_together(self.core, self.gateway)  # the gateway's readiness waits for no core

    def restart_core(self) -> None:
        """The core again, on the same port."""
        again = GatewayProcess(
            self.tmp_path, self.data_dir, "core", **self.shared, **self.db, **self.core_env
        )
        again.port, again.env["PORT"] = self.core.port, str(self.core.port)
        again.log = self.tmp_path / "core-again.log"
        self.core = again.start()

    def stop(self) -> None:
        for process in (self.gateway, self.core):
            if process.proc is not None and process.proc.poll() is None:
                process.stop()


@pytest.fixture(scope="module")
def started_tier(tmp_path_factory, redis_url, database_url, core_schema):
    """One tier for the module's tests that leave the core running: starting two processes
    for each took 1.3 s. Each test gets clean tables (``tier``); what a test leaves in the
    processes (revoked sessions and keys, counters) names nothing a later test makes.
    Each test registers an account or two from 127.0.0.1 (RATE_LOGIN_IP allows 20 a minute).
    """
    tmp_path = tmp_path_factory.mktemp("tier")
    with module_processes(database_url, core_schema) as (data_dir, db):
        t = Tier(tmp_path, data_dir, redis_url, db)
        try:
            yield t
        finally:
            t.stop()


@contextlib.contextmanager
def module_processes(database_url: str, core_schema: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """What a module's shared processes start with: a data directory (the embedded
    database's, for those that use none of their own) and the suite's database."""
    with postgres_dir() as data_dir:
        yield data_dir, {"database_url": database_url, "database_schema": core_schema}


@pytest.fixture
def tier(started_tier, clean_db):
    """The module's tier, over empty tables."""
    return started_tier


@pytest.fixture
def own_tier(tmp_path, data_dir, redis_url, clean_db):
    """A tier of the test's own, for a test that stops its core."""
    t = Tier(tmp_path, data_dir, redis_url, clean_db)
    yield t
    t.stop()


async def user(port: int, who: dict[str, str], **kw: Any) -> ApiClient:
    anon = ApiClient(port, None)
    try:
        await register(anon, who)
        status, tokens = await login(anon, who["email"], who["password"])
        assert status == 200, tokens
    finally:
        anon.close()
    return ApiClient(port, tokens["access_token"], **kw)


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5 * UNIT) as r:
        return r.status, r.read().decode()


def test_the_gateway_holds_no_database(tier):
    assert "DATABASE_URL" not in tier.gateway.env
    status, ready = _get(tier.gateway.port, "/readyz")
    assert status == 200 and '"database":null' in ready and '"reachable":true' in ready


async def test_http_crud_through_the_gateway_is_the_core_s_answer(tier, clean_db):
    ada = await user(tier.gateway.port, ADA)
    try:
        status, headers, created = await ada.call(
            "POST", "/api/projects", PROJECT, headers={"X-Request-Id": "proxy-test-1"}
        )
        assert status == 201 and headers["Location"] == f"/api/projects/{created['id']}"
        assert headers["X-Request-Id"] == "proxy-test-1" and headers["ETag"] == '"1"'
        path = f"/api/projects/{created['id']}"
        assert (await ada.call("GET", path))[2] == created
        status, _, patched = await ada.call(
            "PATCH", path, {"status": "done"}, headers={"If-Match": '"1"'}
        )
        assert status == 200 and patched["version"] == 2
        status, _, stale = await ada.call(
            "PATCH", path, {"status": "active"}, headers={"If-Match": '"1"'}
        )
        assert status == 412 and stale["error"]["code"] == "precondition_failed"
        status, _, invalid = await ada.call("POST", "/api/projects", project(name=""))
        assert status == 422 and invalid["error"]["details"][0]["path"] == "$.name"
        assert (await ada.call("DELETE", path))[0] == 204
        assert (await ada.call("GET", path))[0] == 404
    finally:
        ada.close()
    # The core logged the request under the id the gateway answered with.
    assert '"request_id": "proxy-test-1"' in tier.core.output()


async def test_sessions_opened_through_the_gateway_are_listed_with_their_user_agent(tier):
    anon = ApiClient(tier.gateway.port, None)
    try:
        await register(anon, ADA)
        status, tokens = await login(anon, **{"User-Agent": "Browser/1.0"})
        assert status == 200, tokens
    finally:
        anon.close()
    ada = ApiClient(tier.gateway.port, tokens["access_token"])
    try:
        status, _, sessions = await ada.call("GET", "/api/auth/sessions")
    finally:
        ada.close()
    assert status == 200 and [s["user_agent"] for s in sessions["items"]] == ["Browser/1.0"]


async def test_rpc_through_the_gateway_keeps_its_shape_and_the_socket_s_identity(tier):
    ada = await user(tier.gateway.port, ADA)
    grace = await user(tier.gateway.port, GRACE)
    try:
        async with ws_client(tier.gateway.port, ada.token) as c:
            created = await c.request("rpc", method="POST", path="/api/projects", body=PROJECT)
            assert created["status"] == 201
            body = created["body"]
            assert created["headers"]["Location"] == f"/api/projects/{body['id']}"
            assert created["headers"]["ETag"] == '"1"'
            got = await c.request("rpc", method="GET", path=f"/api/projects/{body['id']}")
            assert got["status"] == 200 and got["body"] == body
            page = await c.request("rpc", method="GET", path="/api/projects?limit=1")
            assert page["body"]["items"] == [body]
        async with ws_client(tier.gateway.port, grace.token) as c:
            # Grace's socket, carrying Ada's token in the frame: still Grace (403).
            forged = await c.request(
                "rpc",
                method="DELETE",
                path=f"/api/projects/{body['id']}",
                headers={"Authorization": f"Bearer {ada.token}"},
            )
            assert forged["status"] == 403 and forged["body"]["error"]["code"] == "forbidden"
        assert (await grace.call("DELETE", f"/api/projects/{body['id']}"))[0] == 403
        assert (await ada.call("DELETE", f"/api/projects/{body['id']}"))[0] == 204
    finally:
        ada.close()
        grace.close()


async def test_the_core_sees_the_client_s_address_and_no_one_can_forge_it(
    tmp_path, data_dir, redis_url, clean_db
):
    """Registrations per client IP: 2 a minute at the core (RATE_LOGIN_IP)."""
    t = Tier(tmp_path, data_dir, redis_url, clean_db, RATE_LOGIN_IP="2/60")
    try:

        async def register_from(port: int, ip: str, n: int, **headers: str) -> int:
            api = ApiClient(port, None, source_ip=ip)
            try:
                who = {**ADA, "email": f"u{n}-{ip}-{port}@example.com"}
                status, _, _ = await api.call("POST", "/api/auth/register", who, headers=headers)
                return status
            finally:
                api.close()

        gw, core = t.gateway.port, t.core.port
        assert [await register_from(gw, "127.0.0.2", n) for n in range(2)] == [201, 201]
        # Spent for 127.0.0.2, whatever it claims to be.
        assert await register_from(gw, "127.0.0.2", 2, **{"X-Forwarded-For": "203.0.113.9"}) == 429
        # Another client through the same gateway has its own allowance.
        assert await register_from(gw, "127.0.0.3", 3) == 201
        # Straight to the core from an address it does not trust: the header is ignored.
        assert [
            await register_from(core, "127.0.0.4", n, **{"X-Forwarded-For": f"198.51.100.{n}"})
            for n in range(3)
        ] == [201, 201, 429]
    finally:
        t.stop()


async def test_change_events_reach_sockets_and_are_recovered_after_a_reconnect(tier):
    ada = await user(tier.gateway.port, ADA)
    try:
        async with ws_client(tier.gateway.port, ada.token) as c:
            assert (await c.request("sub", ch="projects"))["ok"]
            status, _, created = await ada.call("POST", "/api/projects", PROJECT)
            assert status == 201
            push = await c.next_push()
        assert push["data"]["type"] == "created" and push["data"]["id"] == created["id"]
        since = {"offset": push["offset"], "epoch": push["epoch"]}
        path = f"/api/projects/{created['id']}"
        done = await ada.call("PATCH", path, {"status": "done"}, headers={"If-Match": '"1"'})
        assert done[0] == 200
        async with ws_client(tier.gateway.port, ada.token) as c:
            reply = await c.request("sub", ch="projects", since=since)
            assert reply["recovered"] is True
            missed = await c.next_push()
        assert missed["data"]["type"] == "updated" and missed["data"]["version"] == 2
    finally:
        ada.close()


async def test_core_down_then_back_sockets_unaffected(own_tier):
    tier = own_tier
    ada = await user(tier.gateway.port, ADA)
    try:
        async with ws_client(tier.gateway.port, ada.token) as c:
            assert (await c.request("sub", ch="projects"))["ok"]
            await asyncio.to_thread(tier.core.stop)
            answers = []
            for _ in range(4):
                started = time.monotonic()
                status, headers, body = await ada.call("GET", "/api/projects")
                answers.append(
                    (
                        status,
                        body["error"]["code"],
                        headers.get("Retry-After"),
                        time.monotonic() - started,
                    )
                )
            assert {a[:2] for a in answers} == {(503, "unavailable")}
            assert all(a[2] and int(a[2]) >= 1 for a in answers)
            assert answers[-1][3] < 0.5 * UNIT  # the breaker answers at once
            rpc = await c.request("rpc", method="GET", path="/api/projects")
            assert rpc["status"] == 503
            assert (await c.request("ping"))["ok"]  # the socket carries on
            await asyncio.sleep(1.0)  # readiness is checked at most once a second
            status, ready = await asyncio.to_thread(_get, tier.gateway.port, "/readyz")
            assert status == 200 and '"reachable":false' in ready and '"breaker":"open"' in ready
            await asyncio.to_thread(tier.restart_core)
            deadline = time.monotonic() + 10 * UNIT
            while (await ada.call("GET", "/api/projects"))[0] != 200:
                assert time.monotonic() < deadline, "the gateway never used the core again"
                await asyncio.sleep(0.2)
            assert (await c.request("ping"))["ok"]
    finally:
        ada.close()


async def test_an_api_key_made_at_the_core_works_on_the_gateway_and_dies_there(tier, clean_db):
    (await user(tier.gateway.port, ADA)).close()
    await asyncio.to_thread(promote, clean_db, ADA["email"])
    status, tokens = await login(ApiClient(tier.gateway.port, None))
    admin = ApiClient(tier.gateway.port, tokens["access_token"])
    try:
        status, _, created = await admin.call(
            "POST", "/api/keys", {"name": "orders", "channels": ["orders:*"]}
        )
        assert status == 201
        service = ApiClient(tier.gateway.port, created["key"])
        deadline = time.monotonic() + 5 * UNIT
        while (await service.call("POST", "/api/publish", {"ch": "orders:1", "data": 1}))[0] != 200:
            assert time.monotonic() < deadline, "the gateway never learnt the new key"
            await asyncio.sleep(0.05)
        async with ws_client(tier.gateway.port, created["key"]) as socket:
            assert (await socket.request("ping"))["ok"]
            assert (await admin.call("DELETE", f"/api/keys/{created['id']}"))[0] == 204
            await _closed_with(socket, CloseCode.KEY_REVOKED)
        assert (await service.call("POST", "/api/publish", {"ch": "orders:1", "data": 1}))[0] == 401
        service.close()
    finally:
        admin.close()


def core_state(port: int) -> dict[str, Any]:
    """The readiness detail of the gateway on ``port``: the core's URL, breaker, pool."""
    return dict(json.loads(_get(port, "/readyz")[1])["core"])


async def test_a_probe_the_gateway_refuses_itself_does_not_leave_the_breaker_half_open(own_tier):
    """The breaker's probe was a socket user's ``rpc`` with a header that cannot go over
    HTTP/1.1: answered 400 by the gateway, it told the breaker nothing, and every REST call
    and ``rpc`` was a 503 until the gateway restarted. Found by a review."""
    tier = own_tier
    ada = await user(tier.gateway.port, ADA)
    grace = await user(tier.gateway.port, GRACE)
    try:
        async with ws_client(tier.gateway.port, ada.token) as socket:
            await asyncio.to_thread(tier.core.stop)  # the breaker opens (for any reason)
            for _ in range(3):
                assert (await grace.call("GET", "/api/projects"))[0] == 503
            await asyncio.to_thread(tier.restart_core)
            await asyncio.sleep(1.2)  # past CORE_BREAKER_SECONDS: the next call probes
            probe = await socket.request(
                "rpc", method="GET", path="/api/projects", headers={"If-None-Match": "a\x01b"}
            )
            assert probe["status"] == 400
        status, _, body = await grace.call("GET", "/api/projects")
        assert (status, core_state(tier.gateway.port)["breaker"]) == (200, "closed"), body
    finally:
        ada.close()
        grace.close()


async def _status_line(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        return head.split(b"\r\n", 1)[0]
    finally:
        writer.close()


async def test_heads_the_core_refuses_as_too_large_open_no_breaker(tier):
    """A head within the gateway's MAX_HEADER_BYTES grows past the core's on the way
    (the target percent-encoded, the forwarding headers added): the core answers 414 or
    431 with a body and closes. To a HEAD, that body was "bytes past the answer", a
    failing core: a few anonymous HEADs opened the breaker for every user. Found by a
    review."""
    heads = [
        b"HEAD /api/projects?q=" + b'"' * 30000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /api/projects HTTP/1.1\r\nHost: x\r\nIf-None-Match: " + b"a" * 65400 + b"\r\n\r\n",
    ]
    for raw in heads * 2:
        line = await _status_line(tier.gateway.port, raw)
        assert line.split(b" ")[1] in (b"414", b"431"), line
    assert core_state(tier.gateway.port)["breaker"] == "closed"
    line = await _status_line(tier.gateway.port, b"GET /api/projects HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line == b"HTTP/1.1 401 Unauthorized"  # the core's answer, not the breaker's 503


def test_a_gateway_with_core_url_starts_no_embedded_database(tier):
    assert "embedded PostgreSQL" not in tier.gateway.output()
    assert not (tier.data_dir / "pg").exists()


class Dropper:
    """A TCP relay between the gateway and the core that can swallow the next requests.

    A swallowed request reached the core's network but not the core: its
    connection closes with no answer, as when a core pod dies mid-request.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Dropper:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, check: bool) -> None:
            try:
                while data := await src.read(65536):
                    if check and self.drop > 0:
                        self.drop -= 1
                        self.dropped += 1
                        break
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_request_lost_on_the_way_is_retried_only_when_repeating_it_is_harmless(
    tmp_path, data_dir, redis_url, clean_db
):
    core = GatewayProcess(
        tmp_path,
        data_dir,
        "core",
        REDIS_URL=redis_url,
        JWT_SECRET=SECRET,
        DATABASE_URL=clean_db["database_url"],
        DATABASE_SCHEMA=clean_db["database_schema"],
    ).start()
    dropper = await Dropper(core.port).start()
    gateway = await asyncio.to_thread(
        GatewayProcess(
            tmp_path,
            data_dir,
            "gateway",
            REDIS_URL=redis_url,
            JWT_SECRET=SECRET,
            CORE_URL=f"http://127.0.0.1:{dropper.port}",
        ).start
    )
    ada = await user(gateway.port, ADA)
    try:

        async def count() -> int:
            return len((await ada.call("GET", "/api/projects?limit=100"))[2]["items"])

        dropper.drop = 1
        assert (await ada.call("GET", "/api/projects"))[0] == 200  # retried
        dropper.drop = 1
        status, _, body = await ada.call("POST", "/api/projects", PROJECT)
        assert status == 503 and body["error"]["code"] == "unavailable"  # not retried
        assert dropper.dropped == 2 and await count() == 0  # and the core never saw it
        dropper.drop = 1
        keyed = {"Idempotency-Key": "create-apollo-1"}
        status, _, created = await ada.call("POST", "/api/projects", PROJECT, headers=keyed)
        assert status == 201 and dropper.dropped == 3  # retried, created once
        again = await ada.call("POST", "/api/projects", PROJECT, headers=keyed)
        assert again[0] == 201 and again[2] == created and again[1]["Idempotent-Replayed"] == "true"
        assert await count() == 1
        dropper.drop = 1  # a key where the core keeps none: not retried either
        keyed = {"Idempotency-Key": "refresh-1"}
        status, _, _ = await ada.call(
            "POST", "/api/auth/refresh", {"refresh_token": "x"}, headers=keyed
        )
        assert status == 503 and dropper.dropped == 4
    finally:
        ada.close()
        dropper.close()
        for process in (gateway, core):
            await asyncio.to_thread(process.stop)


# -- a withdrawn session at gateways that did not hear of it ---------------------------------

#: What a logged-out admin's access token gets: REST, a publication, the server API, a socket.
REFUSED = {"rest": 401, "publish": 401, "server": 401, "socket": 401}


async def _admin_token(tier: Tier, clean_db: dict) -> str:
    (await user(tier.gateway.port, ADA)).close()
    await asyncio.to_thread(promote, clean_db, ADA["email"])
    return str((await login(ApiClient(tier.gateway.port, None)))[1]["access_token"])


async def _logout(port: int, token: str) -> None:
    assert (await ApiClient(port, token).call("POST", "/api/auth/logout"))[0] == 204


async def _uses(port: int, token: str) -> dict[str, int]:
    """What ``token`` gets at the gateway on ``port``."""
    api = ApiClient(port, token)
    seen = {
        "rest": (await api.call("GET", "/api/projects"))[0],
        "publish": (await api.call("POST", "/api/publish", {"ch": "user:1", "data": 1}))[0],
        "server": (await api.call("POST", "/api/server/publish", {"ch": "room:1", "data": 1}))[0],
    }
    try:
        async with ws_client(port, token) as client:
            seen["socket"] = 101 if (await client.request("sub", ch="room:1"))["ok"] else 0
    except InvalidStatus as refused:
        seen["socket"] = refused.response.status_code
    return seen


def _another_gateway(tier: Tier, **env: str) -> GatewayProcess:
    core = f"http://127.0.0.1:{tier.core.port}"
    return GatewayProcess(
        tier.tmp_path, tier.data_dir, "gateway", **tier.shared, CORE_URL=core, **env
    )


async def test_a_gateway_started_after_a_logout_refuses_the_session_s_tokens(tier, clean_db):
    """A gateway with CORE_URL has no database to catch up from: one that started after
    the logout (a deploy, a scale-out, a respawned worker) let the session's tokens open
    sockets, publish and use the server API until they expired (15 minutes). It now reads
    the revocations the core keeps in Redis. Found by a review."""
    token = await _admin_token(tier, clean_db)
    await _logout(tier.gateway.port, token)
    assert await _uses(tier.gateway.port, token) == REFUSED  # the gateway that heard it
    late = await asyncio.to_thread(_another_gateway(tier).start)
    try:
        assert await _uses(late.port, token) == REFUSED
    finally:
        await asyncio.to_thread(late.stop)


@asynccontextmanager
async def _held_admission(
    tier: Tier, tmp_path: Any, **env: str
) -> AsyncIterator[tuple[GatewayProcess, HookBackend]]:
    """Another gateway with CORE_URL, whose connect hook answers when the backend's gate is
    open (it is at first; `_logout_while_held` closes it)."""
    backend = HookBackend(tmp_path / "backend.log")
    hooked = _another_gateway(
        tier,
        HOOK_SECRET=HOOK_SECRET,
        HOOK_CONNECT_URL=backend.url("/held/connect"),
        HOOK_TIMEOUT=str(6 * UNIT),
        **env,
    )
    try:
        await asyncio.to_thread(hooked.start)
        yield hooked, backend
    finally:
        with contextlib.suppress(OSError):  # nothing left held at the stop
            backend.gate("PUT")
        await asyncio.to_thread(hooked.stop)
        backend.stop()


async def _logout_while_held(backend: HookBackend, port: int, token: str) -> asyncio.Future[float]:
    """Closes the connect hook's gate; then, once the hook holds a call (the token checked,
    the hook not answered), a logout, and the gate opened again. The future is when the
    logout was done. (A fixed wait of 0.5 s before the logout and 3 s before the hook's
    answer did this in 3 s, and hoped the logout was quicker.)"""
    await asyncio.to_thread(backend.gate, "DELETE")

    async def logout() -> float:
        async def holding() -> bool:
            return bool((await asyncio.to_thread(backend.gate))["held"])

        await until(holding, timeout=10 * UNIT, step=0.05)
        await _logout(port, token)
        done = asyncio.get_running_loop().time()
        await asyncio.to_thread(backend.gate, "PUT")
        return done

    return asyncio.ensure_future(logout())


async def test_a_logout_while_a_socket_is_admitted_closes_it(tier, clean_db, tmp_path):
    """The token was checked, then the connect hook answered, then the socket
    joined: a logout in between found no connection of the session to close, and the
    socket stayed open until its token expired. Found by a review."""
    token = await _admin_token(tier, clean_db)
    async with _held_admission(tier, tmp_path) as (hooked, backend):
        later = await _logout_while_held(backend, tier.core.port, token)
        async with ws_client(hooked.port, token, open_timeout=10 * UNIT) as client:
            admitted = asyncio.get_running_loop().time()
            assert admitted > await later  # after the logout: the case this test is about
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(10):
                    await client.request("ping")
                    await asyncio.sleep(0.5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CloseCode.SESSION_REVOKED


async def test_a_stream_whose_session_was_revoked_as_it_opened_joins_nothing(
    tier, clean_db, tmp_path
):
    """An event stream closed as it opened (4502, as above) still subscribed to its
    channels: a Redis subscription, history, and a presence join and leave pushed to
    the channel's members. Found by a review."""
    token = await _admin_token(tier, clean_db)
    # The room's member: Ada on another login session, which the logout leaves alone.
    other = str((await login(ApiClient(tier.gateway.port, None)))[1]["access_token"])
    async with (
        _held_admission(tier, tmp_path, PRESENCE_CHANNELS="room:*") as (hooked, backend),
        ws_client(hooked.port, other, open_timeout=10 * UNIT) as member,
    ):
        assert (await member.request("sub", ch="room:1"))["ok"]
        assert (await member.recv())["op"] == "join"  # its own
        later = await _logout_while_held(backend, tier.core.port, token)
        async with sse(hooked.port, token, ["room:1"]) as stream:
            admitted = asyncio.get_running_loop().time()
            assert stream.status == 200 and admitted > await later
            close = json.loads((await stream.next_of("close"))["data"])
            assert close["code"] == CloseCode.SESSION_REVOKED
        with pytest.raises(TimeoutError):  # no join (nor leave) of the revoked session
            async with asyncio.timeout(1.0 * UNIT):
                pushed = await member.recv()
                raise AssertionError(f"the room's member was sent {pushed}")
