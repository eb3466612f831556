"""A kept-alive long-poll connection after its first poll: one small asyncio Protocol.

Every broadcast answers one poll per session and its client asks again at
once, so 10,000 long-poll sessions on a channel are 10,000 HTTP requests a
publication. Through Tornado each costs a new ``HTTP1Connection``, a header
parse into ``HTTPHeaders``, the listener's guard, the router and a
``write_headers``. So once a connection's poll has gone through Tornado and
been admitted (gateway/transport/polls.py), `adopt` takes the socket off
Tornado's stream and gives it to the event loop's transport (C in uvloop)
with a `PollConnection`, as WebSocket connections are after their handshake
(gateway/transport/wsconn.py). From then on:

* each request is recognised by `gateway.transport.pollrequest.parse`, which
  accepts only a plain ``GET /lp/<session>`` (HTTP/1.1, no body). The token
  is checked as `PollSession.holds` does on Tornado's path: byte-identical
  (constant-time compare) to the one verified for the session, not expired,
  its login session not revoked;
* anything else (another method or path, another token, a malformed or
  unusual request, draining, a bad cursor) goes back to Tornado with the
  bytes still unread (`Listener.resume`), and is answered there exactly as
  on any connection, with the same limits, errors and logs. A poll admitted
  there comes back here;
* answers are the same bytes Tornado writes: a constant head per status,
  then ``Content-Length`` and the body built from the outbox's
  already-encoded messages;
* requests are answered in order, one at a time (pipelined ones wait in a
  buffer of at most twice ``MAX_HEADER_BYTES``, past which reading pauses);
  the next is not read while the previous answer is still unsent;
* between requests the connection has ``HEADER_TIMEOUT`` for the next one
  (kept by the listener, as for Tornado's connections); a client that goes
  away mid-poll leaves its messages in the outbox for its next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tornado.http1connection import HTTP1Connection

from core.infra.adoption import Adopted, take_over
from core.infra.listener import Listener
from core.infra.logs import redact
from gateway.context import Context
from gateway.transport.pollrequest import (
    INCOMPLETE,
    HeadFields,
    PollRequest,
    cursor_of,
    parse,
    token_of,
)
from gateway.transport.pollsessions import PollSession

__all__ = ["PollConnection", "adopt"]

log = logging.getLogger("gateway.longpoll")
access_log = logging.getLogger("gateway.access")


#: Tornado's answer heads up to the length (its order: the answer's headers, then Connection).
_HEADS = {
    200: b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Type: application/json\r\n"
    b"Content-Length: ",
    410: b"HTTP/1.1 410 Gone\r\nCache-Control: no-store\r\nContent-Type: application/json\r\n"
    b"Content-Length: ",
}
_KEEP = b"\r\n\r\n"
_CLOSE = b"\r\nConnection: close\r\n\r\n"


def adopt(
    ctx: Context,
    listener: Listener,
    conn: HTTP1Connection,
    poll: PollSession,
    cursor: int,
    target: str,
    tasks: set[asyncio.Task[Any]],
) -> None:
    """Take ``conn``'s socket off Tornado and serve its poll (to ``target``), then the next ones."""
    remote_ip = str(getattr(conn.context, "remote_ip", ""))

    def make(address: Any, buffered: bytes) -> PollConnection:
        pc = PollConnection(ctx, listener, address, poll, cursor, buffered)
        if access_log.isEnabledFor(logging.INFO):
            pc.logged(target, remote_ip)
        return pc

    take_over(conn, make, tasks, log)


