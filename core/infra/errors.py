"""The one error shape of every answer, and the one error type.

Every error answer, whatever raised it, has the body::

    {"error": {"status": 422, "code": "validation_error", "message": "...",
               "details": [{"path": "$.budget", "message": "..."}]}}

``details`` appears only where there are some. `ApiError` carries a status,
a stable machine-readable ``code``, a message safe to show the caller and
the headers to answer with. Which exception becomes which `ApiError` is
decided in one place, `core.errormap.from_exception`.
"""

from __future__ import annotations

import math
from http import HTTPStatus

import msgspec
import tornado.web

__all__ = [
    "ApiError",
    "Conflict",
    "ErrorBody",
    "ErrorDetail",
    "ErrorResponse",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "TooManyRequests",
    "Unavailable",
    "ValidationFailed",
    "default_code",
    "error_body",
]


class ErrorDetail(msgspec.Struct, frozen=True):
    path: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    status: int
    code: str
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    """The body of every error answer."""

    error: ErrorBody


class ApiError(tornado.web.HTTPError):
    """An answer other than success: status, stable code, safe message.

    The one error type of REST, the socket handshake, long-poll, SSE and
    ``rpc``. It is a Tornado `HTTPError`, so a handler may raise it and
    Tornado answers with its status; `core.errormap.from_exception` maps any
    other exception to one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[ErrorDetail] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.args = (message,)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        return error_body(self.status, self.code, self.message, self.details)


class NotFound(ApiError):
    def __init__(self, message: str = "not found") -> None:
        super().__init__(404, "not_found", message)


class Conflict(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(409, "conflict", message)


class PreconditionFailed(ApiError):
    def __init__(self, message: str = "If-Match does not match the current version") -> None:
        super().__init__(412, "precondition_failed", message)


class PayloadTooLarge(ApiError):
    """413 for a body over ``limit`` bytes (0: the route takes none)."""

    def __init__(self, limit: int) -> None:
        what = "this route takes no request body" if limit == 0 else f"body over {limit} bytes"
        super().__init__(413, "payload_too_large", what)


class ValidationFailed(ApiError):
    def __init__(self, details: list[ErrorDetail], message: str = "invalid request") -> None:
        super().__init__(422, "validation_error", message, details=details)


class TooManyRequests(ApiError):
    """429 with ``Retry-After`` (whole seconds, rounded up)."""

    def __init__(self, retry_after: float, what: str = "requests") -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            429,
            "rate_limited",
            f"too many {what}; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


class Unavailable(ApiError):
    def __init__(self, message: str = "service unavailable, retry later") -> None:
        super().__init__(503, "unavailable", message, headers={"Retry-After": "1"})


_encode = msgspec.json.Encoder().encode


def error_body(
    status: int, code: str, message: str, details: list[ErrorDetail] | None = None
) -> bytes:
    return _encode(ErrorResponse(ErrorBody(status, code, message, details)))


def default_code(status: int) -> str:
    """``method_not_allowed`` for 405, and so on; ``internal`` for any 5xx."""
    if status >= 500:
        return "internal"
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"
