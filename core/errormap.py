"""The one place an exception becomes an answer: `from_exception`.

REST (core/http.py, core/service.py), the Lambda handler, the gateway's own
HTTP handlers, the socket handshake and ``rpc`` all answer an exception with
the `ApiError` this returns (the error type and body: core/infra/errors.py).
Database errors become 409, 422 or 503; anything unknown becomes 500
``internal`` with no internals in the body (they go to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import asyncpg
import tornado.web

from core.infra.errors import (
    ApiError,
    Conflict,
    ErrorDetail,
    NotFound,
    Unavailable,
    ValidationFailed,
    default_code,
)
from core.infra.ids import request_id_of

__all__ = ["JsonErrors", "NotFoundHandler", "from_exception", "write_error"]

log = logging.getLogger("core.errormap")


def from_exception(exc: BaseException, context: str = "") -> ApiError:
    """The `ApiError` for any exception a handler raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, tornado.web.HTTPError):  # Tornado's own: 405, a malformed request
        status = exc.status_code
        return ApiError(status, default_code(status), exc.reason or _phrase(status))
    if isinstance(exc, asyncpg.UniqueViolationError):
        return _conflict(exc, context, "this conflicts with something that already exists")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return _conflict(exc, context, "this refers to something missing, or something in use")
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.DataError):
        # Validation runs first; reaching this means a rule exists only in SQL.
        log.warning("database refused a value in %s: %s", context, exc)
        return ValidationFailed([ErrorDetail("$", "a value is out of range")])
    if isinstance(exc, _UNAVAILABLE):
        log.warning("database unavailable in %s: %s", context, str(exc) or type(exc).__name__)
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


def _phrase(status: int) -> str:
    if status >= 500:
        return "internal error"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def write_error(handler: tornado.web.RequestHandler, status: int, exc_info: object) -> None:
    """`RequestHandler.write_error` for every Tornado handler: the one body and its headers.

    ``exc_info`` is what Tornado passes; without an exception (a handler
    called ``send_error`` itself), the answer is ``status`` with its code.
    The answer carries ``X-Request-Id`` as the REST answers do: the caller's
    when it is a sane one, else a new one.
    """
    exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    if isinstance(exc, BaseException):
        err = from_exception(exc, f"{handler.request.method} {handler.request.path}")
    else:
        err = ApiError(status, default_code(status), _phrase(status))
    handler.set_status(err.status)
    for name, value in err.headers.items():
        handler.set_header(name, value)
    if err.status == 401 and "WWW-Authenticate" not in err.headers:
        handler.set_header("WWW-Authenticate", "Bearer")
    handler.set_header("Content-Type", "application/json")
    handler.set_header(
        "X-Request-Id", request_id_of(handler.request.headers.get("X-Request-Id", ""))
    )
    handler.finish(err.body())


class JsonErrors(tornado.web.RequestHandler):
    """A Tornado handler whose errors are the one JSON body (`write_error`).

    `from_exception` logs what needs logging (an unexpected exception, with
    its traceback); an `ApiError` is an answer, not an event, so Tornado's
    own "Uncaught exception" line is not written as well.
    """

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_error(self, status_code, kwargs.get("exc_info"))

    def log_exception(self, *args: Any) -> None:
        pass


class NotFoundHandler(JsonErrors):
    """The ``default_handler_class`` of every `tornado.web.Application` here: a path no
    route takes is the one JSON 404, whatever the method (Tornado's own is an HTML page)."""

    def prepare(self) -> None:
        raise NotFound(f"no route for {self.request.path}")
