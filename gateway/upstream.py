"""The REST core as a separate service: ``/api/*`` and ``rpc`` forwarded over HTTP (CORE_URL).

With ``CORE_URL`` set, the gateway holds no database pool and no database
credentials. `UpstreamCore` stands where the in-process `Core` would: the
gateway's HTTP delegate (`core.http.CoreHTTP`: CORS, request ids, the body
limit) and every socket's ``rpc`` frames call its `dispatch`, which sends
the request to the core over a bounded pool of keep-alive HTTP/1.1
connections (gateway/corepool.py; CORE_POOL_SIZE per process) and answers
with the core's status, headers and body unchanged.

What the core is told, and why it can trust it:

* **who calls**: the caller's own bearer token (JWT or API key), not an
  assertion signed by the gateway. The core verifies it exactly as it does
  for a direct call (signature, expiry, revoked sessions, revoked keys), so a
  gateway can never act for anyone it does not hold a credential of, and no
  new shared secret exists to leak or rotate.
* **from where**: ``X-Forwarded-For`` with the client's address as the
  gateway resolved it (its own trusted proxies applied), replacing whatever
  the client sent. The core believes it only from peers in its
  ``TRUSTED_PROXIES`` (the gateways' addresses), like any proxy header.
* **which request**: ``X-Request-Id``, the same id the gateway answers with.

Failure (docs/rest.md, "A separate core tier"): each request may take
``CORE_TIMEOUT`` (then 504); one that got no answer, or 502/503 from the
core, is retried ``CORE_RETRIES`` times if repeating it is harmless (GET,
HEAD, PUT, DELETE, OPTIONS, and POST/PATCH with an ``Idempotency-Key``);
after ``CORE_BREAKER_FAILURES`` failures in a row the breaker opens and
every call is answered 503 with ``Retry-After`` at once, until one probe
request after ``CORE_BREAKER_SECONDS`` succeeds. Sockets are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from core.infra import control
from core.infra.backoff import Backoff
from core.infra.breaker import Breaker
from core.infra.errors import ApiError, Unavailable
from core.infra.ids import unique_hex
from core.infra.metrics import Metrics
from core.infra.revocation import Revocations
from core.infra.settings import Settings
from core.infra.throttled import ThrottledLog
from core.request import Request, Response
from core.routing import Router
from core.service import offline_routes
from gateway.corepool import (
    Answer,
    ConnectionLost,
    CoreConnection,
    CorePool,
    PoolTimeout,
    ProtocolError,
    ResponseReader,
    request_head,
)
from gateway.keymirror import KeyMirror

__all__ = [
    "IDEMPOTENT",
    "RETRY_STATUS",
    "UpstreamCore",
    "forward_headers",
    "repeatable_request",
    "response_of",
]

log = logging.getLogger("gateway.upstream")
_busy = ThrottledLog(log, 10.0)  # a full pool: once every 10 s at most, with the count

#: Methods a retry cannot make do twice what was asked once.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Request headers the core reads, as sent to it; nothing else is forwarded.
_FORWARDED = (
    ("authorization", "Authorization"),
    ("content-type", "Content-Type"),
    ("if-match", "If-Match"),
    ("if-none-match", "If-None-Match"),
    ("idempotency-key", "Idempotency-Key"),
    ("user-agent", "User-Agent"),  # shown in a user's list of sessions
)
#: Response headers that belong to the hop, not to the answer (the gateway's
#: delegate writes its own Content-Type, Content-Length, Date, request id and CORS).
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-type",
        "date",
        "server",
        "x-request-id",
        "content-encoding",
        "access-control-allow-origin",
        "access-control-expose-headers",
        "vary",
    }
)
#: The spelling the core's handlers give its headers (HTTP/1.1 writes them in its own
#: case): an rpc reply through the gateway names them as the in-process core does.
_SPELLING = {
    name.lower(): name
    for name in (
        "ETag",
        "Location",
        "Retry-After",
        "Allow",
        "WWW-Authenticate",
        "Idempotent-Replayed",
        "Cache-Control",
    )
}
RETRY_STATUS = frozenset({502, 503})
_FAILURE_STATUS = frozenset({502, 503, 504})


#: How often requests forwarded with callbacks are checked against ``CORE_TIMEOUT``.
SWEEP_SECONDS = 0.05


class Expiring(Protocol):
    """A request forwarded with callbacks, told when its deadline passes."""

    def timed_out(self) -> None: ...


#: What `_Awaited` holds once the sweep found its request past ``CORE_TIMEOUT``.
_TIMED_OUT = object()


class _Awaited:
    """A request `UpstreamCore._once` sent on an idle connection: what ends it, as a future.

    The connection's sink sets the answer or the exception that ended the
    wait, the sweep `_TIMED_OUT`; whichever comes first (both are values).
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[object]) -> None:
        self.future = future

    def settle(self, result: object) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def timed_out(self) -> None:
        self.settle(_TIMED_OUT)


