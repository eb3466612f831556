"""Tornado adapters: the core's routes over HTTP, and its documents.

`ApiHandler` is thin: it authenticates the bearer token (a bad one is 401
before the core sees the request), builds a `Request`, and writes back the
`Response`. The gateway mounts it under ``/api/``; ``python -m core`` serves
it alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

import tornado.web
from openapi_ui_bundles import redoc, swagger_ui

from core.errors import default_code, error_body
from core.openapi import document
from core.request import Request, Response
from core.routing import Route, Router
from gateway.auth import AuthError, Verifier, token_from_header

__all__ = ["ApiHandler", "CoreLike", "DocsHandler", "doc_routes"]


class CoreLike(Protocol):
    routes: tuple[Route, ...]
    router: Router

    async def dispatch(self, req: Request) -> Response: ...


class ApiHandler(tornado.web.RequestHandler):
    # Every method reaches the router, so an unsupported one is a 405 with Allow.
    SUPPORTED_METHODS = (
        "GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS", "TRACE", "CONNECT",
    )  # fmt: skip

    def initialize(self, core: CoreLike, verifier: Verifier) -> None:
        self.core = core
        self.verifier = verifier

    async def _serve(self, *_: str) -> None:
        request = self.request
        caller = None
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            try:
                caller = self.verifier.verify(token_from_header(authorization) or "")
            except AuthError as exc:
                body = error_body(401, "unauthorized", exc.message)
                self._answer(Response(401, body, {"WWW-Authenticate": "Bearer"}))
                return
        req = Request(
            request.method or "GET",
            request.path,
            query=parse_qs(request.query, keep_blank_values=True) if request.query else None,
            headers=request.headers,
            body=request.body,
            caller=caller,
        )
        self._answer(await self.core.dispatch(req))

    get = post = put = patch = delete = head = options = trace = connect = _serve

    def _answer(self, resp: Response) -> None:
        self.set_status(resp.status)
        for name, value in resp.headers.items():
            self.set_header(name, value)
        if resp.body is None:
            self.clear_header("Content-Type")
            self.finish()
            return
        self.set_header("Content-Type", "application/json")
        self.finish(resp.body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado itself answers 405 for methods it does not know (QUERY).
        allow = self.core.router.allow(self.request.path) if status_code == 405 else None
        if allow is not None:
            self.set_header("Allow", allow)
        self.set_header("Content-Type", "application/json")
        message = "internal error" if status_code >= 500 else self._reason
        self.finish(error_body(status_code, default_code(status_code), message))


_SWAGGER = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - Swagger UI</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: true}});</script>
</body></html>
"""
_REDOC = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - ReDoc</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body {{ margin: 0; padding: 0; }}</style></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="/redoc/static/redoc.standalone.js"></script>
</body></html>
"""


class DocsHandler(tornado.web.RequestHandler):
    """Serves one prebuilt document (the OpenAPI JSON or a UI page)."""

    def initialize(self, content: bytes, content_type: str) -> None:
        self.content = content
        self.content_type = content_type

    def get(self) -> None:
        self.set_header("Content-Type", self.content_type)
        self.finish(self.content)


def doc_routes(routes: tuple[Route, ...], title: str, version: str) -> list[Any]:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``, all from package files."""
    spec = json.dumps(document(routes, title=title, version=version), indent=1).encode()
    static = tornado.web.StaticFileHandler
    return [
        (r"/openapi\.json", DocsHandler, {"content": spec, "content_type": "application/json"}),
        (r"/docs/?", DocsHandler,
         {"content": _SWAGGER.format(title=title).encode(), "content_type": "text/html"}),
        (r"/redoc/?", DocsHandler,
         {"content": _REDOC.format(title=title).encode(), "content_type": "text/html"}),
        (r"/docs/static/(.*)", static, {"path": str(Path(swagger_ui.static_path))}),
        (r"/redoc/static/(.*)", static, {"path": str(Path(redoc.static_path))}),
    ]  # fmt: skip
