"""``/api/users``: the people projects belong to (by e-mail).

E-mail addresses are unique regardless of case (409 otherwise). Users
publish no change events: their addresses are not for every subscriber.
"""

from __future__ import annotations

import asyncpg
from msgspec import UNSET

from core.db import one
from core.errors import NotFound
from core.paging import decode_cursor, page_body
from core.projects import IDEMPOTENCY_KEY
from core.request import Request, Response
from core.routing import Route, int_param
from core.schemas import User, UserIn, UserPage, UserPatch, UserQuery

__all__ = ["Users"]

_LIST = """
select coalesce(json_agg(j order by id) filter (where rn <= $2), '[]')::text,
       max(id) filter (where rn <= $2), count(*)
from (select u.id, user_json(u) as j, row_number() over (order by u.id) as rn
      from users u where u.id > $1 order by u.id limit $2 + 1) page
"""
_GET = "select user_json(u)::text from users u where u.id = $1"
_CREATE = """
insert into users (email, display_name) values ($1, $2)
returning id, user_json(users)::text
"""
_UPDATE = """
update users set email = coalesce($2, email), display_name = coalesce($3, display_name),
       updated_at = now()
where id = $1 returning user_json(users)::text
"""
_DELETE = "delete from users where id = $1 returning id"


def _id(req: Request) -> int:
    return int_param(req, "user")


class Users:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def routes(self) -> list[Route]:
        tag = "users"
        return [
            Route("GET", "/api/users", self.list, "List users", "listUsers", tag,
                  responses={200: UserPage}, query=UserQuery),
            Route("POST", "/api/users", self.create, "Create a user", "createUser", tag,
                  responses={201: User}, body=UserIn, headers=(IDEMPOTENCY_KEY,),
                  errors=(409,), idempotent=True),
            Route("GET", "/api/users/{id}", self.get, "Get a user", "getUser", tag,
                  responses={200: User}, errors=(404,)),
            Route("PATCH", "/api/users/{id}", self.patch, "Update a user", "updateUser", tag,
                  responses={200: User}, body=UserPatch, errors=(404, 409)),
            Route("DELETE", "/api/users/{id}", self.delete, "Delete a user", "deleteUser", tag,
                  responses={204: None}, errors=(404,)),
        ]  # fmt: skip

    async def list(self, req: Request) -> Response:
        q: UserQuery = req.args
        items, last, n = await one(self._pool, _LIST, decode_cursor(q.cursor), q.limit)
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
        body = await self._pool.fetchval(_UPDATE, _id(req), email, name)
        if body is None:
            raise NotFound("no such user")
        return Response(200, body.encode())

    async def delete(self, req: Request) -> Response:
        if await self._pool.fetchval(_DELETE, _id(req)) is None:
            raise NotFound("no such user")
        return Response(204)
