"""The core's ``/api/`` routes on kept-alive connections, served off Tornado.

For a REST call most of the server's own work is being an HTTP/1.1 server:
Tornado reading and parsing the request (its `HTTP1Connection`, a coroutine
and futures per request, `HTTPHeaders`, the listener's guard, the router)
and writing the answer through its `IOStream`: about two thirds of the
gateway's CPU per request forwarded behind ``CORE_URL``, half of it per
``POST /api/projects`` answered by the core in-process (py-spy,
bench/proxy.py, bench/rest.py). `FastRest` stands in front of the core's
delegate (`core.http.CoreHTTP`, whichever core it drives: the one in this
process, in the gateway or in ``python -m core``, or `UpstreamCore` behind
``CORE_URL``) and, once a kept-alive connection's ``/api/`` request has gone
through Tornado and the listener's guard, takes its socket off Tornado (as
long-poll connections are, gateway/transport/pollconn.py; the move is
core/infra/adoption.py) and gives it to the event loop's transport with a
`RestConnection`. From then on:

* each request head is read by `parse_head`, which accepts only a strict
  subset of HTTP/1.1: ``GET``, ``HEAD``, ``POST``, ``PUT``, ``PATCH`` or
  ``DELETE`` of a core path (`core.http.is_api_path`, in the gateway
  `gateway.router.is_core_path`), ``HTTP/1.1``,
  CRLF line ends, header names that are tokens followed at once by ``:``,
  printable ASCII values, each name at most once, a ``Host``, at most one
  ``Content-Length`` of digits within the body limits, ``Connection`` only
  ``keep-alive`` or ``close``. Anything else (``Transfer-Encoding``,
  ``Expect``, ``Upgrade``, obs-fold, a bare CR or LF, whitespace before a
  colon, ``OPTIONS`` and preflights, another path, a head past
  ``MAX_HEADER_BYTES``) goes back to Tornado with every byte not yet
  answered (`Listener.resume`), and is answered there exactly as on any
  connection: the same parser, limits, errors and logs. So there is one
  reading of a request's framing for what this class accepts, and
  Tornado's for everything else: no request can be cut in two ways;
* a request with a body asks the listener's body policy first, as the
  guard does; a refusal (401, 403, 404, 413) goes back to Tornado, which
  refuses it in the same words;
* the answer is what `CoreHTTP` would write, byte for byte but the ``Date``
  and a new request id: the same token check (401 before the core is
  asked), request id, CORS headers, ``X-Forwarded-For`` replaced with the
  client's address as the listener resolves it (`TrustedProxies`), the
  same `Request` (its query parsed as Tornado's path parses it) given to the
  same ``dispatch`` (the core's: rate limits, Idempotency-Key, ETags,
  metrics; or `UpstreamCore`'s: breaker, retries, 503 with ``Retry-After``,
  504), the same access log line;
* requests are answered in order, one at a time; pipelined ones wait in a
  buffer (reading pauses past twice ``MAX_HEADER_BYTES``), and the next is
  not read while an answer is still unsent. Requests answered at once (a
  401 before the core) are taken in a loop, at most `_AT_ONCE` before the
  event loop's other callbacks run: a thousand pipelined in one write once
  recursed, answer into next request, to Python's limit (docs/security.md).
  ``Connection: close`` closes after its answer;
* between requests the connection has ``HEADER_TIMEOUT`` for the next head
  and ``BODY_TIMEOUT`` for a body (kept by the listener, as for Tornado's
  connections), and is closed with the listener's connections; answers
  being computed count for `CoreHTTP.wait_idle` (a drain finishes them).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any, cast

from tornado import httputil
from tornado.http1connection import HTTP1Connection

from core.errormap import from_exception
from core.http import (
    REASONS,
    CoreHTTP,
    is_api_path,
    length_only,
)
from core.infra.adoption import Adopted, take_over
from core.infra.ids import request_id_of
from core.infra.listener import Listener
from core.infra.logs import access_level
from core.request import Response

__all__ = ["FastRest", "Head", "RestConnection", "RestRequest", "parse_head"]

log = logging.getLogger("core.fastrest")
access_log = logging.getLogger("gateway.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
_REQUEST_LINE = re.compile(r"(GET|HEAD|POST|PUT|PATCH|DELETE) (/api/[\x21-\x7e]*) HTTP/1\.1\r\n")
#: One header line: a token, a colon, the value (printable ASCII) between optional spaces and
#: tabs, CRLF. `_FIELDS` checks a head's lines all at once, `_FIELD` then reads them. The
#: spaces and tabs around a value are taken possessively (``*+``): a value starts and ends
#: with a visible character, so giving them back never helps, and trying to would make a
#: hostile line of spaces and tabs cost time in the square of its length.
_LINE = (
    r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*+(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?[ \t]*+\r\n"
)
_FIELDS = re.compile(f"(?:{_LINE})*")
_FIELD = re.compile(
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*+((?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?)[ \t]*+\r\n"
)
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_LENGTH = re.compile(r"[0-9]{1,18}")
#: Request headers this class leaves to Tornado (framing and protocol changes).
_UNUSUAL = frozenset({"transfer-encoding", "expect", "upgrade", "te", "trailer"})
_NO_BODY = frozenset({204, 304})
#: Requests `RestConnection._next` answers in one go when each is answered at once.
_AT_ONCE = 16


class Head:
    """One request head `parse_head` accepted: its parts and its size in bytes (head + body)."""

    __slots__ = ("body_length", "close", "headers", "method", "size", "target")

    def __init__(
        self, method: str, target: str, headers: dict[str, str], body_length: int, size: int
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # lower-case names
        self.body_length = body_length
        self.size = size  # the head's bytes, the blank line included
        self.close = headers.get("connection", "").lower() == "close"


#: `parse_head`: the head is not all there yet.
INCOMPLETE = object()


def parse_head(
    data: bytes,
    max_head: int,
    max_body: int,
    paths: Callable[[str], bool] = is_api_path,
    searched: int = 0,
) -> Head | object | None:
    """The head at the start of ``data``, `INCOMPLETE`, or None when it is not for this class.

    None for anything outside the strict subset in the module's docstring
    (Tornado reads it), including a path ``paths`` refuses, a head over
    ``max_head`` bytes or a body over ``max_body``; no input raises.
    ``searched``: how many bytes of ``data`` an earlier call found `INCOMPLETE`
    (only what came since is searched: a head sent a byte at a time is read
    in time proportional to its size, not to its size times its bytes).
    """
    # As Tornado's: the blank line within the limit
    end = data.find(b"\r\n\r\n", max(0, searched - 3), max_head)
    if end < 0:
        if len(data) >= max_head:
            return None
        # What came since, from the CR before it if it ended there (a CRLF is not cut)
        since = searched - 1 if searched and data[searched - 1] == 13 else searched
        rest = data[since:].replace(b"\r\n", b"")
        # A bare LF or CR (but a last CR, whose LF may come): Tornado reads (or refuses) such
        # a head, here it never ends.
        bare_cr = b"\r" in (rest[:-1] if data.endswith(b"\r") else rest)
        return None if b"\n" in rest or bare_cr else INCOMPLETE
    # Latin-1 maps each byte to one character: the patterns, all ASCII, refuse the others.
    text = data[: end + 2].decode("latin-1")
    first = _REQUEST_LINE.match(text)
    if first is None or _FIELDS.fullmatch(text, first.end()) is None:
        return None  # obs-fold, whitespace before a colon, a bare CR or LF, a control byte...
    fields = _FIELD.findall(text, first.end())
    headers = {name.lower(): value for name, value in fields}
    if len(headers) != len(fields) or not _UNUSUAL.isdisjoint(headers):
        return None  # a name twice (in any spelling), or framing left to Tornado
    method, target = first.group(1), first.group(2)
    if end - 10 + len(fields) > max_head and (
        len(method) + len(target) + sum(len(n) + len(v) + 4 for n, v in fields) > max_head
    ):
        return None  # over the listener's measure of a head: Tornado answers 431
    host = headers.get("host")
    if host is None or _HOST.fullmatch(host) is None:
        return None
    if not paths(target.partition("?")[0]):
        return None
    connection = headers.get("connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        return None
    length = 0
    given = headers.get("content-length")
    if given is not None:
        if _LENGTH.fullmatch(given) is None:
            return None
        length = int(given)
        if length > max_body:
            return None
    return Head(method, target, headers, length, end + 4)


@lru_cache(maxsize=256)
def _spelled(name: str) -> str:
    """A response header's name as Tornado's `HTTPHeaders` writes it (``Etag``)."""
    return "-".join([word.capitalize() for word in name.split("-")])


def answer_bytes(resp: Response, method: str, date: str, close: bool) -> bytes:
    """What `CoreHTTP` writes for ``resp`` through Tornado's `HTTP1Connection`, in one piece."""
    status = resp.status
    out = {_spelled(name): value for name, value in resp.headers.items()}
    out["Date"] = date
    body = resp.body if status not in _NO_BODY else None
    if body is not None:
        out["Content-Type"] = "application/json"
        out["Content-Length"] = str(len(body))
        if method == "HEAD":
            body = None
    elif status not in _NO_BODY:
        length_only(out, resp.length)
    if close:
        out["Connection"] = "close"
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"]
    for name, value in out.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"Illegal characters (CR or LF) in header {name}")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head + body if body else head


