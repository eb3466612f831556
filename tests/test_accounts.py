"""Accounts, the OAuth2 token endpoint, refresh rotation, sessions and revocation."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import asyncpg
import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from core.infra.broker import RedisBroker
from core.infra.rate import Rate
from proto import CloseCode, ErrorCode
from tests.harness import SECRET, ApiClient, running_gateway, token_for, unique_prefix, ws_client
from tests.servers import UNIT

ADA = {"email": "ada@example.com", "display_name": "Ada", "password": "correct horse battery"}


@pytest.fixture
async def gw(clean_db):
    async with running_gateway(**clean_db) as gateway:
        yield gateway


@pytest.fixture
async def anon(gw):
    client = ApiClient(gw.port, None)
    yield client
    client.close()


async def register(api: ApiClient, who: dict = ADA) -> dict:
    status, _, user = await api.call("POST", "/api/auth/register", who)
    assert status == 201, user
    return user


async def login(api: ApiClient, email: str = ADA["email"], password: str = ADA["password"],
                **headers: str) -> tuple[int, dict]:  # fmt: skip
    form = urlencode({"grant_type": "password", "username": email, "password": password})
    status, _, body = await api.call(
        "POST",
        "/api/auth/token",
        raw=form.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
    )
    return status, body


def as_user(gw, tokens: dict) -> ApiClient:
    return ApiClient(gw.port, tokens["access_token"])


# -- registration and login -------------------------------------------------------


async def test_register_then_log_in_with_the_password_grant(gw, anon):
    user = await register(anon)
    assert user["email"] == ADA["email"] and "password" not in user and "password_hash" not in user
    status, tokens = await login(anon, "ADA@example.com")  # e-mail in any case
    assert status == 200, tokens
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    claims = jwt.decode(tokens["access_token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(user["id"]) and claims["sid"] == tokens["session_id"]
    assert claims["role"] == "user" and claims["exp"] - claims["iat"] == 900
    assert claims["channels"] == [f"user:{user['id']}", "projects", "projects:*"]
    me = as_user(gw, tokens)
    try:
        assert (await me.call("GET", "/api/projects"))[0] == 200
    finally:
        me.close()
    async with ws_client(gw.port, tokens["access_token"]) as c:
        assert (await c.request("sub", ch=f"user:{user['id']}"))["ok"]
        denied = await c.request("sub", ch="user:someone-else")
        assert denied["error"]["code"] == ErrorCode.PERMISSION_DENIED


@pytest.mark.parametrize("email, password", [("ada@example.com", "wrong password"),
                                             ("nobody@example.com", "correct horse battery"),
                                             ("ada@example.com\x00", "correct horse battery"),
                                             ("a\x00@example.com", "wrong password")])  # fmt: skip
async def test_wrong_credentials_are_one_invalid_grant(anon, email, password):
    await register(anon)
    status, body = await login(anon, email, password)
    assert status == 400 and body["error"]["code"] == "invalid_grant"
    assert body["error"]["message"] == "wrong e-mail or password"


async def test_registration_rules(anon, clean_db):
    await register(anon)
    status, _, body = await anon.call(
        "POST", "/api/auth/register", {**ADA, "email": "ADA@example.com"}
    )
    assert status == 409
    status, _, body = await anon.call("POST", "/api/auth/register", {**ADA, "password": "short"})
    assert status == 422 and body["error"]["details"][0]["path"] == "$.password"
    async with running_gateway(**clean_db, registration_open=False) as closed:
        client = ApiClient(closed.port, None)
        try:
            status, _, body = await client.call(
                "POST", "/api/auth/register", {**ADA, "email": "bob@example.com"}
            )
        finally:
            client.close()
    assert status == 403 and body["error"]["code"] == "registration_closed"


async def test_token_endpoint_ignores_unknown_form_fields_and_needs_a_grant_type(anon):
    await register(anon)
    form = urlencode({"grant_type": "password", "username": ADA["email"],
                      "password": ADA["password"], "scope": "", "client_id": "swagger"})  # fmt: skip
    status, _, body = await anon.call("POST", "/api/auth/token", raw=form.encode())
    assert status == 200, body
    status, _, body = await anon.call("POST", "/api/auth/token", raw=b"username=x&password=y")
    assert status == 422 and body["error"]["details"][0]["path"].startswith("form")


# -- refresh rotation ---------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_whole_session(gw, anon):
    await register(anon)
    _, first = await login(anon)
    status, _, second = await anon.call(
        "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert status == 200 and second["session_id"] == first["session_id"]
    assert second["refresh_token"] != first["refresh_token"]
    # The old refresh token again: reuse. The session, with every token of it, ends.
    status, _, body = await anon.call(
        "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert status == 400 and "revoked" in body["error"]["message"]
    status, _, body = await anon.call(
        "POST", "/api/auth/refresh", {"refresh_token": second["refresh_token"]}
    )
    assert status == 400 and body["error"]["code"] == "invalid_grant"
    me = as_user(gw, second)
    try:
        status, _, body = await me.call("GET", "/api/projects")
    finally:
        me.close()
    assert status == 401 and body["error"]["message"] == "session revoked"


async def test_refresh_grant_on_the_token_endpoint(anon):
    await register(anon)
    _, first = await login(anon)
    form = urlencode({"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    status, _, body = await anon.call("POST", "/api/auth/token", raw=form.encode())
    assert status == 200 and body["session_id"] == first["session_id"]
    status, _, body = await anon.call("POST", "/api/auth/refresh", {"refresh_token": "made-up"})
    assert status == 400 and body["error"]["code"] == "invalid_grant"


async def test_made_up_refresh_tokens_count_as_failed_logins_from_their_address(clean_db):
    # A refresh needs no token: a made-up refresh token cost a transaction and a query and
    # counted against no limit. Now it is a failed login of its address (RATE_LOGIN_IP);
    # refreshes with issued tokens use nothing up.
    async with running_gateway(**clean_db, rate_login_ip=Rate(3, 60.0)) as gw:
        anon = ApiClient(gw.port, None)
        other = ApiClient(gw.port, None, source_ip="127.0.0.2")
        try:
            await register(anon)
            _, tokens = await login(anon)
            for _ in range(5):
                status, _, tokens = await anon.call(
                    "POST", "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
                )
                assert status == 200
            statuses = []
            for n in range(5):
                status, headers, body = await anon.call(
                    "POST", "/api/auth/refresh", {"refresh_token": f"made-up-{n}"}
                )
                statuses.append(status)
            assert statuses == [400] * 3 + [429] * 2
            assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) > 0
            # The same address's password guesses share that allowance; another address
            # has its own.
            status, _ = await login(anon, password="wrong password")
            assert status == 429
            status, _, body = await other.call(
                "POST", "/api/auth/refresh", {"refresh_token": "made-up"}
            )
            assert status == 400 and body["error"]["code"] == "invalid_grant"
        finally:
            anon.close()
            other.close()


async def test_refreshes_spend_the_accounts_rest_allowance(clean_db):
    # Refresh routes take no token, so no limit counted them: one account rotated its
    # refresh tokens ~900 times a second (8 sessions, kept-alive connections), each a
    # transaction and a refresh_tokens row (~200 bytes with its indexes) kept until the
    # session expires (30 days): ~16 GB a day of rows from one ordinary account.
    async with running_gateway(**clean_db, rate_rest=Rate(5, 60.0)) as gw:
        anon = ApiClient(gw.port, None)
        try:
            await register(anon)
            _, tokens = await login(anon)
            statuses = []
            for _ in range(8):
                status, headers, body = await anon.call(
                    "POST", "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
                )
                statuses.append(status)
                if status == 200:
                    tokens = body
            assert statuses == [200] * 5 + [429] * 3
            assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) > 0
            # A refused refresh uses nothing up: the token is still the session's next one.
            schema = clean_db["database_schema"]
            conn = await asyncpg.connect(clean_db["database_url"])
            try:
                rows = await conn.fetch(
                    f'select used_at is null as unused from "{schema}".refresh_tokens'
                )
            finally:
                await conn.close()
            assert sorted(r["unused"] for r in rows) == [False] * 5 + [True]
            # The user's other calls spend the same allowance, and the grant route too.
            me = as_user(gw, tokens)
            try:
                assert (await me.call("GET", "/api/projects"))[0] == 429
            finally:
                me.close()
            form = urlencode(
                {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
            )
            assert (await anon.call("POST", "/api/auth/token", raw=form.encode()))[0] == 429
        finally:
            anon.close()


# -- sessions and revocation -----------------------------------------------------------


async def test_sessions_are_listed_and_ended_by_their_owner_only(gw, anon):
    await register(anon)
    _, phone = await login(anon, **{"User-Agent": "phone-app/1.0"})
    _, laptop = await login(anon, **{"User-Agent": "laptop-browser"})
    await register(anon, {**ADA, "email": "eve@example.com"})
    _, eve = await login(anon, "eve@example.com")
    me, intruder = as_user(gw, laptop), as_user(gw, eve)
    try:
        status, _, body = await me.call("GET", "/api/auth/sessions")
        assert status == 200
        listed = {s["id"]: s for s in body["items"]}
        assert set(listed) == {phone["session_id"], laptop["session_id"]}
        assert listed[laptop["session_id"]]["current"] is True
        assert listed[phone["session_id"]]["user_agent"] == "phone-app/1.0"
        assert listed[phone["session_id"]]["ip"] == "127.0.0.1"
        # Someone else's session is not theirs to end: it does not exist for them.
        assert (await intruder.call("DELETE", f"/api/auth/sessions/{phone['session_id']}"))[
            0
        ] == 404
        assert (await intruder.call("DELETE", "/api/auth/sessions/not-a-uuid"))[0] == 404
        assert (await me.call("DELETE", f"/api/auth/sessions/{phone['session_id']}"))[0] == 204
        status, _, body = await me.call("GET", "/api/auth/sessions")
        assert [s["id"] for s in body["items"]] == [laptop["session_id"]]
    finally:
        me.close()
        intruder.close()
    phone_client = as_user(gw, phone)
    try:
        assert (await phone_client.call("GET", "/api/projects"))[0] == 401
    finally:
        phone_client.close()


async def test_tokens_from_elsewhere_have_no_sessions(gw):
    external = ApiClient(gw.port, token_for(gw, "idp-user"))
    try:
        status, _, body = await external.call("GET", "/api/auth/sessions")
    finally:
        external.close()
    assert status == 403 and body["error"]["code"] == "no_session"


async def test_logout_closes_the_sessions_open_sockets_with_4502(gw, anon):
    await register(anon)
    _, tokens = await login(anon)
    _, other = await login(anon)
    async with (
        ws_client(gw.port, tokens["access_token"]) as c,
        ws_client(gw.port, other["access_token"]) as keeps,
    ):
        assert (await c.request("ping"))["ok"]
        me = as_user(gw, tokens)
        try:
            assert (await me.call("POST", "/api/auth/logout"))[0] == 204
            assert (await me.call("GET", "/api/projects"))[0] == 401
        finally:
            me.close()
        with pytest.raises(ConnectionClosed) as info:
            await c.recv(timeout=2 * UNIT)
        assert info.value.rcvd.code == CloseCode.SESSION_REVOKED
        assert (await keeps.request("ping"))["ok"]  # another session lives on
    # A new socket with the revoked session's token is refused before the upgrade.
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        async with ws_client(gw.port, tokens["access_token"]):
            pass
    assert refused.value.response.status_code == 401


async def test_logout_all_ends_every_session(gw, anon):
    await register(anon)
    sessions = [(await login(anon))[1] for _ in range(3)]
    me = as_user(gw, sessions[0])
    try:
        assert (await me.call("POST", "/api/auth/logout-all"))[0] == 204
    finally:
        me.close()
    for tokens in sessions:
        client = as_user(gw, tokens)
        try:
            assert (await client.call("GET", "/api/projects"))[0] == 401
        finally:
            client.close()


async def test_a_login_beyond_the_live_sessions_an_account_keeps_ends_the_oldest(
    gw, anon, monkeypatch
):
    """Logins made live sessions without bound, and the list of them had no page."""
    from core import accounts

    monkeypatch.setattr(accounts, "MAX_SESSIONS", 3)
    await register(anon)
    sessions = [(await login(anon))[1] for _ in range(5)]
    for n, tokens in enumerate(sessions):
        client = as_user(gw, tokens)
        try:
            status, _, listed = await client.call("GET", "/api/auth/sessions")
        finally:
            client.close()
        assert status == (401 if n < 2 else 200)  # the two oldest ended
    assert len(listed["items"]) == 3 and listed["items"][0]["current"]


async def test_ended_sessions_leave_the_table_once_their_tokens_have_expired(clean_db, monkeypatch):
    """Only live sessions were bounded: an ended one stayed, with its refresh tokens, until
    it would have expired (30 days), so logging in again and again still filled the table
    (~6 logins a second from one address at the production cost: ~500,000 rows a day)."""
    from core import accounts

    monkeypatch.setattr(accounts, "MAX_SESSIONS", 2)
    schema = clean_db["database_schema"]
    async with running_gateway(**clean_db, access_token_ttl=1.0) as gw:
        anon = ApiClient(gw.port, None)
        conn = await asyncpg.connect(clean_db["database_url"])
        try:
            await register(anon)
            sessions = [(await login(anon))[1] for _ in range(6)]
            count = f'select count(*) from "{schema}".auth_sessions'
            assert await conn.fetchval(count) == 6
            core = gw.ctx.core
            await core.accounts.purge()  # ended, but their access tokens may still be out
            assert await conn.fetchval(count) == 6
            await asyncio.sleep(1.2)  # ACCESS_TOKEN_TTL: no token of theirs is valid now
            await core.accounts.purge()
            assert await conn.fetchval(count) == 2
            # What a process that missed their revocation still reads is only what could
            # matter: sessions ended within a token's lifetime.
            assert await core.accounts.recently_revoked(core.revocations.ttl) == []
            # The live ones are untouched, and an ended one's refresh token stays refused.
            for tokens, expected in ((sessions[-1], 200), (sessions[0], 400)):
                body = {"refresh_token": tokens["refresh_token"]}
                assert (await anon.call("POST", "/api/auth/refresh", body))[0] == expected
        finally:
            await conn.close()
            anon.close()


@pytest.mark.parametrize("bearer", ["revoked", "garbage"])
async def test_the_operations_anyone_may_call_ignore_a_bearer_token(gw, anon, bearer):
    """A logged-out client that still sends its old token can register, log in and refresh:
    those operations need no token, so they read none (401 is not among their answers)."""
    await register(anon)
    _, old = await login(anon)
    me = as_user(gw, old)
    try:
        assert (await me.call("POST", "/api/auth/logout"))[0] == 204
    finally:
        me.close()
    token = old["access_token"] if bearer == "revoked" else "not.a.token"
    stale = ApiClient(gw.port, token)
    try:
        assert (await stale.call("GET", "/api/projects"))[0] == 401
        bob = {**ADA, "email": "bob@example.com", "display_name": "Bob"}
        status, _, _ = await stale.call("POST", "/api/auth/register", bob)
        assert status == 201
        status, tokens = await login(stale)
        assert status == 200, tokens
        body = {"refresh_token": tokens["refresh_token"]}
        status, _, _ = await stale.call("POST", "/api/auth/refresh", body)
        assert status == 200
    finally:
        stale.close()


async def test_revocation_reaches_sockets_on_another_process(clean_db, redis_url):
    prefix = unique_prefix()
    async with (
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as a,
        running_gateway(RedisBroker(redis_url, prefix), **clean_db) as b,
    ):
        anon = ApiClient(a.port, None)
        try:
            await register(anon)
            _, tokens = await login(anon)
        finally:
            anon.close()
        async with ws_client(b.port, tokens["access_token"]) as c:
            assert (await c.request("ping"))["ok"]
            me = as_user(a, tokens)
            try:
                assert (await me.call("POST", "/api/auth/logout"))[0] == 204
            finally:
                me.close()
            with pytest.raises(ConnectionClosed) as info:
                await c.recv(timeout=3 * UNIT)
            assert info.value.rcvd.code == CloseCode.SESSION_REVOKED
        on_b = as_user(b, tokens)
        try:
            assert (await on_b.call("GET", "/api/projects"))[0] == 401
        finally:
            on_b.close()


async def test_a_process_that_missed_the_broadcast_catches_up_from_the_database(clean_db):
    # Two memory brokers: B never hears A's broadcast.
    async with running_gateway(**clean_db) as a, running_gateway(**clean_db) as b:
        anon = ApiClient(a.port, None)
        try:
            await register(anon)
            _, tokens = await login(anon)
        finally:
            anon.close()
        me_a, me_b = as_user(a, tokens), as_user(b, tokens)
        try:
            assert (await me_b.call("GET", "/api/projects"))[0] == 200
            assert (await me_a.call("POST", "/api/auth/logout"))[0] == 204
            await b.ctx.core.sync_revocations()  # what B's periodic sync does
            assert (await me_b.call("GET", "/api/projects"))[0] == 401
        finally:
            me_a.close()
            me_b.close()


async def test_reserved_channels_are_out_of_reach_whatever_the_grants(gw):
    async with ws_client(gw.port, token_for(gw, channels=("*",))) as c:
        for op in ("sub", "pub"):
            extra = {"data": {"type": "sessions_revoked", "sids": ["x"]}} if op == "pub" else {}
            reply = await c.request(op, ch="__control", **extra)
            assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED
    api = ApiClient(gw.port, token_for(gw, channels=("*",)))
    try:
        status, _, _ = await api.call("POST", "/api/publish", {"ch": "__control", "data": 1})
    finally:
        api.close()
    assert status == 403


async def test_password_hashes_are_argon2id(gw, anon, clean_db):
    import asyncpg

    await register(anon)
    conn = await asyncpg.connect(clean_db["database_url"])
    try:
        stored = await conn.fetchval(
            f'select password_hash from "{clean_db["database_schema"]}".accounts'
        )
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$") and ADA["password"] not in stored


async def test_concurrent_refreshes_with_one_token_let_one_win(anon):
    await register(anon)
    _, tokens = await login(anon)
    results = await asyncio.gather(
        *(anon.call("POST", "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})
          for _ in range(4))
    )  # fmt: skip
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 400, 400, 400]


async def test_a_session_keeps_its_last_used_refresh_tokens_only(clean_db, monkeypatch):
    # Reuse detection kept every used refresh token for the session's life (30 days):
    # an account refreshing within RATE_REST (1200 a minute) still added 1,200 rows a
    # minute, ~1.7 million a day. A session now keeps its last KEPT_USED_REFRESH used
    # tokens: a reuse among them still ends it, an older one is refused like any
    # unknown token (the session stays: whoever holds it is refused).
    import core.accounts

    monkeypatch.setattr(core.accounts, "KEPT_USED_REFRESH", 3)
    async with running_gateway(**clean_db) as gw:
        anon = ApiClient(gw.port, None)
        try:
            await register(anon)
            _, tokens = await login(anon)
            seen = [tokens["refresh_token"]]
            for _ in range(6):
                status, _, tokens = await anon.call(
                    "POST", "/api/auth/refresh", {"refresh_token": seen[-1]}
                )
                assert status == 200
                seen.append(tokens["refresh_token"])
            schema = clean_db["database_schema"]
            conn = await asyncpg.connect(clean_db["database_url"])
            try:
                kept = await conn.fetchval(f'select count(*) from "{schema}".refresh_tokens')
            finally:
                await conn.close()
            assert kept == 3 + 1  # three used, and the next one
            status, _, body = await anon.call(
                "POST", "/api/auth/refresh", {"refresh_token": seen[0]}
            )
            assert status == 400 and "not valid" in body["error"]["message"]
            status, _, tokens = await anon.call(
                "POST", "/api/auth/refresh", {"refresh_token": seen[-1]}
            )
            assert status == 200, "an old token refused ends nothing"
            status, _, body = await anon.call(
                "POST", "/api/auth/refresh", {"refresh_token": seen[-2]}
            )
            assert status == 400 and "revoked" in body["error"]["message"]
        finally:
            anon.close()
