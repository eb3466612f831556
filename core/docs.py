"""The core's documents: ``/openapi.json``, Swagger UI at ``/docs``, ReDoc at ``/redoc``.

The UI assets come from the openapi-ui-bundles package and are served from
this process: the pages load nothing from a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import tornado.web
from openapi_ui_bundles import redoc, swagger_ui

from core.errormap import JsonErrors, write_error
from core.openapi import document
from core.routing import Route

__all__ = ["DocsHandler", "StaticFiles", "doc_routes", "jwks_route", "page_headers", "page_policy"]


# Swagger UI keeps what Authorize got in memory only: persisted, it was written to the
# origin's localStorage (the password, the access and the refresh token, in clear), where
# every page and script of the gateway's origin could read it, long after the tab closed.
_SWAGGER_INIT = """window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: false});"""
_SWAGGER = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - Swagger UI</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>{init}</script>
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


DESCRIPTION = (
    "The REST core of tornado-gateway. Every operation but registration, login and refresh "
    "takes a bearer JWT (the same token a socket uses); those three ignore one. Errors have "
    'one shape, `{"error": {"status", "code", "message", "details"?}}`, and each operation '
    "lists the codes it can answer under each status. "
    "The same operations run over a WebSocket as `rpc` frames, and every write is "
    "published to the channels `projects` and `projects:<id>`. The gateway describes its "
    "socket, Server-Sent Events and long-poll protocol in [/asyncapi.json](/asyncapi.json) "
    "(AsyncAPI 3.0)."
)


def page_policy(*, script: str | None = None, styles: str = "'self'") -> str:
    """The ``Content-Security-Policy`` of a documentation page: nothing from elsewhere, never
    framed, and of inline code only ``script`` (by its hash), never ``'unsafe-inline'``."""
    scripts = "'self'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        scripts += f" 'sha256-{digest}'"
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; "
        "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


def page_headers(handler: tornado.web.RequestHandler, policy: str) -> None:
    """What every HTML page of these servers carries: its ``policy`` (`page_policy`), no
    sniffing, and no window of another site: without ``Cross-Origin-Opener-Policy``, a
    page that opened the console kept a handle on it and could send that tab elsewhere (a
    look-alike sign-in) while the admin used it."""
    handler.set_header("Content-Security-Policy", policy)
    handler.set_header("Cross-Origin-Opener-Policy", "same-origin")
    handler.set_header("X-Content-Type-Options", "nosniff")


class DocsHandler(JsonErrors):
    """Serves one prebuilt document (the OpenAPI JSON or a UI page); errors are JSON.

    Every answer is ``nosniff``; a page carries its ``policy`` (`page_policy`)."""

    def initialize(self, content: bytes, content_type: str, policy: str | None = None) -> None:
        self.content = content
        self.content_type = content_type
        self.policy = policy

    def get(self) -> None:
        self.set_header("Content-Type", self.content_type)
        if self.policy is not None:
            page_headers(self, self.policy)
        else:
            self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(self.content)


class StaticFiles(JsonErrors, tornado.web.StaticFileHandler):
    """Tornado's static files, whose errors (405, 404, 403, 416) are the one JSON body, not
    HTML: a ``Range`` past the end was Tornado's ``416`` with ``text/plain`` and no body."""

    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get(path, include_body)
        if self.get_status() == 416 and not self._finished:
            size = self._headers.get("Content-Range")
            self.clear()
            if size is not None:
                self.set_header("Content-Range", size)
            write_error(self, 416, None)


def jwks_route(jwks: dict[str, Any]) -> tuple[str, type[DocsHandler], dict[str, Any]]:
    """``/.well-known/jwks.json``: the public keys of the tokens this system issues."""
    content = json.dumps(jwks).encode()
    return (r"/\.well-known/jwks\.json", DocsHandler,
            {"content": content, "content_type": "application/json"})  # fmt: skip


def doc_routes(routes: tuple[Route, ...], title: str, version: str) -> list[Any]:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``, all from package files."""
    doc = document(routes, title=title, version=version, description=DESCRIPTION)
    spec = json.dumps(doc, indent=1).encode()
    static = StaticFiles
    html = "text/html; charset=utf-8"
    swagger = _SWAGGER.format(title=title, init=_SWAGGER_INIT).encode()
    # ReDoc styles its page with <style> elements it writes (styled-components).
    redoc_policy = page_policy(styles="'self' 'unsafe-inline'")
    return [
        (r"/openapi\.json", DocsHandler, {"content": spec, "content_type": "application/json"}),
        (r"/docs/?", DocsHandler,
         {"content": swagger, "content_type": html, "policy": page_policy(script=_SWAGGER_INIT)}),
        (r"/redoc/?", DocsHandler,
         {"content": _REDOC.format(title=title).encode(), "content_type": html,
          "policy": redoc_policy}),
        # Only the files the pages load: the bundles' folders also hold demo pages that
        # load a spec from the internet, and Tornado's handler answers odd paths (a NUL)
        # with a 500 and a traceback. Anything else is the application's JSON 404.
        (r"/docs/static/(swagger-ui\.css|swagger-ui-bundle\.js)", static,
         {"path": str(Path(swagger_ui.static_path))}),
        (r"/redoc/static/(redoc\.standalone\.js)", static,
         {"path": str(Path(redoc.static_path))}),
    ]  # fmt: skip
