"""The REST core's one error shape, and the one place exceptions map to it.

Every error answer, whatever raised it, has the body::

    {"error": {"status": 422, "code": "validation_error", "message": "...",
               "details": [{"path": "$.budget", "message": "..."}]}}

``details`` appears only where there are some. `ApiError` carries a status,
a stable machine-readable ``code`` and a message safe to show the caller;
`from_exception` turns database errors into the same shape, and anything
unknown into 500 ``internal`` with no internals in the body (they go to the
log).
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec

__all__ = [
    "ApiError",
    "Conflict",
    "ErrorBody",
    "ErrorDetail",
    "ErrorResponse",
    "NotFound",
    "PreconditionFailed",
    "TooManyRequests",
    "Unavailable",
    "ValidationFailed",
    "error_body",
    "from_exception",
]

log = logging.getLogger("core.errors")


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


class ApiError(Exception):
    """An answer other than success: status, stable code, safe message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[ErrorDetail] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

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


def from_exception(exc: BaseException, context: str = "") -> ApiError:
    """The `ApiError` for any exception a handler raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        return _conflict(exc, context, "this conflicts with something that already exists")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return _conflict(exc, context, "this refers to something missing, or something in use")
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.DataError):
        # Validation runs first; reaching this means a rule exists only in SQL.
        log.warning("database refused a value in %s: %s", context, exc)
        return ValidationFailed([ErrorDetail("$", "a value is out of range")])
    if isinstance(exc, _UNAVAILABLE):
        log.warning("database unavailable in %s: %s", context, exc)
        return Unavailable()
    log.error("unexpected error in %s", context, exc_info=exc)
    return ApiError(500, "internal", "internal error")


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionFailureError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
)


def _conflict(exc: Any, context: str, message: str) -> Conflict:
    # The constraint's name is for the operator: the schema is no business of the caller's.
    log.info("conflict in %s: %s", context, getattr(exc, "constraint_name", None) or exc)
    return Conflict(message)
