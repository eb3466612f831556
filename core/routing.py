"""The route table: one list of `Route` serves HTTP, ``rpc`` frames and OpenAPI.

A route names its method, path template (``/api/projects/{id}``), handler,
and the types of its query string, body and success responses. The router
decodes and validates the query and body before the handler runs, so a
handler receives typed values; the OpenAPI document is generated from the
same fields. Each route declares its `Access` rule beside it; a route
without one is refused when the router is built.

Path parameters are row ids (`ROW_ID`: what `int_param` accepts) unless a
route names another schema in ``params`` (`UUID_ID`: what `uuid_param`
accepts); the document states exactly what the parsers take.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence

from core.access import Access
from core.infra.errors import ApiError, NotFound
from core.request import Request, Response

__all__ = [
    "ROW_ID",
    "UUID_ID",
    "Handler",
    "HeaderParam",
    "Route",
    "Router",
    "int_param",
    "uuid_param",
]

Handler = Callable[[Request], Awaitable[Response]]

_PARAM = re.compile(r"\{([a-z_]+)\}")
_ROW_ID_DIGITS = 18
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![\s\S])"
#: The schema of a row id in a path (`int_param`), and of a UUID (`uuid_param`).
ROW_ID: Mapping[str, object] = {
    "type": "integer",
    "minimum": 1,
    "maximum": 10**_ROW_ID_DIGITS - 1,
}
UUID_ID: Mapping[str, object] = {"type": "string", "format": "uuid", "pattern": _UUID}


def int_param(req: Request, what: str, name: str = "id") -> int:
    """A path parameter that is a row id; anything else names no ``what``: 404."""
    raw = req.params[name]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > _ROW_ID_DIGITS:
        raise NotFound(f"no {what} {raw[:40]}")
    return int(raw)


def uuid_param(req: Request, name: str = "id") -> str | None:
    """A path parameter that is a UUID (lower-case), or None when it cannot be one."""
    raw = req.params[name]
    return raw if re.match(_UUID, raw) else None


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderParam:
    """A request header a route reads, for the document."""

    name: str
    description: str
    schema: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: {"type": "string", "minLength": 1, "maxLength": 255}
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    operation_id: str
    tag: str
    #: success status -> response body type (None: no body)
    responses: Mapping[int, object]
    body: type | None = None
    #: a form-encoded body (``application/x-www-form-urlencoded``), as OAuth2 wants
    form: type | None = None
    query: type | None = None
    headers: tuple[HeaderParam, ...] = ()
    #: error codes (core/errorcodes.py) this route answers besides those its
    #: other fields imply (`core.errorcodes.route_errors` says which those are)
    errors: tuple[str, ...] = ()
    #: who may call it and act on its object (core/access.py); every route names one
    access: Access | None = None
    #: the largest body it takes, in bytes (None: MAX_BODY_BYTES); checked at
    #: the headers, before a byte of the body is read
    max_body: int | None = None
    #: POST routes that honour Idempotency-Key
    idempotent: bool = False
    description: str = ""
    #: path parameter -> its schema, for those that are not row ids (`ROW_ID`)
    params: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    #: where a 201's ``Location`` points (a path template; None: no Location)
    location: str | None = None
    #: whether success answers carry an ``ETag`` (the resource's version)
    etag: bool = False
    #: OpenAPI links from the success answer beyond those the route table implies
    #: (core/openapilinks.py): link name -> Link Object
    links: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)

    @property
    def auth(self) -> bool:
        """Whether the route needs a token."""
        return self.access is not Access.PUBLIC

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", self.path) + r"\Z")

    def path_params(self) -> list[str]:
        return _PARAM.findall(self.path)

    def param_schema(self, name: str) -> Mapping[str, object]:
        """The schema of path parameter ``name``: a row id unless ``params`` says otherwise."""
        return self.params.get(name, ROW_ID)


class Router:
    """Matches (method, path) to a route: 404 for no path, 405 for no method."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        by_path: dict[str, dict[str, Route]] = {}
        for route in self.routes:
            if route.access is None:
                raise ValueError(f"route {route.method} {route.path} declares no access rule")
            methods = by_path.setdefault(route.path, {})
            if route.method in methods:
                raise ValueError(f"duplicate route {route.method} {route.path}")
            methods[route.method] = route
        # Static paths by dict lookup; templated ones by regex, in order.
        self._static = {p: m for p, m in by_path.items() if "{" not in p}
        self._dynamic = [
            (methods[next(iter(methods))].pattern(), methods)
            for p, methods in by_path.items()
            if "{" in p
        ]

    def _find(self, path: str) -> tuple[dict[str, Route], dict[str, str]]:
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        for pattern, candidates in self._dynamic:
            m = pattern.match(path)
            if m is not None:
                return candidates, m.groupdict()
        raise NotFound(f"no route for {path}")

    def allow(self, path: str) -> str | None:
        """The ``Allow`` header for ``path``; None when no route has it."""
        try:
            methods, _ = self._find(path)
        except NotFound:
            return None
        return ", ".join(sorted(methods))

    def is_public(self, method: str, path: str) -> bool:
        """Whether ``method path`` is an operation anyone may call (its token is not read)."""
        try:
            methods, _ = self._find(path)
        except NotFound:
            return False
        route = methods.get(method)
        return route is not None and not route.auth

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        methods, params = self._find(path)
        route = methods.get(method)
        if route is None:
            allow = ", ".join(sorted(methods))
            raise ApiError(
                405, "method_not_allowed", f"{method} not allowed", headers={"Allow": allow}
            )
        return route, params
