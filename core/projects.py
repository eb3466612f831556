"""``/api/projects``: the benchmark resource.

Every caller with a token reads every project (the board is shared); only
the owner (``owner_email`` is their e-mail), an admin or an API key with
``rest`` writes one (core/access.py, rule `Access.OWNER`).

Reads hand back the JSON PostgreSQL builds (``project_json``), so the hot
path decodes no rows in Python. Lists asked for at once share their query
(`Projects.list`). Writes are validated by `ProjectIn`, and
each successful one publishes a change event (core/events.py), stored in
the outbox by the write's own statement (core/outbox.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any, NoReturn

import asyncpg
import msgspec
from msgspec import UNSET

from core.access import Access, privileged, require_creator, require_owner
from core.batch import Batcher
from core.db import Queryable, one
from core.events import ChangeKind, Events
from core.idempotency import IDEMPOTENCY_KEY_SCHEMA
from core.infra.coalesce import Coalescer
from core.infra.errors import NotFound, PreconditionFailed, ValidationFailed
from core.outbox import with_events
from core.paging import ANY, IF_MATCH_SCHEMA, decode_cursor, etag, if_match, none_match, page_body
from core.request import Request, Response
from core.routing import HeaderParam, Route, int_param
from core.schemas import (
    Milestone,
    Project,
    ProjectIn,
    ProjectPage,
    ProjectPatch,
    ProjectQuery,
    Status,
)

__all__ = ["Projects"]

_JSON = "application/json"
#: What a list asks for: after (the cursor's id), status, tag, limit.
_Page = tuple[int, str | None, str | None, int]
#: A request's `Amount` is written as the plain Decimal it is.
_encode_json = msgspec.json.Encoder(decimal_format="number", enc_hook=Decimal).encode


class _Stored(msgspec.Struct, kw_only=True):
    """A stored project as a merge patch reads it: its fields' types, not the rules a
    request is held to. A row written under earlier rules (an address the first release
    took, ``ada@exa_mple.com``) stays patchable; before, every PATCH of it was a 500."""

    name: str
    description: str
    owner_email: str
    budget: Decimal
    status: Status
    tags: list[str]
    starts_on: dt.date
    ends_on: dt.date | None
    milestones: list[Milestone]


_stored = msgspec.json.Decoder(_Stored)

ITEM = "/api/projects/{id}"
IF_MATCH = HeaderParam(
    "If-Match",
    "Only write if the project's ETag (its version) is this one (412 if not), or if it "
    "exists at all (`*`). A list of ETags is not taken.",
    IF_MATCH_SCHEMA,
)
IF_NONE_MATCH = HeaderParam(
    "If-None-Match",
    "Answer 304 if one of these ETags is current.",
    {"type": "string"},
)
IDEMPOTENCY_KEY = HeaderParam(
    "Idempotency-Key",
    "A retry with the same key, path and body replays the first response; the same key with "
    "another request is 422 `idempotency_key_reused`. Printable ASCII, 1 to 255 characters.",
    IDEMPOTENCY_KEY_SCHEMA,
)

_LIST = """
select coalesce(json_agg(j order by id) filter (where rn <= $4), '[]')::text,
       max(id) filter (where rn <= $4), count(*)
from (select p.id, project_json(p) as j, row_number() over (order by p.id) as rn
      from projects p
      where p.id > $1
        and ($2::text is null or p.status = $2)
        and ($3::text is null or p.tags @> array[$3::text])
      order by p.id
      limit $4 + 1) page
"""
#: The projects a filtered page examines at most, after its cursor.
SCAN = 5000
#: A filtered page: the first `SCAN` projects after the cursor, those that match. Without
#: the window PostgreSQL walked the ids until it had a page, and a tag or status that
#: matched nothing walked the whole table (300,000 projects: ~100 ms a request). The
#: last column is the id of the `SCAN`th project (null if there are fewer): the next
#: cursor when the window held no more than a page.
_LIST_FILTERED = """
select coalesce(json_agg(j order by id) filter (where rn <= $4), '[]')::text,
       max(id) filter (where rn <= $4), count(*),
       case when count(*) <= $4 then
           (select id from projects where id > $1 order by id offset $5 - 1 limit 1) end
from (select w.id, project_json(w) as j, row_number() over (order by w.id) as rn
      from (select * from projects p where p.id > $1 order by p.id limit $5) w
      where ($2::text is null or w.status = $2)
        and ($3::text is null or w.tags @> array[$3::text])
      order by w.id
      limit $4 + 1) page
