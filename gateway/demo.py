"""The browser client, the live demo and the admin console: ``/client/gateway.js``,
``/demo`` and ``/admin``.

All are package files (gateway/static/), served as they are: no build step.
The console's chart library (uPlot) is vendored in gateway/static/vendor/
with its licence; nothing is loaded from elsewhere.
They carry validators (``ETag``, ``Last-Modified``) and ``Cache-Control:
no-cache``, so a browser revalidates each use and gets a new release at once
(a ``304`` otherwise); a URL with ``?v=…`` (a version the page chose) may be
cached for a year. See docs/clients.md.
"""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from core.docs import StaticFiles, page_headers

__all__ = ["STATIC_DIR", "BrowserFileHandler", "browser_routes"]

STATIC_DIR = Path(__file__).resolve().with_name("static")

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}

# The demo loads nothing from elsewhere; its sockets go to the same host.
_PAGE_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class BrowserFileHandler(StaticFiles):
    """One of the files in gateway/static/: ``filename``, or the one the URL names.

    Its errors (a method other than GET or HEAD: 405) are the one JSON body, not HTML."""

    def initialize(self, path: str, filename: str | None = None) -> None:  # type: ignore[override]
        super().initialize(path)
        self.filename = filename

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get(self.filename or path, include_body)

    def head(self, path: str = "") -> Awaitable[None]:
        return self.get(path, include_body=False)

    def get_content_type(self) -> str:
        assert self.absolute_path is not None
        return _TYPES.get(Path(self.absolute_path).suffix, "application/octet-stream")

    def get_cache_time(self, path: str, modified: Any, mime_type: str) -> int:
        return self.CACHE_MAX_AGE if "v" in self.request.arguments else 0

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")
        if path.endswith(".html"):
            page_headers(self, _PAGE_POLICY)
        else:
            self.set_header("X-Content-Type-Options", "nosniff")


def browser_routes() -> list[Any]:
    """The client module, the demo page and the admin console, with their scripts and styles."""
    kw = {"path": str(STATIC_DIR)}
    return [
        (r"/client/(gateway\.js)", BrowserFileHandler, kw),
        (r"/demo/?", BrowserFileHandler, {**kw, "filename": "demo.html"}),
        (r"/demo/(demo\.js|demo\.css)", BrowserFileHandler, kw),
        (r"/admin/?", BrowserFileHandler, {**kw, "filename": "admin.html"}),
        (r"/admin/(admin\.js|admin\.css)", BrowserFileHandler, kw),
        (
            r"/admin/(vendor/uPlot\.iife\.min\.js|vendor/uPlot\.min\.css|vendor/uPlot\.LICENSE)",
            BrowserFileHandler,
            kw,
        ),
    ]
