"""FastAPI peer of the REST core's project endpoints, for ``bench/rest.py``.

Written the way a FastAPI developer would: pydantic v2 models, ``Depends`` for
the caller and the pool, an asyncpg pool opened in the lifespan, plain SQL and
models built from the rows. It reads the ``projects`` table made by
``core/migrations``; it never creates it.

    DATABASE_URL=postgresql://127.0.0.1:5432/test DATABASE_SCHEMA=bench_rest JWT_SECRET=... \\
    uvicorn bench.peers.fastapi_projects:app --host 127.0.0.1 --port 8001 \\
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

import asyncpg
import jwt
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, EmailStr, Field, PlainSerializer, model_validator

Status = Literal["draft", "active", "done"]
Tag = Annotated[str, Field(min_length=1, max_length=40)]
Budget = Annotated[
    Decimal,
    Field(ge=0, le=1_000_000_000, max_digits=12, decimal_places=2),
    PlainSerializer(float, return_type=float, when_used="json"),
]

COLUMNS = (
    "id, name, description, owner_email, budget, status, tags, starts_on, ends_on,"
    " milestones, created_at, updated_at, version"
)


class Milestone(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Annotated[str, Field(min_length=1, max_length=200)]
    due: date
    done: bool = False


class ProjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(max_length=5000)] = ""
    owner_email: EmailStr
    budget: Budget
    status: Status = "draft"
    tags: Annotated[list[Tag], Field(max_length=20)] = []
    starts_on: date
    ends_on: date | None = None
    milestones: Annotated[list[Milestone], Field(max_length=50)] = []

    @model_validator(mode="after")
    def ends_after_start(self) -> Self:
        if self.ends_on is not None and self.ends_on < self.starts_on:
            raise ValueError("ends_on must not be before starts_on")
        return self


class Project(ProjectIn):
    id: int
    created_at: datetime
    updated_at: datetime
    version: int


class ProjectPage(BaseModel):
    items: list[Project]
    next_cursor: str | None


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.jwt_secret = os.environ["JWT_SECRET"]
    app.state.pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        server_settings={"search_path": os.environ["DATABASE_SCHEMA"], "timezone": "UTC"},
        init=_init_connection,
    )
    try:
        yield
    finally:
        await app.state.pool.close()


app = FastAPI(title="projects (FastAPI peer)", lifespan=lifespan)
bearer = HTTPBearer()


async def get_pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


async def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]
) -> str:
    try:
        claims = jwt.decode(
            credentials.credentials,
            request.app.state.jwt_secret,
            algorithms=["HS256"],
            options={"require": ["sub"]},
        )
    except jwt.InvalidTokenError:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"}) from None
    sub: str = claims["sub"]
    return sub


PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]
UserDep = Annotated[str, Depends(current_user)]


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise HTTPException(422, "invalid cursor") from None


@app.get("/api/projects")
async def list_projects(
    pool: PoolDep,
    _user: UserDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Status | None = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=40)] = None,
    cursor: str | None = None,
) -> ProjectPage:
    conditions: list[str] = []
    args: list[Any] = []
    if cursor is not None:
        args.append(decode_cursor(cursor))
        conditions.append(f"id > ${len(args)}")
    if status is not None:
        args.append(status)
        conditions.append(f"status = ${len(args)}")
    if tag is not None:
        args.append(tag)
        conditions.append(f"tags @> array[${len(args)}::text]")
    where = f"where {' and '.join(conditions)}" if conditions else ""
    args.append(limit + 1)
    rows = await pool.fetch(
        f"select {COLUMNS} from projects {where} order by id limit ${len(args)}", *args
    )
    items = [Project.model_validate(dict(row)) for row in rows[:limit]]
    next_cursor = encode_cursor(items[-1].id) if len(rows) > limit else None
    return ProjectPage(items=items, next_cursor=next_cursor)


@app.post("/api/projects", status_code=201)
async def create_project(
    project: ProjectIn, response: Response, pool: PoolDep, _user: UserDep
) -> Project:
    row = await pool.fetchrow(
        "insert into projects (name, description, owner_email, budget, status, tags,"
        " starts_on, ends_on, milestones) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        f" returning {COLUMNS}",
        project.name,
        project.description,
        project.owner_email,
        project.budget,
        project.status,
        project.tags,
        project.starts_on,
        project.ends_on,
        [milestone.model_dump(mode="json") for milestone in project.milestones],
    )
    assert row is not None  # insert ... returning always yields the row
    created = Project.model_validate(dict(row))
    response.headers["Location"] = f"/api/projects/{created.id}"
    return created
