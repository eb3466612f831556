"""Every ``code`` of the REST core's error body, and which operations answer it.

`ERRORS` names each code once: its status, when it is answered, a sample
message, and whether the answer carries ``Retry-After``. `route_errors`
derives, from a route's declarations alone, every code its operation can
answer; the OpenAPI document (core/openapi.py) lists them per status with an
example of each, and tests/test_core_docs.py checks that every code raised
anywhere in core/ is in the table, so the document cannot fall behind the
code.

`BEFORE_ROUTING` are the codes answered before a request reaches an
operation (the listener's limits, unknown paths and methods): they belong to
no operation and the document states them once, in its description.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from core.access import Access
from core.routing import Route

__all__ = ["BEFORE_ROUTING", "ERRORS", "ErrorDoc", "route_errors"]


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorDoc:
    status: int
    #: when it is answered (Markdown)
    when: str
    #: a message as the server writes it
    example: str
    #: ``Retry-After``: "always", "sometimes" or "never"
    retry_after: str = "never"


ERRORS: Final[dict[str, ErrorDoc]] = {
    "bad_request": ErrorDoc(400, "The request is not HTTP the server can read.", "Bad Request"),
    "malformed_json": ErrorDoc(
        400, "The body is not JSON, or is nested too deeply.", "request body is not JSON"
    ),
    "malformed_form": ErrorDoc(400, "The form body is not UTF-8.", "form body is not UTF-8"),
    "unexpected_body": ErrorDoc(
        400, "A body on an operation that takes none.", "this operation takes no body"
    ),
    "invalid_header": ErrorDoc(
        400,
        "An `If-Match` that cannot be one of our ETags (see the parameter's schema).",
        'If-Match must be "*" or an ETag like "3"',
    ),
    "invalid_grant": ErrorDoc(
        400,
        "Wrong e-mail or password, or a refresh token that is unknown, used (which revokes "
        "its session), revoked or expired.",
        "wrong e-mail or password",
    ),
    "unauthorized": ErrorDoc(
        401,
        "The bearer token is missing, malformed, expired or revoked (`WWW-Authenticate: Bearer`).",
        "missing token",
    ),
    "forbidden": ErrorDoc(
        403,
        "The operation's access rule refuses this caller (docs/security.md), or an API key "
        "without `rest`.",
        "admins only",
    ),
    "no_session": ErrorDoc(
        403,
        "The operation needs a token from a login here (claim `sid`).",
        "this token was not issued by a login here",
    ),
    "registration_closed": ErrorDoc(
        403, "This deployment creates no accounts (`REGISTRATION_OPEN`).", "registration is closed"
    ),
    "not_found": ErrorDoc(404, "No such resource (or another user's account).", "no such project"),
    "method_not_allowed": ErrorDoc(
        405, "The path has no such method (`Allow` lists those it has).", "PUT not allowed"
    ),
    "conflict": ErrorDoc(
        409,
        "A unique value (an e-mail address) is already in use.",
        "this e-mail address cannot be used",
    ),
    "limit_reached": ErrorDoc(
        409,
        "A user creating a project owns `MAX_PROJECTS_PER_USER` (1000) already: delete one first.",
        "you own 1000 projects, the most a user may: delete one",
    ),
    "idempotency_in_progress": ErrorDoc(
        409,
        "The first request with this `Idempotency-Key` is still running.",
        "a request with this Idempotency-Key is still running",
        retry_after="always",
    ),
    "precondition_failed": ErrorDoc(
        412,
        "`If-Match` is a well-formed ETag that is not the current version.",
        "If-Match does not match the current version",
    ),
    "payload_too_large": ErrorDoc(
        413,
        "A body over this operation's limit (`MAX_BODY_BYTES`, 8 KiB for the operations "
        "anyone may call, none for those that take no body).",
        "body over 1048576 bytes",
    ),
    "uri_too_long": ErrorDoc(
        414, "A request target over `MAX_HEADER_BYTES`.", "request target over 65536 bytes"
    ),
    "validation_error": ErrorDoc(
        422,
        "`details` lists every bad field by path (`$.milestones[1].title`, `query.limit`, "
        "`header.Idempotency-Key`), unknown fields included, up to 100 of them.",
        "invalid request",
    ),
    "idempotency_key_reused": ErrorDoc(
        422,
        "This `Idempotency-Key` was used for a different request (method, path or body).",
        "this Idempotency-Key was used for a different request",
    ),
    "rate_limited": ErrorDoc(
        429,
        "Too many requests (`RATE_REST` per caller, `RATE_LOGIN_IP` for logins and "
        "registrations, `MAX_PENDING_PER_IP` connections): retry after `Retry-After` seconds.",
        "too many requests; retry in 3 s",
        retry_after="always",
    ),
    "headers_too_large": ErrorDoc(
        431,
        "A request line and headers over `MAX_HEADER_BYTES`.",
        "request line and headers over 65536 bytes",
    ),
    "internal": ErrorDoc(500, "A bug: nothing about it is sent, the log has it.", "internal error"),
    "gateway_timeout": ErrorDoc(
        504,
        "A gateway that forwards to a separate core (`CORE_URL`) got no answer in `CORE_TIMEOUT`.",
        "the REST core did not answer in time",
    ),
    "not_implemented": ErrorDoc(
        501,
        "This deployment verifies tokens but issues none (`JWT_PUBLIC_KEY` or `JWT_JWKS_FILE` "
        "and no `JWT_SECRET` or signing keys): logging in is another service's.",
        "this deployment verifies tokens but issues none",
    ),
    "unavailable": ErrorDoc(
        503,
        "The database is unreachable or overloaded (retry after `Retry-After` seconds).",
        "service unavailable, retry later",
        retry_after="sometimes",
    ),
}

#: Answered before a request is an operation's: no operation lists them.
BEFORE_ROUTING: Final = ("bad_request", "not_found", "method_not_allowed", "uri_too_long",
                         "headers_too_large")  # fmt: skip

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def route_errors(route: Route) -> tuple[str, ...]:
    """Every error code ``route``'s operation can answer, in a stable order.

    Implied by its fields: a body (400 malformed, 422), a query (422), a
    token (401, 403, the per-caller rate), a session (403 ``no_session``), a
    path parameter (404), ``Idempotency-Key`` (409, 422), ``If-Match`` (400,
    412); every operation may meet 413, 429, 500, 503 and 504 (behind a
    gateway, gateway/upstream.py). ``route.errors``
    adds what its handler alone decides (409 for a taken e-mail address...).
    """
    codes = ["payload_too_large", "rate_limited", "internal", "unavailable", "gateway_timeout"]
    if route.body is not None:
        codes += ["malformed_json", "validation_error"]
    elif route.form is not None:
        codes += ["malformed_form", "validation_error"]
    elif route.method in _BODY_METHODS:
        codes.append("unexpected_body")
    if route.query is not None:
        codes.append("validation_error")
    if route.auth:
        codes += ["unauthorized", "forbidden"]
    if route.access is Access.SESSION:
        codes.append("no_session")
    if route.path_params():
        codes.append("not_found")
    if route.idempotent:
        codes += ["idempotency_in_progress", "idempotency_key_reused", "validation_error"]
    if any(h.name == "If-Match" for h in route.headers):
        codes += ["invalid_header", "precondition_failed"]
    codes += route.errors
    unknown = [c for c in codes if c not in ERRORS]
    if unknown:
        raise ValueError(f"{route.method} {route.path} declares unknown error codes {unknown}")
    return tuple(sorted(dict.fromkeys(codes), key=lambda c: (ERRORS[c].status, c)))
