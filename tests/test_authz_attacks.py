"""The findings of issue 12, replayed by an ordinary self-registered account.

Each test is one attack from the report; it must fail now. Revocation runs
across two real gateway processes (``python -m gateway``) on one Redis and
one PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proto import CloseCode, ErrorCode
from tests.harness import SECRET, ApiClient, running_gateway, token_for, unique_prefix, ws_client
from tests.hookbackend import HookBackend
from tests.servers import UNIT
from tests.test_accounts import login
from tests.test_authz import make_world, new_person
from tests.test_core_rest import project
from tests.test_hooks import _http, cookie_client, hooked
from tests.test_processes import GatewayProcess, start_together


@pytest.fixture
async def gw(clean_db):
    async with running_gateway(**clean_db, rate_login_ip=None) as gateway:
        yield gateway


async def test_an_address_taken_by_another_account_cannot_be_taken_over(gw, clean_db):
    victim = await new_person(gw, clean_db)
    attacker = await new_person(gw, clean_db)
    api = ApiClient(gw.port, attacker.token)
    try:
        for email in (victim.email, victim.email.upper()):
            status, _, body = await api.call("PATCH", f"/api/users/{attacker.id}", {"email": email})
            assert (
                status == 409 and body["error"]["message"] == "this e-mail address cannot be used"
            )
        status, _, me = await api.call("GET", f"/api/users/{attacker.id}")
        assert me["email"] == attacker.email
    finally:
        api.close()


async def test_registration_cannot_be_blocked_by_a_pre_created_users_row(gw, clean_db):
    world = await make_world(gw, clean_db)
    admin = ApiClient(gw.port, world.admin.token)
    anon = ApiClient(gw.port, None)
    try:
        row = {"email": "late@example.com", "display_name": "Placeholder"}
        status, _, made = await admin.call("POST", "/api/users", row)
        assert status == 201
        who = {"email": "Late@example.com", "display_name": "Late", "password": "long enough pw"}
        status, _, user = await anon.call("POST", "/api/auth/register", who)
        assert status == 201 and user["id"] == made["id"] and user["display_name"] == "Late"
        assert (await anon.call("POST", "/api/auth/register", who))[
            0
        ] == 409  # an account exists now: this one is not claimable
    finally:
        admin.close()
        anon.close()


async def test_owners_keep_their_projects_when_their_e_mail_changes(gw, clean_db):
    owner = await new_person(gw, clean_db)
    api = ApiClient(gw.port, owner.token)
    try:
        _, _, p = await api.call("POST", "/api/projects", project(owner_email=owner.email))
        status, _, _ = await api.call("PATCH", f"/api/projects/{p['id']}", {"owner_email": "x@y.z"})
        assert status == 403  # giving it away is taking it from yourself: admins only
        async with ws_client(gw.port, token_for(gw, channels=("projects",))) as c:
            assert (await c.request("sub", ch="projects"))["ok"]
            new = {"email": "renamed@example.com"}
            assert (await api.call("PATCH", f"/api/users/{owner.id}", new))[0] == 200
            event = (await c.next_push())["data"]
            assert event["type"] == "updated" and event["data"]["owner_email"] == new["email"]
        status, _, after = await api.call(
            "PATCH", f"/api/projects/{p['id']}", {"name": "Still mine"}
        )
        assert status == 200 and after["owner_email"] == "renamed@example.com"
    finally:
        api.close()


# -- change channels belong to the core ----------------------------------------------


async def test_issued_tokens_publish_only_on_their_own_user_channel(gw, clean_db):
    user = await new_person(gw, clean_db)
    async with ws_client(gw.port, user.token) as c:
        for ch in ("projects", "projects:1"):
            assert (await c.request("sub", ch=ch))["ok"]
            reply = await c.request("pub", ch=ch, data={"type": "deleted", "version": 2147483648})
            assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.PERMISSION_DENIED
        mine = f"user:{user.id}"
        assert (await c.request("sub", ch=mine))["ok"]
        assert (await c.request("pub", ch=mine, data={"note": 1}))["ok"]
        assert (await c.next_push())["data"] == {"note": 1}


async def test_no_client_publishes_on_core_channels_whatever_its_grants(gw, clean_db):
    world = await make_world(gw, clean_db)
    # A token minted with pub on everything, and an admin's socket: refused alike.
    for token in (token_for(gw, channels=("*",), pub=True), world.admin.token):
        async with ws_client(gw.port, token) as c:
            assert (await c.request("sub", ch="projects"))["ok"]
            reply = await c.request("pub", ch="projects", data={"type": "deleted"})
            assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED
    admin = ApiClient(gw.port, world.admin.token)
    try:
        _, _, key = await admin.call("POST", "/api/keys", {"name": "all", "channels": ["*"]})
    finally:
        admin.close()
    service = ApiClient(gw.port, key["key"])
    try:
        forged = {"ch": "projects:1", "data": {"type": "deleted", "version": 2147483648}}
        status, _, body = await service.call("POST", "/api/publish", forged)
        assert status == 403 and body["error"]["code"] == "forbidden"
        assert (await service.call("POST", "/api/publish", {"ch": "orders:1", "data": 1}))[0] == 200
    finally:
        service.close()


# -- revocation reaches every process ---------------------------------------------------


@pytest.fixture
def two_processes(tmp_path, data_dir, redis_url, clean_db):
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": unique_prefix(),
        "JWT_SECRET": SECRET,
        "DATABASE_URL": clean_db["database_url"],
        "DATABASE_SCHEMA": clean_db["database_schema"],
        "PASSWORD_TIME_COST": "1",
        "PASSWORD_MEMORY_KIB": "8192",
        "RATE_LOGIN_IP": "off",
    }
    started = start_together(*(GatewayProcess(tmp_path, data_dir, **env) for _ in range(2)))
    yield started
    for gp in started:
        gp.stop()


async def _closed_with(c, code: CloseCode) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5 * UNIT):
            while True:
                await c.recv(5 * UNIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def _until(check, what: str) -> None:
    for _ in range(100):
        if await check():
            return
        await asyncio.sleep(0.05 * UNIT)
    pytest.fail(what)


@pytest.mark.timeout(90)
async def test_a_revoked_key_is_cut_off_on_every_process(two_processes, clean_db):
    a, b = two_processes
    world = await make_world(a, clean_db)
    admin = ApiClient(a.port, world.admin.token)
    _, _, key = await admin.call(
        "POST", "/api/keys", {"name": "feed", "channels": ["feed:*"], "rest": True}
    )
    on_b = ApiClient(b.port, key["key"])
    try:
        await _until(
            lambda: _status(on_b, "GET", "/api/projects", 200), "the key never worked on B"
        )
        async with ws_client(b.port, key["key"]) as c:
            assert (await c.request("pub", ch="feed:1", data=1))["ok"]
            assert (await admin.call("DELETE", f"/api/keys/{key['id']}"))[0] == 204
            await _closed_with(c, CloseCode.KEY_REVOKED)
        status, _, body = await on_b.call("GET", "/api/projects")
        assert status == 401 and body["error"]["status"] == 401
    finally:
        on_b.close()
        admin.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("by", ["self", "admin"])
async def test_a_deleted_account_is_cut_off_on_every_process(two_processes, clean_db, by):
    a, b = two_processes
    world = await make_world(a, clean_db)
    victim = await new_person(a, clean_db)
    deleter = ApiClient(a.port, victim.token if by == "self" else world.admin.token)
    on_b = ApiClient(b.port, victim.token)
    try:
        assert (await on_b.call("GET", f"/api/users/{victim.id}"))[0] == 200
        async with ws_client(b.port, victim.token) as c:
            assert (await c.request("sub", ch=f"user:{victim.id}"))["ok"]
            assert (await deleter.call("DELETE", f"/api/users/{victim.id}"))[0] == 204
            await _closed_with(c, CloseCode.SESSION_REVOKED)
        status, _, body = await on_b.call("GET", "/api/projects")
        assert status == 401 and body["error"]["message"] == "session revoked"
        anon = ApiClient(b.port, None)
        try:
            form = {"refresh_token": victim.tokens["refresh_token"]}
            assert (await anon.call("POST", "/api/auth/refresh", form))[0] == 400
        finally:
            anon.close()
    finally:
        deleter.close()
        on_b.close()
    # Sessions outlive the deleted row, revoked, so a process that missed the
    # broadcast still learns of it from the database.
    conn = await asyncpg.connect(clean_db["database_url"])
    try:
        reason = await conn.fetchval(
            f'select revoked_reason from "{clean_db["database_schema"]}".auth_sessions '
            "where id = $1::uuid",
            victim.tokens["session_id"],
        )
    finally:
        await conn.close()
    assert reason == "account_deleted"


async def _status(api: ApiClient, method: str, path: str, expected: int) -> bool:
    return (await api.call(method, path))[0] == expected


def _outside_identity_provider() -> tuple[Any, str]:
    """An IdP's RSA key, and its public half as JWT_PUBLIC_KEY takes it (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    idp = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = idp.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return idp, public.decode()