class FastRest(httputil.HTTPServerConnectionDelegate):
    """The core's delegate (`CoreHTTP` over `UpstreamCore`), adopting kept-alive connections."""

    def __init__(
        self,
        api: CoreHTTP,
        max_body: int,
        paths: Callable[[str], bool] = is_api_path,
        connection: type[RestConnection] | None = None,
    ) -> None:
        self.api = api
        self.connection = connection or RestConnection  # a subclass: gateway/passthrough.py
        self.max_body = max_body
        self.paths = paths  # the paths served here (the others go back to Tornado)
        self.listener: Listener | None = None  # set once the listener exists
        self.adopting: set[asyncio.Task[Any]] = set()

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _First(self, server_conn, request_conn)

    def adoptable(
        self, conn: httputil.HTTPConnection, start: httputil.RequestStartLine, headers: Any
    ) -> bool:
        """Whether this request can be the first a `RestConnection` answers (after Tornado read it)."""
        if self.listener is None or not isinstance(conn, HTTP1Connection):
            return False
        if start.version != "HTTP/1.1" or start.method not in _METHODS:
            return False
        if headers.get("Connection", "").lower() not in ("", "keep-alive"):
            return False
        if any(name in headers for name in ("Transfer-Encoding", "Expect", "Upgrade")):
            return False
        length = headers.get("Content-Length", "0")
        return _LENGTH.fullmatch(length) is not None and int(length) <= self.max_body

    def adopt(self, conn: HTTP1Connection, first: RestRequest) -> None:
        """Take ``conn``'s socket off Tornado; a `RestConnection` answers ``first``, then the rest."""
        listener = self.listener
        assert listener is not None

        def make(address: Any, buffered: bytes) -> RestConnection:
            return self.connection(self, listener, address, first, buffered)

        take_over(conn, make, self.adopting, log)


