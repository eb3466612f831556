"""The HTTP-shaped events Lambda delivers, and what an HTTP connection would have delivered.

`parse_event` takes an API Gateway HTTP API (payload 2.0) or function URL
event, or a REST API (payload 1.0) proxy event, and gives the `Incoming`
request line, headers, body and source address, or raises `BadEvent`. The
schemas hold only the fields the core needs; everything else in an event is
ignored. core/lambda_handler.py answers the request.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Literal
from urllib.parse import urlencode

import msgspec
from tornado import httputil

__all__ = ["BadEvent", "Incoming", "headers_of", "parse_event"]


class _Http(msgspec.Struct, rename="camel"):
    method: str
    source_ip: str = ""


class _ContextV2(msgspec.Struct, rename="camel"):
    http: _Http
    stage: str = "$default"


class _EventV2(msgspec.Struct, rename="camel"):
    """HTTP API payload 2.0 and function URLs: only the fields the core needs."""

    version: Literal["2.0"]
    raw_path: str
    request_context: _ContextV2
    raw_query_string: str = ""
    headers: dict[str, str] | None = None
    body: str | None = None
    is_base64_encoded: bool = False


class _Identity(msgspec.Struct, rename="camel"):
    source_ip: str | None = None


class _ContextV1(msgspec.Struct, rename="camel"):
    stage: str = ""
    identity: _Identity | None = None


class _EventV1(msgspec.Struct, rename="camel"):
    """REST API proxy events (and HTTP API payload 1.0)."""

    http_method: str
    path: str
    request_context: _ContextV1
    headers: dict[str, str] | None = None
    multi_value_headers: dict[str, list[str]] | None = None
    query_string_parameters: dict[str, str] | None = None
    multi_value_query_string_parameters: dict[str, list[str]] | None = None
    body: str | None = None
    is_base64_encoded: bool | None = False


class BadEvent(ValueError):
    """The event is not one of the three shapes, its body does not decode, or it holds
    a header no HTTP connection carries."""


class Incoming:
    """An event as an HTTP connection would have delivered it."""

    __slots__ = ("body", "headers", "method", "multi_value", "source_ip", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: httputil.HTTPHeaders,
        body: bytes,
        source_ip: str,
        multi_value: bool,
    ) -> None:
        self.method = method
        self.target = target  # path?query, as in a request line
        self.headers = headers
        self.body = body
        self.source_ip = source_ip
        self.multi_value = multi_value  # answer with multiValueHeaders (format 1.0)


def parse_event(event: object) -> Incoming:
    if not isinstance(event, dict):
        raise BadEvent("an HTTP event is a JSON object")
    try:
        if event.get("version") == "2.0":
            return _from_v2(msgspec.convert(event, _EventV2))
        if "httpMethod" in event:
            return _from_v1(msgspec.convert(event, _EventV1))
    except msgspec.ValidationError as exc:
        raise BadEvent(str(exc)) from None
    except UnicodeError:  # a lone surrogate, which stands for no byte (in a query, say)
        raise BadEvent("the event holds text that is not UTF-8 (a lone surrogate)") from None
    raise BadEvent("not an API Gateway (payload 1.0 or 2.0) or function URL event")


def _from_v2(ev: _EventV2) -> Incoming:
    headers = _received((ev.headers or {}).items())
    path = _without_stage(ev.raw_path, ev.request_context.stage)
    query = ev.raw_query_string
    # As the path's: before, a lone surrogate here was a 500 with a traceback from the
    # query's validation (payload 1.0's parameters are refused in `parse_event`).
    query.encode("utf-8")
    target = path + ("?" + query if query else "")
    body = _body(ev.body, ev.is_base64_encoded)
    method = ev.request_context.http.method.upper()
    return Incoming(method, target, headers, body, ev.request_context.http.source_ip, False)


def _from_v1(ev: _EventV1) -> Incoming:
    if ev.multi_value_headers is not None:
        pairs = [(k, v) for k, values in ev.multi_value_headers.items() for v in values]
    else:
        pairs = list((ev.headers or {}).items())
    if ev.multi_value_query_string_parameters is not None:
        query = urlencode(ev.multi_value_query_string_parameters, doseq=True)
    else:
        query = urlencode(ev.query_string_parameters or {})
    path = _without_stage(ev.path, ev.request_context.stage)
    identity = ev.request_context.identity
    source_ip = (identity.source_ip if identity is not None else None) or ""
    body = _body(ev.body, bool(ev.is_base64_encoded))
    target = path + ("?" + query if query else "")
    return Incoming(ev.http_method.upper(), target, _received(pairs), body, source_ip, True)


def headers_of(pairs: Iterable[tuple[str, str]]) -> httputil.HTTPHeaders:
    headers = httputil.HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


def _received(pairs: Iterable[tuple[str, str]]) -> httputil.HTTPHeaders:
    """Request headers as an HTTP server reads them, or `BadEvent`.

    The services hand on a header's bytes decoded as UTF-8 (``Srīperumbūdūr``); a server
    reads each byte as one character (Tornado: latin-1) and drops the spaces around a
    value. A name or value no connection could carry (a control character) is refused.
    """
    headers = httputil.HTTPHeaders()
    for name, value in pairs:
        try:
            headers.add(name, _bytes(value).decode("latin-1").strip(" \t"))
        except (httputil.HTTPInputError, UnicodeError):
            raise BadEvent(f"header {name[:64]!r}: no HTTP connection carries it") from None
    return headers


def _bytes(text: str) -> bytes:
    """The bytes ``text`` was decoded from (UTF-8; undecodable bytes as Python escapes them)."""
    return text.encode("utf-8", "surrogateescape")


def _without_stage(path: str, stage: str) -> str:
    path = (path or "/").replace("?", "%3F")  # a decoded "?" is not the query's
    # A lone surrogate stands for no byte of a request line: refused here (UnicodeError),
    # else every answer naming the path (a 404's message) failed to encode, a 500.
    path.encode("utf-8")
    if stage and stage != "$default":
        prefix = "/" + stage
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix) :] or "/"
    return path


def _body(body: str | None, encoded: bool) -> bytes:
    if not body:
        return b""
    if not encoded:
        return _bytes(body)
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error:
        raise BadEvent("isBase64Encoded is true but the body is not base64") from None