async def test_a_token_from_an_outside_identity_provider_is_no_core_user_nor_admin(clean_db):
    """An IdP (JWT_PUBLIC_KEY) that hands out ``sub: "<n>"`` and ``role: admin`` must not
    make its holder the core's user n, nor a core admin."""
    import time

    import jwt

    idp, public = _outside_identity_provider()
    async with running_gateway(**clean_db, jwt_public_key=public, rate_login_ip=None) as gw:
        victim = await new_person(gw, clean_db)
        owner = ApiClient(gw.port, victim.tokens["access_token"])
        claims = {"sub": str(victim.id), "role": "admin", "exp": int(time.time()) + 600}
        outsider = ApiClient(gw.port, jwt.encode(claims, idp, algorithm="RS256"))
        try:
            status, _, created = await owner.call(
                "POST", "/api/projects", project(owner_email=victim.email)
            )
            assert status == 201
            pid = created["id"]
            assert (await outsider.call("GET", f"/api/projects/{pid}"))[0] == 200  # READ
            assert (await outsider.call("GET", f"/api/users/{victim.id}"))[0] == 404
            assert (await outsider.call("PATCH", f"/api/users/{victim.id}", {"display_name": "x"}))[
                0
            ] == 404
            assert (await outsider.call("DELETE", f"/api/users/{victim.id}"))[0] == 404
            status, _, page = await outsider.call("GET", "/api/users")
            assert status == 200 and page["items"] == []
            assert (await outsider.call("DELETE", f"/api/projects/{pid}"))[0] == 403
            assert (await outsider.call("GET", "/api/keys"))[0] == 403  # no core admin
            assert (await owner.call("GET", f"/api/projects/{pid}"))[0] == 200
        finally:
            owner.close()
            outsider.close()


