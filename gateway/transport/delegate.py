"""A request served outside `tornado.web`: headers in, one JSON answer out.

The WebSocket upgrade and the long-poll's poll are requests with no body
that `tornado.web` would only slow down (a RequestHandler per request). Both
are `BodylessRequest`s: they keep the request line and headers, ignore any
body, and answer with `answer` (or `refuse`, the project's JSON error body).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from tornado import httputil

from core.infra.errors import ApiError

__all__ = ["BodylessRequest"]

log = logging.getLogger("gateway.endpoints")


class BodylessRequest(httputil.HTTPMessageDelegate):
    __slots__ = ("_conn", "_headers", "_start")

    def __init__(self, conn: httputil.HTTPConnection) -> None:
        self._conn = conn
        self._start: httputil.RequestStartLine | None = None
        self._headers: httputil.HTTPHeaders | None = None

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.RequestStartLine)
        self._start, self._headers = start_line, headers

    def data_received(self, chunk: bytes) -> None:
        return None  # no body is read; anything sent is ignored

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> bool:
        """Write one complete JSON answer; False when the client went away meanwhile."""
        out = httputil.HTTPHeaders(headers)
        out["Content-Type"] = "application/json"
        out["Content-Length"] = str(len(body))
        if status == 401:
            out["WWW-Authenticate"] = "Bearer"
        line = httputil.ResponseStartLine("HTTP/1.1", status, HTTPStatus(status).phrase)
        try:
            self._conn.write_headers(line, out, body)
            self._conn.finish()
        except Exception as exc:
            log.debug("answer not written: %s", exc)
            return False
        return True

    def refuse(self, exc: ApiError, headers: dict[str, str] | None = None) -> bool:
        """Answer with the error body of ``exc`` (its status and headers)."""
        status = exc.status_code
        return self.answer(status, {**exc.headers, **(headers or {})}, exc.body())
