"""Logging set-up and the access log, which never shows a token."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from urllib.parse import unquote_plus

import tornado.web

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "TextFormatter",
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


class TextFormatter(logging.Formatter):
    """The terminal's format, context fields appended as ``key=value``, redacted too."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        extras = [
            f"{n}={record.__dict__[n]}"
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
    if status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    request = handler.request
    access_log.log(
        level,
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        redact(request.uri or ""),
        request.remote_ip,
        1000.0 * request.request_time(),
    )