async def test_an_outside_token_naming_a_users_id_shares_neither_keys_nor_limits(clean_db):
    """Idempotency keys and REST rate limits belong to a principal: an IdP's
    ``sub: "<n>"`` is not user n's, so it may neither replay n's stored answers, burn
    n's keys, nor spend n's allowance."""
    import time

    import jwt

    from core.infra.rate import Rate

    idp, public = _outside_identity_provider()
    settings = {"jwt_public_key": public, "rate_login_ip": None, "rate_rest": Rate(6, 60.0)}
    async with running_gateway(**clean_db, **settings) as gw:
        victim = await new_person(gw, clean_db)
        owner = ApiClient(gw.port, victim.tokens["access_token"])
        claims = {"sub": str(victim.id), "exp": int(time.time()) + 600}
        outsider = ApiClient(gw.port, jwt.encode(claims, idp, algorithm="RS256"))
        try:
            mine = project(owner_email=victim.email)
            key = {"Idempotency-Key": "k1"}
            assert (await owner.call("POST", "/api/projects", mine, headers=key))[0] == 201
            status, headers, _ = await outsider.call("POST", "/api/projects", mine, headers=key)
            assert status == 403 and "Idempotent-Replayed" not in headers  # not n's 201
            theirs = project(owner_email="someone@example.com")
            key = {"Idempotency-Key": "k2"}
            assert (await outsider.call("POST", "/api/projects", theirs, headers=key))[0] == 403
            assert (await owner.call("POST", "/api/projects", mine, headers=key))[0] == 201
            for _ in range(6):  # the outsider's allowance, spent
                await outsider.call("GET", "/api/projects")
            assert (await outsider.call("GET", "/api/projects"))[0] == 429
            assert (await owner.call("GET", "/api/projects"))[0] == 200  # n's is n's
        finally:
            owner.close()
            outsider.close()


