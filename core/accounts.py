"""``/api/auth/…``: registration, the OAuth2 token endpoint, refresh, sessions, logout.

Each login is a session (``auth_sessions``). Its refresh tokens form a
family: a refresh uses up the presented token and issues the next; a used
token presented again means a copy is in someone else's hands, and the whole
session is revoked (OAuth 2.0 Security BCP, refresh token rotation with
reuse detection). Revocation reaches every process and closes the session's
open sockets (core/infra/revocation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, Protocol

import asyncpg
import msgspec
from msgspec import Meta

from core.access import Access
from core.infra.clientip import limit_key
from core.infra.errors import ApiError, Conflict, ErrorDetail, NotFound, TooManyRequests
from core.infra.rate import Rate
from core.infra.ratelimit import RateLimiter, over_limit
from core.infra.settings import Settings
from core.logins import LoginGuard
from core.passwords import Passwords, password_problems
from core.request import Request, Response
from core.routing import UUID_ID, Route, uuid_param
from core.schemas import DisplayName, Email, User
from core.tokens import Issuer, new_refresh_token, refresh_hash
from core.validation import Checked

__all__ = ["Accounts", "Revoker", "TokenOut"]

Password = Annotated[str, Meta(min_length=8, max_length=1024)]


#: The largest body of the routes anyone may call without a token: a login or a
#: registration is far smaller, and nobody may make the gateway buffer more.
AUTH_BODY = 8192


#: After a login or a refresh: refresh again, by either route.
_AFTER_LOGIN = {
    "refresh": {"operationId": "refresh",
                "requestBody": {"refresh_token": "$response.body#/refresh_token"}},
    "refreshGrant": {"operationId": "token",
                     "requestBody": {"grant_type": "refresh_token",
                                     "refresh_token": "$response.body#/refresh_token"}},
}  # fmt: skip


class Revoker(Protocol):
    async def revoke(self, sids: list[str]) -> None:
        """Apply session revocations here and broadcast them to every process."""


class RegisterIn(Checked, forbid_unknown_fields=True, kw_only=True):
    rules: ClassVar[tuple[str, ...]] = (
        "The password is not one of the 10,000 most common ones, not only white space, has "
        "more than two different characters, is not a run (`abcdefgh`, `98765432`) and does "
        "not contain the e-mail address, nor the name before its `@` (if 4 characters or "
        "more; a shorter one is refused only as the whole password): 422 `validation_error` "
        "at `$.password` (core/passwords.py).",
    )

    email: Email
    display_name: DisplayName
    password: Password

    @classmethod
    def problems(cls, get: Callable[[str], Any]) -> list[ErrorDetail]:
        return password_problems(get("password"), get("email"))  # common, repeated, own name


class TokenForm(msgspec.Struct, kw_only=True):
    """The OAuth2 token request (form-encoded, RFC 6749 §4.3 and §6).

    Unrecognized parameters (``scope``, ``client_id``…) are ignored, as the
    RFC requires.
    """

    grant_type: Literal["password", "refresh_token"]
    username: Annotated[str, Meta(max_length=254)] | None = None
    password: Annotated[str, Meta(max_length=1024)] | None = None
    refresh_token: Annotated[str, Meta(max_length=200)] | None = None


class RefreshIn(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: Annotated[str, Meta(max_length=200)]


class TokenOut(msgspec.Struct):
    """Tokens for a session. Keep ``refresh_token`` secret: it is used up by a refresh."""

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    refresh_token: str
    session_id: str


class SessionOut(msgspec.Struct):
    id: str
    created_at: str
    last_used_at: str
    expires_at: str
    user_agent: str
    ip: str
    current: bool


class SessionList(msgspec.Struct):
    items: list[SessionOut]


_LOGIN = """
select u.id, a.password_hash, a.role, u.display_name from users u join accounts a on a.user_id = u.id
where lower(u.email) = lower($1)
"""
_REHASH = "update accounts set password_hash = $2, updated_at = now() where user_id = $1"
#: A users row with no account (an admin made it) is the registrant's to claim,
#: unless projects name the address: with no e-mail verification, whoever
#: registers an address first would own them. Such an address is refused, and an
#: admin hands the projects over once their owner has an account.
_NEW_USER = """
insert into users (email, display_name)
select $1, $2
where not exists (select 1 from projects p where lower(p.owner_email) = lower($1))
on conflict ((lower(email))) do update
    set email = excluded.email, display_name = excluded.display_name, updated_at = now()
    where not exists (select 1 from accounts a where a.user_id = users.id)
