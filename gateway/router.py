"""The gateway's first routing step: the core's ``/api/`` routes without Tornado's router.

Tornado's `RuleRouter` builds an `HTTPServerRequest` for every request it
routes (parsing the query and deep-copying it), and the gateway's routes
nest two of them (sockets and server API first, then the core's ``/api/``).
For a REST call through the gateway that was about 5% of its CPU per
request (py-spy, bench/proxy.py), spent to learn what the path's prefix
says. `FirstRoute` looks at the path once: a core route goes straight to the
core's delegate, anything else (``/ws``, polls, ``/api/server/``,
``/api/publish``, documents, metrics) to the rules as before.
"""

from __future__ import annotations

from collections.abc import Awaitable

from tornado import httputil

__all__ = ["FirstRoute", "is_core_path"]


def is_core_path(path: str) -> bool:
    """Whether ``path`` (no query) is one of the core's: ``/api/`` but not the gateway's own."""
    return (
        path.startswith("/api/") and not path.startswith("/api/server/") and path != "/api/publish"
    )


class FirstRoute(httputil.HTTPServerConnectionDelegate):
    """Core routes to ``core``, every other request to ``others``."""

    def __init__(
        self,
        core: httputil.HTTPServerConnectionDelegate,
        others: httputil.HTTPServerConnectionDelegate,
    ) -> None:
        self.core = core
        self.others = others

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Pick(self, server_conn, request_conn)


class _Pick(httputil.HTTPMessageDelegate):
    __slots__ = ("_conn", "_delegate", "_route", "_server")

    def __init__(
        self, route: FirstRoute, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> None:
        self._route = route
        self._server = server_conn
        self._conn = request_conn
        self._delegate: httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        route = self._route
        target = route.core if is_core_path(start_line.path.partition("?")[0]) else route.others
        self._delegate = target.start_request(self._server, self._conn)
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self._delegate is not None
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        assert self._delegate is not None
        self._delegate.finish()

    def on_connection_close(self) -> None:
        if self._delegate is not None:
            self._delegate.on_connection_close()