async def test_an_outside_token_naming_a_users_id_spends_none_of_their_long_poll_sessions():
    """Long-poll sessions are counted and owned by a principal too: an IdP's
    ``sub: "42"`` holding LONGPOLL_MAX_PER_USER sessions leaves user 42 theirs, and
    neither reaches the other's sessions."""
    import time

    import jwt

    idp, public = _outside_identity_provider()
    async with running_gateway(jwt_public_key=public, longpoll_max_per_user=2) as gw:
        claims = {"sub": "42", "channels": ["room:*"], "exp": int(time.time()) + 600}
        outsider = ApiClient(gw.port, jwt.encode(claims, idp, algorithm="RS256"))
        user = ApiClient(gw.port, token_for(gw, "42"))  # this deployment's user 42
        try:
            theirs = [await outsider.call("POST", "/lp", raw=b"") for _ in range(2)]
            assert [status for status, _, _ in theirs] == [201, 201]
            assert (await outsider.call("POST", "/lp", raw=b""))[0] == 429
            status, _, mine = await user.call("POST", "/lp", raw=b"")
            assert status == 201, mine  # 42's allowance is 42's
            sid = theirs[0][2]["session"]
            assert (await user.call("GET", f"/lp/{sid}?cursor=0"))[0] == 404
            assert (await outsider.call("GET", f"/lp/{mine['session']}?cursor=0"))[0] == 404
        finally:
            outsider.close()
            user.close()


async def test_an_outside_token_naming_a_users_id_spends_none_of_their_connections():
    """MAX_CONNECTIONS_PER_USER is counted by principal: an IdP's ``sub: "42"`` at
    its limit leaves user 42 theirs, and a socket cannot be refreshed from one to
    the other (they are not the same user)."""
    import time

    import jwt

    idp, public = _outside_identity_provider()
    async with running_gateway(jwt_public_key=public, max_connections_per_user=1) as gw:
        claims = {"sub": "42", "channels": ["room:*"], "exp": int(time.time()) + 600}
        outside = jwt.encode(claims, idp, algorithm="RS256")
        async with ws_client(gw.port, outside) as theirs:
            with pytest.raises(InvalidStatus):
                async with ws_client(gw.port, outside):
                    pass
            async with ws_client(gw.port, token_for(gw, "42")) as mine:  # 42's allowance
                refused = await mine.request("refresh", token=outside)
                assert refused["error"]["code"] == ErrorCode.PERMISSION_DENIED
                assert (await theirs.request("ping"))["ok"]


async def test_no_one_takes_over_projects_by_claiming_their_owners_address(gw, clean_db):
    """No e-mail verification: an address that projects name is no one's to claim,
    neither by registering it nor by changing one's own e-mail to it."""
    admin = await new_person(gw, clean_db, role="admin")
    attacker = await new_person(gw, clean_db)
    root = ApiClient(gw.port, admin.tokens["access_token"])
    mallory = ApiClient(gw.port, attacker.tokens["access_token"])
    anon = ApiClient(gw.port, None)
    try:
        # An admin records a project for someone who has no account yet.
        status, _, _ = await root.call(
            "POST", "/api/projects", project(owner_email="bob@example.com")
        )
        assert status == 201
        status, _, body = await anon.call(
            "POST", "/api/auth/register",
            {"email": "Bob@example.com", "display_name": "Not Bob", "password": "long enough pw"},
        )  # fmt: skip
        assert status == 409 and "bob" not in body["error"]["message"].lower()
        status, _, _ = await mallory.call(
            "PATCH", f"/api/users/{attacker.id}", {"email": "bob@example.com"}
        )
        assert status == 409
        # The admin may still hand the project to whoever it belongs to.
        status, _, _ = await root.call(
            "PATCH", f"/api/users/{attacker.id}", {"email": "bob@example.com"}
        )
        assert status == 200
    finally:
        for c in (root, mallory, anon):
            c.close()