returning id, user_json(users)::text
"""
_NEW_ACCOUNT = "insert into accounts (user_id, password_hash) values ($1, $2)"
_NEW_SESSION = """
insert into auth_sessions (user_id, expires_at, user_agent, ip)
values ($1, now() + make_interval(secs => $2), $3, $4) returning id::text
"""
#: Live sessions one account keeps: a login beyond them ends the oldest (ended
#: sessions' tokens stop working everywhere, as after a logout).
MAX_SESSIONS = 100
_END_OLDEST = """
update auth_sessions set revoked_at = now(), revoked_reason = 'too_many_sessions'
where id in (select id from auth_sessions
             where user_id = $1 and revoked_at is null and expires_at > now()
             order by created_at desc, id offset $2)
returning id::text
"""
_NEW_REFRESH = "insert into refresh_tokens (token_hash, session_id) values ($1, $2::uuid)"
_FIND_REFRESH = """
select r.session_id::text as sid, r.used_at is not null as used, s.user_id,
       s.revoked_at is not null as revoked, s.expires_at <= now() as expired, a.role,
       u.display_name
from refresh_tokens r
join auth_sessions s on s.id = r.session_id
join accounts a on a.user_id = s.user_id
join users u on u.id = s.user_id
where r.token_hash = $1
for update of r
"""
_USE_REFRESH = "update refresh_tokens set used_at = now() where token_hash = $1"
#: Used refresh tokens a session keeps, for reuse detection: a reuse of one of
#: them ends the session; an older one is refused as an unknown token is.
KEPT_USED_REFRESH = 20
_FORGET_USED = """
delete from refresh_tokens where session_id = $1::uuid and used_at is not null
and token_hash not in (select token_hash from refresh_tokens
                       where session_id = $1::uuid and used_at is not null
                       order by used_at desc limit $2)
"""
_TOUCH = "update auth_sessions set last_used_at = now() where id = $1::uuid"
_REVOKE_ONE = """
update auth_sessions set revoked_at = now(), revoked_reason = $3
where id = $1::uuid and user_id = $2 and revoked_at is null returning id::text
"""
_REVOKE_ALL = """
update auth_sessions set revoked_at = now(), revoked_reason = $2
where user_id = $1 and revoked_at is null returning id::text
"""
_LIST = """
select coalesce(json_agg(json_build_object(
    'id', id, 'created_at', created_at, 'last_used_at', last_used_at,
    'expires_at', expires_at, 'user_agent', user_agent, 'ip', ip,
    'current', id = $2::uuid) order by created_at desc), '[]')::text
