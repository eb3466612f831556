"""The listener's connections as Tornado streams, where Tornado falls short.

`HTTPStream` is the `IOStream` the listener serves every connection on. It
differs from Tornado's in one place: when a request line and headers pass
their limit (``max_header_size``), Tornado's stream closes the connection
without a word (`UnsatisfiableReadError`); this one first answers ``414``
(the request line alone is over) or ``431`` (headers), with the JSON error
body and ``Connection: close``. The answer is written straight to the
socket: a stream reading a request has nothing else to write (the previous
response was flushed before the read began). What the client had already
sent is read and dropped first, so that closing sends a FIN after the
answer rather than a reset that could destroy it.

Tornado answers a request it cannot parse (a malformed request line or
header, a missing, repeated or malformed ``Host``, a bad ``Content-Length``
or chunk) with a bare ``400`` of its own, no body and no type; this stream
writes the JSON error body in its place (`MALFORMED_ANSWER`), so every
answer a client can get is the one error shape.

It also reads a request's head in time proportional to its size. Tornado's
stream searches for the head's end (``\r?\n\r?\n``) from the first byte
buffered every time bytes arrive, twice per read event: 60 KB of head and
then one byte every few milliseconds cost 2 ms a byte, and kept an event
loop busy for all of ``HEADER_TIMEOUT`` on about 20 KB/s, with no token.
This stream resumes each search where the last one stopped (less the three
bytes a match could start before it).

It tells the listener when an answer stalls (bytes left that the socket
would not take), when it drains, and when it closes with bytes its client
has not taken (`Writes`: ``WRITE_TIMEOUT`` is the listener's), and can be
reset. A stream whose socket lives on elsewhere (taken off Tornado) drops
its ``writes`` before it closes.

`unread` is what a stream read past the request it served: the bytes a
client sent right behind an upgrade request, which belong to the protocol
it upgrades to.
"""

from __future__ import annotations

import logging
import socket
from asyncio import Future
from collections.abc import Awaitable
from http import HTTPStatus
from types import TracebackType
from typing import Protocol

from tornado.iostream import IOStream, UnsatisfiableReadError

from core.infra.clientip import address_key
from core.infra.errors import error_body
from core.infra.tcp import kernel_queue, reset_on_close
from core.infra.throttled import ThrottledLog

__all__ = ["DRAIN_BYTES", "MALFORMED_ANSWER", "HTTPStream", "Writes", "oversized_answer",
           "unread"]  # fmt: skip

log = logging.getLogger("core.infra.listener")
_log_oversized = ThrottledLog(log)

#: At most this much already-sent input is dropped before an oversized request is closed.
DRAIN_BYTES = 1 << 20

_ExcInfo = (
    None
    | bool
    | BaseException
    | tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
)


def oversized_answer(head: bytes, limit: int) -> bytes:
    """The 414 or 431 response to a request whose first ``limit`` bytes are ``head``."""
    if b"\n" not in head.lstrip(b"\r\n"):  # Tornado skips blank lines before a request
        status, code, what = 414, "uri_too_long", "request line"
    else:
        status, code, what = 431, "headers_too_large", "request line and headers"
    body = error_body(status, code, f"{what} over {limit} bytes")
    head_lines = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head_lines.encode() + body


