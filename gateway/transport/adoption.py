"""Moving a kept-alive connection between Tornado's stream and an asyncio transport.

Long-poll connections (gateway/transport/pollconn.py) and, behind
``CORE_URL``, REST connections (gateway/fastproxy.py) are served by a small
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
from typing import Any

from tornado.http1connection import HTTP1Connection

from core.infra.listener import Listener, unread

__all__ = ["give_back", "take_over"]


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