class PoolBusy(Unavailable):
    """503: no pooled connection to the core came free within ``CORE_TIMEOUT``."""


class UpstreamCore:
    """Where the gateway's REST core would be: a client of the core service."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        revocations: Revocations | None = None,
        keys: KeyMirror | None = None,
    ) -> None:
        assert settings.core_url is not None
        self.revocations = revocations
        self.keys = keys
        self.url = settings.core_url.rstrip("/")
        where = urlsplit(self.url)
        if where.scheme not in ("http", "https") or not where.hostname:
            raise ValueError(f"CORE_URL must be http://host[:port]: {settings.core_url!r}")
        tls = ssl.create_default_context() if where.scheme == "https" else None
        self.prefix = where.path
        self.pool = CorePool(
            where.hostname,
            where.port or (443 if tls else 80),
            settings.core_pool_size,
            max_age=settings.core_connection_max_age,
            tls=tls,
        )
        self.routes, self.router = offline_routes()
        self.breaker = Breaker(settings.core_breaker_failures, settings.core_breaker_seconds)
        self.retries = settings.core_retries
        self.timeout = settings.core_timeout
        self._pool_size = settings.core_pool_size
        self._backoff = Backoff(0.05, 0.5)
        self._metrics = metrics
        self.seconds = metrics.core_upstream_seconds
        self.last_error: str | None = None
        #: Requests forwarded with callbacks (gateway/passthrough.py) and their deadlines:
        #: a sweep every `SWEEP_SECONDS` times out those past theirs, with no timer each.
        self.deadlines: dict[Expiring, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        metrics.core_pool_size.set(self._pool_size)
        metrics.core_pool_in_use.set_function(lambda: self.pool.in_use)
        metrics.core_breaker_open.set_function(lambda: 0 if self.breaker.state == "closed" else 1)

    @property
    def in_flight(self) -> int:
        return self.pool.in_use

    async def open(self) -> UpstreamCore:
        self._sweep()
        log.info("REST core at %s (up to %d connections)", self.url, self._pool_size)
        if self.keys is not None:
            if not await self.keys.reload():
                log.info("no API-key snapshot yet: API keys work once the core has stored one")
            self.keys.start()
        return self

    def on_control(self, message: control.ControlMessage) -> None:
        """A control-channel message: revoked sessions, changed API keys."""
        if self.revocations is not None:
            self.revocations.on_control(message)
        if self.keys is not None:
            self.keys.on_control(message)

    def _sweep(self) -> None:
        period = max(0.005, min(SWEEP_SECONDS, self.timeout / 4))
        self._sweeper = asyncio.get_running_loop().call_later(period, self._sweep)  # first
        now = time.monotonic()
        late = [waiting for waiting, deadline in self.deadlines.items() if deadline <= now]
        for waiting in late:
            del self.deadlines[waiting]
            waiting.timed_out()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.keys is not None:
            await self.keys.close()
        await self.pool.close()

    async def dispatch(self, req: Request, tried: int = 0) -> Response:
        """The core's answer to ``req``, or 503/504 when there is none; never raises.

        ``tried``: attempts made already (the pass-through's, gateway/passthrough.py),
        counted against ``CORE_RETRIES``; the breaker was asked before them.
        """
        breaker = self.breaker
        probe = 0  # this request's number as the breaker's probe; 0: not a probe
        if not tried:
            wait = breaker.refuse(time.monotonic())
            if wait is not None:
                self._metrics.core_upstream_errors.labels("breaker_open").inc()
                seconds = max(1, math.ceil(wait))
                return Response.error(_unavailable("the REST core is unavailable", seconds))
            if breaker.state == "half_open":  # this request is the breaker's probe
                probe = breaker.probes
        try:
            query = req.query_string
            target = self.prefix + req.path + ("?" + query if query else "")
            token = getattr(req.caller, "token", None)
            headers = forward_headers(req.headers, token, req.client, req.request_id)
            repeatable = repeatable_request(req.method, req.path, req.headers, self.router)
            retries = self.retries if repeatable else 0
            resp: Response | ApiError | None = None
            for attempt in range(tried, retries + 1):
                if attempt:
                    await asyncio.sleep(self._backoff.delay(attempt - 1))
                resp = await self._once(req.method, target, headers, req.body, repeatable)
                if isinstance(resp, Response) and resp.status not in RETRY_STATUS:
                    return resp
                if isinstance(resp, ApiError) and (resp.status < 500 or isinstance(resp, PoolBusy)):
                    break  # refused here (a header that cannot be sent, a full pool)
            if resp is None:
                resp = Unavailable("the REST core was not asked")
            return resp if isinstance(resp, Response) else Response.error(resp)
        finally:
            # A probe that ends with no verdict (refused here: a header that cannot go
            # over HTTP/1.1; or given up) lets the next request probe, or the breaker
            # would refuse every request for good.
            if probe:
                breaker.abandon(probe)

    async def _once(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        repeatable: bool,
    ) -> Response | ApiError:
        """One attempt: on an idle connection with no timer of its own (the sweep keeps
        ``CORE_TIMEOUT``, as for gateway/passthrough.py), else as the pool gives one."""
        started = time.perf_counter()
        pool = self.pool
        conn = pool.take()
        if conn is None:
            return await self._pooled(method, target, headers, body, repeatable, started)
        try:
            head = request_head(method, target, pool.authority, headers, len(body))
            awaited = _Awaited(asyncio.get_running_loop().create_future())
            conn.forward(
                head + body if body else head, ResponseReader(method == "HEAD"), awaited.settle
            )
        except ValueError as exc:  # a header or path that cannot go over HTTP/1.1
            pool.give(conn, True)
            return ApiError(400, "bad_request", str(exc))
        except ConnectionLost:  # closed as it lay idle: the pool opens another
            pool.give(conn, False)
            return await self._pooled(method, target, headers, body, repeatable, started)
        self.deadlines[awaited] = time.monotonic() + self.timeout
        try:
            result = await awaited.future
        except BaseException:  # cancelled: the connection, mid-request, is not used again
            pool.give(conn, False)
            raise
        finally:
            self.deadlines.pop(awaited, None)
        if isinstance(result, Answer):
            pool.give(conn, result.keep_alive)
            return self._answered(result, started)
        if result is _TIMED_OUT:
            pool.give(conn, False)
            return self.timed_out()
        assert isinstance(result, Exception)
        if self.replaced(conn, result, repeatable):
            return await self._pooled(method, target, headers, body, repeatable, started)
        return self.unreachable(result)

    def replaced(self, conn: CoreConnection, failure: Exception, repeatable: bool) -> bool:
        """Give back ``conn``, whose request ``failure`` ended; whether to send the request
        again on another connection, at once and uncounted: the core closed the kept-alive
        connection as the request came, before answering, and repeating it is harmless."""
        again = (
            isinstance(failure, ConnectionLost)
            and conn.reused  # (`give` forgets it)
            and not failure.answered
            and repeatable
        )
        self.pool.give(conn, False)
        return again

    async def _pooled(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        repeatable: bool,
        started: float,
    ) -> Response | ApiError:
        """`_once` when no connection is idle: the pool opens one, or the request waits."""
        left = max(0.0, self.timeout - (time.perf_counter() - started))
        deadline = asyncio.get_running_loop().time() + left
        try:
            answer = await self.pool.request(method, target, headers, body, repeatable, deadline)
        except PoolTimeout:
            return self.busy()
        except TimeoutError:
            return self.timed_out()
        except ValueError as exc:  # a header or path that cannot go over HTTP/1.1
            return ApiError(400, "bad_request", str(exc))
        except (OSError, ProtocolError) as exc:
            return self.unreachable(exc)
        return self._answered(answer, started)

    def _answered(self, answer: Answer, started: float) -> Response:
        self.seconds.observe(time.perf_counter() - started)
        self.counted(answer.status)
        return response_of(answer)

    def counted(self, status: int) -> None:
        """What an answer with ``status`` tells the breaker and the error metric."""
        if status in _FAILURE_STATUS:
            self._metrics.core_upstream_errors.labels(f"status_{status}").inc()
            self.breaker.failure(time.monotonic())
        elif self.breaker.state != "closed" or self.breaker.failures:
            self.breaker.success()

    def timed_out(self) -> ApiError:
        """The 504 of a request the core did not answer within ``CORE_TIMEOUT``, counted."""
        return self._failed(
            "timeout", ApiError(504, "gateway_timeout", "the REST core did not answer in time")
        )

    def busy(self) -> ApiError:
        """The 503 of a request that waited ``CORE_TIMEOUT`` for a pooled connection.

        Not a failure of the core's (it was not asked, and the requests that
        held the connections count for themselves): the breaker is not told,
        and the request is not retried.
        """
        self._metrics.core_upstream_errors.labels("pool_timeout").inc()
        _busy.warning("every connection to the REST core stayed busy for %.1f s "
                      "(CORE_POOL_SIZE %d): answering 503", self.timeout, self._pool_size)  # fmt: skip
        return PoolBusy("the gateway's connections to the REST core are all busy")

    def unreachable(self, exc: Exception) -> ApiError:
        """The 503 of a request that got no answer (``exc``), counted."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        return self._failed("unreachable", _unavailable("the REST core is unreachable", 1))

    def _failed(self, kind: str, err: ApiError) -> ApiError:
        self._metrics.core_upstream_errors.labels(kind).inc()
        if self.breaker.failure(time.monotonic()):
            log.warning(
                "REST core failing (%s): answering 503 for %.0f s", kind, self.breaker.open_for
            )
        return err

    async def healthy(self) -> bool:
        """The core answers its readiness probe within a second."""
        try:
            async with asyncio.timeout(1.0):
                answer = await self.pool.request("GET", self.prefix + "/readyz", [], b"", True)
        except (TimeoutError, OSError, ProtocolError):
            return False
        return answer.status == 200

    def state(self) -> dict[str, Any]:
        """For readiness: where the core is and what the breaker thinks of it."""
        return {
            "url": self.url,
            "breaker": self.breaker.state,
            "in_flight": self.in_flight,
            "pool": self._pool_size,
            "connections": self.pool.size,
            "last_error": self.last_error,
        }