async def test_a_token_from_an_outside_identity_provider_cannot_end_a_core_user_s_sessions(
    clean_db,
):
    """The IdP's ``sub: "<n>"`` with a ``sid`` claim is no login here: it neither lists
    nor ends user n's sessions (and an ``sub`` of other digits names no one)."""
    import time

    import jwt

    idp, public = _outside_identity_provider()
    async with running_gateway(**clean_db, jwt_public_key=public, rate_login_ip=None) as gw:
        victim = await new_person(gw, clean_db)
        owner = ApiClient(gw.port, victim.tokens["access_token"])
        status, _, mine = await owner.call("GET", "/api/auth/sessions")
        assert status == 200 and mine["items"]
        sid = mine["items"][0]["id"]
        outsiders = [
            {"sub": str(victim.id), "sid": sid},
            {"sub": "".join(chr(0x0660 + int(d)) for d in str(victim.id)), "sid": sid},
        ]
        try:
            for extra in outsiders:
                claims = {**extra, "role": "admin", "exp": int(time.time()) + 600}
                outsider = ApiClient(gw.port, jwt.encode(claims, idp, algorithm="RS256"))
                try:
                    assert (await outsider.call("GET", "/api/auth/sessions"))[0] == 403
                    assert (await outsider.call("DELETE", f"/api/auth/sessions/{sid}"))[0] == 403
                    assert (await outsider.call("POST", "/api/auth/logout"))[0] == 403
                    assert (await outsider.call("POST", "/api/auth/logout-all"))[0] == 403
                finally:
                    outsider.close()
            status, _, still = await owner.call("GET", "/api/auth/sessions")
            assert status == 200 and still["items"] == mine["items"]
        finally:
            owner.close()


def test_only_ascii_digits_name_a_user_of_this_deployment():
    from types import SimpleNamespace

    from core.access import user_id

    def caller(sub: str) -> SimpleNamespace:
        return SimpleNamespace(sub=sub, role="user", local=True)

    assert user_id(caller("12")) == 12
    assert user_id(caller("\u0661\u0662")) is None  # "١٢": int() reads it as 12
    assert user_id(caller("\u00b2")) is None  # "²": isdigit() says yes, int() refuses


async def test_a_deployment_that_issues_no_tokens_refuses_logins_with_501(clean_db):
    # Not 503: a gateway in front (CORE_URL) counts 502-504 as the core failing, and these
    # routes need no token, so anyone could open its breaker with them.
    _, public = _outside_identity_provider()
    settings = {"jwt_secret": None, "jwt_public_key": public, "rate_login_ip": None}
    async with running_gateway(**clean_db, **settings) as gw:
        anon = ApiClient(gw.port, None)
        try:
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            for path, raw, headers in [
                ("/api/auth/refresh", b'{"refresh_token": "%s"}' % (b"x" * 43), None),
                ("/api/auth/token", b"grant_type=password&username=a%40b.c&password=pw", form),
            ]:
                status, _, answer = await anon.call("POST", path, raw=raw, headers=headers)
                assert (status, answer["error"]["code"]) == (501, "not_implemented"), path
        finally:
            anon.close()


async def _blocked_by(watch: asyncpg.Connection, pid: int) -> list[int]:
    """The backends waiting for a lock that backend ``pid`` holds."""
    rows = await watch.fetch(
        "select pid from pg_stat_activity where $1 = any(pg_blocking_pids(pid))", pid
    )
    return [r[0] for r in rows]


