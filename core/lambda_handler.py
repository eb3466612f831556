"""The REST core on AWS Lambda: ``core.lambda_handler.handler``.

One handler takes the three HTTP-shaped events Lambda receives:

* API Gateway HTTP API, payload format 2.0, and Lambda function URLs (the
  same shape): ``rawPath``, ``rawQueryString``, lower-case ``headers`` with
  repeated values comma-joined, ``cookies`` apart (ignored: the core reads
  no cookies);
* API Gateway REST API (and HTTP API 1.0) proxy events: ``path``,
  ``multiValueHeaders`` and ``multiValueQueryStringParameters`` (or their
  single-valued forms), answered with ``multiValueHeaders`` as well.

An event becomes the request line, headers and body an HTTP connection
would have delivered, and is answered by the very `CoreHTTP` delegate the
standalone server runs, through a connection that records the response
(`_Recorder`). Bearer-token auth, CORS and preflights, the 413 limit and the
500 for an unexpected error are therefore the server's own, not a copy.

A path that starts with ``/{stage}/`` (the HTTP API's ``rawPath`` on a named
stage, a REST API custom domain whose base path is the stage) is served
without that prefix; ``resource`` (``/{proxy+}``) is a template and never
used. Name no stage ``api`` behind a custom domain.

The container keeps one event loop for its life, and opens the core (pool,
limiter, broker) on its first invocation through `StandaloneCore`, as
``python -m core`` does; warm invocations reuse both, since asyncpg
connections belong to the loop that opened them. Between invocations Lambda
freezes the process and the core's timers with it, so before serving, a core
that has not caught up on revocations and API keys for `Core.REVOCATION_SYNC`
seconds does so first.

Nothing here raises into Lambda: an event of no known shape is 400, a core
that cannot open is 503 (database unreachable) or 500, anything unexpected is
500 with no internals in the body and the traceback in the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
import types
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlencode

import msgspec
from tornado import httputil

from core.app import Core
from core.errors import Unavailable, error_body, from_exception
from core.migrate import SchemaError
from core.server import StandaloneCore
from gateway.settings import Settings

__all__ = ["handler", "opened", "shutdown"]

log = logging.getLogger("core.lambda")

#: Response headers the service in front sets itself (from the body it sends on).
_SERVICE_HEADERS = frozenset({"content-length", "date"})


# -- events -----------------------------------------------------------------------


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


class _BadEvent(ValueError):
    """The event is not one of the three shapes, or its body does not decode."""


class _Incoming:
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


def _parse(event: object) -> _Incoming:
    if not isinstance(event, dict):
        raise _BadEvent("an HTTP event is a JSON object")
    try:
        if event.get("version") == "2.0":
            return _from_v2(msgspec.convert(event, _EventV2))
        if "httpMethod" in event:
            return _from_v1(msgspec.convert(event, _EventV1))
    except msgspec.ValidationError as exc:
        raise _BadEvent(str(exc)) from None
    raise _BadEvent("not an API Gateway (payload 1.0 or 2.0) or function URL event")


def _from_v2(ev: _EventV2) -> _Incoming:
    headers = _headers((ev.headers or {}).items())
    path = _without_stage(ev.raw_path, ev.request_context.stage)
    target = path + ("?" + ev.raw_query_string if ev.raw_query_string else "")
    body = _body(ev.body, ev.is_base64_encoded)
    method = ev.request_context.http.method.upper()
    return _Incoming(method, target, headers, body, ev.request_context.http.source_ip, False)


def _from_v1(ev: _EventV1) -> _Incoming:
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
    return _Incoming(ev.http_method.upper(), target, _headers(pairs), body, source_ip, True)


def _headers(pairs: Iterable[tuple[str, str]]) -> httputil.HTTPHeaders:
    headers = httputil.HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


def _without_stage(path: str, stage: str) -> str:
    path = (path or "/").replace("?", "%3F")  # a decoded "?" is not the query's
    if stage and stage != "$default":
        prefix = "/" + stage
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix) :] or "/"
    return path


def _body(body: str | None, encoded: bool) -> bytes:
    if not body:
        return b""
    if not encoded:
        return body.encode()
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error:
        raise _BadEvent("isBase64Encoded is true but the body is not base64") from None


# -- responses ----------------------------------------------------------------------


class _Recorder(httputil.HTTPConnection):
    """The connection `CoreHTTP` writes its answer to: it keeps the answer."""

    def __init__(self, remote_ip: str) -> None:
        self.context = types.SimpleNamespace(remote_ip=remote_ip)  # read for Request.client
        self.status: int | None = None
        self.headers = httputil.HTTPHeaders()
        self.chunks: list[bytes] = []

    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.status = start_line.code
        self.headers = headers
        return self.write(chunk or b"")

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        self.chunks.append(chunk)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        written.set_result(None)
        return written

    def finish(self) -> None:
        return None


def _reply(
    status: int, headers: httputil.HTTPHeaders, body: bytes, multi_value: bool
) -> dict[str, Any]:
    values: dict[str, list[str]] = {}
    for name, value in headers.get_all():
        if name.lower() not in _SERVICE_HEADERS:
            values.setdefault(name, []).append(value)
    try:
        text, encoded = body.decode(), False
    except UnicodeDecodeError:  # the core answers JSON; kept safe all the same
        text, encoded = base64.b64encode(body).decode(), True
    if multi_value:  # 1.0 merges both maps: one value each here, all of them there
        single = {name: vs[-1] for name, vs in values.items()}
    else:
        single = {name: ",".join(vs) for name, vs in values.items()}
    reply: dict[str, Any] = {
        "statusCode": status,
        "headers": single,
        "body": text,
        "isBase64Encoded": encoded,
    }
    if multi_value:
        reply["multiValueHeaders"] = values
    return reply


def _error(
    status: int,
    code: str,
    message: str,
    extra: dict[str, str] | None = None,
    multi_value: bool = False,
) -> dict[str, Any]:
    headers = _headers([("Content-Type", "application/json"), *(extra or {}).items()])
    return _reply(status, headers, error_body(status, code, message), multi_value)


# -- the container --------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, as the servers run (`gateway.runtime.run`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Container:
    """What one Lambda container keeps across invocations: a loop, and the core."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.stack: StandaloneCore | None = None
        self.synced = 0.0  # time.monotonic() of the last catch-up

    async def open(self) -> StandaloneCore:
        if self.stack is None:
            self.stack = await StandaloneCore.open(Settings.from_env())
            self.synced = time.monotonic()
            log.info("core opened (pool of schema %s)", self.stack.core.db.schema)
        return self.stack

    async def answer(self, req: _Incoming) -> dict[str, Any]:
        try:
            stack = await self.open()
        except SchemaError as exc:  # not migrated yet (or edited): the next invocation retries
            log.error("not serving: %s", exc)
            down = Unavailable()
            return _error(down.status, down.code, down.message, down.headers, req.multi_value)
        except Exception as exc:
            err = from_exception(exc, "opening the core")  # logs; 503 when unreachable
            return _error(err.status, err.code, err.message, err.headers, req.multi_value)
        await self._catch_up(stack.core)
        conn = _Recorder(req.source_ip)
        exchange = stack.api.start_request(None, conn)
        start = httputil.RequestStartLine(req.method, req.target, "HTTP/1.1")
        exchange.headers_received(start, req.headers)
        if req.body:
            exchange.data_received(req.body)
        exchange.finish()
        await stack.api.wait_idle()
        if conn.status is None:
            path = req.target.partition("?")[0]  # the query may carry anything
            raise RuntimeError(f"no response written for {req.method} {path}")
        return _reply(conn.status, conn.headers, b"".join(conn.chunks), req.multi_value)

    async def _catch_up(self, core: Core) -> None:
        now = time.monotonic()
        if now - self.synced < core.REVOCATION_SYNC:
            return
        self.synced = now
        try:
            await core.sync()
        except Exception as exc:
            log.warning("catching up on revocations failed: %s", exc)

    async def close(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None:
            await stack.close()


_container: _Container | None = None


def handler(event: object, context: object) -> dict[str, Any]:
    """The Lambda entry point: an HTTP event in, its response out; never raises."""
    global _container
    try:
        req = _parse(event)
    except _BadEvent as exc:
        return _error(400, "bad_request", str(exc))
    try:
        if _container is None:
            _container = _Container()
        return _container.loop.run_until_complete(_container.answer(req))
    except Exception:
        log.exception("unexpected error answering %s %s", req.method, req.target.partition("?")[0])
        return _error(500, "internal", "internal error", None, req.multi_value)


def opened() -> StandaloneCore | None:
    """The core this container opened, or None before the first invocation."""
    return _container.stack if _container is not None else None


def shutdown() -> None:
    """Close the core and the loop; the next invocation starts afresh (tests, benchmarks)."""
    global _container
    container, _container = _container, None
    if container is not None:
        try:
            container.loop.run_until_complete(container.close())
        finally:
            container.loop.close()
