"""CORS on the REST API: allowed origins get the headers, others get none."""

from __future__ import annotations

from tests.harness import ApiClient, running_gateway, token_for


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