"""
_GET = "select project_json(p)::text, p.version from projects p where p.id = $1"
_COLUMNS = "name, description, owner_email, budget, status, tags, starts_on, ends_on, milestones"
#: Many creations in one statement (core/batch.py): rows are inserted in the
#: order given, so ids ascend in that order and the result (sorted by id, by
#: `core.outbox.with_events`) matches it.
_CREATE_MANY = f"""
insert into projects ({_COLUMNS})
select {_COLUMNS}
from json_populate_recordset(null::projects, $1::json) with ordinality
order by ordinality
returning id, version, project_json(projects)::text as body
"""
#: Dates go as ISO text: asyncpg writes date.min and date.max as -infinity and infinity.
_REPLACE = """
update projects set name = $2, description = $3, owner_email = $4, budget = $5, status = $6,
       tags = $7, starts_on = $8::text::date, ends_on = $9::text::date, milestones = $10::jsonb,
       version = version + 1, updated_at = now()
where id = $1 and ($11::integer is null or version = $11)
returning id, version, project_json(projects)::text as body
"""
_DELETE = """
delete from projects where id = $1 and ($2::integer is null or version = $2)
returning id, version, null::text as body
"""
_VERSION = "select version from projects where id = $1"
_LOCK = "select project_json(p)::text, p.version from projects p where p.id = $1 for update"


def _values(p: ProjectIn) -> tuple[Any, ...]:
    milestones = _encode_json(p.milestones).decode()
    ends_on = None if p.ends_on is None else p.ends_on.isoformat()
    return (p.name, p.description, p.owner_email, p.budget, p.status, p.tags,
            p.starts_on.isoformat(), ends_on, milestones)  # fmt: skip


def _id(req: Request) -> int:
    return int_param(req, "project")


def _expected(req: Request) -> int | None:
    """The version If-Match demands (None: any, including no header)."""
    version = if_match(req.header("if-match"))
    return None if version == ANY else version


class Projects:
    def __init__(self, pool: asyncpg.Pool, events: Events, max_per_user: int = 0) -> None:
        """``max_per_user``: projects a user may own (`MAX_PROJECTS_PER_USER`; 0: no limit)."""
        self._pool = pool
        self._events = events
        self._max_per_user = max_per_user
        # Each write returns id, version, body, and its outbox row and call id (or nulls).
        queue = events.queues
        self._create = with_events(_CREATE_MANY, "projects", "created", queue=queue)
        self._replace = with_events(_REPLACE, "projects", "updated", queue=queue)
        self._delete = with_events(_DELETE, "projects", "deleted", queue=queue)
        self._creations = Batcher(pool, self._create)
        self._pages: Coalescer[_Page, bytes] = Coalescer(self._read_pages, what="reads")

    def routes(self) -> list[Route]:
        tag = "projects"
        return [
            Route("GET", "/api/projects", self.list, "List projects", "listProjects", tag,
                  responses={200: ProjectPage}, query=ProjectQuery, access=Access.READ),
            Route("POST", "/api/projects", self.create, "Create a project", "createProject", tag,
                  responses={201: Project}, body=ProjectIn, headers=(IDEMPOTENCY_KEY,),
                  idempotent=True, access=Access.OWNER, location=ITEM, etag=True,
                  errors=("limit_reached",)),
            Route("GET", ITEM, self.get, "Get a project", "getProject", tag,
                  responses={200: Project, 304: None}, headers=(IF_NONE_MATCH,),
                  access=Access.READ, etag=True),
            Route("PUT", ITEM, self.replace, "Replace a project", "replaceProject", tag,
                  responses={200: Project}, body=ProjectIn, headers=(IF_MATCH,),
                  access=Access.OWNER, etag=True),
            Route("PATCH", ITEM, self.patch, "Update a project (merge patch)", "updateProject",
                  tag, responses={200: Project}, body=ProjectPatch, headers=(IF_MATCH,),
                  access=Access.OWNER, etag=True),
            Route("DELETE", ITEM, self.delete, "Delete a project", "deleteProject", tag,
                  responses={204: None}, headers=(IF_MATCH,), access=Access.OWNER),
        ]  # fmt: skip

    async def list(self, req: Request) -> Response:
        """A page of projects; every caller reads the same board (`Access.READ`).

        Requests for the same page share one query, but only one sent after
        each of them arrived (`core.infra.coalesce.Coalescer`: a request that
        comes while 4 queries run waits for the next one), so an answer holds
        every write committed before its request came: a client that was
        answered 201 and then lists sees its project.
        """
        q: ProjectQuery = req.args
        after = decode_cursor(q.cursor)
        status = None if q.status is UNSET else q.status
        tag = None if q.tag is UNSET else q.tag
        return Response(200, await self._pages.submit((after, status, tag, q.limit)))

    async def _read_pages(self, pages: Sequence[_Page]) -> Sequence[bytes | BaseException]:
        """Each page's body: one query per distinct page, all at once."""
        distinct = list(dict.fromkeys(pages))
        bodies = await asyncio.gather(*map(self._read_page, distinct), return_exceptions=True)
        read = dict(zip(distinct, bodies, strict=True))
        return [read[page] for page in pages]

    async def _read_page(self, page: _Page) -> bytes:
        _, status, tag, limit = page
        if status is None and tag is None:
            items, last, n = await one(self._pool, _LIST, *page)
            return page_body(items, last if n > limit else None)
        items, last, n, scanned = await one(self._pool, _LIST_FILTERED, *page, SCAN)
        return page_body(items, last if n > limit else scanned)

    async def get(self, req: Request) -> Response:
        row = await self._pool.fetchrow(_GET, _id(req))
        if row is None:
            raise NotFound("no such project")
        body, version = row
        headers = {"ETag": etag(version)}
        if none_match(req.header("if-none-match"), version):
            return Response(304, None, headers)
        return Response(200, body.encode(), headers)

    async def create(self, req: Request) -> Response:
        # (Without a limit, one account filled the shared table and Redis's history at
        # its RATE_REST: 2,382 projects, 53 MB of table and 246 MB of history a minute.)
        await require_creator(self._pool, req.caller, req.data.owner_email, self._max_per_user)
        row = await self._creations.submit(_encode_json(req.data))
        return await self._written("created", row, 201)

    async def replace(self, req: Request) -> Response:
        id = _id(req)
        async with self._writing(req, id, req.data.owner_email) as conn:
            row = await conn.fetchrow(self._replace, id, *_values(req.data), _expected(req))
            if row is None:
                await _missing_or_stale(conn, id)
        return await self._written("updated", row)

    async def patch(self, req: Request) -> Response:
        id = _id(req)
        patch: ProjectPatch = req.data
        expected = _expected(req)
        async with self._pool.acquire() as conn, conn.transaction():
            owner = None if patch.owner_email is UNSET else patch.owner_email
            await require_owner(conn, req.caller, id, owner)
            row = await conn.fetchrow(_LOCK, id)
            if row is None:
                raise NotFound("no such project")
            current_json, version = row
            if expected is not None and expected != version:
                raise PreconditionFailed()
            merged = _merge(_stored.decode(current_json), patch)
            row = await one(conn, self._replace, id, *_values(merged), None)
        return await self._written("updated", row)

    async def delete(self, req: Request) -> Response:
        id = _id(req)
        async with self._writing(req, id, None) as conn:
            row = await conn.fetchrow(self._delete, id, _expected(req))
            if row is None:
                await _missing_or_stale(conn, id)
        _, version, _, event, call = row
        await self._events.changed("projects", "deleted", id, version, None, event, call)
        return Response(204)

    @contextlib.asynccontextmanager
    async def _writing(
        self, req: Request, id: int, new_owner: str | None
    ) -> AsyncIterator[Queryable]:
        """Where to write project ``id``: for a user, a transaction that holds
        the row locked once `require_owner` let them (admins need neither)."""
        if privileged(req.caller):
            yield self._pool
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await require_owner(conn, req.caller, id, new_owner)
            yield conn

    async def _written(self, kind: ChangeKind, row: asyncpg.Record, status: int = 200) -> Response:
        """The answer to a write that returned ``row`` (see `core.outbox.with_events`), its event
        published."""
        id, version, body, event, call = row
        data = body.encode()
        await self._events.changed("projects", kind, id, version, data, event, call)
        headers = {"ETag": etag(version)}
        if status == 201:
            headers["Location"] = f"/api/projects/{id}"
        return Response(status, data, headers)


