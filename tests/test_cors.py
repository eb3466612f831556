"""CORS on the REST API: allowed origins get the headers, others get none."""

from __future__ import annotations

from core.infra.mint import mint_token
from core.infra.settings import Settings
from core.server import CoreServer
from tests.harness import (
    SECRET,
    ApiClient,
    KeptAliveClient,
    call_once,
    running_gateway,
    token_for,
)


async def test_allowed_origin_gets_cors_headers_and_preflight():
    async with running_gateway(cors_origins=("https://app.example",)) as gw:
        api = ApiClient(gw.port, token_for(gw))
        try:
            status, headers, _ = await api.call(
                "GET", "/api/projects", headers={"Origin": "https://app.example"}
            )
            # 503 (no database here) still carries CORS: the script can read the error.
            assert status == 503
            assert headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "ETag" in headers["Access-Control-Expose-Headers"]
            assert headers["Vary"] == "Origin"
            status, headers, body = await api.call(
                "OPTIONS",
                "/api/projects/7",
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "PATCH",
                    "Access-Control-Request-Headers": "authorization, if-match",
                },
            )
            assert status == 204 and body is None
            assert headers["Access-Control-Allow-Methods"] == "DELETE, GET, PATCH, PUT"
            assert "If-Match" in headers["Access-Control-Allow-Headers"]
            assert "Access-Control-Allow-Credentials" not in headers
            status, headers, _ = await api.call(
                "GET", "/api/projects", headers={"Origin": "https://evil.example"}
            )
            assert "Access-Control-Allow-Origin" not in headers
        finally:
            api.close()


async def test_no_cors_unless_configured():
    async with running_gateway() as gw:
        api = ApiClient(gw.port, None)
        try:
            status, headers, _ = await api.call(
                "OPTIONS",
                "/api/projects",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
            )
        finally:
            api.close()
    assert status == 503  # no database in this gateway; and no CORS headers either
    assert "Access-Control-Allow-Origin" not in headers


ORIGIN = "https://app.example"
#: What a caller may send: no Origin, a refused one, the allowed one; preflights of both.
_PREFLIGHT = {"Access-Control-Request-Method": "GET"}
_ASKS: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/api/projects", {}),
    ("GET", "/api/projects", {"Origin": "https://evil.example"}),
    ("GET", "/api/projects", {"Origin": ORIGIN}),
    ("GET", "/api/projects/999999", {}),  # an error (404)
    ("GET", "/api/no/such/route", {"Origin": "https://evil.example"}),
    ("OPTIONS", "/api/projects", {"Origin": ORIGIN, **_PREFLIGHT}),
    ("OPTIONS", "/api/projects", {"Origin": "https://evil.example", **_PREFLIGHT}),
    ("OPTIONS", "/api/projects", _PREFLIGHT),
]


async def _every_answer_varies_by_origin(port: int, token: str, allowed: str = ORIGIN) -> None:
    """Each ask, on a new connection (Tornado's path) and on a kept-alive one (served off
    Tornado, and passed through verbatim behind CORE_URL), answers with ``Vary: Origin``."""
    for client in (ApiClient(port, token), KeptAliveClient(port, token)):
        try:
            for _ in range(2):
                for method, path, headers in _ASKS:
                    status, got, _ = await client.call(method, path, headers=headers)
                    what = (type(client).__name__, method, path, headers, status, dict(got))
                    assert "Origin" in got.get_list("Vary"), what
                    cors = got.get("Access-Control-Allow-Origin")
                    origin = headers.get("Origin")
                    admitted = origin == ORIGIN or (origin is not None and allowed == "*")
                    assert cors == (allowed if admitted else None), what
        finally:
            client.close()


async def test_with_origins_named_every_rest_answer_varies_by_origin(clean_db):
    """Found by the operations review of 2026-12-02: only an answer to an allowed Origin said
    ``Vary: Origin``. A shared cache that stored the answer to a request with no Origin (or a
    refused one) gave it to the allowed origin's script, without its CORS headers, and the
    reverse; the answers to errors and preflights said nothing either."""
    async with running_gateway(**clean_db, cors_origins=(ORIGIN,)) as gw:
        assert gw.port is not None
        await _every_answer_varies_by_origin(gw.port, token_for(gw))
    async with running_gateway(**clean_db, cors_origins=("*",)) as gw:
        assert gw.port is not None
        await _every_answer_varies_by_origin(gw.port, token_for(gw), allowed="*")


async def test_the_core_and_a_gateway_behind_core_url_vary_by_origin(clean_db):
    settings = Settings(jwt_secret=SECRET, host="127.0.0.1", port=0, **clean_db)
    core = await CoreServer.start(settings.replace(cors_origins=(ORIGIN,)))
    plain = await CoreServer.start(settings)  # the core names none: the gateway's own CORS
    try:
        await _every_answer_varies_by_origin(core.port, mint_token(settings, "ada", ["room:*"]))
        core_url = f"http://127.0.0.1:{plain.port}"
        async with running_gateway(core_url=core_url, cors_origins=(ORIGIN,)) as gw:
            assert gw.port is not None
            await _every_answer_varies_by_origin(gw.port, token_for(gw))
    finally:
        await plain.close()
        await core.close()


async def test_without_origins_named_no_answer_varies():
    async with running_gateway() as gw:
        assert gw.port is not None
        status, headers, _ = await call_once(gw.port, token_for(gw), "GET", "/api/projects")
    assert status == 503 and "Vary" not in headers
