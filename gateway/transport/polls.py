"""``GET /lp/<session>?cursor=N``: the long-poll's hot path, answered below Tornado's web layer.

Every broadcast answers one poll per session and the client asks again at
once, so a channel with 10,000 long-poll subscribers costs 10,000 HTTP
requests a publication. Like ``/ws`` (gateway/transport/websocket.py), these
requests are routed to `PollServer` before Tornado's `Application`: no
RequestHandler, no coroutine, no per-poll task. Tornado's HTTP/1.1 connection
parses the request (behind the listener's limits), then:

* the token is checked as on every long-poll request: draining is 503, a
  missing or bad token 401, a session of another ``sub`` (or none) 404. A
  token byte-identical (constant-time compare) to the one last verified for
  this session skips the signature check; its expiry and its login
  session's revocation are still checked, and any other token is verified
  in full (and then remembered for the session if its ``sub`` owns it);
* the cursor acknowledges, and the answer is written at once when the
  outbox holds something after it or the session is closed (410), or
  else when something arrives, the session closes, or ``LONGPOLL_TIMEOUT``
  passes: one callback from the session, no Event or task per poll;
* the body is built from the outbox's already-encoded messages in one
  concatenation: ``{"messages":[…],"cursor":N}``.

The other long-poll requests (``POST /lp``, ``POST /lp/<session>``) stay on
`LongPollHandler`; answers are the same on both paths.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.routing import Matcher

from core.errormap import from_exception
from core.infra.errors import ApiError
from core.infra.identity import API_KEY_PREFIX, AuthError, Identity, principal
from core.infra.listener import Listener
from core.infra.logs import access_level, redact
from gateway.context import Context
from gateway.transport.delegate import BodylessRequest
from gateway.transport.pollconn import adopt
from gateway.transport.pollrequest import cursor_of, token_of
from gateway.transport.pollsessions import PollSession

__all__ = ["PollMatches", "PollServer"]

log = logging.getLogger("gateway.longpoll")
access_log = logging.getLogger("gateway.access")
_NO_STORE = {"Cache-Control": "no-store"}

_PATH = re.compile(r"/lp/([A-Za-z0-9_-]{1,64})\Z")


class PollMatches(Matcher):
    """``GET /lp/<session>``: polls (the other methods go on to tornado.web)."""

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if request.method == "GET" and _PATH.match(request.path):
            return {}
        return None


class PollServer(httputil.HTTPServerConnectionDelegate):
    """One `_Poll` per poll request; kept-alive connections then go to `PollConnection`.

    ``listener`` is set once the gateway listens (`Gateway.listen`); until
    then (or with None) every poll is answered through Tornado.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.listener: Listener | None = None
        self._adopting: set[asyncio.Task[Any]] = set()

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Poll(self, request_conn)

    def adopt(self, conn: HTTP1Connection, poll: PollSession, cursor: int, target: str) -> None:
        """Serve ``conn``'s admitted poll, and its later ones, with a `PollConnection`."""
        assert self.listener is not None
        adopt(self.ctx, self.listener, conn, poll, cursor, target, self._adopting)


def _cursor(query: str) -> int:
    cursor = cursor_of(query)
    if cursor is None:
        raise ApiError(422, "validation_error", "cursor must be an integer")
    return cursor


class _Poll(BodylessRequest):
    __slots__ = ("_ctx", "_cursor", "_done", "_poll", "_server", "_started", "_token")

    def __init__(self, server: PollServer, conn: httputil.HTTPConnection) -> None:
        super().__init__(conn)
        self._server = server
        self._ctx = server.ctx
        self._poll: PollSession | None = None
        self._cursor = 0
        self._token = ""
        self._done = False
        self._started = time.monotonic()

    def finish(self) -> None:
        try:
            poll = self._admit()
        except ApiError as exc:
            self._refuse(exc)
            return
        except Exception as exc:
            self._refuse(from_exception(exc, "a long-poll request"))
            return
        if self._adoptable(poll):
            assert isinstance(self._conn, HTTP1Connection)
            self._done = True
            assert self._start is not None
            self._server.adopt(self._conn, poll, self._cursor, self._start.path)
            return
        self._poll = poll
        poll.ack(self._cursor)
        if poll.ready():
            self._answer()
        else:
            poll.wait(self._answer, self._ctx.settings.longpoll_timeout)

    def on_connection_close(self) -> None:
        # The outbox keeps what this poll would have carried.
        self._done = True
        if self._poll is not None:
            self._poll.cancel_wait(self._answer)

    def _admit(self) -> PollSession:
        ctx, start, headers = self._ctx, self._start, self._headers
        assert start is not None and headers is not None
        if ctx.status.draining:
            raise ApiError(
                503, "draining", "this gateway is shutting down", headers={"Retry-After": "1"}
            )
        path, _, query = start.path.partition("?")
        match = _PATH.match(path)
        assert match is not None  # PollMatches routed it here
        self._cursor = _cursor(query) if query else 0
        token = self._token = token_of(headers.get("Authorization"), query)
        found = ctx.longpoll.find(match.group(1))
        if found is not None and found[1].holds(token, time.time(), ctx.verifier.revoked):
            return found[1]
        identity = self._verify(token)
        if found is None or found[0] != principal(identity):
            raise ApiError(404, "not_found", "no such long-poll session")
        if not token.startswith(API_KEY_PREFIX):  # a key's revocation is not in its bytes
            found[1].remember(token, identity)
        return found[1]

    def _adoptable(self, poll: PollSession) -> bool:
        """Whether this connection's next polls can be served by a `PollConnection`.

        A kept-alive HTTP/1.1 connection whose token the session now holds
        (its later polls with that token pass without Tornado); not an API
        key's (checked in full every time), not ``Connection: close``.
        """
        start, headers = self._start, self._headers
        assert start is not None and headers is not None
        return (
            self._server.listener is not None
            and isinstance(self._conn, HTTP1Connection)
            and start.version == "HTTP/1.1"
            and headers.get("Connection", "").lower() != "close"
            and poll.holds(self._token, time.time(), self._ctx.verifier.revoked)
        )

    def _verify(self, token: str) -> Identity:
        ctx = self._ctx
        try:
            return ctx.verifier.verify(token)
        except AuthError as exc:
            ctx.metrics.handshake_failures.labels(exc.reason).inc()
            log.info("long-poll refused: %s", exc.reason)
            raise ApiError(401, "unauthorized", exc.message) from None

    def _answer(self) -> None:
        poll = self._poll
        if self._done or poll is None:
            return
        messages, cursor = poll.answer(self._cursor)
        body = b'{"messages":[' + b",".join(messages) + b'],"cursor":%d' % cursor
        status = 200
        if poll.closed is not None and not messages:
            status = 410
            body += poll.close_field()
        self._write(status, {}, body + b"}")

    def _refuse(self, exc: ApiError) -> None:
        self._done = True
        if self.refuse(exc, _NO_STORE):
            self._log(exc.status_code)

    def _write(self, status: int, extra: dict[str, str], body: bytes) -> None:
        self._done = True
        if self.answer(status, {**extra, **_NO_STORE}, body):
            self._log(status)

    def _log(self, status: int) -> None:
        level = access_level(status)
        if access_log.isEnabledFor(level):
            start = self._start
            remote_ip = getattr(getattr(self._conn, "context", None), "remote_ip", "")
            access_log.log(level, "%d GET %s (%s) %.2fms", status,
                           redact(start.path if start else ""), remote_ip,
                           1000.0 * (time.monotonic() - self._started))  # fmt: skip
