"""Logging set-up and the access log, which never shows a token."""

from __future__ import annotations

import logging
import re

import tornado.web

__all__ = ["configure_logging", "log_request", "redact"]

access_log = logging.getLogger("gateway.access")

_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&])(?:token|access_token|api_key)=)[^&#]*")


def redact(uri: str) -> str:
    """``/ws?token=abc&x=1`` -> ``/ws?token=[redacted]&x=1``."""
    return _SECRET_PARAMS.sub(r"\1[redacted]", uri)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


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
