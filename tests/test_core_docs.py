"""The OpenAPI document, the offline doc pages, and schemathesis against a live core."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from core.errorcodes import ERRORS, route_errors
from core.idempotency import IDEMPOTENCY_KEY_SCHEMA
from core.infra.errors import ApiError
from core.openapi import document
from core.paging import CURSOR_PATTERN, IF_MATCH_SCHEMA, decode_cursor, encode_cursor
from core.routing import ROW_ID, UUID_ID
from core.schemas import BUDGET_TEXT, ProjectIn
from core.service import CoreUnavailable
from core.validation import decode_body
from tests.harness import ApiClient, running_gateway
from tests.servers import UNIT
from tests.test_accounts import login, register
from tests.test_apikeys import promote

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
ROOT = Path(__file__).resolve().parent.parent


def spec() -> dict:
    return document(CoreUnavailable("docs").routes, title="t", version="1")


def test_document_is_valid_openapi_3_1():
    doc = spec()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_is_documented_with_its_errors():
    doc = spec()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {(r.method, r.path) for r in CoreUnavailable("docs").routes}
    create = doc["paths"]["/api/projects"]["post"]
    assert set(create["responses"]) >= {"201", "400", "401", "409", "413", "422", "503"}
    assert create["security"] == [{"bearerAuth": []}, {"password": []}]
    token = doc["paths"]["/api/auth/token"]["post"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]
    assert "security" not in token
    flows = doc["components"]["securitySchemes"]["password"]["flows"]
    assert flows["password"]["tokenUrl"] == "/api/auth/token"
    assert "Location" in create["responses"]["201"]["headers"]
    patch = doc["paths"]["/api/projects/{id}"]["patch"]
    assert "412" in patch["responses"]
    assert any(p["name"] == "If-Match" and p["in"] == "header" for p in patch["parameters"])


def test_budget_bounds_and_places_are_in_the_document():
    schemas = spec()["components"]["schemas"]
    stored = schemas["Project"]["properties"]["budget"]
    sent = schemas["ProjectIn"]["properties"]["budget"]
    number, text = sent["anyOf"]
    for budget in (stored, number):
        assert budget["type"] == "number" and "format" not in budget
        assert budget["minimum"] == 0 and budget["maximum"] == 1_000_000_000
        assert budget["multipleOf"] == 0.01
    assert text["type"] == "string" and text["pattern"] == BUDGET_TEXT
    assert schemas["ProjectPatch"]["properties"]["budget"]["anyOf"] == sent["anyOf"]
    project_in = schemas["ProjectIn"]
    assert set(project_in["required"]) == {"name", "owner_email", "budget", "starts_on"}
    assert project_in["additionalProperties"] is False
    assert schemas["ProjectIn"]["properties"]["milestones"]["maxItems"] == 50


@pytest.mark.parametrize(
    ("text", "ok"),
    [("0", True), ("12.30", True), ("999999999.99", True), ("1000000000.00", True),
     ("1000000000.01", False), ("012", False), ("1.234", False), ("1e2", False), (" 1", False),
     ("1_000", False), ("-1", False), ("\u0663", False), ("1.", False), (".5", False)],
)  # fmt: skip
def test_a_budget_as_text_is_taken_exactly_when_the_pattern_allows_it(text, ok):
    assert bool(re.match(BUDGET_TEXT, text)) is ok
    body = json.dumps({"name": "x", "owner_email": "ada@example.com", "budget": text,
                       "starts_on": "2026-01-01"}).encode()  # fmt: skip
    if ok:
        assert decode_body(ProjectIn, body).budget == Decimal(text)
    else:
        with pytest.raises(ApiError) as refused:
            decode_body(ProjectIn, body)
        assert refused.value.status == 422
        assert [d.path for d in refused.value.details or []] == ["$.budget"]


def test_header_cursor_and_id_formats_are_the_parsers_own():
    doc = spec()
    patch = doc["paths"]["/api/projects/{id}"]["patch"]
    params = {p["name"]: p["schema"] for p in patch["parameters"]}
    assert params["If-Match"] == IF_MATCH_SCHEMA and params["id"] == ROW_ID
    listing = {p["name"]: p["schema"] for p in doc["paths"]["/api/projects"]["get"]["parameters"]}
    assert listing["cursor"]["pattern"] == CURSOR_PATTERN
    create = {p["name"]: p["schema"] for p in doc["paths"]["/api/projects"]["post"]["parameters"]}
    assert create["Idempotency-Key"] == IDEMPOTENCY_KEY_SCHEMA
    for path in ("/api/auth/sessions/{id}", "/api/keys/{id}"):
        (param,) = doc["paths"][path]["delete"]["parameters"]
        assert param["schema"] == UUID_ID


@pytest.mark.parametrize("last_id", [0, 1, 7, 2**31, 10**18 - 1])
def test_every_cursor_matches_its_pattern_and_every_match_is_a_cursor(last_id):
    cursor = encode_cursor(last_id)
    assert re.match(CURSOR_PATTERN, cursor) and decode_cursor(cursor) == last_id
    for other in ("AAAAAAAAAAA", "f_________8", "a0-_aZz9AAw"):
        assert 0 <= decode_cursor(other) < 2**63
    for bad in ("AAAAAAAAAAB", "gAAAAAAAAAA", "AAAAAAAAAA", "WzVd", "AAAA!AAAAAA"):
        with pytest.raises(ApiError):
            decode_cursor(bad)


def test_rules_beyond_the_schema_are_described_with_their_422():
    doc = spec()
    for method, path in (("post", "/api/projects"), ("put", "/api/projects/{id}"),
                         ("patch", "/api/projects/{id}")):  # fmt: skip
        op = doc["paths"][path][method]
        assert "`ends_on`" in op["description"] and "`starts_on`" in op["description"]
        assert "`starts_on`" in op["responses"]["422"]["description"]


def test_every_error_code_raised_in_core_is_in_the_table():
    raised = set()
    for source in [*(ROOT / "core").rglob("*.py"), ROOT / "gateway" / "upstream.py"]:
        raised |= set(re.findall(r'\(\s*(\d{3}),\s*"([a-z_]+)"', source.read_text()))
    assert len(raised) > 15
    assert {(int(status), code) for status, code in raised} <= {
        (doc.status, code) for code, doc in ERRORS.items()
    }


def test_every_operation_documents_each_code_it_can_answer_with_an_example():
    doc = spec()
    for route in CoreUnavailable("docs").routes:
        responses = doc["paths"][route.path][route.method.lower()]["responses"]
        for code in route_errors(route):
            status = str(ERRORS[code].status)
            answer = responses[status]
            content = answer["content"]["application/json"]
            assert code in content["schema"]["allOf"][1]["properties"]["error"]["properties"][
                "code"]["enum"]  # fmt: skip
            assert content["examples"][code]["value"]["error"]["code"] == code
        assert ("401" in responses) is route.auth
        if route.auth:
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"]
        assert responses["429"]["headers"]["Retry-After"]["required"]
        assert {"413", "500", "503", "504"} <= set(responses)
    register = doc["paths"]["/api/auth/register"]["post"]["responses"]
    assert register["201"]["headers"]["Location"]["required"]
    assert "ETag" not in register["201"]["headers"]


def test_created_resources_link_to_reading_updating_and_deleting_them():
    doc = spec()
    created = doc["paths"]["/api/projects"]["post"]["responses"]["201"]["links"]
    assert set(created) == {"getProject", "replaceProject", "updateProject", "deleteProject"}
    assert created["deleteProject"]["parameters"] == {
        "path.id": "$response.body#/id", "header.If-Match": "$response.header.ETag"}  # fmt: skip
    updated = doc["paths"]["/api/projects/{id}"]["patch"]["responses"]["200"]["links"]
    assert set(updated) == {"getProject", "replaceProject", "deleteProject"}
    user = doc["paths"]["/api/users"]["post"]["responses"]["201"]["links"]
    assert set(user) == {"getUser", "updateUser", "deleteUser"}
    key = doc["paths"]["/api/keys"]["post"]["responses"]["201"]["links"]
    assert set(key) == {"revokeApiKey"}
    registered = doc["paths"]["/api/auth/register"]["post"]["responses"]["201"]["links"]
    assert registered["logIn"]["operationId"] == "token"


def test_query_parameters_are_typed():
    params = {p["name"]: p for p in spec()["paths"]["/api/projects"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 100
    assert set(params["status"]["schema"]["enum"]) == {"draft", "active", "done"}
    assert params["status"]["schema"]["type"] == "string"
    assert not any(p["required"] for p in params.values())


async def test_docs_pages_and_assets_are_served_without_a_cdn():
    async with running_gateway() as gw:
        client = ApiClient(gw.port, None)
        try:
            status, _, doc = await client.call("GET", "/openapi.json")
            assert status == 200 and doc["paths"]
            for page, asset in (
                ("/docs", "/docs/static/swagger-ui-bundle.js"),
                ("/redoc", "/redoc/static/redoc.standalone.js"),
            ):
                r = await client._http.fetch(client.base + page)
                html = r.body.decode()
                assert "/openapi.json" in html and asset in html
                assert "http://" not in html and "https://" not in html
                r = await client._http.fetch(client.base + asset)
                assert r.code == 200 and len(r.body) > 100_000
        finally:
            client.close()


@pytest.mark.parametrize(
    "path",
    [
        "/docs/static/index.html",  # the bundle's demo page: it loads petstore.swagger.io
        "/redoc/static/index.html",
        "/docs/static/favicon-32x32.png",
        "/docs/static/%00",  # Tornado's static handler raised: a 500 and a traceback each
        "/redoc/static/redoc.standalone.js%00",
        "/docs/static/..%2f..%2f..%2fetc%2fpasswd",
        "/docs/static/",
    ],
)
async def test_only_the_assets_the_doc_pages_load_are_served(path, caplog):
    """The pages' folders were served whole, to anyone: the bundles' own demo pages, which
    load a spec from the internet, and a path with a NUL was a 500 with a traceback logged
    at ERROR for each request (found by the operations review of 2026-12-02)."""
    async with running_gateway() as gw:
        client = ApiClient(gw.port, None)
        try:
            for asset in ("/docs/static/swagger-ui.css", "/docs/static/swagger-ui-bundle.js",
                          "/redoc/static/redoc.standalone.js"):  # fmt: skip
                assert (await client._http.fetch(client.base + asset)).code == 200
            caplog.clear()
            status, _, body = await client.call("GET", path)
        finally:
            client.close()
    assert status == 404 and body["error"]["code"] == "not_found"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


#: The run's account: an admin logged in here, so every operation is open to it.
FUZZER = {"email": "fuzzer@example.com", "display_name": "Fuzzer",
          "password": "correct horse battery staple"}  # fmt: skip
#: Operations that end the caller's own session: the only ones the run leaves out.
ENDS_OWN_SESSION = ("logout", "logoutAll")


async def fuzzing_account(gw, clean_db: dict) -> str:
    """An admin's access token from a login; two more logins give it sessions to end."""
    anon = ApiClient(gw.port, None)
    try:
        await register(anon, FUZZER)
        promote(clean_db, FUZZER["email"])
        tokens = [await login(anon, FUZZER["email"], FUZZER["password"]) for _ in range(3)]
    finally:
        anon.close()
    assert all(status == 200 for status, _ in tokens)
    return tokens[0][1]["access_token"]


