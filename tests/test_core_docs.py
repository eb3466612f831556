"""The OpenAPI document, the offline doc pages, and schemathesis against a live core."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from core.openapi import document
from core.service import CoreUnavailable
from tests.harness import ApiClient, running_gateway, token_for
from tests.servers import UNIT

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


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


def test_budget_bounds_are_in_the_document():
    schemas = spec()["components"]["schemas"]
    for name in ("ProjectIn", "Project"):
        budget = schemas[name]["properties"]["budget"]
        assert budget["type"] == "number"
        assert budget["minimum"] == 0 and budget["maximum"] == 1_000_000_000
    project_in = schemas["ProjectIn"]
    assert set(project_in["required"]) == {"name", "owner_email", "budget", "starts_on"}
    assert project_in["additionalProperties"] is False
    assert schemas["ProjectIn"]["properties"]["milestones"]["maxItems"] == 50


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


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_server_error_and_no_document_violation(clean_db):
    """Fuzz every operation, stateful links included, against a live gateway."""
    async with running_gateway(**clean_db) as gw:
        token = token_for(gw, "fuzzer", channels=("*",))
        proc = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"http://127.0.0.1:{gw.port}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            os.environ.get("SCHEMATHESIS_EXAMPLES", "25"),
            "--generation-deterministic",
            # A stale but well-formed ETag is a correct 412, an opaque cursor
            # may be refused, and "two places" is not expressible for floats
            # in JSON Schema: schema-valid input may be refused (docs/rest.md).
            "--exclude-checks",
            "positive_data_acceptance",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 280 * UNIT)
        api = ApiClient(gw.port, None)
        try:  # the gateway's document: the core's operations and the server API's
            _, _, served = await api.call("GET", "/openapi.json")
        finally:
            api.close()
    output = stdout.decode(errors="replace")
    assert proc.returncode == 0, output[-20000:]
    operations = sum(len(item) for item in served["paths"].values())
    assert f"Tested: {operations}" in output


def test_the_document_states_what_an_error_looks_like():
    error = spec()["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"status", "code", "message"}
    assert json.dumps(error)  # serializable as served
