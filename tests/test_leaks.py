"""Small leaks, each attack reproduced: tokens in logs, key files, trailing newlines, odd JSON."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import msgspec
import pytest
import yaml
from jsonschema import Draft202012Validator
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

from core.apikeys import KEY_CHANNEL_PATTERN, ApiKeyIn
from core.errormap import from_exception
from core.idempotency import IDEMPOTENCY_KEY_SCHEMA
from core.infra.keys import generate_jwk, write_key_file
from core.infra.logs import JsonFormatter, TextFormatter, redact
from core.infra.settings import Settings
from core.openapi import document as core_document
from core.paging import CURSOR_PATTERN, ETAG_PATTERN, ETAG_SCHEMA
from core.request import Request, Response
from core.routing import UUID_ID, Route, uuid_param
from core.schemas import BUDGET_TEXT, EMAIL_PATTERN, NO_NUL, Email
from core.server import CoreServer
from core.service import CoreUnavailable
from gateway.asyncapi import document as asyncapi_document
from proto import ErrorCode
from proto.frames import CALL_METHOD_PATTERN, CHANNEL_PATTERN, Channel
from tests.harness import SECRET, ApiClient, http_url, running_gateway, token_for, ws_client
from tests.servers import UNIT
from tests.test_accounts import ADA, register

ROOT = Path(__file__).resolve().parent.parent

# -- tokens in logs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["token", "%74oken", "TO%4BEN", "t%6f%6Ben", "access%5Ftoken", "api_key", "password"]
)
def test_every_spelling_of_a_secret_parameter_is_redacted(name):
    line = f"401 GET /ws?x=1&{name}=eyJ.secret.sig#frag (127.0.0.1)"
    assert redact(line) == f"401 GET /ws?x=1&{name}=[redacted]#frag (127.0.0.1)"


def test_other_parameters_stay_readable():
    assert redact("/ws?tokens=1&%2574oken=2&to+ken=3") == "/ws?tokens=1&%2574oken=2&to+ken=3"


async def test_an_encoded_token_parameter_authenticates_but_never_reaches_the_logs(caplog):
    async with running_gateway() as gw:
        token = token_for(gw)
        secret_part = token.rsplit(".", 1)[1]
        with caplog.at_level(logging.DEBUG):
            url = f"ws://127.0.0.1:{gw.port}/ws?%74oken={token}"
            async with connect(url, subprotocols=["gw.v1.json"], proxy=None,  # type: ignore[list-item]
                               open_timeout=5 * UNIT) as ws:  # fmt: skip
                await ws.send(json.dumps({"op": "ping", "id": 1}))
                assert json.loads(await ws.recv())["ok"] is True  # it did authenticate
            http = AsyncHTTPClient(force_instance=True)
            try:
                # A refused socket and an HTTP request with a bad token are logged too.
                refused = await http.fetch(http_url(gw, f"/ws?%74oken={token}x"), raise_error=False)
                assert refused.code == 401
                polled = await http.fetch(http_url(gw, f"/lp?TOKEN={token}&t%6Fken={token}x"),
                                          method="POST", body=b"", raise_error=False)  # fmt: skip
                assert polled.code == 401
            finally:
                http.close()
    server = [r for r in caplog.records if r.name.split(".")[0] in ("gateway", "tornado", "core")]
    assert any("[redacted]" in r.getMessage() for r in server)
    for formatter in (JsonFormatter(), TextFormatter()):
        assert all(secret_part not in formatter.format(r) for r in server)
    assert all(secret_part not in r.getMessage() for r in server)


# -- private key files -----------------------------------------------------------------


def test_key_files_are_owner_only_from_the_first_byte(tmp_path, monkeypatch):
    """Every byte is written to a file already 0600, even with a umask of 0."""
    modes: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        modes.append(os.fstat(fd).st_mode & 0o777)
        return real_write(fd, data)

    path = tmp_path / "keys.json"
    old = generate_jwk("ES256", "old")
    path.write_text(json.dumps({"keys": [old]}))
    monkeypatch.setattr(os, "write", write)
    umask = os.umask(0)
    try:
        write_key_file(path, [generate_jwk("ES256", "new"), old])
    finally:
        os.umask(umask)
    assert modes and set(modes) == {0o600}
    assert [k["kid"] for k in json.loads(path.read_text())["keys"]] == ["new", "old"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left


def test_keygen_under_a_permissive_umask_makes_an_owner_only_file(tmp_path):
    path = tmp_path / "keys.json"
    for kid in ("old", "new"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "keygen", "--kid", kid, "--add-to", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, umask=0,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert path.stat().st_mode & 0o777 == 0o600
    assert [k["kid"] for k in json.loads(path.read_text())["keys"]] == ["new", "old"]


# -- trailing newlines ---------------------------------------------------------------------


def _patterns(node: object) -> set[str]:
    if isinstance(node, dict):
        found = set()
        for key, value in node.items():
            found |= {value} if key == "pattern" and isinstance(value, str) else _patterns(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_patterns, node)) if node else set()
    return set()


#: Every pattern either document publishes: (a good value, whether a newline may end one).
PATTERNS = {
    CHANNEL_PATTERN: ("room:1", False),
    CALL_METHOD_PATTERN: ("orders.create", False),
    EMAIL_PATTERN: ("ada@example.com", False),
    NO_NUL: ("multi-line\ntext", True),
    ETAG_PATTERN: ('W/"3"', False),
    str(ETAG_SCHEMA["pattern"]): ('"3"', False),
    KEY_CHANNEL_PATTERN: ("projects:*", False),  # API key channel patterns
    CURSOR_PATTERN: ("AAAAAAAAAAE", False),
    BUDGET_TEXT: ("12.30", False),
    str(IDEMPOTENCY_KEY_SCHEMA["pattern"]): ("k-1", False),
    str(UUID_ID["pattern"]): ("0b4c7f52-1f2e-4b7a-9a3c-2d1e5f6a7b8c", False),
    r"^/api/": ("/api/projects", True),  # a prefix: the router matches the whole path
}


def test_every_published_pattern_refuses_a_trailing_newline_in_python_and_ecma_262():
    openapi = core_document(CoreUnavailable("docs").routes, title="t", version="1")
    published = _patterns(openapi) | _patterns(asyncapi_document("1"))
    assert published == set(PATTERNS)  # a new pattern needs its line here
    for pattern, (good, newline_ok) in PATTERNS.items():
        assert re.search(pattern, good), pattern
        assert bool(re.search(pattern, good + "\n")) is newline_ok, pattern
        assert not pattern.endswith("$"), pattern  # $ matches before a final newline
        # JSON Schema validators check "pattern" with Python's re: same answer there.
        schema = {"type": "string", "pattern": pattern}
        assert Draft202012Validator(schema).is_valid(good + "\n") is newline_ok


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (Channel, "room:1\n"),
        (Email, "ada@example.com\n"),
        (ApiKeyIn, {"name": "ci", "channels": ["room:*\n"]}),
    ],
)
def test_trailing_newlines_fail_validation(tp, value):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(value, tp)


def test_uuid_path_parameters_end_at_the_end():
    good = "0b4c7f52-1f2e-4b7a-9a3c-2d1e5f6a7b8c"
    req = Request("DELETE", "/x")
    for raw, expected in ((good, good), (good + "\n", None)):
        req.params = {"id": raw}
        assert uuid_param(req) == expected
    route = Route("GET", "/api/things/{id}/parts", _no_handler, "s", "o", "t", {200: None})
    assert route.pattern().match("/api/things/1/parts")
    assert not route.pattern().match("/api/things/1/parts\n")


async def _no_handler(req: Request) -> Response:
    return Response(204)


async def test_a_trailing_newline_registers_no_second_account_nor_subscribes(clean_db):
    async with running_gateway(**clean_db) as gw:
        anon = ApiClient(gw.port, None)
        try:
            await register(anon)
            twin = {**ADA, "email": ADA["email"] + "\n"}
            status, _, body = await anon.call("POST", "/api/auth/register", twin)
            assert status == 422 and body["error"]["details"][0]["path"] == "$.email"
        finally:
            anon.close()
        async with ws_client(gw.port, token_for(gw)) as c:
            reply = await c.request("sub", ch="room:1\n")
            assert reply["error"]["code"] in (ErrorCode.BAD_FRAME, ErrorCode.INVALID_CHANNEL)
            assert (await c.request("sub", ch="room:1"))["ok"]
            rpc = await c.request("rpc", method="GET", path="/api/projects\n")
            assert rpc["status"] == 404


# -- numbers beyond a double, JSON nested beyond the decoder -----------------------------------

DEEP = b"[" * 5_000 + b"]" * 5_000
DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000


async def test_odd_json_in_a_rest_body_is_a_4xx_with_the_error_body(clean_db):
    async with running_gateway(**clean_db) as gw:
        user = ApiClient(gw.port, token_for(gw, "1", channels=("projects*",)))
        try:
            cases = [
                ("POST", "/api/projects", b'{"name": "x", "budget": 1e999}', 422),
                ("POST", "/api/projects", b'{"name": "x", "tags": [-1e999]}', 422),
                ("POST", "/api/projects", b"1e999", 422),
                ("POST", "/api/projects", DEEP, 400),
                ("POST", "/api/projects", DEEP_OBJECT, 400),
                (
                    "POST",
                    "/api/auth/register",
                    b'{"email": "a@b.co", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                    400,
                ),
                ("PATCH", "/api/users/1", b"9d", 400),  # was a 500 (its own id: SELF)
                ("POST", "/api/publish", b'{"ch": "room:1", "data": ' + DEEP + b"}", 400),
            ]
            for method, path, raw, expected in cases:
                status, _, body = await user.call(
                    method, path, raw=raw, headers={"Content-Type": "application/json"}
                )
                assert status == expected, (path, raw[:40], body)
                assert body["error"]["status"] == expected and body["error"]["message"]
            cursor = base64.urlsafe_b64encode(b"[" * 2_000 + b"]" * 2_000).decode()
            status, _, body = await user.call("GET", f"/api/projects?cursor={cursor}")
            assert status == 422 and body["error"]["details"][0]["path"] == "query.cursor"
            # And the process still serves everyone.
            assert (await user.call("GET", "/api/projects"))[0] == 200
        finally:
            user.close()


# -- database names in 409s -------------------------------------------------------------------


async def test_a_conflict_names_no_table_nor_constraint(clean_db, caplog):
    async with running_gateway(**clean_db) as gw:
        anon = ApiClient(gw.port, None)
        admin = ApiClient(gw.port, token_for(gw, "root", extra={"role": "admin"}))
        try:
            await register(anon)
            answers = [await anon.call("POST", "/api/auth/register", ADA)]
            with caplog.at_level(logging.INFO, logger="core"):
                # A unique index refuses this one: the database's words stay in the log.
                answers.append(
                    await admin.call(
                        "POST", "/api/users", {"email": ADA["email"], "display_name": "Ada"}
                    )
                )
        finally:
            anon.close()
            admin.close()
    for status, _, body in answers:
        assert status == 409 and body["error"]["code"] == "conflict"
        message = body["error"]["message"]
        assert not {"users", "_key", "constraint", "email", "unique"} & set(
            re.split(r"\W+", message)
        )
        assert "_key" not in message and "users" not in message
    assert any(
        "conflict in" in r.getMessage() for r in caplog.records
    )  # the operator still sees it


@pytest.mark.parametrize("kind", [asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError])
def test_constraint_violations_map_to_generic_409s(kind):
    exc = kind("insert or update violates constraint")
    exc.constraint_name = "projects_owner_fkey"
    body = from_exception(exc, "POST /api/projects").body()
    assert b"409" in body and b"projects" not in body and b"fkey" not in body


# -- /metrics ------------------------------------------------------------------------------

METRICS_TOKEN = "scrape-" + "x" * 40


async def _scrape(port: int, authorization: str | None) -> tuple[int, str, str | None]:
    http = AsyncHTTPClient(force_instance=True)
    headers = {"Authorization": authorization} if authorization else {}
    try:
        r = await http.fetch(f"http://127.0.0.1:{port}/metrics", headers=headers, raise_error=False)
    finally:
        http.close()
    return r.code, r.body.decode(), r.headers.get("WWW-Authenticate")


async def test_metrics_need_the_token_when_one_is_set():
    async with running_gateway(metrics_token=METRICS_TOKEN) as gw:
        for authorization in (None, "Bearer wrong", f"Basic {METRICS_TOKEN}", "Bearer"):
            status, body, challenge = await _scrape(gw.port, authorization)
            assert status == 401 and "gateway_" not in body
            assert json.loads(body)["error"]["code"] == "unauthorized"
            assert challenge is not None and challenge.startswith("Bearer")
        status, body, _ = await _scrape(gw.port, f"Bearer {METRICS_TOKEN}")
        assert status == 200 and "gateway_connections" in body


async def test_open_metrics_are_announced_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="core.infra.metrics"):
        async with running_gateway() as gw:
            status, body, _ = await _scrape(gw.port, None)
    assert status == 200 and "gateway_connections" in body
    assert any("METRICS_TOKEN is not set" in r.getMessage() for r in caplog.records)


async def test_the_standalone_cores_metrics_need_the_token_too(clean_db):
    settings = Settings(jwt_secret=SECRET, host="127.0.0.1", port=0, metrics_token=METRICS_TOKEN,
                        password_time_cost=1, password_memory_kib=8192, **clean_db)  # fmt: skip
    server = await CoreServer.start(settings)
    try:
        status, body, challenge = await _scrape(server.port, "Bearer nope")
        assert status == 401 and json.loads(body)["error"]["status"] == 401 and challenge
        status, body, _ = await _scrape(server.port, f"Bearer {METRICS_TOKEN}")
        assert status == 200 and "gateway_rest_request_seconds" in body
    finally:
        await server.close()


def test_every_scrape_config_sends_the_metrics_token():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"] in ("gateway", "core"):
            # Each scraped service's own token: what its /metrics checks.
            for target in (t for config in job["static_configs"] for t in config["targets"]):
                token = services[target.partition(":")[0]]["environment"]["METRICS_TOKEN"]
                assert job["authorization"] == {"type": "Bearer", "credentials": token}
    base = ROOT / "deploy/k8s/base"
    secret = yaml.safe_load((base / "secret.yaml").read_text())
    for name in ("gateway-servicemonitor.yaml", "core-servicemonitor.yaml"):
        (endpoint,) = yaml.safe_load((base / name).read_text())["spec"]["endpoints"]
        credentials = endpoint["authorization"]["credentials"]
        assert credentials["name"] == secret["metadata"]["name"]
        assert credentials["key"] == "METRICS_TOKEN" in secret["stringData"]