class RestRequest:
    """One request to answer: from Tornado (the first) or from `parse_head`."""

    __slots__ = ("body", "client", "close", "headers", "method", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        client: str,
        close: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # .get() with lower-case names
        self.body = body
        self.client = client
        self.close = close


class _First(httputil.HTTPMessageDelegate):
    """A request Tornado read: adopted at its end when it may be, else `CoreHTTP`'s as ever."""

    __slots__ = ("_chunks", "_conn", "_headers", "_inner", "_proxy", "_server", "_start")

    def __init__(
        self, proxy: FastRest, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> None:
        self._proxy = proxy
        self._server = server_conn
        self._conn = request_conn
        self._inner: httputil.HTTPMessageDelegate | None = None
        self._start: httputil.RequestStartLine | None = None
        self._headers: httputil.HTTPHeaders | None = None
        self._chunks: list[bytes] = []

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        if self._proxy.adoptable(self._conn, start_line, headers):
            self._start, self._headers = start_line, headers
            return None
        self._inner = self._proxy.api.start_request(self._server, self._conn)
        return self._inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self._inner is not None:
            return self._inner.data_received(chunk)
        self._chunks.append(chunk)
        return None

    def finish(self) -> None:
        if self._inner is not None:
            self._inner.finish()
            return
        start, headers = self._start, self._headers
        assert start is not None and headers is not None
        client = str(getattr(getattr(self._conn, "context", None), "remote_ip", ""))
        first = RestRequest(
            start.method, start.path, headers, b"".join(self._chunks), client, False
        )
        self._chunks = []
        self._proxy.adopt(cast(HTTP1Connection, self._conn), first)

    def on_connection_close(self) -> None:
        self._chunks = []
        if self._inner is not None:
            self._inner.on_connection_close()


class RestConnection(Adopted):
    """One kept-alive connection's ``/api/`` requests, in order, off Tornado."""

    _logger = log

    def __init__(
        self,
        proxy: FastRest,
        listener: Listener,
        address: Any,
        first: RestRequest,
        buffered: bytes,
    ) -> None:
        self._proxy = proxy
        self._api = proxy.api
        self._listener = listener
        self._address = address
        self._peer = str(address[0]) if isinstance(address, tuple) and address else ""
        # A connection keeps its peer: whether it is a trusted proxy is asked once, not per request.
        self._peer_trusted = listener.proxies.trusts(self._peer)
        if self._peer_trusted:
            self.serves(first.client)  # (the listener resolved it for Tornado's read)
        self._first: RestRequest | None = first
        self._buffer = buffered
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a request is being answered
        self._starting = False  # `_next` is starting one (an answer written now returns to it)
        self._paused = False  # an answer is not all sent
        self._reading = True
        self._gone = False  # closed, or handed back to Tornado
        self._waiting = ""  # "head" or "body": which deadline the listener keeps now
        # A head read while its body comes: the body's pieces are kept apart, and joined once
        # all are in (`data_received`), so a body sent a byte at a time costs no more to read
        # than one sent whole (the head is not read again, the buffer not copied per piece).
        self._head: Head | None = None
        self._pieces: list[bytes] = []
        self._short = 0  # bytes of its body still to come
        self._searched = 0  # bytes of the buffer holding no whole head (`parse_head`)
        self._max_head = listener.max_header_bytes
        self._max_buffer = 2 * listener.max_header_bytes

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made(transport)
        first, self._first = self._first, None
        assert first is not None
        self._start(first)

    def _idle(self) -> bool:
        return not self._busy

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            super().data_received(data)
            return
        self._pieces.append(data)
        self._short -= len(data)
        if self._short <= 0:  # the body is all in: one buffer again, and the request is read
            self._buffer = b"".join([self._buffer, *self._pieces])
            self._pieces = []
            if self._idle() and not self._paused:
                self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    # -- requests ----------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next requests buffered, or wait for the rest of one.

        A request answered at once (a 401 before the core) is followed by the
        next one here, in this loop, not from inside its own answer: at most
        `_AT_ONCE` of them, then the rest after the loop's other callbacks.
        """
        for _ in range(_AT_ONCE):
            transport = self._transport
            if self._busy or self._paused or self._gone or transport is None:
                return
            if transport.is_closing():
                return  # aborted by the answer just given
            try:
                request = self._take()
            except Exception:
                log.exception("reading a REST request failed")
                self._abort()
                return
            if request is None:
                return
            self._starting = True
            try:
                self._start(request)
            finally:
                self._starting = False
        asyncio.get_running_loop().call_soon(self._next)

    def _take(self) -> RestRequest | None:
        """The next whole request off the buffer; None to wait (or once handed back)."""
        buffer = self._buffer
        if not self._waiting:
            self._waiting = "head"
            self._listener.await_request(self)  # HEADER_TIMEOUT from now
        head = self._head
        if head is None:
            proxy = self._proxy
            read = (
                parse_head(buffer, self._max_head, proxy.max_body, proxy.paths, self._searched)
                if buffer
                else INCOMPLETE
            )
            if read is INCOMPLETE:
                self._searched = len(buffer)
                self._resume_reading()
                return None
            self._searched = 0
            if not isinstance(read, Head) or not self._admit(read):
                self._hand_back()
                return None
            head = read
        end = head.size + head.body_length
        if len(buffer) < end:
            if self._head is None:
                self._head, self._short = head, end - len(buffer)
                self._waiting = "body"
                self._listener.reading(self, True)  # BODY_TIMEOUT from now
            self._resume_reading()
            return None
        self._head = None
        self._waiting = ""
        self._listener.reading(self, False)
        self._buffer = buffer[end:]
        client = self._peer
        if self._peer_trusted:
            client = self._listener.proxies.client_ip(client, Fields(head.headers))
            self.serves(client)
        body = buffer[head.size : end]
        return RestRequest(head.method, head.target, head.headers, body, client, head.close)

    def _admit(self, head: Head) -> bool:
        """Whether the listener's body policy lets ``head``'s body in (else Tornado refuses it)."""
        if not head.body_length and "content-length" not in head.headers:
            return True
        if head.body_length == 0:
            return True  # as the guard: "Content-Length: 0" has no body
        start = httputil.RequestStartLine(head.method, head.target, "HTTP/1.1")
        try:
            limit = self._listener.policy(start, Fields(head.headers))
        except Exception:  # ApiError (refused) or a failure: Tornado's guard answers it
            return False
        return head.body_length <= limit

    def _start(self, request: RestRequest) -> None:
        self._busy = True
        self._api.track(self._answer(request))

    async def _answer(self, request: RestRequest) -> None:
        t0 = time.perf_counter()
        origin = self._api.cors_origin(request.headers.get("origin"))
        rid = request_id_of(request.headers.get("x-request-id", ""))
        path, _, query = request.target.partition("?")
        try:
            resp = await self._api.serve(
                request.method, path, query, request.headers, request.body, request.client, rid
            )
        except Exception as exc:  # logged with its traceback; the body says "internal error"
            resp = Response.error(from_exception(exc, f"{request.method} {path}"))
        self._reply(request, resp, origin, rid, path, t0)

    def _reply(
        self,
        request: RestRequest,
        resp: Response,
        origin: str | None,
        rid: str,
        path: str,
        t0: float,
    ) -> None:
        """Write ``resp`` (CORS and the request id added) and log it; then the next request."""
        self._api.add_cors(resp.headers, origin)
        resp.headers["X-Request-Id"] = rid
        try:
            data = answer_bytes(resp, request.method, self._api.date(), request.close)
        except ValueError as exc:
            log.warning("answer not written: %s", exc)
            self._busy = False
            self._abort()
            return
        self._send(request, data)
        self._logged(request.method, path, resp.status, rid, t0)

    def _logged(self, method: str, path: str, status: int, rid: str, t0: float) -> None:
        level = access_level(status)
        if access_log.isEnabledFor(level):
            ms = 1000.0 * (time.perf_counter() - t0)
            context = {
                "request_id": rid,
                "status": status,
                "method": method,
                "path": path,
                "ms": round(ms, 2),
            }
            access_log.log(level, "%d %s %s %.2fms", status, method, path, ms, extra=context)

    def _send(self, request: RestRequest, data: bytes) -> None:
        """Write one whole answer, then read on (or close, after ``Connection: close``)."""
        self._busy = False
        transport = self._transport
        if transport is None or self._gone:
            return  # the client went away meanwhile
        self._write(data)
        if request.close:
            self._gone = True
            self._listener.release(self)
            self._linger()
            transport.close()  # once written
            return
        if not self._starting:  # (else `_next`'s loop goes on)
            self._next()

    # -- leaving -------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and not self._gone:
            self._reading = True
            assert self._transport is not None
            self._transport.resume_reading()


class Fields(Mapping[str, str]):
    """A head's fields by lower-case name (`parse_head`'s, each once), read in any spelling,
    as Tornado's `HTTPHeaders` reads them, without building one (6 us for four fields)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def get_list(self, name: str) -> list[str]:
        """``name``'s values, as `HTTPHeaders.get_list` gives them (one at most here)."""
        value = self._fields.get(name.lower())
        return [] if value is None else [value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)
