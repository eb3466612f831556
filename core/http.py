"""The core's HTTP transport: a thin `HTTPMessageDelegate` on Tornado's HTTP server.

``tornado.web.RequestHandler`` costs about as much per request as everything
the core does for a read (measured: 4.2k req/s for a bare handler against
8.4k for a bare delegate on one core), so ``/api/`` requests skip it: Tornado's
`RuleRouter` sends them here, and everything else (sockets, documents,
metrics) to the `tornado.web.Application`.

Per request this delegate collects the body (at most ``max_body_bytes``;
past it the body is dropped and the answer is 413), authenticates the bearer
token (401 before the core sees the request; not on the operations anyone
may call, which ignore it), calls `Core.dispatch`, and writes the response.
It never raises into Tornado.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping, MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

from tornado import httputil
from tornado.routing import AnyMatches, PathMatches, Rule, RuleRouter

from core.errormap import from_exception
from core.infra.errors import ApiError, NotFound, PayloadTooLarge
from core.infra.identity import AuthError, Identity, token_from_header
from core.infra.ids import request_id_of
from core.infra.logs import access_level
from core.infra.tasks import TaskSet
from core.infra.verify import Verifier
from core.request import Request, Response
from core.routing import Route, Router

__all__ = [
    "REASONS",
    "CoreHTTP",
    "CoreLike",
    "api_router",
    "cors_headers",
    "is_api_path",
    "length_only",
    "make_request",
    "unauthorized",
]

log = logging.getLogger("core.http")
access_log = logging.getLogger("gateway.access")

#: Reason phrases of the status lines written.
REASONS = {s.value: s.phrase for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})


class CoreLike(Protocol):
    routes: tuple[Route, ...]
    router: Router

    async def dispatch(self, req: Request) -> Response: ...


class _Date:
    """The ``Date`` header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True)
        return self._value


def length_only(out: MutableMapping[str, str], length: int | None) -> None:
    """The length fields of an answer with no body here: ``length`` is a ``HEAD``'s JSON
    body's (`Response.length`, behind ``CORE_URL``), else there is no body."""
    if length is None:
        out["Content-Length"] = "0"
    else:
        out["Content-Type"] = "application/json"
        out["Content-Length"] = str(length)