#: What Tornado's HTTP1Connection writes, and nothing else, to a request it cannot parse.
_TORNADO_MALFORMED = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MALFORMED_BODY = error_body(
    400, "bad_request", "malformed request: its request line, a header, Host or its body framing"
)
#: The answer written in its place (the connection closes after it, as Tornado's).
MALFORMED_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Content-Length: "
    + str(len(_MALFORMED_BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + _MALFORMED_BODY
)


#: The head's end as Tornado's HTTP1Connection reads it, and the most bytes a match spans.
HEAD_END = b"\r?\n\r?\n"
_HEAD_END_SPAN = 4


class Writes(Protocol):
    """Who keeps the write deadline (the listener's ``WRITE_TIMEOUT``)."""

    def stalled(self, conn: HTTPStream) -> None:
        """``conn`` holds bytes its socket would not take."""

    def flowing(self, conn: HTTPStream) -> None:
        """``conn`` holds none any more (or closed)."""

    def linger(self, sock: socket.socket) -> None:
        """``sock``'s connection ends: keep it until its client took what it was sent."""


class HTTPStream(IOStream):
    """An `IOStream` that answers 414/431 rather than closing on an oversized header read,
    reads a head in time proportional to its size (not to its size times its packets), and
    says when its writes stall."""

    _searched = 0  # bytes of the buffer the pending head read has searched in vain
    writes: Writes | None = None  # told when writes stall and drain
    _stalled = False
    _client = ""  # the client's address (``limit_key``), set by the listener

    def _handle_write(self) -> None:
        super()._handle_write()
        writes = self.writes
        if writes is None or self.closed():
            return
        if self._write_buffer:
            if not self._stalled:
                self._stalled = True
                writes.stalled(self)
        elif self._stalled:
            self._stalled = False
            writes.flowing(self)

    def client(self) -> str:
        """The client's address (``limit_key``; the PROXY header's), "" when unknown."""
        return self._client

    def serves(self, address: object) -> None:
        """It serves the client at ``address`` (a socket address, or an IP)."""
        self._client = address_key(address)

    def taken(self) -> int:
        """Bytes written that the client's TCP has acknowledged."""
        return self._total_write_done_index - kernel_queue(self.socket)

    def unsent(self) -> int:
        """Bytes written that the socket has not taken yet (0 once closed)."""
        return 0 if self.closed() else len(self._write_buffer)

    def unacked(self) -> int:
        """Bytes written that the client's TCP has not acknowledged (process and kernel)."""
        return 0 if self.closed() else len(self._write_buffer) + kernel_queue(self.socket)

    def reset(self) -> None:
        """Close with a TCP reset: the kernel drops what the client did not read."""
        reset_on_close(self.socket)
        self.close()

    def write(self, data: bytes | memoryview) -> Future[None]:
        if data == _TORNADO_MALFORMED:  # Tornado's HTTP1Connection refusing what it read
            data = MALFORMED_ANSWER
        return super().write(data)

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        self._searched = 0
        return super().read_until_regex(regex, max_bytes)

    def _find_read_pos(self) -> int | None:
        regex = self._read_regex
        if regex is None or regex.pattern != HEAD_END or not self._read_buffer:
            return super()._find_read_pos()
        start = max(0, self._searched - (_HEAD_END_SPAN - 1))
        found = regex.search(self._read_buffer, start)
        if found is None:
            self._searched = self._read_buffer_size
            self._check_max_bytes(regex, self._read_buffer_size)
            return None
        self._searched = 0
        self._check_max_bytes(regex, found.end())
        return found.end()

    def close(self, exc_info: _ExcInfo = False) -> None:
        if (
            isinstance(exc_info, UnsatisfiableReadError)
            and self._read_regex is not None  # the header read (chunk sizes are read_until)
            and self._read_max_bytes is not None
            and not self.closed()
            and not self.writing()
        ):
            self._answer_oversized(self._read_max_bytes)
        writes = self.writes
        if writes is not None:
            if self._stalled:
                self._stalled = False
                writes.flowing(self)
            if not exc_info and not self.closed():
                writes.linger(self.socket)  # (a reset asked for, or all taken: nothing to keep)
        super().close(exc_info)

    def _answer_oversized(self, limit: int) -> None:
        head = bytes(self._read_buffer[:limit])
        answer = oversized_answer(head, limit)
        sock = self.socket
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = "?"
        _log_oversized.log(logging.WARNING, "answered %s to a request from %s over %d bytes",
                           answer[9:12].decode(), peer, limit)  # fmt: skip
        try:
            sock.send(answer)  # a few hundred bytes into an empty send buffer
            drained = 0
            while drained < DRAIN_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # BlockingIOError: nothing more sent yet; otherwise the client is gone
        del self._read_buffer[:]
        self._read_buffer_size = 0


def unread(stream: IOStream) -> bytes:
    """What ``stream`` has read from its socket and nobody has consumed yet."""
    size = stream._read_buffer_size
    return bytes(stream._read_buffer[:size]) if size else b""
