"""``/api/users``: the people projects belong to (by e-mail).

E-mail addresses are unique regardless of case (409 otherwise). Users
publish no change events: their addresses are not for every subscriber.

Access (core/access.py): a user sees and changes only their own row (the
list holds only them; another's id is 404), admins any; only admins create
rows (accounts come from registration, which claims an account-less row).
A changed e-mail takes the user's projects along (their ``owner_email``
follows, with change events). Deleting a user revokes their login sessions
everywhere, so their tokens stop working on REST and their sockets close.
"""

from __future__ import annotations

import asyncpg
from msgspec import UNSET

from core.access import Access, is_admin, user_id
from core.accounts import Revoker
from core.db import one
from core.events import Events
from core.infra.errors import Conflict, NotFound, TooManyRequests
from core.infra.identity import principal
from core.infra.rate import Rate
from core.infra.ratelimit import RateLimiter, over_limit
from core.outbox import with_events
from core.paging import decode_cursor, page_body
from core.projects import IDEMPOTENCY_KEY
from core.request import Request, Response, rest_cost
from core.routing import Route, int_param
from core.schemas import User, UserIn, UserPage, UserPatch, UserQuery

__all__ = ["Users"]

#: $3: only this user (a non-admin's list), or null for everyone.
_LIST = """
select coalesce(json_agg(j order by id) filter (where rn <= $2), '[]')::text,
       max(id) filter (where rn <= $2), count(*)
from (select u.id, user_json(u) as j, row_number() over (order by u.id) as rn
      from users u where u.id > $1 and ($3::bigint is null or u.id = $3)
      order by u.id limit $2 + 1) page
"""
_GET = "select user_json(u)::text from users u where u.id = $1"
_CREATE = """
insert into users (email, display_name) values ($1, $2)
returning id, user_json(users)::text
"""
_OLD_EMAIL = "select email from users where id = $1 for update"
_UPDATE = """
update users set email = coalesce($2, email), display_name = coalesce($3, display_name),
       updated_at = now()
where id = $1 returning user_json(users)::text
"""
#: The projects of a user whose e-mail changed follow them (with their change
#: events, queued in the outbox by the same statement: core/outbox.py).
_MOVE_PROJECTS = """
update projects set owner_email = $2, version = version + 1, updated_at = now()
where lower(owner_email) = lower($1)
returning id, version, project_json(projects)::text as body
"""
_OWNS_PROJECTS = "select exists(select 1 from projects where lower(owner_email) = lower($1))"
#: The projects an e-mail change of user $1 to $2 would move (none if the address is the same).
_MOVING = """
select count(*) from users u join projects p on lower(p.owner_email) = lower(u.email)
where u.id = $1 and lower(u.email) <> lower($2)
"""
_REVOKE_SESSIONS = """
update auth_sessions set revoked_at = now(), revoked_reason = 'account_deleted'
where user_id = $1 and revoked_at is null returning id::text
"""
#: Taken first: a login's new session (its foreign key locks the row FOR KEY SHARE) then
#: either committed before, and is revoked below, or waits and finds no user. Revoking
#: first and deleting after let every login that inserted between the two keep a live
#: session of a deleted account (its access token worked until it expired).
_LOCK_USER = "select id from users where id = $1 for update"
_DELETE = "delete from users where id = $1 returning id"
_TAKEN = "this e-mail address cannot be used"
ITEM = "/api/users/{id}"


def _id(req: Request) -> int:
    return int_param(req, "user")


