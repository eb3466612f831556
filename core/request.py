"""The small request and response objects every core handler speaks.

Transports (HTTP in the gateway, the standalone server, the socket's ``rpc``
frame, Lambda) build a `Request` and send back the `Response`; handlers
never see the transport. Header names are lower-case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs

from core.infra.errors import ApiError

__all__ = ["REST_COST_BYTES", "Caller", "Request", "Response", "rest_cost"]


class Caller(Protocol):
    """Who is calling: the verified identity (JWT ``sub``)."""

    @property
    def sub(self) -> str: ...


class Request:
    __slots__ = (
        "_query", "args", "body", "caller", "client", "data", "headers", "method", "params", "path",
        "query_string", "request_id",
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        caller: Caller | None = None,
        client: str = "",
        query_string: str = "",
        request_id: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self._query = query
        self.headers: Mapping[str, str] = headers or {}
        self.body = body
        self.caller = caller
        self.client = client  # the peer's IP address, where the transport knows it
        self.query_string = query_string  # as received, for a core elsewhere (gateway/upstream.py)
        self.request_id = request_id  # X-Request-Id of the answer, where the transport set one
        self.params: dict[str, str] = {}
        self.args: Any = None  # the route's query Struct, once validated
        self.data: Any = None  # the route's body Struct, once validated

    @property
    def query(self) -> Mapping[str, list[str]]:
        """The query's fields: ``query`` as given, else ``query_string`` parsed when first
        asked (as Tornado parses a path's; a core elsewhere is sent the string only)."""
        query = self._query
        if query is None:
            text = self.query_string
            query = self._query = parse_qs(text, keep_blank_values=True) if text else {}
        return query

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


#: A request counts against ``RATE_REST`` once more for each this many bytes of its body:
#: what one caller may write a second (and the change events and history it makes) is
#: bounded in bytes, not only in requests.
REST_COST_BYTES = 8192


def rest_cost(req: Request) -> int:
    """The requests ``req`` counts as against ``RATE_REST``: one, and one more a
    `REST_COST_BYTES` of its body."""
    return 1 + len(req.body) // REST_COST_BYTES


class Response:
    __slots__ = ("body", "headers", "length", "status")

    def __init__(
        self, status: int, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {}
        #: A JSON body's length where the body itself is not here: the core's answer to a
        #: ``HEAD`` behind ``CORE_URL``, written with that length and no body.
        self.length: int | None = None

    @classmethod
    def error(cls, err: ApiError, extra: dict[str, str] | None = None) -> Response:
        """The answer for ``err``: its status, the one error body, its headers."""
        return cls(err.status, err.body(), {**err.headers, **(extra or {})})

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body!r})"
