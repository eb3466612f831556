"""Logging set-up and the access log, which never shows a token."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import tornado.web

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "access_level",
    "configure_logging",
    "log_request",
    "redact",
]

access_log = logging.getLogger("gateway.access")

#: Query parameters whose values are secrets, compared after percent-decoding.
_SECRET_PARAMS = frozenset({"token", "access_token", "refresh_token", "api_key", "password"})
# A parameter: its name as sent (after ?, &, ; or a space) up to =, then its value.
_PARAM = re.compile(r"(^|[?&;\s])([^?&;=#\s]*)=([^&;#\s]*)")


def _redact_param(m: re.Match[str]) -> str:
    # The server decodes names (?%74oken= is ?token=), so the log must too.
    name = unquote_plus(m.group(2)).strip().casefold()
    if name in _SECRET_PARAMS:
        return f"{m.group(1)}{m.group(2)}=[redacted]"
    return m.group(0)


def access_level(status: int) -> int:
    """The level of an access log line: ``INFO`` below 500, ``WARNING`` for 503, else ``ERROR``.

    A 4xx is the client's doing, and any client can ask for as many as it
    sends requests: at ``WARNING`` one client with no token made thousands
    of warnings a second, past a ``LOG_LEVEL=WARNING`` meant to keep
    per-request lines out (metrics count them by route and status). A 503
    says the process is draining, full or without its database, which it
    logs where it finds it out.
    """
    if status < 500:
        return logging.INFO
    return logging.WARNING if status == 503 else logging.ERROR


def redact(uri: str) -> str:
    """``/ws?token=abc&x=1`` -> ``/ws?token=[redacted]&x=1``, whatever spelling of the name."""
    return _PARAM.sub(_redact_param, uri)


#: Fields a log call may add (``extra={...}``), carried into JSON lines.
CONTEXT_FIELDS = ("request_id", "conn", "user", "code", "status", "method", "path", "ms", "worker")
_TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context fields, exc.

    The message goes through `redact`, so a URL with a token in its query
    never reaches the log in full.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


#: What a terminal acts on or a log reader splits lines at: C0 controls but tab, DEL, C1
#: (NEL, CSI) and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_LF = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    return m[0].encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """The terminal's format, context fields appended as ``key=value``, redacted too.

    Control characters a client sent (a path's C1 bytes, a claim) are
    written escaped (``\\x1b``, ``\\n``): they would act on the terminal
    (ANSI escapes) or forge a line. A traceback keeps its line breaks.
    """

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(_escape, super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _CONTROL_BUT_LF.sub(_escape, super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _CONTROL_BUT_LF.sub(_escape, super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        extras = [
            f"{n}={_CONTROL.sub(_escape, str(record.__dict__[n]))}"
            for n in CONTEXT_FIELDS
            if record.__dict__.get(n) is not None
        ]
        return f"{text} [{' '.join(extras)}]" if extras else text


def configure_logging(level: str, fmt: str = "auto") -> None:
    """Logs to stderr: ``json`` lines, ``text``, or ``auto`` (text on a terminal, else JSON)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's ``log_function``: one line per request, query redacted."""
    status = handler.get_status()
    request = handler.request
    access_log.log(
        access_level(status),
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        redact(request.uri or ""),
        request.remote_ip,
        1000.0 * request.request_time(),
    )
