"""The core on Lambda answers as the standalone core does over HTTP.

Each check feeds a real-shaped event (tests/fixtures/lambda: an HTTP API 2.0
event, a function URL event, a REST API proxy event) to
`core.lambda_handler.handler` and makes the same request over HTTP to a
standalone core (`CoreServer`, on its own thread and loop) configured from
the same environment and database schema, then compares status, JSON body
and the headers that carry meaning.

The tests are synchronous: the handler runs its container's own loop, as
Lambda calls it, and no loop runs in the test's thread.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import http.client
import importlib
import json
import logging
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
import yaml

from core import lambda_handler
from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.server import CoreServer
from core.service import Core
from tests.harness import unique_prefix
from tests.servers import UNIT, free_port, run_in_thread

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "lambda"
TEMPLATE = ROOT / "deploy" / "lambda" / "template.yaml"
KINDS = ("http_api_v2", "function_url", "rest_api_v1")
SECRET = "lambda-secret-" + "0123456789abcdef" * 4
ORIGIN = "https://app.example.com"

#: Headers whose values carry meaning and must match between the transports.
KEY_HEADERS = (
    "content-type",
    "etag",
    "location",
    "retry-after",
    "www-authenticate",
    "allow",
    "idempotent-replayed",
    "access-control-allow-origin",
    "access-control-expose-headers",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "vary",
)

PROJECT = {
    "name": "Apollo",
    "owner_email": "ada@example.com",
    "budget": 12500.5,
    "starts_on": "2026-01-01",
    "tags": ["space", "moon"],
}
GENERATED = ("id", "created_at", "updated_at")


# -- the two transports ---------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: Any  # decoded JSON, or None for an empty body

    def key_headers(self, *, location_id: bool = True) -> dict[str, str | None]:
        out = {h: self.headers.get(h) for h in KEY_HEADERS}
        if not location_id and out["location"] is not None:
            out["location"] = out["location"].rsplit("/", 1)[0] + "/{id}"
        return out


class CoreThread:
    """A standalone core (`python -m core`'s server) on a private thread and loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="core-http", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            server = await CoreServer.start(self.settings)
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self.port = server.port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()

    def __enter__(self) -> CoreThread:
        self._thread.start()
        if not self._ready.wait(30 * UNIT):
            raise TimeoutError("the standalone core did not start")
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30 * UNIT)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10 * UNIT)
        try:
            target = path + ("?" + urlencode(query) if query else "")
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            names = {k.lower(): v for k, v in resp.getheaders()}
            return Answer(resp.status, names, json.loads(raw) if raw else None)
        finally:
            conn.close()


def make_event(
    kind: str,
    method: str,
    path: str,
    *,
    query: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    b64: bool = False,
) -> dict[str, Any]:
    """The fixture of ``kind`` with this request in it, as the service would fill it."""
    event: dict[str, Any] = json.loads((FIXTURES / f"{kind}.json").read_text())
    query = query or []
    headers = headers or {}
    text = None
    if body is not None:
        text = base64.b64encode(body).decode() if b64 else body.decode()
    if kind == "rest_api_v1":
        event["httpMethod"] = event["requestContext"]["httpMethod"] = method
        event["path"] = path
        event["requestContext"]["path"] = f"/{event['requestContext']['stage']}{path}"
        event["pathParameters"] = {"proxy": path.lstrip("/")}
        for name, value in headers.items():
            event["headers"][name] = value
            event["multiValueHeaders"][name] = [value]
        if query:
            multi: dict[str, list[str]] = {}
            for k, v in query:
                multi.setdefault(k, []).append(v)
            event["multiValueQueryStringParameters"] = multi
            event["queryStringParameters"] = {k: vs[-1] for k, vs in multi.items()}
    else:
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["rawQueryString"] = urlencode(query)
        joined: dict[str, list[str]] = {}
        for k, v in query:
            joined.setdefault(k, []).append(v)
        event["queryStringParameters"] = {k: ",".join(vs) for k, vs in joined.items()}
        event["headers"].update({k.lower(): v for k, v in headers.items()})
        event["headers"]["content-length"] = str(len(body or b""))
    event["body"] = text
    event["isBase64Encoded"] = b64
    return event


