"""Object-level authorization: who may do what, on every route, over HTTP and ``rpc``.

The matrix runs every route of the core's route table as six callers: no
token, the owner of the object, another ordinary user, an admin, an API key
with ``rest`` and one without. A route added without a row here fails
`test_every_route_has_a_row`; a row that disagrees with the server fails
its route's test. docs/security.md (## Authorization) is the same table.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from core.service import CoreUnavailable
from tests.harness import ApiClient, running_gateway, ws_client
from tests.test_accounts import login, register
from tests.test_core_rest import project

ROLES = ("anonymous", "owner", "other", "admin", "key_rest", "key")

#: operation id -> status per role, in ROLES order.
EXPECTED: dict[str, tuple[int, ...]] = {
    "register": (201, 201, 201, 201, 201, 201),
    "token": (200, 200, 200, 200, 200, 200),
    "refresh": (200, 200, 200, 200, 200, 200),
    "listSessions": (401, 200, 200, 200, 403, 403),
    "deleteSession": (401, 204, 404, 404, 403, 403),
    "logout": (401, 204, 204, 204, 403, 403),
    "logoutAll": (401, 204, 204, 204, 403, 403),
    "createApiKey": (401, 403, 403, 201, 403, 403),
    "listApiKeys": (401, 403, 403, 200, 403, 403),
    "revokeApiKey": (401, 403, 403, 204, 403, 403),
    "listProjects": (401, 200, 200, 200, 200, 403),
    "createProject": (401, 201, 403, 201, 201, 403),
    "getProject": (401, 200, 200, 200, 200, 403),
    "replaceProject": (401, 200, 403, 200, 200, 403),
    "updateProject": (401, 200, 403, 200, 200, 403),
    "deleteProject": (401, 204, 403, 204, 204, 403),
    "listUsers": (401, 200, 200, 200, 403, 403),
    "createUser": (401, 403, 403, 201, 403, 403),
    "getUser": (401, 200, 404, 200, 403, 403),
    "updateUser": (401, 200, 404, 200, 403, 403),
    "deleteUser": (401, 204, 404, 204, 403, 403),
}

ROUTES = CoreUnavailable("the table only").routes
_serial = itertools.count(1)


def test_every_route_has_a_row():
    assert {r.operation_id for r in ROUTES} == set(EXPECTED)


@dataclass
class Person:
    id: int
    email: str
    tokens: dict[str, Any]

    @property
    def token(self) -> str:
        return self.tokens["access_token"]


async def new_person(gw, clean_db, role: str = "user") -> Person:
    n = next(_serial)
    who = {"email": f"p{n}@example.com", "display_name": f"P{n}", "password": "long enough pw"}
    anon = ApiClient(gw.port, None)
    try:
        user = await register(anon, who)
        if role == "admin":  # what `python -m core promote` does
            conn = await asyncpg.connect(clean_db["database_url"])
            try:
                await conn.execute(
                    f'update "{clean_db["database_schema"]}".accounts set role = $2 '
                    "where user_id = $1",
                    user["id"],
                    role,
                )
            finally:
                await conn.close()
        status, tokens = await login(anon, who["email"], who["password"])
        assert status == 200, tokens
    finally:
        anon.close()
    return Person(user["id"], who["email"], tokens)


@dataclass
class World:
    gw: Any
    clean_db: dict[str, str]
    admin: Person
    other: Person
    keys: dict[str, str]  # role -> API key
    victim_keys: list[str]  # ids of keys to revoke, one per caller

    async def owner_with_things(self) -> tuple[Person, int, str]:
        """A fresh owner, a project of theirs, and a key an admin may revoke."""
        owner = await new_person(self.gw, self.clean_db)
        async with self.client(owner.token) as api:
            status, _, body = await api.call(
                "POST", "/api/projects", project(owner_email=owner.email)
            )
            assert status == 201, body
        return owner, body["id"], self.victim_keys.pop()

    def client(self, token: str | None) -> _Client:
        return _Client(self.gw.port, token)


class _Client:
    def __init__(self, port: int, token: str | None) -> None:
        self.api = ApiClient(port, token)

    async def __aenter__(self) -> ApiClient:
        return self.api

    async def __aexit__(self, *exc: object) -> None:
        self.api.close()


async def make_world(gw, clean_db) -> World:
    admin = await new_person(gw, clean_db, "admin")
    other = await new_person(gw, clean_db)
    keys = {}
    api = ApiClient(gw.port, admin.token)
    try:
        for role, rest in (("key_rest", True), ("key", False)):
            status, _, key = await api.call("POST", "/api/keys", {"name": role, "rest": rest})
            assert status == 201, key
            keys[role] = key["key"]
        victims = []
        for _ in ROLES:
            status, _, key = await api.call("POST", "/api/keys", {"name": "victim"})
            assert status == 201, key
            victims.append(key["id"])
    finally:
        api.close()
    return World(gw, clean_db, admin, other, keys, victims)


Call = tuple[str, str, dict[str, Any]]
Builder = Callable[[Person, int, str, str], Call]


def _fresh_user() -> dict[str, str]:
    n = next(_serial)
    return {"email": f"new{n}@example.com", "display_name": "New", "password": "long enough pw"}


def _form(body: dict[str, str]) -> dict[str, Any]:
    return {
        "raw": urlencode(body).encode(),
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
    }


#: operation id -> the request, given (owner, their project, a key id, the owner's password)
REQUESTS: dict[str, Builder] = {
    "register": lambda o, p, k, pw: ("POST", "/api/auth/register", {"body": _fresh_user()}),
    "token": lambda o, p, k, pw: ("POST", "/api/auth/token", _form(
        {"grant_type": "password", "username": o.email, "password": pw})),
    "refresh": lambda o, p, k, pw: ("POST", "/api/auth/refresh", {
        "body": {"refresh_token": o.tokens["refresh_token"]}}),
    "listSessions": lambda o, p, k, pw: ("GET", "/api/auth/sessions", {}),
    "deleteSession": lambda o, p, k, pw: ("DELETE", f"/api/auth/sessions/{o.tokens['session_id']}", {}),
    "logout": lambda o, p, k, pw: ("POST", "/api/auth/logout", {}),
    "logoutAll": lambda o, p, k, pw: ("POST", "/api/auth/logout-all", {}),
    "createApiKey": lambda o, p, k, pw: ("POST", "/api/keys", {"body": {"name": "x"}}),
    "listApiKeys": lambda o, p, k, pw: ("GET", "/api/keys", {}),
    "revokeApiKey": lambda o, p, k, pw: ("DELETE", f"/api/keys/{k}", {}),
    "listProjects": lambda o, p, k, pw: ("GET", "/api/projects", {}),
    "createProject": lambda o, p, k, pw: ("POST", "/api/projects", {
        "body": project(owner_email=o.email)}),
    "getProject": lambda o, p, k, pw: ("GET", f"/api/projects/{p}", {}),
    "replaceProject": lambda o, p, k, pw: ("PUT", f"/api/projects/{p}", {
        "body": project(name="Replaced", owner_email=o.email)}),
    "updateProject": lambda o, p, k, pw: ("PATCH", f"/api/projects/{p}", {"body": {"name": "Patched"}}),
    "deleteProject": lambda o, p, k, pw: ("DELETE", f"/api/projects/{p}", {}),
    "listUsers": lambda o, p, k, pw: ("GET", "/api/users", {}),
    "createUser": lambda o, p, k, pw: ("POST", "/api/users", {
        "body": {"email": f"made{next(_serial)}@example.com", "display_name": "Made"}}),
    "getUser": lambda o, p, k, pw: ("GET", f"/api/users/{o.id}", {}),
    "updateUser": lambda o, p, k, pw: ("PATCH", f"/api/users/{o.id}", {"body": {"display_name": "Hacked"}}),
    "deleteUser": lambda o, p, k, pw: ("DELETE", f"/api/users/{o.id}", {}),
}  # fmt: skip


def _token(world: World, role: str, owner: Person) -> str | None:
    return {
        "anonymous": None,
        "owner": owner.token,
        "other": world.other.token,
        "admin": world.admin.token,
        "key_rest": world.keys["key_rest"],
        "key": world.keys["key"],
    }[role]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.operation_id)
async def test_access_matrix_over_http(route, clean_db):
    async with running_gateway(**clean_db, rate_login_ip=None, rate_login_account=None) as gw:
        world = await make_world(gw, clean_db)
        got = []
        for role in ROLES:
            # Fresh objects for each caller: a refused write must leave them as they were.
            owner, project_id, key_id = await world.owner_with_things()
            method, path, kw = REQUESTS[route.operation_id](
                owner, project_id, key_id, "long enough pw"
            )
            async with world.client(_token(world, role, owner)) as api:
                status, _, body = await api.call(method, path, **kw)
                if status >= 400:
                    assert set(body) == {"error"} and body["error"]["status"] == status
                if status in (403, 404) and route.path.startswith("/api/projects/{id}"):
                    owner_view = ApiClient(gw.port, owner.token)
                    try:
                        _, _, after = await owner_view.call("GET", f"/api/projects/{project_id}")
                    finally:
                        owner_view.close()
                    assert after["version"] == 1, f"{role} changed the project"
            got.append(status)
        assert tuple(got) == EXPECTED[route.operation_id], dict(zip(ROLES, got, strict=True))


async def test_the_same_rules_hold_over_rpc(clean_db):
    async with running_gateway(**clean_db, rate_login_ip=None) as gw:
        world = await make_world(gw, clean_db)
        owner, project_id, _ = await world.owner_with_things()
        async with ws_client(gw.port, world.other.token) as c:

            async def rpc(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                fields: dict[str, Any] = {"method": method, "path": path}
                if body is not None:
                    fields["body"] = body
                reply = await c.request("rpc", **fields)
                return reply["status"], reply.get("body")

            status, body = await rpc(
                "PATCH", f"/api/projects/{project_id}", {"owner_email": world.other.email}
            )
            assert status == 403 and body["error"]["code"] == "forbidden"
            assert (
                await rpc(
                    "PUT", f"/api/projects/{project_id}", project(owner_email=world.other.email)
                )
            )[0] == 403
            assert (await rpc("DELETE", f"/api/projects/{project_id}"))[0] == 403
            assert (await rpc("POST", "/api/projects", project(owner_email=owner.email)))[0] == 403
            assert (await rpc("GET", f"/api/projects/{project_id}"))[
                0
            ] == 200  # the board is shared
            for method in ("GET", "DELETE"):
                status, body = await rpc(method, f"/api/users/{owner.id}")
                assert status == 404 and body["error"]["message"] == f"no user {owner.id}"
            assert (await rpc("PATCH", f"/api/users/{owner.id}", {"email": "x@example.com"}))[
                0
            ] == 404
            status, page = await rpc("GET", "/api/users")
            assert [u["id"] for u in page["items"]] == [world.other.id]
            assert (
                await rpc("POST", "/api/users", {"email": "pre@example.com", "display_name": "P"})
            )[0] == 403
        async with ws_client(gw.port, owner.token) as c:
            reply = await c.request("rpc", method="PATCH", path=f"/api/projects/{project_id}",
                                    body={"name": "Mine"})  # fmt: skip
            assert reply["status"] == 200 and reply["body"]["version"] == 2
