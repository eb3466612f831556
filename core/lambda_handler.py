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
(`_Recorder`; the events' shapes and their parsing are in
core/lambda_events.py). Bearer-token auth, CORS and preflights, the 413 limit and the
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
seconds does so first, from the database. A broadcast revocation waits
unread on the frozen container's socket until after the request that thaws
it is verified; so with ``REDIS_URL``, a container that has not looked for
`RECENT_CHECK` seconds first reads the session revocations stored since
its last look (one Redis range read, `Revocations.catch_up_recent`): a
logout elsewhere is refused here within about a second. Without
``REDIS_URL`` there is no such store, and the 30 s sync is all.

Nothing here raises into Lambda: an event of no known shape, or with a header
no HTTP connection carries, is 400, a core that cannot open is 503 (database
unreachable) or 500, anything unexpected (in reading the event too) is 500
with no internals in the body and the traceback in the log.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import types
from typing import Any

from tornado import httputil

from core.errormap import from_exception
from core.infra.errors import ApiError, Unavailable
from core.infra.settings import Settings
from core.lambda_events import BadEvent, Incoming, headers_of, parse_event
from core.migrate import SchemaError
from core.server import StandaloneCore
from core.service import Core

__all__ = ["handler", "opened", "shutdown"]

log = logging.getLogger("core.lambda")

#: Seconds a warm container trusts its list of revoked sessions before reading the
#: revocations stored since (with ``REDIS_URL``).
RECENT_CHECK = 1.0

#: Response headers the service in front sets itself (from the body it sends on).
_SERVICE_HEADERS = frozenset({"content-length", "date"})


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


def _error(err: ApiError, multi_value: bool = False) -> dict[str, Any]:
    headers = headers_of([("Content-Type", "application/json"), *err.headers.items()])
    return _reply(err.status, headers, err.body(), multi_value)


# -- the container --------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, as the servers run (`core.infra.runtime.run`)."""
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
        self.synced = 0.0  # time.monotonic() of the last catch-up from the database
        self.checked = 0.0  # time.monotonic() of the last look for recent revocations
        self.seen = 0.0  # time.time() the last look (or catch-up) began: the next reads on

    async def open(self) -> StandaloneCore:
        if self.stack is None:
            began = time.time()
            self.stack = await StandaloneCore.open(Settings.from_env())
            self.synced = self.checked = time.monotonic()
            self.seen = began
            log.info("core opened (pool of schema %s)", self.stack.core.db.schema)
        return self.stack

    async def answer(self, req: Incoming) -> dict[str, Any]:
        try:
            stack = await self.open()
        except SchemaError as exc:  # not migrated yet (or edited): the next invocation retries
            log.error("not serving: %s", exc)
            return _error(Unavailable(), req.multi_value)
        except Exception as exc:  # logged; 503 when the database is unreachable
            return _error(from_exception(exc, "opening the core"), req.multi_value)
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
        if now - self.synced >= core.REVOCATION_SYNC:
            self.synced = now
            began = time.time()
            try:
                await core.sync()
            except Exception as exc:  # the store may still answer: looked at below
                log.warning("catching up on revocations failed: %s", exc)
            else:
                self.checked, self.seen = now, began
                return
        if now - self.checked < RECENT_CHECK:
            return
        self.checked = now
        began = time.time()
        if await core.revocations.catch_up_recent(self.seen) is not None:
            self.seen = began

    async def close(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None:
            await stack.close()


_container: _Container | None = None


def handler(event: object, context: object) -> dict[str, Any]:
    """The Lambda entry point: an HTTP event in, its response out; never raises."""
    global _container
    try:
        req = parse_event(event)
    except BadEvent as exc:
        return _error(ApiError(400, "bad_request", str(exc)))
    except Exception as exc:  # a fault of the parsing's, not the event's: logged, 500
        return _error(from_exception(exc, "reading the event"))
    try:
        if _container is None:
            _container = _Container()
        return _container.loop.run_until_complete(_container.answer(req))
    except Exception as exc:  # logged with its traceback; the body says "internal error"
        context = f"{req.method} {req.target.partition('?')[0]}"  # the query may carry anything
        return _error(from_exception(exc, context), req.multi_value)


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
