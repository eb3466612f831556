"""Each route's largest request body, and who may send one: decided at the headers.

`RouteLimits` is the `Listener`'s body policy. A request that announces a
body (``Content-Length`` > 0 or ``Transfer-Encoding``) is refused before one
byte of it is read when

* no route has its path: 404 (for the core's routes also 405);
* the route needs a token and the request has none, or a bad one: 401 (the
  routes anyone may call ignore a token, as the core does);
* the route would refuse this caller anyway (403, or 404 for another
  user's account), as core/access.py decides from the token and the path;
* its ``Content-Length`` is over the route's limit: 413 (a chunked body is
  cut with 413 when it passes the limit).

Limits: the REST core's routes ``MAX_BODY_BYTES``, or their own
``max_body`` (8 KiB for those anyone may call without a token: login,
registration, refresh; none for logout); the server that uses the policy
adds its own handlers' limits (the gateway: ``POST /api/publish``
``MAX_PUBLISH_BYTES`` + 1024 for the envelope; ``POST /lp/<session>``
``MAX_BODY_BYTES``); every other route (``/ws``, ``/lp``, documents,
health, metrics) takes no body (0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qs

import tornado.web
from tornado import httputil

from core.access import check
from core.infra.errors import ApiError
from core.infra.identity import AuthError, Identity, token_from_header
from core.infra.settings import Settings
from core.infra.verify import Verifier
from core.routing import Router

__all__ = ["CORE_PATHS", "HandlerLimit", "RouteLimits"]

#: Paths the core's delegate serves (`core.http.api_router` routes them there).
CORE_PATHS = re.compile(r"/api/(?!publish$).*")


#: A handler's body limit, whether it needs a token (None: it authenticates its callers
#: itself, with credentials of its own), and whether the token may be in the query.
HandlerLimit = tuple[int, bool | None, bool]


class RouteLimits:
    """The body policy of one server: the core's router, the web application, the verifier.

    ``handlers`` gives the limits of the application's own handlers that take
    a body (any other takes none).
    """

    def __init__(
        self,
        settings: Settings,
        verifier: Verifier,
        core: Router,
        app: tornado.web.Application,
        handlers: dict[type, HandlerLimit] | None = None,
    ) -> None:
        self.verifier = verifier
        self.core = core
        self.app = app
        self.core_limit = settings.max_body_bytes
        self.handlers: dict[type, HandlerLimit] = dict(handlers or {})

    def __call__(self, start: httputil.RequestStartLine, headers: Mapping[str, str]) -> int:
        path, _, query = start.path.partition("?")
        if path == "/ws":
            return 0
        if CORE_PATHS.fullmatch(path):
            route, params = self.core.match(start.method, path)
            if not route.auth:  # anyone may call it: a token, good or bad, is not read
                return self.core_limit if route.max_body is None else route.max_body
            identity = self._authenticate(headers, None, required=True)
            if identity is not None and route.access is not None:
                # What the route would refuse from this caller, it refuses unread.
                if not getattr(identity, "rest", True):
                    raise ApiError(403, "forbidden", "this API key may not call the REST API")
                check(route.access, identity, params)
            return self.core_limit if route.max_body is None else route.max_body
        if not isinstance(headers, httputil.HTTPHeaders):
            headers = httputil.HTTPHeaders(headers)
        request = httputil.HTTPServerRequest(start_line=start, headers=headers)
        handler = self.app.find_handler(request).handler_class
        if handler is tornado.web.ErrorHandler or handler is self.app.settings.get(
            "default_handler_class"
        ):
            raise ApiError(404, "not_found", f"no route for {path}")
        limit, required, in_query = self.handlers.get(handler, (0, False, False))
        if required is None:
            return limit
        query_token = parse_qs(query).get("token", [None])[0] if in_query and query else None
        self._authenticate(headers, query_token, required=required)
        return limit

    def _authenticate(
        self, headers: Mapping[str, str], query_token: str | None, *, required: bool
    ) -> Identity | None:
        token = token_from_header(headers.get("Authorization")) or query_token
        if token is None:
            if required:
                raise ApiError(401, "unauthorized", "missing token")
            return None
        try:
            return self.verifier.verify(token)
        except AuthError as exc:
            raise ApiError(401, "unauthorized", exc.message) from None