class CoreHTTP(httputil.HTTPServerConnectionDelegate):
    """Serves the core's routes; one `_Exchange` per request.

    CORS: a request whose ``Origin`` is in ``cors_origins`` (or any, with
    ``*``) gets ``Access-Control-Allow-Origin`` and the response headers a
    script needs exposed; a preflight (``OPTIONS`` with
    ``Access-Control-Request-Method``) is answered 204 with the path's methods.
    Tokens travel in ``Authorization``, never in cookies, so credentials are
    not allowed. With any origin named, every answer (to no ``Origin``, a
    refused one, an error, a preflight) carries ``Vary: Origin``
    (`add_cors`): its headers depend on it, so a shared cache must not give
    one origin's answer to another.
    """

    def __init__(
        self,
        core: CoreLike,
        verifier: Verifier,
        max_body_bytes: int,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.core = core
        self.verifier = verifier
        self.max_body_bytes = max_body_bytes
        self.cors_origins = frozenset(cors_origins)
        self.date = _Date()
        self._tasks = TaskSet(log)
        self._held = 0  # requests answered without a task
        self._quiet: asyncio.Event | None = None

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Exchange(self, request_conn)

    async def serve(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        client: str,
        request_id: str,
    ) -> Response:
        """Check the caller, then dispatch: the answer to one request, however it was read
        (Tornado's `_Exchange` or an adopted connection's `core.fastrest.RestConnection`).

        An answer to a request with credentials is ``Cache-Control: no-store`` unless it
        says otherwise: a browser kept it in its disk cache (a user's sessions with their
        addresses, her projects), after she logged out and closed it."""
        authorization = headers.get("authorization")
        try:
            caller = self.caller(method, path, authorization)
        except AuthError as exc:
            resp = unauthorized(exc)
        else:
            req = make_request(method, path, query, headers, body, caller, client, request_id)
            resp = await self.core.dispatch(req)
        if authorization is not None:
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def caller(self, method: str, path: str, authorization: str | None) -> Identity | None:
        """Who calls (None: no token, or an operation anyone may call); `AuthError` if refused."""
        if authorization is None or self.core.router.is_public(method, path):
            return None
        return self.verifier.verify(token_from_header(authorization) or "")

    def add_cors(self, headers: dict[str, str], origin: str | None) -> None:
        """Add to an answer's ``headers`` what CORS asks: ``Vary: Origin`` whenever origins
        are named, and the allowed ``origin``'s headers (`cors_origin`'s value, or None)."""
        if not self.cors_origins:
            return
        vary = headers.get("Vary")
        if not vary:
            headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            headers["Vary"] = vary + ", Origin"
        if origin is not None:
            headers.update(cors_headers(origin))

    def cors_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, None if not allowed."""
        if origin is None or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin in self.cors_origins else None

    async def wait_idle(self) -> None:
        """Return once every request being answered has been answered."""
        while True:
            await self._tasks.wait()
            if not self._held:
                return
            self._quiet = asyncio.Event()
            await self._quiet.wait()

    def hold(self) -> None:
        """A request is being answered without a task (gateway/passthrough.py): `wait_idle` waits."""
        self._held += 1

    def release(self) -> None:
        """The request `hold` counted is answered."""
        self._held -= 1
        if not self._held and self._quiet is not None:
            self._quiet.set()

    def spawn(self, exchange: _Exchange) -> None:
        self._tasks.spawn(exchange.run())

    def track(self, answer: Coroutine[Any, Any, None]) -> None:
        """Run ``answer`` (a request answered off Tornado, core/fastrest.py) as `wait_idle` sees."""
        self._tasks.spawn(answer)


class _Exchange(httputil.HTTPMessageDelegate):
    __slots__ = ("_chunks", "_conn", "_headers", "_server", "_size", "_start")

    def __init__(self, server: CoreHTTP, conn: httputil.HTTPConnection) -> None:
        self._server = server
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._start: httputil.RequestStartLine | None = None
        self._headers: httputil.HTTPHeaders | None = None
        self._t0 = 0.0
        self._id = ""  # X-Request-Id of the answer

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.RequestStartLine)
        self._start = start_line
        self._headers = headers
        self._t0 = time.perf_counter()

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._server.max_body_bytes:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()  # answered with 413; keep no memory for it

    def finish(self) -> None:
        self._server.spawn(self)

    def on_connection_close(self) -> None:
        self._chunks.clear()

    async def run(self) -> None:
        assert self._headers is not None and self._start is not None
        origin = self._server.cors_origin(self._headers.get("Origin"))
        self._id = self._request_id()
        try:
            if origin is not None and self._is_preflight():
                resp = self._preflight()
            else:
                resp = await self._respond()
        except Exception as exc:  # logged with its traceback; the body says "internal error"
            start = self._start  # the path only: a query may hold a token
            resp = Response.error(
                from_exception(exc, f"{start.method} {start.path.partition('?')[0]}")
            )
        self._server.add_cors(resp.headers, origin)
        resp.headers["X-Request-Id"] = self._id
        self._write(resp)

    def _request_id(self) -> str:
        assert self._headers is not None
        return request_id_of(self._headers.get("X-Request-Id", ""))

    def _is_preflight(self) -> bool:
        assert self._start is not None and self._headers is not None
        return self._start.method == "OPTIONS" and "Access-Control-Request-Method" in self._headers

    def _preflight(self) -> Response:
        assert self._start is not None
        allow = self._server.core.router.allow(self._start.path.partition("?")[0])
        if allow is None:
            return Response.error(NotFound("no such route"))
        return Response(
            204,
            None,
            {
                "Access-Control-Allow-Methods": allow,
                "Access-Control-Allow-Headers": _CORS_REQUEST_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    async def _respond(self) -> Response:
        start, headers, server = self._start, self._headers, self._server
        assert start is not None and headers is not None
        if self._size > server.max_body_bytes:
            return Response.error(PayloadTooLarge(server.max_body_bytes))
        path, _, query = start.path.partition("?")
        body, self._chunks = b"".join(self._chunks), []
        return await server.serve(
            start.method, path, query, headers, body, _remote_ip(self._conn), self._id
        )

    def _write(self, resp: Response) -> None:
        assert self._start is not None
        status = resp.status
        out = httputil.HTTPHeaders(resp.headers)
        out["Date"] = self._server.date()
        body = resp.body if status not in _NO_BODY else None
        if body is not None:
            out["Content-Type"] = "application/json"
            out["Content-Length"] = str(len(body))
            if self._start.method == "HEAD":
                body = None
        elif status not in _NO_BODY:
            length_only(out, resp.length)
        line = httputil.ResponseStartLine("HTTP/1.1", status, REASONS.get(status, "Unknown"))
        try:
            self._conn.write_headers(line, out, body)
            self._conn.finish()
        except Exception as exc:  # the client went away meanwhile
            log.debug("response not written: %s", exc)
        level = access_level(status)
        if access_log.isEnabledFor(level):
            ms = 1000.0 * (time.perf_counter() - self._t0)
            # The query is left out: it may carry anything; the path names the resource.
            path = self._start.path.partition("?")[0]
            context = {"request_id": resp.headers.get("X-Request-Id"), "status": status,
                       "method": self._start.method, "path": path, "ms": round(ms, 2)}  # fmt: skip
            access_log.log(
                level, "%d %s %s %.2fms", status, self._start.method, path, ms, extra=context
            )


_CORS_REQUEST_HEADERS = "Authorization, Content-Type, If-Match, If-None-Match, Idempotency-Key"
_CORS_EXPOSED = "ETag, Location, Retry-After, Idempotent-Replayed"


def make_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    caller: Identity | None,
    client: str,
    request_id: str,
) -> Request:
    """The core's `Request` for an HTTP request (its query parsed when first read)."""
    return Request(
        method,
        path,
        headers=headers,
        body=body,
        caller=caller,
        client=client,
        query_string=query,
        request_id=request_id,
    )


def unauthorized(refused: AuthError) -> Response:
    """The 401 for a token `CoreHTTP.caller` refused."""
    return Response.error(
        ApiError(401, "unauthorized", refused.message),
        {"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},  # as `CoreHTTP.serve`'s
    )


def cors_headers(origin: str) -> dict[str, str]:
    """The headers of an answer to an allowed ``origin`` (``Vary``: `CoreHTTP.add_cors`)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": _CORS_EXPOSED,
    }


def _remote_ip(conn: httputil.HTTPConnection) -> str:
    # HTTP1Connection carries the server's request context (not on the ABC).
    return str(getattr(getattr(conn, "context", None), "remote_ip", ""))


def is_api_path(path: str) -> bool:
    """Whether ``path`` (no query) is the core's, as `api_router` routes it."""
    return path.startswith("/api/") and path != "/api/publish"


def api_router(
    core_http: httputil.HTTPServerConnectionDelegate, rest: httputil.HTTPServerConnectionDelegate
) -> RuleRouter:
    """``/api/…`` (except ``/api/publish``) to the core; anything else to ``rest``."""
    return RuleRouter(
        [
            Rule(PathMatches(r"/api/(?!publish$).*"), core_http),
            Rule(AnyMatches(), rest),
        ]
    )