def invoke(event: Any) -> dict[str, Any]:
    reply = lambda_handler.handler(event, None)
    assert set(reply) >= {"statusCode", "headers", "body", "isBase64Encoded"}, reply
    assert reply["isBase64Encoded"] is False
    assert isinstance(reply["body"], str)
    return reply


def as_answer(reply: dict[str, Any]) -> Answer:
    headers = {k.lower(): v for k, v in reply["headers"].items()}
    assert "content-length" not in headers and "date" not in headers  # the service's own
    if "multiValueHeaders" in reply:  # 1.0: both maps agree
        assert {k: vs[-1] for k, vs in reply["multiValueHeaders"].items()} == reply["headers"]
    return Answer(
        reply["statusCode"], headers, json.loads(reply["body"]) if reply["body"] else None
    )


def without_generated(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: without_generated(v) for k, v in body.items() if k not in GENERATED}
    if isinstance(body, list):
        return [without_generated(v) for v in body]
    return body


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(database_url: str, core_schema: str) -> Iterator[dict[str, str]]:
    """The environment both transports are configured from (`Settings.from_env`)."""
    values = {
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": core_schema,
        "JWT_SECRET": SECRET,
        "CORS_ORIGINS": ORIGIN,
        # argon2id at its production cost takes ~0.2 s a hash; tests need no such cost.
        "PASSWORD_TIME_COST": "1",
        "PASSWORD_MEMORY_KIB": "8192",
        "HOST": "127.0.0.1",
        "PORT": "0",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REDIS_URL", raising=False)  # events stay local: no broker to share
        for name, value in values.items():
            mp.setenv(name, value)
        try:
            yield values
        finally:
            lambda_handler.shutdown()


@pytest.fixture(scope="module")
def core_http(env: dict[str, str]) -> Iterator[CoreThread]:
    with CoreThread(Settings.from_env()) as server:
        yield server


@pytest.fixture
def token(env: dict[str, str]) -> str:
    return mint_token(Settings.from_env(), "alice", [], extra={"role": "admin"})


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> None:
    if "env" not in request.fixturenames:
        return
    env = request.getfixturevalue("env")

    async def truncate() -> None:
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            schema = env["DATABASE_SCHEMA"]
            tables = ("projects", "users", "idempotency_keys", "accounts", "auth_sessions")
            names = ", ".join(f'"{schema}".{t}' for t in (*tables, "api_keys"))
            await conn.execute(f"truncate {names} restart identity cascade")
        finally:
            await conn.close()

    run_in_thread(truncate, 30 * UNIT)


def via_lambda(kind: str, method: str, path: str, **request: Any) -> Answer:
    return as_answer(invoke(make_event(kind, method, path, **request)))


def both(
    core_http: CoreThread, kind: str, method: str, path: str, **request: Any
) -> tuple[Answer, Answer]:
    """(Lambda's answer, the HTTP server's answer) to one request."""
    b64 = request.pop("b64", False)
    return via_lambda(kind, method, path, b64=b64, **request), core_http.call(
        method, path, **request
    )


def create(core_http: CoreThread, auth: dict[str, str], **changes: Any) -> dict[str, Any]:
    answer = core_http.call(
        "POST", "/api/projects", headers=auth, body=json.dumps({**PROJECT, **changes}).encode()
    )
    assert answer.status == 201, answer
    body: dict[str, Any] = answer.body
    return body


# -- the same answers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_list_projects(core_http, auth, kind):
    for name in ("a", "b", "c"):
        create(core_http, auth, name=name)
    lam, web = both(core_http, kind, "GET", "/api/projects", headers=auth)
    assert lam.status == web.status == 200
    assert [p["name"] for p in lam.body["items"]] == ["a", "b", "c"]
    assert lam.body == web.body
    assert lam.key_headers() == web.key_headers()


@pytest.mark.parametrize("kind", KINDS)
def test_create_with_idempotency_key_replays_on_either_transport(core_http, auth, kind):
    payload = json.dumps(PROJECT).encode()
    lam, web = both(
        core_http,
        kind,
        "POST",
        "/api/projects",
        headers={**auth, "Idempotency-Key": "k-1", "Content-Type": "application/json"},
        body=payload,
    )
    # Same key, same request: the HTTP call replays what Lambda created.
    assert lam.status == web.status == 201
    assert lam.headers["location"] == f"/api/projects/{lam.body['id']}"
    assert web.headers["idempotent-replayed"] == "true" and web.body == lam.body
    assert "idempotent-replayed" not in lam.headers
    again = via_lambda(
        kind, "POST", "/api/projects", headers={**auth, "Idempotency-Key": "k-1"}, body=payload
    )
    assert again.key_headers() == web.key_headers() and again.body == lam.body
    # A fresh key on each: two projects, alike but for what the database generates.
    lam2 = via_lambda(
        kind, "POST", "/api/projects", headers={**auth, "Idempotency-Key": "k-2"}, body=payload
    )
    web2 = core_http.call(
        "POST", "/api/projects", headers={**auth, "Idempotency-Key": "k-3"}, body=payload
    )
    assert lam2.status == web2.status == 201 and lam2.body["id"] != web2.body["id"]
    assert without_generated(lam2.body) == without_generated(web2.body)
    assert lam2.key_headers(location_id=False) == web2.key_headers(location_id=False)


@pytest.mark.parametrize("kind", KINDS)
def test_get_by_id_and_if_none_match(core_http, auth, kind):
    pid = create(core_http, auth)["id"]
    lam, web = both(core_http, kind, "GET", f"/api/projects/{pid}", headers=auth)
    assert lam.status == web.status == 200 and lam.body == web.body
    assert lam.headers["etag"] == '"1"' and lam.key_headers() == web.key_headers()
    lam, web = both(
        core_http, kind, "GET", f"/api/projects/{pid}", headers={**auth, "If-None-Match": '"1"'}
    )
    assert lam.status == web.status == 304
    assert lam.body is None and web.body is None
    assert lam.key_headers() == web.key_headers()


@pytest.mark.parametrize("kind", KINDS)
def test_validation_errors_are_the_same_422(core_http, auth, kind):
    bad = json.dumps({**PROJECT, "name": "", "budget": -5, "colour": "red"}).encode()
    lam, web = both(core_http, kind, "POST", "/api/projects", headers=auth, body=bad)
    assert lam.status == web.status == 422
    assert lam.body == web.body and lam.body["error"]["code"] == "validation_error"
    assert len(lam.body["error"]["details"]) == 3
    lam, web = both(core_http, kind, "GET", "/api/projects", query=[("limit", "0")], headers=auth)
    assert lam.status == web.status == 422 and lam.body == web.body


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt", "Basic YWxpY2U6cHc="])
def test_missing_or_invalid_token_is_401(core_http, kind, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    lam, web = both(core_http, kind, "GET", "/api/projects", headers=headers)
    assert lam.status == web.status == 401
    assert lam.body == web.body and lam.body["error"]["code"] == "unauthorized"
    assert lam.headers["www-authenticate"] == "Bearer"
    assert lam.key_headers() == web.key_headers()


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_route_and_method(core_http, auth, kind):
    lam, web = both(core_http, kind, "GET", "/api/nothing-here", headers=auth)
    assert lam.status == web.status == 404 and lam.body == web.body
    lam, web = both(core_http, kind, "DELETE", "/api/projects", headers=auth)
    assert lam.status == web.status == 405 and lam.body == web.body
    assert lam.key_headers() == web.key_headers() and lam.headers["allow"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_route_s_body_limit_is_the_same_413(core_http, kind):
    # Registration, which anyone may call, takes 8 KiB; Lambda parsed 200 KB (and any
    # form to /api/auth/token, up to the 1 MiB MAX_BODY_BYTES: 0.75 s in parse_qs).
    ada = {"email": "ada@example.com", "display_name": "Ada", "password": "correct horse battery"}
    padded = (json.dumps(ada) + " " * 200_000).encode()
    lam, web = both(core_http, kind, "POST", "/api/auth/register", body=padded)
    assert lam.status == web.status == 413 and lam.body == web.body
    assert lam.body["error"]["message"] == "body over 8192 bytes"
    form = b"a=1&" * 250_000 + b"grant_type=password&username=x%40example.com&password=wrong"
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    lam = via_lambda(kind, "POST", "/api/auth/token", headers=form_type, body=form)
    assert lam.status == 413 and lam.body["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("kind", KINDS)
def test_base64_body(core_http, auth, kind):
    payload = json.dumps({**PROJECT, "name": "Zürich ☃"}).encode()
    lam = via_lambda(kind, "POST", "/api/projects", headers=auth, body=payload, b64=True)
    web = core_http.call("POST", "/api/projects", headers=auth, body=payload)
    assert lam.status == web.status == 201 and lam.body["name"] == "Zürich ☃"
    assert without_generated(lam.body) == without_generated(web.body)
    assert lam.key_headers(location_id=False) == web.key_headers(location_id=False)


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_query_keys_last_one_wins(core_http, auth, kind):
    create(core_http, auth, name="x", tags=["x"])
    create(core_http, auth, name="y", tags=["y"])
    create(core_http, auth, name="z", tags=["y"])
    query = [("tag", "x"), ("tag", "y"), ("limit", "5"), ("limit", "1")]
    lam, web = both(core_http, kind, "GET", "/api/projects", query=query, headers=auth)
    assert lam.status == web.status == 200
    assert [p["name"] for p in lam.body["items"]] == ["y"] and lam.body["next_cursor"]
    assert lam.body == web.body


@pytest.mark.parametrize("kind", KINDS)
def test_cors_answer_and_preflight(core_http, auth, kind):
    lam, web = both(core_http, kind, "GET", "/api/projects", headers={**auth, "Origin": ORIGIN})
    assert lam.status == web.status == 200
    assert lam.headers["access-control-allow-origin"] == ORIGIN
    assert lam.key_headers() == web.key_headers()
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    lam, web = both(core_http, kind, "OPTIONS", "/api/projects", headers=preflight)
    assert lam.status == web.status == 204 and lam.body is None
    assert "POST" in lam.headers["access-control-allow-methods"]
    assert lam.key_headers() == web.key_headers()
    lam, web = both(
        core_http, kind, "GET", "/api/projects", headers={**auth, "Origin": "https://evil"}
    )
    assert "access-control-allow-origin" not in lam.headers
    assert lam.key_headers() == web.key_headers()


# -- event details ---------------------------------------------------------------------


def test_header_names_are_case_insensitive(core_http, token):
    pid = create(core_http, {"Authorization": f"Bearer {token}"})["id"]
    event = make_event("rest_api_v1", "GET", f"/api/projects/{pid}")
    for name, value in (("AUTHORIZATION", f"Bearer {token}"), ("if-NONE-match", '"1"')):
        event["headers"][name] = value
        event["multiValueHeaders"][name] = [value]
    assert invoke(event)["statusCode"] == 304
    event = make_event("http_api_v2", "GET", f"/api/projects/{pid}")
    event["headers"]["Authorization"] = f"Bearer {token}"  # not lower-case, as 2.0 sends it
    assert invoke(event)["statusCode"] == 200


@pytest.mark.parametrize("kind", KINDS)
def test_header_values_are_read_as_an_http_server_reads_them(core_http, auth, kind):
    """ALB and API Gateway hand on a UTF-8 header value decoded (Cloudflare's cf-ipcity:
    "Srīperumbūdūr"); the handler raised on it, and on a value with a space after it,
    into Lambda (API Gateway's 502)."""
    pid = create(core_http, auth)["id"]
    odd = {"X-City": "Srīperumbūdūr", "If-None-Match": '"1" '}
    lam = via_lambda(kind, "GET", f"/api/projects/{pid}", headers={**auth, **odd})
    on_the_wire = {**odd, "X-City": odd["X-City"].encode()}
    web = core_http.call("GET", f"/api/projects/{pid}", headers={**auth, **on_the_wire})
    assert lam.status == web.status == 304


def test_single_valued_rest_event_without_multi_value_maps(core_http, auth):
    create(core_http, auth, name="solo")
    event = make_event("rest_api_v1", "GET", "/api/projects", headers=auth)
    event["multiValueHeaders"] = None
    event["queryStringParameters"] = {"limit": "1"}
    lam = as_answer(invoke(event))
    web = core_http.call("GET", "/api/projects", query=[("limit", "1")], headers=auth)
    assert lam.status == 200 and lam.body == web.body


def test_stage_prefixes_are_not_part_of_the_route(core_http, auth):
    pid = create(core_http, auth)["id"]
    rest = make_event("rest_api_v1", "GET", f"/Prod/api/projects/{pid}", headers=auth)
    assert rest["requestContext"]["stage"] == "Prod"
    http_api = make_event("http_api_v2", "GET", f"/dev/api/projects/{pid}", headers=auth)
    http_api["requestContext"]["stage"] = "dev"
    for event in (rest, http_api):
        answer = as_answer(invoke(event))
        assert answer.status == 200 and answer.body["id"] == pid
    unstaged = make_event("http_api_v2", "GET", f"/dev/api/projects/{pid}", headers=auth)
    assert invoke(unstaged)["statusCode"] == 404  # $default: the path is the path


def test_cookies_are_ignored(core_http, auth):
    create(core_http, auth)
    plain = make_event("http_api_v2", "GET", "/api/projects", headers=auth)
    plain.pop("cookies")
    with_cookies = make_event("http_api_v2", "GET", "/api/projects", headers=auth)
    with_cookies["headers"]["cookie"] = "session=abc123"
    plain["headers"]["x-request-id"] = with_cookies["headers"]["x-request-id"] = "req-1"
    assert invoke(plain) == invoke(with_cookies)


def test_the_container_reuses_its_loop_core_and_pool(core_http, auth):
    event = make_event("function_url", "GET", "/api/projects", headers=auth)
    assert invoke(event)["statusCode"] == 200
    first = lambda_handler.opened()
    assert first is not None
    pool, loop = first.core.db.pool, lambda_handler._container.loop
    assert invoke(event)["statusCode"] == 200
    assert lambda_handler.opened() is first
    assert first.core.db.pool is pool and lambda_handler._container.loop is loop
    assert not pool._closed


def test_a_session_ended_elsewhere_is_refused_once_the_container_catches_up(core_http):
    ada = {"email": "ada@example.com", "display_name": "Ada", "password": "correct horse battery"}
    assert core_http.call("POST", "/api/auth/register", body=json.dumps(ada).encode()).status == 201
    form = urlencode(
        {"grant_type": "password", "username": ada["email"], "password": ada["password"]}
    )
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    tokens = via_lambda(
        "http_api_v2", "POST", "/api/auth/token", headers=form_type, body=form.encode()
    )
    assert tokens.status == 200, tokens
    me = {"Authorization": f"Bearer {tokens.body['access_token']}"}
    assert via_lambda("http_api_v2", "GET", "/api/projects", headers=me).status == 200
    # Another process ends the session; no broker tells this container. Once it
    # has gone REVOCATION_SYNC seconds without catching up, it does so first.
    assert core_http.call("POST", "/api/auth/logout", headers=me).status == 204
    lambda_handler._container.synced -= Core.REVOCATION_SYNC
    late = via_lambda("http_api_v2", "GET", "/api/projects", headers=me)
    assert late.status == 401 and late.body["error"]["message"] == "session revoked"


def _later(seconds: float) -> types.SimpleNamespace:
    """`time` for the handler, its monotonic clock ``seconds`` ahead (the loop's is not)."""
    return types.SimpleNamespace(
        time=time.time, monotonic=lambda: time.monotonic() + seconds, perf_counter=time.perf_counter
    )


def test_a_warm_container_with_redis_refuses_a_session_ended_elsewhere_within_a_second(
    env, redis_url, monkeypatch
):
    # Another core, sharing Redis with the container, ends the session. Between
    # invocations the container's loop stands still (as Lambda freezes it), so the
    # broadcast waits unread on its socket; what refuses the token is the read of the
    # revocations stored since its last look, once a second has gone by, long before
    # the 30 s catch-up from the database.
    lambda_handler.shutdown()  # the module's container has no Redis
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", unique_prefix())
    ada = {"email": "ada@example.com", "display_name": "Ada", "password": "correct horse battery"}
    form = urlencode(
        {"grant_type": "password", "username": ada["email"], "password": ada["password"]}
    )
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        with CoreThread(Settings.from_env()) as other:
            assert (
                other.call("POST", "/api/auth/register", body=json.dumps(ada).encode()).status
                == 201
            )
            tokens = via_lambda(
                "function_url", "POST", "/api/auth/token", headers=form_type, body=form.encode()
            )
            assert tokens.status == 200, tokens
            me = {"Authorization": f"Bearer {tokens.body['access_token']}"}
            assert via_lambda("function_url", "GET", "/api/projects", headers=me).status == 200
            assert other.call("POST", "/api/auth/logout", headers=me).status == 204
            monkeypatch.setattr(lambda_handler, "time", _later(1.5))
            late = via_lambda("function_url", "GET", "/api/projects", headers=me)
            assert late.status == 401, late
            assert late.body["error"]["message"] == "session revoked"
    finally:
        lambda_handler.shutdown()


# -- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        "GET /api/projects",
        {},
        {"Records": [{"eventSource": "aws:sqs", "body": "{}"}]},
        {"version": "2.0", "rawPath": "/api/projects"},
        {"version": "2.0", "rawPath": 7, "requestContext": {"http": {"method": "GET"}}},
        {"httpMethod": "GET", "path": "/api/projects"},
        {"httpMethod": "GET", "path": "/api/projects", "requestContext": {}, "headers": []},
    ],
    ids=lambda e: json.dumps(e)[:40],
)
def test_bad_events_are_400_and_never_raise(event):
    reply = invoke(event)
    assert reply["statusCode"] == 400
    assert reply["headers"]["Content-Type"] == "application/json"
    assert json.loads(reply["body"])["error"]["code"] == "bad_request"


@pytest.mark.parametrize("kind", KINDS)
def test_a_body_that_is_not_base64_is_400(kind):
    event = make_event(kind, "POST", "/api/projects", body=b"{}", b64=True)
    event["body"] = "not base64!"
    reply = invoke(event)
    assert reply["statusCode"] == 400 and "base64" in json.loads(reply["body"])["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("x-note", "a\x01b", "bad_request"),  # a control character: no server reads it
        ("x-note", "\ud800", "bad_request"),  # a surrogate that stands for no byte
        ("body", '{"name": "\ud800"}', "bad_request"),
        ("body", '{"name": "\udc80"}', "malformed_json"),  # the byte 0x80: not UTF-8
        ("path", "/api/projects/\udc80", "bad_request"),  # was a 500 and a traceback
        ("path", "/api/\ud800", "bad_request"),
    ],
    ids=[
        "control-character",
        "lone-surrogate-header",
        "lone-surrogate-body",
        "byte-0x80-body",
        "lone-surrogate-path",
        "lone-surrogate-unrouted-path",
    ],
)
def test_text_no_connection_carries_is_400_and_never_raises(core_http, auth, field, value, code):
    body = json.dumps(PROJECT).encode()
    event = make_event("http_api_v2", "POST", "/api/projects", headers=auth, body=body)
    if field == "body":
        event["body"] = value
    elif field == "path":
        event["rawPath"] = value
    else:
        event["headers"][field] = value
    reply = invoke(event)
    assert reply["statusCode"] == 400, reply
    assert reply["headers"]["Content-Type"] == "application/json"
    assert json.loads(reply["body"])["error"]["code"] == code


@pytest.mark.parametrize("kind", ["http_api_v2", "function_url"])
def test_a_query_with_a_lone_surrogate_is_400_and_never_raises(core_http, auth, kind):
    # Payload 2.0 hands the query on as text: "\ud800" in it stands for no byte, and the
    # list's query validation raised (a 500 with a traceback), as the path did.
    event = make_event(kind, "GET", "/api/projects", headers=auth)
    event["rawQueryString"] = "limit=\ud800"
    reply = invoke(event)
    assert reply["statusCode"] == 400, reply
    assert json.loads(reply["body"])["error"]["code"] == "bad_request"


@pytest.mark.parametrize("kind", KINDS)
def test_an_unexpected_error_is_500_without_internals(core_http, auth, monkeypatch, caplog, kind):
    async def broken(self, req):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(lambda_handler._Container, "answer", broken)
    with caplog.at_level(logging.ERROR, logger="core.errormap"):
        reply = invoke(make_event(kind, "GET", "/api/projects", headers=auth))
    assert reply["statusCode"] == 500
    assert ("multiValueHeaders" in reply) == (kind == "rest_api_v1")
    assert json.loads(reply["body"]) == {
        "error": {"status": 500, "code": "internal", "message": "internal error"}
    }
    assert "secret" not in reply["body"]
    # Logged once, by the one exception mapping, with the traceback.
    [record] = [r for r in caplog.records if r.name == "core.errormap"]
    assert "GET /api/projects" in record.getMessage() and record.exc_info is not None


def test_a_fault_in_reading_the_event_is_500_not_a_raise(monkeypatch, caplog):
    def broken(event):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(lambda_handler, "parse_event", broken)
    with caplog.at_level(logging.ERROR, logger="core.errormap"):
        reply = invoke(make_event("http_api_v2", "GET", "/api/projects"))
    assert reply["statusCode"] == 500 and "secret" not in reply["body"]


def test_an_unreachable_database_is_503_and_retried_next_time(env, auth, monkeypatch, caplog):
    lambda_handler.shutdown()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://127.0.0.1:{free_port()}/none")
    monkeypatch.setenv("DB_CONNECT_TIMEOUT", "2")
    event = make_event("http_api_v2", "GET", "/api/projects", headers=auth)
    try:
        with caplog.at_level(logging.WARNING):
            reply = invoke(event)
        assert reply["statusCode"] == 503 and reply["headers"]["Retry-After"]
        assert json.loads(reply["body"])["error"]["code"] == "unavailable"
        assert lambda_handler.opened() is None  # the next invocation tries again
        monkeypatch.setenv("DATABASE_URL", env["DATABASE_URL"])
        assert invoke(event)["statusCode"] == 200
    finally:
        lambda_handler.shutdown()


# -- deployment --------------------------------------------------------------------------


class _SamLoader(yaml.SafeLoader):
    """Safe YAML plus CloudFormation's short-form tags (!Ref, !Sub, !GetAtt, ...)."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    assert isinstance(node, yaml.MappingNode)
    return {suffix: loader.construct_mapping(node, deep=True)}


_SamLoader.add_multi_constructor("!", _any_tag)


def test_the_sam_template_parses_and_names_the_real_handler():
    template = yaml.load(TEMPLATE.read_text(), Loader=_SamLoader)
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    functions = {
        name: r for name, r in template["Resources"].items()
        if r["Type"] == "AWS::Serverless::Function"
    }  # fmt: skip
    [(name, function)] = functions.items()
    if function.get("Metadata", {}).get("BuildMethod") == "makefile":  # SAM runs build-<name>
        assert f"build-{name}:" in (TEMPLATE.parent / "Makefile").read_text()
    props = copy.deepcopy(template.get("Globals", {}).get("Function", {}))
    props.update(function["Properties"])
    assert props["Runtime"] == "python3.11"
    module_name, _, attr = props["Handler"].rpartition(".")
    assert callable(getattr(importlib.import_module(module_name), attr))
    assert props["Handler"] == "core.lambda_handler.handler"
    assert "FunctionUrlConfig" in props
    assert any(e["Type"] == "HttpApi" for e in props["Events"].values())
    env = props["Environment"]["Variables"]
    assert {"DATABASE_URL", "DATABASE_SCHEMA"} <= set(env)
    assert set(env) <= {f.metadata["env"] for f in dataclasses.fields(Settings)}
    assert "VpcConfig" in props


@pytest.mark.parametrize("kind", KINDS)
def test_authorization_is_the_same_on_lambda(core_http, auth, kind):
    """An ordinary user is refused another's project and account on Lambda as over HTTP."""
    created = create(core_http, auth)  # an admin's, owned by someone else
    user = {"Authorization": f"Bearer {mint_token(Settings.from_env(), '424242', [])}"}
    patch = json.dumps({"name": "mine now"}).encode()
    for method, path, body, expected in [
        ("PATCH", f"/api/projects/{created['id']}", patch, 403),
        ("DELETE", f"/api/projects/{created['id']}", None, 403),
        ("GET", "/api/users/1", None, 404),
        ("GET", "/api/keys", None, 403),
        ("GET", f"/api/projects/{created['id']}", None, 200),
    ]:
        request: dict[str, Any] = {"headers": user}
        if body is not None:
            request["body"] = body
        lam, web = both(core_http, kind, method, path, **request)
        assert lam.status == web.status == expected, (method, path, lam, web)
