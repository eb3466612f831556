"""FastAPI peer written the way FastAPI's tutorials show, for ``bench/rest.py``.

The other peer (``fastapi_projects.py``) checks what our core checks
(e-mail syntax, budget bounds, cross-field dates, extra fields refused) and
builds a model per row. This one is what most FastAPI services look like:
the security tutorial's ``OAuth2PasswordBearer`` and a ``get_current_user``
dependency that decodes the HS256 token with pyjwt on every request
(https://fastapi.tiangolo.com/tutorial/security/oauth2-jwt/), pydantic v2
models with nested milestones and tags and ``response_model`` doing the
output, an asyncpg pool opened in the lifespan, and plain SQL. Like the
tutorial, the current user is built from the token's claims (the tutorial
reads it from an in-memory dict, no database). It reads the ``projects``
table made by ``core/migrations``; it never creates it.

    DATABASE_URL=postgresql://127.0.0.1:5432/test DATABASE_SCHEMA=bench_rest JWT_SECRET=... \\
    uvicorn bench.peers.fastapi_tutorial:app --host 127.0.0.1 --port 8002 \\
        --loop uvloop --http httptools --no-access-log --log-level warning
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated

import asyncpg
import jwt
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from jwt.exceptions import InvalidTokenError
from pydantic import BaseModel

ALGORITHM = "HS256"
COLUMNS = (
    "id, name, description, owner_email, budget, status, tags, starts_on, ends_on,"
    " milestones, created_at, updated_at, version"
)


class User(BaseModel):
    username: str
    role: str | None = None


class Milestone(BaseModel):
    title: str
    due: date
    done: bool = False


class ProjectCreate(BaseModel):
    name: str
    description: str = ""
    owner_email: str
    budget: Decimal
    status: str = "draft"
    tags: list[str] = []
    starts_on: date
    ends_on: date | None = None
    milestones: list[Milestone] = []


class Project(ProjectCreate):
    id: int
    created_at: datetime
    updated_at: datetime
    version: int


class ProjectPage(BaseModel):
    items: list[Project]
    next_cursor: int | None = None


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        server_settings={"search_path": os.environ["DATABASE_SCHEMA"], "timezone": "UTC"},
        init=init_connection,
    )
    yield
    await app.state.pool.close()


SECRET_KEY = os.environ.get("JWT_SECRET", "")
app = FastAPI(lifespan=lifespan)
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")


async def get_current_user(token: Annotated[str, Depends(oauth2_scheme)]) -> User:
    credentials_exception = HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="Could not validate credentials",
        headers={"WWW-Authenticate": "Bearer"},
    )
    try:
        payload = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM])
        username = payload.get("sub")
        if username is None:
            raise credentials_exception
    except InvalidTokenError:
        raise credentials_exception from None
    return User(username=username, role=payload.get("role"))


def get_pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


@app.get("/api/projects", response_model=ProjectPage)
async def read_projects(
    current_user: Annotated[User, Depends(get_current_user)],
    pool: Annotated[asyncpg.Pool, Depends(get_pool)],
    limit: int = 20,
    cursor: int = 0,
) -> dict[str, object]:
    rows = await pool.fetch(
        f"select {COLUMNS} from projects where id > $1 order by id limit $2", cursor, limit + 1
    )
    items = [dict(row) for row in rows[:limit]]
    return {"items": items, "next_cursor": items[-1]["id"] if len(rows) > limit else None}


@app.post("/api/projects", response_model=Project, status_code=status.HTTP_201_CREATED)
async def create_project(
    project: ProjectCreate,
    current_user: Annotated[User, Depends(get_current_user)],
    pool: Annotated[asyncpg.Pool, Depends(get_pool)],
) -> dict[str, object]:
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
    return dict(row)