class Users:
    def __init__(
        self,
        pool: asyncpg.Pool,
        events: Events,
        revoker: Revoker,
        limiter: RateLimiter | None = None,
        rate: Rate | None = None,
    ) -> None:
        """``limiter`` and ``rate`` (`RATE_REST`): what an e-mail change spends (`patch`)."""
        self._pool = pool
        self._limiter = limiter
        self._rate = rate
        self._events = events
        self._revoker = revoker
        self._move_projects = with_events(
            _MOVE_PROJECTS, "projects", "updated", queue=events.queues
        )

    def routes(self) -> list[Route]:
        tag = "users"
        return [
            Route("GET", "/api/users", self.list, "List users (yourself, unless admin)",
                  "listUsers", tag, responses={200: UserPage}, query=UserQuery,
                  access=Access.SELF),
            Route("POST", "/api/users", self.create, "Create a user (admin)", "createUser", tag,
                  responses={201: User}, body=UserIn, headers=(IDEMPOTENCY_KEY,),
                  errors=("conflict",), idempotent=True, access=Access.ADMIN, location=ITEM),
            Route("GET", ITEM, self.get, "Get a user (yourself, unless admin)",
                  "getUser", tag, responses={200: User}, access=Access.SELF),
            Route("PATCH", ITEM, self.patch, "Update a user (yourself, unless admin)",
                  "updateUser", tag, responses={200: User}, body=UserPatch,
                  errors=("conflict",), access=Access.SELF),
            Route("DELETE", ITEM, self.delete,
                  "Delete a user and end their sessions (yourself, unless admin)", "deleteUser",
                  tag, responses={204: None}, access=Access.SELF),
        ]  # fmt: skip

    async def list(self, req: Request) -> Response:
        q: UserQuery = req.args
        only = None if is_admin(req.caller) else (user_id(req.caller) or 0)
        items, last, n = await one(self._pool, _LIST, decode_cursor(q.cursor), q.limit, only)
        return Response(200, page_body(items, last if n > q.limit else None))

    async def get(self, req: Request) -> Response:
        body = await self._pool.fetchval(_GET, _id(req))
        if body is None:
            raise NotFound("no such user")
        return Response(200, body.encode())

    async def create(self, req: Request) -> Response:
        data: UserIn = req.data
        id, body = await one(self._pool, _CREATE, data.email, data.display_name)
        return Response(201, body.encode(), {"Location": f"/api/users/{id}"})

    async def patch(self, req: Request) -> Response:
        data: UserPatch = req.data
        email = None if data.email is UNSET else data.email
        name = None if data.display_name is UNSET else data.display_name
        id = _id(req)
        if email is not None:
            await self._spend_moves(req, id, email)
        moved: list[asyncpg.Record] = []
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchval(_OLD_EMAIL, id)
            if old is None:
                raise NotFound("no such user")
            try:
                body = await conn.fetchval(_UPDATE, id, email, name)
            except asyncpg.UniqueViolationError:
                # Generic on purpose: whose the address is stays unsaid.
                raise Conflict(_TAKEN) from None
            if email is not None and email.lower() != old.lower():
                if not is_admin(req.caller) and await conn.fetchval(_OWNS_PROJECTS, email):
                    # Projects name that address (a deleted account's, or an owner an
                    # admin recorded): only an admin hands them to someone.
                    raise Conflict(_TAKEN)
                moved = await conn.fetch(self._move_projects, old, email)
        for project, version, project_body, event, call in moved:
            await self._events.changed(
                "projects", "updated", project, version, project_body.encode(), event, call
            )
        return Response(200, body.encode())

    async def _spend_moves(self, req: Request, id: int, email: str) -> None:
        """Count each project an e-mail change moves as a request of the caller's
        (`RATE_REST`): each move is a write and two change events, as a PATCH of the
        project is. Before, one PATCH of one's own address moved up to
        `MAX_PROJECTS_PER_USER` projects: 10 such requests pushed 10,000 events (54 MB)
        to every subscriber of ``projects``. 429 (nothing changed) when over.

        The request itself has counted already (`core.service`, by its size): the moves
        count at most the rest of the allowance, or a change moving as many projects as
        ``RATE_REST`` allows was refused for ever (each retry counted itself first); and
        the wait said covers the retry's own count too."""
        rate = self._rate
        if self._limiter is None or rate is None or req.caller is None:
            return
        counted = rest_cost(req)  # as `core.service` counted the request
        room = rate.limit - counted
        if room < 1:
            return  # an allowance of one request a period: the request is all it spends
        moving = await self._pool.fetchval(_MOVING, id, email)
        if moving:
            key = f"rest:{principal(req.caller)}"
            wait = await over_limit(self._limiter, key, rate, min(moving, room))
            if wait is not None:
                raise TooManyRequests(wait + counted * rate.period / rate.limit)

    async def delete(self, req: Request) -> Response:
        id = _id(req)
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_LOCK_USER, id) is None:
                raise NotFound("no such user")
            sids = [r[0] for r in await conn.fetch(_REVOKE_SESSIONS, id)]
            await conn.execute(_DELETE, id)
        await self._revoker.revoke(sids)
        return Response(204)
