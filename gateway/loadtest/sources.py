"""Load sockets from a chosen source address, their ports picked at the connect.

A socket bound to ``(source, 0)`` before its connect takes a port of the
machine's ephemeral range for itself (``ip_local_port_range``, 28,232 ports
here), whatever it connects to: 19,500 load sockets left ~8,700 ports for
every other connect on the machine (bench.sendfloor, run after the hold
scenario of bench.fanout, failed with ``EADDRNOTAVAIL`` after 13,232 of its
19,000), and one source could hold no more than the range. With
``IP_BIND_ADDRESS_NO_PORT`` the port is chosen at the connect for the whole
address pair, so the same port serves connections to other destinations.
"""

from __future__ import annotations

import asyncio
import socket

__all__ = ["IP_BIND_ADDRESS_NO_PORT", "connected"]

#: Linux's option (24), named by Python only from 3.12.
IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connected(
    host: str, port: int, source: str, *, mss: int = 0, rcvbuf: int = 0
) -> socket.socket:
    """A non-blocking TCP socket from ``source`` connected to ``host:port``.

    ``mss``, ``rcvbuf``: ``TCP_MAXSEG`` and ``SO_RCVBUF`` set before the
    connect (0: left as they are).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass  # not Linux: the bind takes a port, as before
            sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
