"""Kept-alive REST connections behind ``CORE_URL``: each request forwarded with callbacks only.

`core.fastrest.RestConnection` answers an adopted connection's requests
with a task each: `CoreHTTP.serve` makes a `Request`, checks the caller and
awaits `UpstreamCore.dispatch`, which sends the request under
``asyncio.timeout`` through `CorePool.request` and makes a `Response` of the
answer. With one connection that machinery was most of the gateway's CPU
per forwarded request, and most of the latency its hop added (issue 16,
docs/performance.md). `ForwardConnection` does the same work without a
task, a future or a timeout context per request:

* a request `parse_head` read (or the first, Tornado's) is checked as
  `CoreHTTP.serve` checks it (the caller's token: 401 before the core is
  asked; CORS; the request id), and its head for the core is written at
  once on an idle pooled connection (`CorePool.take`), with the headers
  `UpstreamCore` sends (`forward_headers`: the verified credential, the
  client's address as resolved, the request id), and its deadline
  (``CORE_TIMEOUT``) noted for `UpstreamCore`'s sweep;
* the answer, once whole, is written to the client as the task path writes
  it, byte for byte. Most answers are already those bytes: the core writes
  its answers as the gateway does (`core.fastrest.answer_bytes`) and echoes
  the request id it was sent, so `VerbatimReader` checks that an answer's
  head has exactly that shape (the status line, fields the gateway keeps,
  spelled as it spells them, each once, the request id sent, ``Date``,
  ``Content-Type: application/json``, ``Content-Length``, nothing about the
  connection) and then passes its bytes through as they came, ``Date``
  included (the core's clock, not the gateway's; the same second in
  practice). Any other answer, and every answer to a ``HEAD``, to a
  request with ``Connection: close`` or to a CORS request, is read by
  `ResponseReader` and written anew (`response_of`, then
  `RestConnection._reply`). The latency metric, the breaker's count and
  the access log come after the write.

What this class does not do itself, the task path does, with everything it
does: a request finds no idle connection (the pool opens one or waits for
one, in order); the breaker is not closed (503, or the probe); a request
whose first attempt failed is retried if repeating it is harmless (GET,
HEAD, PUT, DELETE, OPTIONS, a POST or PATCH with an ``Idempotency-Key``),
from the second attempt on, so the attempts are ``CORE_RETRIES + 1`` in all
as before; a reused connection the core had closed is tried once more on a
new one, as `CorePool.request` does.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from core.errormap import from_exception
from core.fastrest import FastRest, RestConnection, RestRequest
from core.http import REASONS, make_request, unauthorized
from core.infra.errors import ApiError
from core.infra.identity import AuthError, Identity
from core.infra.ids import request_id_of
from core.infra.listener import Listener
from core.request import Response
from gateway.corepool import (
    MAX_BODY,
    Answer,
    ConnectionLost,
    CoreConnection,
    ProtocolError,
    ResponseReader,
    head_end,
    request_head,
)
from gateway.upstream import (
    RETRY_STATUS,
    UpstreamCore,
    forward_headers,
    repeatable_request,
    response_of,
)

__all__ = ["ForwardConnection", "Verbatim", "VerbatimReader"]

log = logging.getLogger("gateway.passthrough")

#: An answer head exactly as `core.fastrest.answer_bytes` writes it for a client that
#: sent no Origin and keeps its connection: fields the gateway passes on (none it
#: writes itself or drops), names spelled as it spells them, values with no space
#: around them, then the request id, Date, Content-Type and Content-Length.
_VERBATIM = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([A-Za-z][\x20-\x7e]*)\r\n"
    rb"((?:(?!(?:Connection|Keep-Alive|Transfer-Encoding|Content-Encoding|Content-Length"
    rb"|Content-Type|Date|Server|Vary|X-Request-Id|Access-Control-[A-Za-z0-9-]*):)"
    rb"[A-Z][a-z0-9]*(?:-[A-Z][a-z0-9]*)*: (?:[\x21-\x7e]+(?: [\x21-\x7e]+)*)?\r\n)*)"
    rb"X-Request-Id: ([A-Za-z0-9._:-]{1,64})\r\n"
    rb"Date: [\x21-\x7e]+(?: [\x21-\x7e]+)*\r\n"
    rb"Content-Type: application/json\r\n"
    rb"Content-Length: ([0-9]{1,10})\r\n\r\n"
)
_NAME = re.compile(rb"(?m)^([^:\r\n]+):")
_REASONS = {status: phrase.encode("ascii") for status, phrase in REASONS.items()}


def _varied(answer: bytes) -> bytes:
    """A verbatim answer with ``Vary: Origin`` after its status line (CORS origins named:
    every answer's headers depend on Origin, an answer to no Origin too)."""
    end = answer.index(b"\r\n") + 2
    return answer[:end] + b"Vary: Origin\r\n" + answer[end:]


class Verbatim:
    """An answer to pass on as it came: its status and all its bytes."""

    __slots__ = ("data", "status")

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data


class VerbatimReader:
    """Cuts one answer out of the bytes fed to it: a `Verbatim` when its head has the
    shape the client is to get (`_VERBATIM`, answering ``request_id``), else what a
    `ResponseReader` makes of it (an `Answer`). No I/O; `ProtocolError` as that reader."""

    __slots__ = ("_buf", "_inner", "_need", "_rid", "_status")

    def __init__(self, request_id: str) -> None:
        self._rid = request_id.encode("ascii")
        self._buf = b""
        self._need = -1  # the answer's length in bytes, once its head is in
        self._status = 0
        self._inner: ResponseReader | None = None

    @property
    def started(self) -> bool:
        return bool(self._buf) or self._need >= 0 or self._inner is not None

    def feed(self, data: bytes) -> Verbatim | Answer | None:
        if self._inner is not None:
            return self._inner.feed(data)
        buf = self._buf + data if self._buf else data
        if self._need < 0:
            end = head_end(buf)
            if end < 0:
                self._buf = buf
                return None
            shape = _VERBATIM.match(buf, 0, end + 4)
            if shape is None or not self._same(shape):
                self._buf = b""
                self._inner = ResponseReader()
                return self._inner.feed(buf)
            self._status = int(shape.group(1))
            self._need = end + 4 + int(shape.group(5))
        if len(buf) < self._need:
            self._buf = buf
            return None
        if len(buf) > self._need:
            raise ProtocolError("bytes past the answer")
        self._buf = b""
        return Verbatim(self._status, buf)

    def _same(self, shape: re.Match[bytes]) -> bool:
        """Whether the head that has the shape is what the gateway would write, byte for byte."""
        if shape.group(4) != self._rid or int(shape.group(5)) > MAX_BODY:
            return False
        if _REASONS.get(int(shape.group(1))) != shape.group(2):
            return False
        fields = shape.group(3)
        if not fields:
            return True
        names = _NAME.findall(fields)  # each once: the gateway would keep only the last
        return len(set(names)) == len(names)

    def feed_eof(self) -> Answer:
        if self._inner is not None:
            return self._inner.feed_eof()
        raise ProtocolError("connection closed in the middle of an answer")


class _Pending:
    """The request a `ForwardConnection` has forwarded and waits for the answer of."""

    __slots__ = (
        "caller",
        "origin",
        "path",
        "query",
        "repeatable",
        "request",
        "rid",
        "sent",
        "t0",
        "upstream",
    )

    def __init__(
        self,
        request: RestRequest,
        path: str,
        query: str,
        origin: str | None,
        rid: str,
        caller: Identity | None,
        t0: float,
        repeatable: bool,
    ) -> None:
        self.request = request
        self.path = path
        self.query = query
        self.origin = origin
        self.rid = rid
        self.caller = caller
        self.t0 = t0
        self.sent = 0.0
        self.repeatable = repeatable
        self.upstream: CoreConnection | None = None


class ForwardConnection(RestConnection):
    """A kept-alive ``/api/`` connection whose requests go to the core without a task each."""

    def __init__(
        self,
        proxy: FastRest,
        listener: Listener,
        address: Any,
        first: RestRequest,
        buffered: bytes,
    ) -> None:
        super().__init__(proxy, listener, address, first, buffered)
        core = proxy.api.core
        assert isinstance(core, UpstreamCore)
        self._core = core
        self._pending: _Pending | None = None

    def _start(self, request: RestRequest) -> None:
        try:
            self._forward(request)
        except Exception:  # a fault of this class: the client is not left waiting
            log.exception("forwarding a REST request failed")
            self._give_up()

    def _give_up(self) -> None:
        """Close the client's connection, and the upstream one a request may be under way on."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._core.deadlines.pop(self, None)
            self._api.release()
            if pending.upstream is not None:
                pending.upstream.detach()
                self._core.pool.give(pending.upstream, False)
        self._busy = False
        self._abort()

    def _forward(self, request: RestRequest) -> None:
        core = self._core
        if core.breaker.state != "closed":
            super()._start(request)  # 503 at once, or the probe
            return
        self._busy = True
        t0 = time.perf_counter()
        api = self._api
        headers = request.headers
        method = request.method
        path, _, query = request.target.partition("?")
        rid = request_id_of(headers.get("x-request-id", ""))
        origin = api.cors_origin(headers.get("origin"))
        try:
            caller = api.caller(method, path, headers.get("authorization"))
            fields = forward_headers(headers, getattr(caller, "token", None), request.client, rid)
            target = core.prefix + path + ("?" + query if query else "")
            head = request_head(method, target, core.pool.authority, fields, len(request.body))
        except AuthError as exc:
            self._reply(request, unauthorized(exc), origin, rid, path, t0)
            return
        except ValueError as exc:  # a header or path that cannot go over HTTP/1.1
            bad = Response.error(ApiError(400, "bad_request", str(exc)))
            self._reply(request, bad, origin, rid, path, t0)
            return
        except Exception as exc:  # logged with its traceback; the body says "internal error"
            failed = Response.error(from_exception(exc, f"{method} {path}"))
            self._reply(request, failed, origin, rid, path, t0)
            return
        if origin is None and not request.close and method != "HEAD":
            reader: VerbatimReader | ResponseReader = VerbatimReader(rid)
        else:
            reader = ResponseReader(method == "HEAD")
        repeatable = repeatable_request(method, path, headers, core.router)
        pending = _Pending(request, path, query, origin, rid, caller, t0, repeatable)
        upstream = core.pool.take()
        if upstream is None:  # the task path opens a connection, or waits for one
            self._again(pending, 0)
            return
        try:
            upstream.forward(head + request.body if request.body else head, reader, self._answered)
        except ConnectionLost:  # closed as it lay idle: the task path opens another
            core.pool.give(upstream, False)
            self._again(pending, 0)
            return
        pending.sent = time.perf_counter()
        pending.upstream = upstream
        self._pending = pending
        core.deadlines[self] = time.monotonic() + core.timeout  # `timed_out` past it
        api.hold()

    def _answered(self, result: object) -> None:
        """The upstream connection's callback: the core's answer, or what went wrong."""
        try:
            self._settle(result)
        except Exception:  # a fault of this class: the client is not left waiting
            log.exception("answering a forwarded REST request failed")
            self._give_up()

    def _settle(self, result: object) -> None:
        pending = self._taken()
        upstream = pending.upstream
        assert upstream is not None
        core = self._core
        if isinstance(result, Verbatim | Answer):
            core.pool.give(upstream, isinstance(result, Verbatim) or result.keep_alive)
            status = result.status
            if status in RETRY_STATUS and pending.repeatable and core.retries:
                core.seconds.observe(time.perf_counter() - pending.sent)
                core.counted(status)
                self._again(pending, 1)
                return
            if isinstance(result, Verbatim):
                request = pending.request
                data = result.data if not self._api.cors_origins else _varied(result.data)
                self._send(request, data)
                self._logged(request.method, pending.path, status, pending.rid, pending.t0)
            else:
                self._answer_with(pending, response_of(result))
            core.seconds.observe(time.perf_counter() - pending.sent)
            core.counted(status)
            return
        assert isinstance(result, Exception)
        if core.replaced(upstream, result, pending.repeatable):
            self._again(pending, 0)  # closed by the core as it was taken: once more, uncounted
            return
        self._failed(pending, core.unreachable(result))

    def timed_out(self) -> None:
        """The core did not answer within ``CORE_TIMEOUT`` (`UpstreamCore` keeps the time)."""
        try:
            self._expired()
        except Exception:  # a fault of this class: the client is not left waiting
            log.exception("timing out a forwarded REST request failed")
            self._give_up()

    def _expired(self) -> None:
        pending = self._taken()
        upstream = pending.upstream
        assert upstream is not None
        upstream.detach()
        self._core.pool.give(upstream, False)
        self._failed(pending, self._core.timed_out())

    def _taken(self) -> _Pending:
        pending, self._pending = self._pending, None
        assert pending is not None
        self._core.deadlines.pop(self, None)
        self._api.release()
        return pending

    def _failed(self, pending: _Pending, err: ApiError) -> None:
        if pending.repeatable and self._core.retries:
            self._again(pending, 1)
            return
        self._answer_with(pending, Response.error(err))

    def _again(self, pending: _Pending, tried: int) -> None:
        """Go on on the task path (`UpstreamCore.dispatch`), ``tried`` attempts made already."""
        self._api.track(self._dispatch(pending, tried))

    async def _dispatch(self, pending: _Pending, tried: int) -> None:
        request = pending.request
        headers, body, client = request.headers, request.body, request.client
        req = make_request(
            request.method,
            pending.path,
            pending.query,
            headers,
            body,
            pending.caller,
            client,
            pending.rid,
        )
        try:
            resp = await self._core.dispatch(req, tried)
        except Exception as exc:  # logged with its traceback; the body says "internal error"
            resp = Response.error(from_exception(exc, f"{request.method} {pending.path}"))
        self._answer_with(pending, resp)

    def _answer_with(self, pending: _Pending, resp: Response) -> None:
        self._reply(pending.request, resp, pending.origin, pending.rid, pending.path, pending.t0)