def response_of(answer: Answer) -> Response:
    """The core's answer as the in-process core gives it: the hop's own headers left out."""
    out = {
        _SPELLING.get(low, name): value
        for name, value in answer.headers
        if (low := name.lower()) not in _HOP
    }
    status, payload = answer.status, answer.body
    if payload or status in (204, 304):
        return Response(status, payload or None, out)
    resp = Response(status, payload, out)
    for name, value in answer.headers:  # an answer to HEAD: its length, with no body
        if name.lower() == "content-length" and value.isdigit() and int(value):
            resp.body, resp.length = None, int(value)
    return resp


def repeatable_request(method: str, path: str, headers: Mapping[str, str], router: Router) -> bool:
    """Whether sending the request twice does no more than once (lower-case header names).

    A ``POST`` or ``PATCH`` is, with an ``Idempotency-Key``, on a route of the
    core's that keeps such keys (``idempotent``) and nowhere else: the key of a
    refresh would not stop the core seeing its token used twice.
    """
    if method in IDEMPOTENT:
        return True
    if method not in ("POST", "PATCH") or not headers.get("idempotency-key"):
        return False
    try:
        route, _ = router.match(method, path)
    except ApiError:  # no such route: the core's 404 or 405, whatever the key
        return False
    return route.idempotent


def forward_headers(
    given: Mapping[str, str], token: str | None, client: str, request_id: str
) -> list[tuple[str, str]]:
    """What the core is told: the credential, the body's type, conditions, who and which."""
    out = [
        (name, value)
        for key, name in _FORWARDED
        if (value := given.get(key)) and not (token and key == "authorization")
    ]
    if token:  # the credential the gateway verified (an rpc frame's: its socket's)
        out.append(("Authorization", f"Bearer {token}"))
    if client:  # replaces what the client sent (resolved already)
        out.append(("X-Forwarded-For", client))
        # The same in RFC 7239's words, for a core that reads that header instead
        # (FORWARDED_HEADER=forwarded, which a ConfigMap shared with the gateways may set).
        out.append(("Forwarded", f'for="[{client}]"' if ":" in client else f"for={client}"))
    out.append(("X-Request-Id", request_id or unique_hex(16)))
    return out


def _unavailable(message: str, retry_after: int) -> ApiError:
    err = Unavailable(message)
    err.headers["Retry-After"] = str(retry_after)
    return err
