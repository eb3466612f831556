"""Moving a kept-alive connection between Tornado's stream and an asyncio transport.

Long-poll connections (gateway/transport/pollconn.py) and, behind
``CORE_URL``, REST connections (core/fastrest.py) are served by a small
`asyncio.Protocol` between requests once Tornado has read one request of
theirs, and go back to Tornado for any request their protocol does not
serve. Both moves keep the bytes read and not yet answered: `take_over`
takes those Tornado read ahead, `give_back` hands Tornado those the
protocol read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from tornado.http1connection import HTTP1Connection

from core.infra.clientip import address_key
from core.infra.listener import Listener, unread
from core.infra.tcp import kernel_queue, reset_on_close

__all__ = ["Adopted", "give_back", "take_over"]


def take_over(
    conn: HTTP1Connection,
    make: Callable[[Any, bytes], asyncio.Protocol],
    tasks: set[asyncio.Task[Any]],
    log: logging.Logger,
) -> None:
    """Take ``conn``'s socket off Tornado for ``make(address, buffered)``'s protocol.

    ``buffered``: the bytes Tornado read ahead (pipelined requests). Nothing
    happens when the client has gone already.
    """
    address = getattr(conn.context, "address", None)
    stream = conn.detach()
    # The socket leaves Tornado's stream for the loop's transport; the stream
    # (and its buffers) closes its own descriptor, a duplicate.
    try:
        if stream.closed():
            return
        buffered = unread(stream)
        sock = stream.socket.dup()
    except OSError:
        return
    finally:
        stream.writes = None  # type: ignore[attr-defined]  # the connection lives on: no linger
        stream.close()
    protocol = make(address, buffered)
    task = asyncio.ensure_future(
        asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
    )
    tasks.add(task)
    task.add_done_callback(partial(_taken, tasks, sock, log))


def _taken(
    tasks: set[asyncio.Task[Any]], sock: socket.socket, log: logging.Logger, task: asyncio.Task[Any]
) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        sock.close()
        log.info("connection lost while taken off Tornado: %s", task.exception())


def give_back(
    transport: asyncio.Transport,
    listener: Listener,
    address: Any,
    buffered: bytes,
    log: logging.Logger,
) -> None:
    """Give ``transport``'s connection back to Tornado, ``buffered`` first (nothing is unsent)."""
    transport.pause_reading()
    try:
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    except OSError as exc:
        log.info("connection lost while handed back: %s", exc)
        transport.abort()
        return
    transport.abort()  # closes its descriptor; the duplicate holds the connection
    sock.setblocking(False)
    listener.resume(sock, address, buffered)


class Adopted(asyncio.Protocol):
    """What the protocols of adopted connections do alike: the transport, the buffer, leaving,
    the write deadline (an answer left unsent pauses writing: the listener's ``WRITE_TIMEOUT``).

    A subclass sets ``_listener``, ``_address``, ``_buffer``, ``_max_buffer``
    and ``_logger``, starts with ``_transport`` None, ``_gone``, ``_paused``
    False and ``_reading`` True, and defines `_idle` (no answer being
    computed) and `_next` (serve what is buffered).
    """

    __slots__ = (
        "_address",
        "_buffer",
        "_gone",
        "_listener",
        "_max_buffer",
        "_paused",
        "_reading",
        "_served",
        "_transport",
        "_written",
    )
    _listener: Listener
    _address: Any
    _buffer: bytes
    _max_buffer: int
    _logger: logging.Logger  # a class attribute
    _transport: asyncio.Transport | None
    _gone: bool  # closed, or handed back to Tornado
    _paused: bool  # an answer is not all sent
    _reading: bool
    _written: int  # bytes given to the transport

    def _idle(self) -> bool:
        raise NotImplementedError

    def _next(self) -> None:
        raise NotImplementedError

    def _made(self, transport: asyncio.BaseTransport) -> None:
        """`connection_made`'s common part: the transport kept, the listener told."""
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self._written = 0
        # Paused as soon as anything is left unsent: the next request waits for it.
        self._transport.set_write_buffer_limits(high=0)
        self._listener.adopt(self)

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if self._idle() and not self._paused:
            self._next()
        elif len(self._buffer) > self._max_buffer and self._reading:
            self._pause_reading()

    def eof_received(self) -> bool:
        self._linger()
        return False  # the transport closes; connection_lost forgets what was under way

    def _write(self, data: bytes) -> None:
        """Send ``data`` (an answer) on the transport."""
        assert self._transport is not None
        self._written += len(data)
        self._transport.write(data)

    def pause_writing(self) -> None:
        self._paused = True
        self._listener.stalled(self)

    def resume_writing(self) -> None:
        self._paused = False
        self._listener.flowing(self)
        transport = self._transport
        if transport is not None and transport.is_closing():
            self._linger()  # its last answer is all in the kernel: the socket closes now
        elif self._idle():
            self._next()

    def _linger(self) -> None:
        """The transport closes once it has sent all it holds: if that is now, the listener
        keeps the connection until the client has taken it (`Listener.linger`)."""
        transport = self._transport
        if transport is not None and not transport.get_write_buffer_size():
            self._listener.linger(transport.get_extra_info("socket"))

    def _lost(self) -> bool:
        """`connection_lost`'s common part; False when handed back (the socket lives on)."""
        self._listener.flowing(self)  # (also after an answer with "Connection: close")
        if self._gone:
            return False
        self._gone = True
        self._transport = None
        self._listener.release(self)
        return True

    def close(self) -> None:
        """Close the connection (``HEADER_TIMEOUT`` passed, or the listener stops)."""
        if self._transport is not None and not self._gone:
            self._transport.close()

    def _pause_reading(self) -> None:
        self._reading = False
        assert self._transport is not None
        self._transport.pause_reading()

    def _hand_back(self) -> None:
        """Give the connection back to Tornado, the unread bytes first (nothing is unsent)."""
        transport = self._transport
        assert transport is not None and self._idle() and not self._paused
        self._gone = True
        self._transport = None
        self._listener.release(self)
        buffered, self._buffer = self._buffer, b""
        give_back(transport, self._listener, self._address, buffered, self._logger)

    def taken(self) -> int:
        """Bytes of answers the client's TCP has acknowledged."""
        return self._written - self.unacked()

    def client(self) -> str:
        """The client's address (``limit_key``), "" when unknown: the one a trusted proxy
        forwarded for the request last read (`serves`), else the TCP peer's."""
        served: str | None = getattr(self, "_served", None)  # (unset until a proxy forwards)
        return address_key(self._address) if served is None else served

    def serves(self, ip: str) -> None:
        """Its request came from ``ip``, as a trusted proxy forwarded it (answer budget)."""
        self._served = address_key(ip)

    def unsent(self) -> int:
        """Bytes of answers the transport holds (0 once closed)."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def unacked(self) -> int:
        """Bytes of answers the client's TCP has not acknowledged (transport and kernel)."""
        transport = self._transport
        if transport is None:
            return 0
        return transport.get_write_buffer_size() + kernel_queue(transport.get_extra_info("socket"))

    def reset(self) -> None:
        """Close with a TCP reset (``WRITE_TIMEOUT`` passed): what is unsent is dropped."""
        transport = self._transport
        if transport is not None:
            reset_on_close(transport.get_extra_info("socket"))
            transport.abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