@pytest.mark.timeout(60)
async def test_a_login_under_way_does_not_outlive_the_account_s_deletion(gw, clean_db):
    """A login whose session was written while an admin deleted the account (its
    sessions revoked, then the row deleted) kept a session nobody revoked: its access
    token read projects and opened sockets until it expired. Here the deletion is held
    between its two steps by a lock the login does not wait for; without it, six
    login loops racing 30 deletions kept 36 of 1,073 tokens working."""
    schema = clean_db["database_schema"]
    admin = await new_person(gw, clean_db, role="admin")
    victim = await new_person(gw, clean_db)
    holder = await asyncpg.connect(clean_db["database_url"])
    watch = await asyncpg.connect(clean_db["database_url"])
    root = ApiClient(gw.port, admin.token)
    anon = ApiClient(gw.port, None)
    holding = holder.transaction()
    try:
        await holding.start()
        # What a login's foreign key takes too: it blocks a delete, not a login.
        await holder.execute(
            f'select 1 from "{schema}".users where id = $1 for key share', victim.id
        )
        deleting = asyncio.ensure_future(root.call("DELETE", f"/api/users/{victim.id}"))
        held = holder.get_server_pid()

        async def deletion_waits() -> bool:
            return bool(await _blocked_by(watch, held))

        await _until(deletion_waits, "the deletion never waited")
        (deleter,) = await _blocked_by(watch, held)
        logging_in = asyncio.ensure_future(login(anon, victim.email, "long enough pw"))

        async def login_done_or_waiting() -> bool:
            waiting = set(await _blocked_by(watch, held)) | set(await _blocked_by(watch, deleter))
            return logging_in.done() or bool(waiting - {deleter})

        await _until(login_done_or_waiting, "the login neither ended nor waited")
        await holding.rollback()
        assert (await deleting)[0] == 204
        status, tokens = await logging_in
        if status == 200:  # written before the deletion took the row: revoked with the rest
            late = ApiClient(gw.port, tokens["access_token"])
            try:
                status, _, body = await late.call("GET", "/api/projects")
                assert (status, body["error"]["message"]) == (401, "session revoked")
            finally:
                late.close()
            with pytest.raises(InvalidStatus) as refused:
                async with ws_client(gw.port, tokens["access_token"]):
                    pass
            assert refused.value.response.status_code == 401
        else:  # it waited for the deletion, and found no account
            assert (status, tokens["error"]["code"]) == (400, "invalid_grant")
        live = await watch.fetchval(
            f'select count(*) from "{schema}".auth_sessions where revoked_at is null '
            "and (user_id is null or user_id = $1)",
            victim.id,
        )
        assert live == 0
    finally:
        root.close()
        anon.close()
        await holder.close()
        await watch.close()


# -- connections a browser authenticates by its cookies -------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An application backend whose connect hook admits browsers by session cookie."""
    started = HookBackend(tmp_path_factory.mktemp("hooks") / "backend.log")
    yield started
    started.stop()


async def test_a_page_of_another_origin_cannot_connect_as_the_user_by_her_cookie(backend):
    """With a connect hook that admits by session cookie, a socket handshake from any
    page carrying the user's cookie (a browser sends it from any page of the same site,
    from any site for ``SameSite=None``) was admitted as her with ``ALLOWED_ORIGINS=*``,
    the default: the page read her private pushes and called and published as her.
    A WebSocket has no CORS; the gateway must check the page's origin itself."""
    backend.forget()
    cookie = backend.login("ada")
    async with running_gateway(**hooked(backend)) as gw:
        own = f"http://127.0.0.1:{gw.port}"
        for origin in ("https://evil.example", "http://127.0.0.1:1", "null", "*"):
            with pytest.raises(InvalidStatus) as refused:
                async with cookie_client(gw, cookie, Origin=origin):
                    pass
            assert refused.value.response.status_code == 403, origin
            for path in ("/sse?ch=room:1", "/lp"):  # no CORS for them, but no session either
                method = "POST" if path == "/lp" else "GET"
                status, body = await _http(gw, method, path, headers={"Cookie": cookie,
                                                                      "Origin": origin})  # fmt: skip
                assert (status, body["error"]["code"]) == (403, "forbidden"), (path, origin)
        assert backend.requests("connect") == []  # refused before the backend is asked
        # The gateway's own pages (the demo) and clients that are no browser's page.
        for headers in ({"Origin": own}, {"Origin": own.upper()}, {}):
            async with cookie_client(gw, cookie, **headers) as c:
                assert (await c.request("call", method="whoami"))["data"] == {"user": "ada"}
        # A token proves itself, from any page, as before.
        async with ws_client(gw.port, token_for(gw, "bob"), origin="https://evil.example") as c:
            assert (await c.request("sub", ch="room:1"))["ok"]
    allowed = hooked(backend, allowed_origins=("https://app.example",))
    async with running_gateway(**allowed) as gw:
        async with cookie_client(gw, cookie, Origin="https://app.example") as c:
            assert (await c.request("call", method="whoami"))["data"] == {"user": "ada"}