_WRITABLE = tuple(f.name for f in msgspec.structs.fields(ProjectIn))


async def _missing_or_stale(db: Queryable, id: int) -> NoReturn:
    """Why a write of project ``id`` matched no row: 404, or 412 for a stale ``If-Match``.

    Asked of ``db``, the connection the write holds (with the row locked), never of the
    pool: a second connection asked for while holding one is a deadlock PostgreSQL cannot
    see, once every connection is held by a write waiting for the lock (a user's burst of
    stale writes to one project stalled every request for ``DB_COMMAND_TIMEOUT``).
    """
    if await db.fetchval(_VERSION, id) is None:
        raise NotFound("no such project")
    raise PreconditionFailed()


def _merge(current: _Stored, patch: ProjectPatch) -> ProjectIn:
    """The project after a merge patch; 422 if the whole breaks a rule (dates).

    Each patched field was validated when the body was decoded, and stored
    values were valid when written, so only the cross-field rules remain.
    """
    values = {name: getattr(current, name) for name in _WRITABLE}
    for name in _WRITABLE:
        value = getattr(patch, name)
        if value is not UNSET:
            values[name] = value
    merged = ProjectIn(**values)
    problems = ProjectIn.problems(lambda name: getattr(merged, name))
    if problems:
        raise ValidationFailed(problems)
    return merged
