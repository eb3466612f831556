"""Every error the gateway and the core answer is the one JSON body, never Tornado's HTML page.

Found by the operations review of 2026-12-02: a wrong method on ``/openapi.json``,
``/asyncapi.json``, ``/docs``, the static files, the JWKS or the demo pages, and
any unknown path or wrong method on the standalone core (which had no default
handler), were answered with Tornado's ``<html><title>405: Method Not
Allowed</title>...``; a request Tornado cannot parse (a malformed ``Host``, no
``Host``, a garbage request line) got a bare 400 with no body. A client, or a
balancer's health check, parsing errors as JSON failed on them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from core.infra.settings import Settings
from core.server import CoreServer
from tests.harness import SECRET, running_gateway
from tests.servers import UNIT

REQUEST_ID = "probe-4242"

#: (method, path, status) every server (gateway and standalone core) answers.
BOTH = [
    ("GET", "/no/such/page", 404),
    ("POST", "/no/such/page", 404),
    ("POST", "/healthz", 405),
    ("DELETE", "/readyz", 405),
    ("PUT", "/metrics", 405),
    ("POST", "/openapi.json", 405),
    ("POST", "/docs", 405),
    ("PUT", "/redoc", 405),
    ("POST", "/docs/static/swagger-ui.css", 405),
    ("DELETE", "/redoc/static/redoc.standalone.js", 405),
    ("GET", "/docs/static/index.html", 404),
    ("POST", "/.well-known/jwks.json", 405),
    ("PATCH", "/api/projects", 405),
    ("GET", "/api/no/such/route", 404),
]
#: What only the gateway serves: its documents, pages, sockets and publish endpoint.
GATEWAY = [
    ("POST", "/asyncapi.json", 405),
    ("POST", "/demo", 405),
    ("PUT", "/admin", 405),
    ("POST", "/admin/admin.js", 405),
    ("DELETE", "/client/gateway.js", 405),
    ("POST", "/ws", 405),
    ("GET", "/ws", 401),
    ("GET", "/sse", 401),
    ("GET", "/lp", 401),
    ("GET", "/api/publish", 405),
    ("GET", "/api/server/no/such/route", 404),
]
#: Requests Tornado refuses itself, before any route: 400.
MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a,b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"NOT A REQUEST\r\n\r\n",
]


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a new connection; the answer's status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 5 * UNIT) if length else b""
    finally:
        writer.close()
    return status, headers, body


def ask(method: str, path: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {REQUEST_ID}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()


def assert_error_body(status: int, headers: dict[str, str], body: bytes, expected: int) -> Any:
    assert status == expected, (status, headers, body)
    assert headers.get("content-type") == "application/json", (headers, body)
    error = json.loads(body)["error"]
    assert set(error) <= {"status", "code", "message", "details"}, error
    assert error["status"] == expected
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return error


async def assert_every_error_is_json(port: int, cases: list[tuple[str, str, int]]) -> None:
    for method, path, expected in cases:
        status, headers, body = await exchange(port, ask(method, path))
        assert_error_body(status, headers, body, expected)
        assert headers.get("x-request-id") == REQUEST_ID, (method, path, headers)
    for request in MALFORMED:
        status, headers, body = await exchange(port, request)
        error = assert_error_body(status, headers, body, 400)
        assert error["code"] == "bad_request", request


async def test_every_error_of_the_gateway_is_the_json_body(clean_db):
    async with running_gateway(**clean_db) as gw:
        assert gw.port is not None
        await assert_every_error_is_json(gw.port, BOTH + GATEWAY)


async def test_every_error_of_the_standalone_core_is_the_json_body(clean_db):
    settings = Settings(jwt_secret=SECRET, host="127.0.0.1", port=0, **clean_db)
    server = await CoreServer.start(settings)
    try:
        await assert_every_error_is_json(server.port, BOTH)
    finally:
        await server.close()


async def test_a_range_past_a_file_s_end_is_the_json_body(clean_db):
    """Tornado's static files answered an unsatisfiable ``Range`` with ``416``, ``text/plain``
    and no body; it is the one JSON body, and still says the file's size (RFC 9110 15.5.17)."""
    async with running_gateway(**clean_db) as gw:
        assert gw.port is not None
        for path in ("/client/gateway.js", "/demo", "/docs/static/swagger-ui.css"):
            request = (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=99999999-\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            status, headers, body = await exchange(gw.port, request)
            assert_error_body(status, headers, body, 416)
            assert headers["content-range"].startswith("bytes */"), headers