from auth_sessions
where user_id = $1 and revoked_at is null and expires_at > now()
"""
_RECENTLY_REVOKED = """
select id::text from auth_sessions where revoked_at > now() - make_interval(secs => $1)
"""
#: An ended session is kept as long as an access token of it may still be valid ($1 s),
#: for processes that missed its revocation to read; its refresh tokens go with it, and
#: are refused after as before. Else logging in again and again filled the table.
_PURGE = """
delete from auth_sessions
where expires_at < now() - interval '1 day' or revoked_at < now() - make_interval(secs => $1)
"""

_encode = msgspec.json.encode


def _invalid_grant(message: str) -> ApiError:
    return ApiError(400, "invalid_grant", message)


class Accounts:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        passwords: Passwords,
        issuer: Issuer,
        revoker: Revoker,
        limiter: RateLimiter,
    ) -> None:
        self._limiter = limiter
        self._logins = LoginGuard(limiter, settings.rate_login_ip, settings.rate_login_account)
        self._pool = pool
        self._settings = settings
        self._passwords = passwords
        self.issuer = issuer
        self._revoker = revoker

    def routes(self) -> list[Route]:
        tag = "auth"
        return [
            Route("POST", "/api/auth/register", self.register, "Create an account",
                  "register", tag, responses={201: User}, body=RegisterIn,
                  errors=("registration_closed", "conflict"), access=Access.PUBLIC,
                  max_body=AUTH_BODY, location="/api/users/{id}",
                  description="Anyone may call it; an `Authorization` header is ignored.",
                  links={"logIn": {"operationId": "token", "requestBody": {
                      "grant_type": "password", "username": "$request.body#/email",
                      "password": "$request.body#/password"}}}),
            Route("POST", "/api/auth/token", self.token, "Log in or refresh (OAuth2)",
                  "token", tag, responses={200: TokenOut}, form=TokenForm, access=Access.PUBLIC,
                  max_body=AUTH_BODY, errors=("invalid_grant", "not_implemented"), links=_AFTER_LOGIN,
                  description="OAuth2 password grant (`grant_type=password`, `username` is "
                  "the e-mail) or refresh grant (`grant_type=refresh_token`), form-encoded. "
                  "Wrong credentials and unusable refresh tokens are 400 `invalid_grant`. "
                  "Anyone may call it; an `Authorization` header is ignored."),
            Route("POST", "/api/auth/refresh", self.refresh, "Rotate a refresh token",
                  "refresh", tag, responses={200: TokenOut}, body=RefreshIn, access=Access.PUBLIC,
                  max_body=AUTH_BODY, errors=("invalid_grant", "not_implemented"), links=_AFTER_LOGIN,
                  description="Uses up the refresh token and returns new tokens. Presenting "
                  "a used refresh token again revokes the whole session. Anyone may call it; "
                  "an `Authorization` header is ignored."),
            Route("GET", "/api/auth/sessions", self.sessions, "List my sessions",
                  "listSessions", tag, responses={200: SessionList}, access=Access.SESSION,
                  links={"endNewest": {"operationId": "deleteSession",
                                       "parameters": {"path.id": "$response.body#/items/0/id"}}}),
            Route("DELETE", "/api/auth/sessions/{id}", self.end_session, "End one of my sessions",
                  "deleteSession", tag, responses={204: None}, access=Access.SESSION,
                  params={"id": UUID_ID}),
            Route("POST", "/api/auth/logout", self.logout, "End this session",
                  "logout", tag, responses={204: None}, access=Access.SESSION, max_body=0),
            Route("POST", "/api/auth/logout-all", self.logout_all, "End all my sessions",
                  "logoutAll", tag, responses={204: None}, access=Access.SESSION, max_body=0),
        ]  # fmt: skip

    # -- accounts and logins ------------------------------------------------------

    async def register(self, req: Request) -> Response:
        if not self._settings.registration_open:
            raise ApiError(403, "registration_closed", "registration is closed")
        await self._limit(
            f"login-ip:{limit_key(req.client)}", self._settings.rate_login_ip, "attempts"
        )
        data: RegisterIn = req.data
        password_hash = await self._passwords.hash(data.password, limit_key(req.client))
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_NEW_USER, data.email, data.display_name)
            if row is None:
                raise Conflict("this e-mail address cannot be used")
            user_id, body = row
            await conn.execute(_NEW_ACCOUNT, user_id, password_hash)
        return Response(201, body.encode(), {"Location": f"/api/users/{user_id}"})

    async def token(self, req: Request) -> Response:
        form: TokenForm = req.data
        if form.grant_type == "refresh_token":
            if not form.refresh_token:
                raise _invalid_grant("refresh_token is required")
            return await self._rotate(req, form.refresh_token)
        if not form.username or not form.password:
            raise _invalid_grant("username and password are required")
        return await self._login(req, form.username, form.password)

    async def refresh(self, req: Request) -> Response:
        data: RefreshIn = req.data
        return await self._rotate(req, data.refresh_token)

    async def _login(self, req: Request, email: str, password: str) -> Response:
        self._require_issuer()
        attempt = await self._logins.begin(email, req.client)
        # Addresses are ASCII (schemas.EMAIL_PATTERN). PostgreSQL's lower() maps some other
        # letters to ASCII ones ("\u0130" to "i") where Python's, which keys the count, does
        # not: such a spelling would be counted apart yet checked against the account. A NUL
        # names no account either: PostgreSQL refuses it (before, a 422 at `$` and a
        # WARNING line for each such login, which anyone without a token could send).
        usable = email.isascii() and "\x00" not in email
        row = await self._pool.fetchrow(_LOGIN, email) if usable else None
        who = limit_key(req.client)
        ok, rehash = await self._passwords.verify(
            row["password_hash"] if row else None, password, who
        )
        if row is None or not ok:
            raise _invalid_grant("wrong e-mail or password")
        await attempt.succeeded()  # only failures count (core/logins.py)
        user_id, role = row["id"], row["role"]
        if rehash:
            await self._pool.execute(_REHASH, user_id, await self._passwords.hash(password, who))
        user_agent = (req.header("user-agent") or "")[:256]
        refresh = new_refresh_token()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                sid = await conn.fetchval(
                    _NEW_SESSION, user_id, self._settings.session_ttl, user_agent, req.client
                )
                await conn.execute(_NEW_REFRESH, refresh_hash(refresh), sid)
                ended = await conn.fetch(_END_OLDEST, user_id, MAX_SESSIONS)
        except asyncpg.ForeignKeyViolationError:  # the account was deleted meanwhile
            raise _invalid_grant("wrong e-mail or password") from None
        if ended:
            await self._revoker.revoke([r[0] for r in ended])
        return self._tokens(user_id, role, sid, refresh, row["display_name"])

    async def _rotate(self, req: Request, token: str) -> Response:
        self._require_issuer()
        # A made-up token is a guess: it counts as a failed login from its address.
        attempt = await self._logins.begin_refresh(req.client)
        digest = refresh_hash(token)
        reused: str | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_FIND_REFRESH, digest)
            if row is not None:
                await attempt.succeeded()
            if row is None or row["revoked"] or row["expired"]:
                raise _invalid_grant("refresh token is not valid")
            sid = row["sid"]
            if row["used"]:
                reused = await conn.fetchval(
                    _REVOKE_ONE, sid, row["user_id"], "refresh_token_reuse"
                )
            else:
                # A refresh is the account's call like any other: without this, it was the
                # one write no limit counted (a row a refresh, kept for the session's life).
                await self._limit(f"rest:{row['user_id']}", self._settings.rate_rest, "requests")
                refresh = new_refresh_token()
                await conn.execute(_USE_REFRESH, digest)
                await conn.execute(_NEW_REFRESH, refresh_hash(refresh), sid)
                await conn.execute(_FORGET_USED, sid, KEPT_USED_REFRESH)
                await conn.execute(_TOUCH, sid)
        if row["used"]:
            if reused is not None:
                await self._revoker.revoke([reused])
            raise _invalid_grant("refresh token was already used: the session is revoked")
        return self._tokens(row["user_id"], row["role"], sid, refresh, row["display_name"])

    async def _limit(self, key: str, rate: Rate | None, what: str) -> None:
        wait = await over_limit(self._limiter, key, rate)
        if wait is not None:
            raise TooManyRequests(wait, what)

    def _tokens(self, user_id: int, role: str, sid: str, refresh: str, name: str) -> Response:
        access = self.issuer.access_token(user_id, role, sid, name=name)
        out = TokenOut(access, "bearer", self.issuer.ttl, refresh, sid)
        return Response(200, _encode(out), {"Cache-Control": "no-store"})

    def _require_issuer(self) -> None:
        # 501, not 503: nothing is down, and a gateway in front (CORE_URL) counts 502-504
        # as the core failing; anyone could open its breaker with this route otherwise.
        if not self.issuer.ready:
            raise ApiError(
                501, "not_implemented", "this deployment verifies tokens but issues none"
            )

    # -- sessions -------------------------------------------------------------------

    async def sessions(self, req: Request) -> Response:
        user_id, sid = _session_caller(req)
        items = await self._pool.fetchval(_LIST, user_id, sid)
        return Response(200, b'{"items":' + items.encode() + b"}")

    async def end_session(self, req: Request) -> Response:
        user_id, _ = _session_caller(req)
        target = uuid_param(req)
        revoked = None
        if target is not None:
            revoked = await self._pool.fetchval(_REVOKE_ONE, target, user_id, "ended")
        if revoked is None:
            raise NotFound("no such session of yours")
        await self._revoker.revoke([revoked])
        return Response(204)

    async def logout(self, req: Request) -> Response:
        user_id, sid = _session_caller(req)
        revoked = await self._pool.fetchval(_REVOKE_ONE, sid, user_id, "logout")
        if revoked is not None:
            await self._revoker.revoke([revoked])
        return Response(204)

    async def logout_all(self, req: Request) -> Response:
        user_id, _ = _session_caller(req)
        rows = await self._pool.fetch(_REVOKE_ALL, user_id, "logout_all")
        await self._revoker.revoke([r[0] for r in rows])
        return Response(204)

    # -- upkeep ----------------------------------------------------------------------

    async def recently_revoked(self, within: float) -> list[str]:
        """Sessions revoked in the last ``within`` seconds (for processes catching up)."""
        return [r[0] for r in await self._pool.fetch(_RECENTLY_REVOKED, within)]

    async def purge(self) -> int:
        """Delete expired sessions, and ended ones whose access tokens have all expired."""
        window = self._settings.access_token_ttl + self._settings.jwt_leeway
        status = await self._pool.execute(_PURGE, window)
        return int(status.rsplit(" ", 1)[-1])


def _session_caller(req: Request) -> tuple[int, str]:
    """(user id, session id) of a caller logged in here; 403 for other tokens."""
    caller = req.caller
    sid = getattr(caller, "sid", None)
    sub = caller.sub if caller is not None else ""
    if sid is None or not (sub.isascii() and sub.isdigit()):
        raise ApiError(403, "no_session", "this token was not issued by a login here")
    return int(sub), sid