def schemathesis_command(url: str, token: str, examples: str) -> list[str]:
    """The run docs/rest.md gives: every check, the repository's settings and hooks."""
    excluded = [arg for op in ENDS_OWN_SESSION for arg in ("--exclude-operation-id", op)]
    return [str(SCHEMATHESIS), "--config-file", "tests/schemathesis.toml", "run", url,
            "--checks", "all", "--header", f"Authorization: Bearer {token}", *excluded,
            "--max-examples", examples, "--generation-deterministic", "--no-color"]  # fmt: skip


@pytest.mark.timeout(400)
async def test_schemathesis_with_every_check_finds_nothing(clean_db):
    """Every check over every operation, stateful links included, against a live gateway:
    no failure and no warning (tests/schemathesis.toml makes warnings fail the run)."""
    # The server API's presence and history are asked of "fuzz" (tests/schemathesis_hooks.py).
    settings = {
        "rate_rest": None,
        "rate_login_ip": None,
        "rate_login_account": None,
        "presence_channels": ("fuzz",),
        "history_channels": ("projects", "projects:*", "fuzz"),
    }
    async with running_gateway(**clean_db, **settings) as gw:
        token = await fuzzing_account(gw, clean_db)
        env = {**os.environ, "FUZZ_TOKEN": token, "FUZZ_EMAIL": FUZZER["email"],
               "FUZZ_PASSWORD": FUZZER["password"], "FUZZ_CHANNEL": "fuzz"}  # fmt: skip
        url = f"http://127.0.0.1:{gw.port}/openapi.json"
        examples = os.environ.get("SCHEMATHESIS_EXAMPLES", "30")
        proc = await asyncio.create_subprocess_exec(
            *schemathesis_command(url, token, examples),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 380 * UNIT)
        api = ApiClient(gw.port, None)
        try:  # the gateway's document: the core's operations and the server API's
            _, _, served = await api.call("GET", "/openapi.json")
        finally:
            api.close()
    output = stdout.decode(errors="replace")
    assert proc.returncode == 0, output[-20000:]
    operations = sum(len(item) for item in served["paths"].values())
    assert f"Tested: {operations - len(ENDS_OWN_SESSION)}" in output, output[-3000:]
    assert "No issues found" in output, output[-3000:]
    covered = re.search(r"API Links: +(\d+) covered", output)
    assert covered is not None and int(covered[1]) >= 10, output[-3000:]


def test_the_document_states_what_an_error_looks_like():
    error = spec()["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"status", "code", "message"}
    assert json.dumps(error)  # serializable as served