class PollConnection(Adopted):
    """One kept-alive connection's polls, in order."""

    _logger = log

    __slots__ = (
        "_client",
        "_close",
        "_ctx",
        "_cursor",
        "_first",
        "_max_head",
        "_on_ready",
        "_poll",
        "_searched",
        "_started",
        "_target",
    )

    def __init__(
        self,
        ctx: Context,
        listener: Listener,
        address: Any,
        poll: PollSession,
        cursor: int,
        buffered: bytes,
    ) -> None:
        self._ctx = ctx
        self._listener = listener
        self._address = address
        self._first: tuple[PollSession, int] | None = (poll, cursor)
        self._buffer = buffered
        self._searched = 0  # bytes of the buffer holding no whole head (`parse`)
        self._max_head = ctx.settings.max_header_bytes
        self._max_buffer = 2 * self._max_head
        self._transport: asyncio.Transport | None = None
        self._poll: PollSession | None = None  # the poll being answered
        self._cursor = 0
        self._close = False  # the poll being answered said Connection: close
        self._target = ""  # the request target and the client, for the access log
        self._client = ""
        self._started = 0.0
        self._paused = False  # the last answer is not all sent yet
        self._reading = True
        self._gone = False  # closed, or handed back to Tornado
        self._on_ready = self._ready  # one bound method for every wait

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made(transport)
        first, self._first = self._first, None
        assert first is not None
        self._started = time.monotonic()
        if self._begin(*first):
            self._next()

    def _idle(self) -> bool:
        return self._poll is None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost():
            return  # handed back: the socket lives on in Tornado
        poll, self._poll = self._poll, None
        if poll is not None:
            poll.cancel_wait(self._on_ready)  # the outbox keeps what it would have carried

    # -- requests ----------------------------------------------------------------

    def _next(self) -> None:
        """Serve the requests buffered, in order, while each is answered at once."""
        try:
            while self._poll is None and not self._paused and not self._gone:
                request = parse(self._buffer, self._max_head, self._searched)
                if request is INCOMPLETE:
                    self._searched = len(self._buffer)
                    break
                self._searched = 0
                if not isinstance(request, PollRequest):
                    self._hand_back()
                    return
                admitted = self._admit(request)
                if admitted is None:
                    self._hand_back()
                    return
                self._buffer = self._buffer[request.size :]
                self._listener.reading(self, False)
                self._close = request.close
                if self._listener.proxies or access_log.isEnabledFor(logging.INFO):
                    client = self._client_of(request)
                    self.serves(client)  # the answer budget groups by it
                    self.logged(request.target.decode("ascii"), client)
                self._started = time.monotonic()
                if not self._begin(*admitted):
                    break  # waiting for the session
        except Exception:
            log.exception("long-poll connection failed")
            self._abort()
            return
        if not self._reading and len(self._buffer) <= self._max_buffer and not self._gone:
            self._reading = True
            assert self._transport is not None
            self._transport.resume_reading()

    def _admit(self, request: PollRequest) -> tuple[PollSession, int] | None:
        """The session and cursor of a poll this path may answer; None: Tornado's to answer."""
        ctx = self._ctx
        if ctx.status.draining:
            return None
        cursor = cursor_of(request.query)
        if cursor is None:
            return None
        found = ctx.longpoll.find(request.sid)
        token = token_of(request.authorization, request.query)
        if found is None or not found[1].holds(token, time.time(), ctx.verifier.revoked):
            return None
        return found[1], cursor

    def _begin(self, poll: PollSession, cursor: int) -> bool:
        """Acknowledge ``cursor``; answer now (True) or when the session is ready."""
        poll.ack(cursor)
        self._poll, self._cursor = poll, cursor
        if poll.ready():
            self._answer()
            return not self._gone
        poll.wait(self._on_ready, self._ctx.settings.longpoll_timeout)
        return False

    def _ready(self) -> None:
        """The session's waiter: something arrived, it closed, or the timeout passed."""
        if self._poll is None or self._gone:
            return
        self._answer()
        if not self._gone:
            self._next()

    def _answer(self) -> None:
        poll, self._poll = self._poll, None
        transport = self._transport
        assert poll is not None and transport is not None
        messages, cursor = poll.answer(self._cursor)
        body = b'{"messages":[' + b",".join(messages) + b'],"cursor":%d' % cursor
        status = 200
        if poll.closed is not None and not messages:
            status = 410
            body += poll.close_field()
        body += b"}"
        self._write(
            b"%s%d%s%s" % (_HEADS[status], len(body), _CLOSE if self._close else _KEEP, body)
        )
        self._log(status)
        if self._close:
            self._gone = True
            self._listener.release(self)
            self._linger()
            transport.close()  # once the answer is sent
        else:
            self._listener.await_request(self)

    def logged(self, target: str, client: str) -> None:
        """The request target and client address of the poll being answered (access log)."""
        self._target, self._client = target, client

    def _log(self, status: int) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%d GET %s (%s) %.2fms", status, redact(self._target), self._client,
                            1000.0 * (time.monotonic() - self._started))  # fmt: skip

    def _client_of(self, request: PollRequest) -> str:
        """The client's address as the listener resolves it (a trusted proxy's header)."""
        peer = str(self._address[0]) if isinstance(self._address, tuple) else ""
        if not self._listener.proxies.trusts(peer):
            return peer
        return self._listener.proxies.client_ip(peer, HeadFields(request.head))