def test_the_gateway_s_own_origin_is_the_one_of_the_host_it_was_asked():
    from gateway.transport.origins import may_connect_without_token, same_origin

    assert same_origin("https://app.example", "app.example")
    assert same_origin("https://app.example", "App.Example:443")
    assert same_origin("http://127.0.0.1:8888", "127.0.0.1:8888")
    assert same_origin("http://[::1]:8888", "[::1]:8888")
    for origin, host in [
        ("https://app.example", "app.example:8443"),
        ("http://app.example", "app.example:443"),
        ("https://evil.example", "app.example"),
        ("https://app.example.evil.example", "app.example"),
        ("https://user@app.example", "app.example"),
        ("ftp://app.example", "app.example"),
        ("null", "null"),
        ("app.example", "app.example"),
        ("http://[::1", "[::1"),
        ("https://app.example", None),
    ]:
        assert not same_origin(origin, host), (origin, host)
    assert may_connect_without_token(None, "app.example", ())  # no browser's page
    assert may_connect_without_token("https://b.example", "a.example", ("https://b.example",))
    assert not may_connect_without_token("https://b.example", "a.example", ("*",))
    assert not may_connect_without_token("*", "a.example", ("*",))


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_refused_write_of_someone_else_s_project_takes_no_lock_on_it(gw, clean_db, method):
    # A non-owner's write locked the row before it was refused: 250 refused PATCHes at once
    # held the owner's own PATCH 0.6 s, each waiting for the row with a pool connection.
    # Here the owner's write is under way (the row locked) and the refusal must not wait.
    owner = await new_person(gw, clean_db)
    other = await new_person(gw, clean_db)
    mine, theirs = ApiClient(gw.port, owner.token), ApiClient(gw.port, other.token)
    conn = await asyncpg.connect(clean_db["database_url"])
    schema = clean_db["database_schema"]
    try:
        _, _, p = await mine.call("POST", "/api/projects", project(owner_email=owner.email))
        body = None if method == "DELETE" else project(owner_email=owner.email, name="taken")
        if method == "PATCH":
            body = {"name": "taken"}
        async with conn.transaction():
            await conn.execute(
                f'select 1 from "{schema}".projects where id = $1 for update', p["id"]
            )
            refused = asyncio.ensure_future(theirs.call(method, f"/api/projects/{p['id']}", body))
            for _ in range(1000):
                if refused.done():
                    break
                waiting = await conn.fetchval(  # sessions waiting for this one's lock
                    "select count(*) from pg_stat_activity "
                    "where pg_backend_pid() = any(pg_blocking_pids(pid))"
                )
                assert waiting == 0, "a refused write waited for the owner's lock"
                await asyncio.sleep(0.01)
            status, _, answer = await refused
        assert status == 403 and answer["error"]["code"] == "forbidden"
        status, _, current = await mine.call("GET", f"/api/projects/{p['id']}")
        assert status == 200 and current["name"] == p["name"]
    finally:
        await conn.close()
        mine.close()
        theirs.close()
