"""Serving the server API: who may call it, at the headers and per request, and who did.

`ServerAPI` is served by the core's HTTP delegate (`core.http.CoreHTTP`, the
same fast path, error bodies, request ids and access log as ``/api/``), in
front of the core's routes, so ``/api/server/`` answers on a gateway whose
REST core is elsewhere (``CORE_URL``) too. Per request:

* no token, or a bad one: 401; a caller that is neither an admin nor an API
  key with the ``server`` scope: 403 (`core.access.Access.SERVER`), whether
  or not the key may call the REST API;
* over ``RATE_REST`` (shared with the REST API): 429;
* the body validated against the route's type: 400 / 422, with every bad field.

Every call is logged with who made it, what, and how it ended; refusals
too, at warning level. `ServerBodyPolicy` refuses the same callers at the
headers, before a byte of their body is read (core/bodylimits.py does this
for every other route).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from tornado import httputil

from core.access import Access, check
from core.errormap import from_exception
from core.infra.errors import ApiError, TooManyRequests
from core.infra.identity import AuthError, principal, token_from_header
from core.infra.logs import access_level
from core.infra.ratelimit import RateLimiter, over_limit
from core.infra.settings import Settings
from core.infra.verify import Verifier
from core.request import Request, Response
from core.routing import Route, Router
from core.validation import decode_body
from gateway.serverapi.routes import PREFIX, caller_name

__all__ = ["ServerAPI", "ServerBodyPolicy"]

log = logging.getLogger("gateway.serverapi")

#: The bound of the core's body policy: ``(start line, headers) -> largest body``.
BodyPolicy = Callable[[httputil.RequestStartLine, Mapping[str, str]], int]
_BEARER = {"WWW-Authenticate": "Bearer"}


class ServerAPI:
    """The server API's routes, and `dispatch` (what `core.http.CoreHTTP` calls)."""

    def __init__(self, routes: list[Route], settings: Settings, limiter: RateLimiter) -> None:
        self.routes = tuple(routes)
        self.router = Router(self.routes)
        self._settings = settings
        self._limiter = limiter
        #: The largest body a call takes: a broadcast of the largest publication to
        #: a thousand of the longest channel names, and room for the envelope.
        self.max_body = settings.max_publication_bytes + 256 * 1024
        #: metrics hook: (operation id, status, seconds) per request
        self.observe: Callable[[str, int, float], None] | None = None

    async def dispatch(self, req: Request) -> Response:
        started = time.perf_counter()
        op = "unmatched"
        try:
            route, req.params = self.router.match(req.method, req.path)
            op = route.operation_id
            resp = await self._run(route, req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            resp = Response.error(from_exception(exc, f"{req.method} {req.path}"))
        if self.observe is not None:
            self.observe(op, resp.status, time.perf_counter() - started)
        who = caller_name(req.caller) if req.caller is not None else "anonymous"
        log.log(
            access_level(resp.status),
            "server API %s by %s: %d",
            op,
            who,
            resp.status,
            extra={"user": who, "status": resp.status},
        )
        return resp

    async def _run(self, route: Route, req: Request) -> Response:
        caller = req.caller
        if caller is None:
            raise ApiError(401, "unauthorized", "missing token", headers=_BEARER)
        check(Access.SERVER, caller, req.params)
        wait = await over_limit(
            self._limiter, f"rest:{principal(caller)}", self._settings.rate_rest
        )
        if wait is not None:
            raise TooManyRequests(wait)
        assert route.body is not None  # every server route takes a JSON body (``{}`` at least)
        body = req.body if _keeps_bytes(route.body) else _integral(req.body)
        req.data = decode_body(route.body, body)
        return await route.handler(req)


def _keeps_bytes(tp: type) -> bool:
    """Whether a body type holds data as sent (``data``), which must not be rewritten."""
    return any(f.type is msgspec.Raw for f in msgspec.structs.fields(tp))


def _integral(body: bytes) -> bytes:
    """``body`` with integral numbers written as integers (``755.0`` as ``755``).

    JSON Schema's integers include them, so a field the document says is an
    integer takes them; anything else is left for the decoder to judge.
    """
    try:
        return msgspec.json.encode(_ints(msgspec.json.decode(body)))
    except (msgspec.DecodeError, RecursionError):
        return body


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    return value


class ServerBodyPolicy:
    """The listener's body policy: the server API's routes here, the rest to ``inner``."""

    def __init__(self, api: ServerAPI, verifier: Verifier, inner: BodyPolicy) -> None:
        self._api = api
        self._verifier = verifier
        self._inner = inner

    def __call__(self, start: httputil.RequestStartLine, headers: Mapping[str, str]) -> int:
        path = start.path.partition("?")[0]
        if not path.startswith(PREFIX):
            return self._inner(start, headers)
        route, params = self._api.router.match(start.method, path)
        who = "anonymous"
        try:
            token = token_from_header(headers.get("Authorization"))
            if token is None:
                raise ApiError(401, "unauthorized", "missing token", headers=_BEARER)
            try:
                identity = self._verifier.verify(token)
            except AuthError as exc:
                raise ApiError(401, "unauthorized", exc.message, headers=_BEARER) from None
            who = caller_name(identity)
            check(Access.SERVER, identity, params)
        except ApiError as exc:
            log.log(
                access_level(exc.status),
                "server API %s by %s: %d (at the headers)",
                route.operation_id,
                who,
                exc.status,
                extra={"user": who, "status": exc.status},
            )
            raise
        return self._api.max_body
