"""Four facts about a TCP socket the event loop's transports do not give: its kernel send
queue, whether its connection has ended, closing it with a reset, and whether a reset was
asked for.

Both serve the cut-offs of clients that read too slowly (a socket's send budget, an event
stream's, an HTTP answer's ``WRITE_TIMEOUT``): the kernel moves bytes on only in large
steps, so its queue, added to what the process holds, is what shows a slow reader making
progress; and a reader that reads nothing would otherwise keep its queue for minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios

__all__ = ["ended", "kernel_queue", "reset_on_close", "resetting"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
_TCP_CLOSE = 7  # Linux tcp_states.h: the connection is over (reset, or closed both ways)


def kernel_queue(sock: socket.socket | None) -> int:
    """Bytes in ``sock``'s kernel send queue, sent and not yet acknowledged or not yet sent
    (Linux ``SIOCOUTQ``; 0 when unknown)."""
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            return int(
                struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            )
    return 0


def ended(sock: socket.socket | None) -> bool:
    """Whether ``sock``'s connection is over in the kernel (TCP state CLOSE; False when unknown).

    A peer that closed its socket answers what we write next with a reset: the
    bytes stay counted in `kernel_queue` (SIOCOUTQ), but none of them will ever
    be delivered or acknowledged, so there is nothing left to wait for.
    """
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_CLOSE
    return False


def reset_on_close(sock: socket.socket | None) -> None:
    """Make closing ``sock`` a TCP reset, so the kernel frees its send queue at once.

    A plain close leaves what the peer has not read to an orphan socket that
    keeps probing a peer that reads nothing (a zero window) for minutes,
    holding that queue (up to the kernel's send buffer, 4 MB) the while.
    """
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def resetting(sock: socket.socket) -> bool:
    """Whether closing ``sock`` resets the connection (`reset_on_close` was called)."""
    with contextlib.suppress(OSError, ValueError):
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == _LINGER_RESET
    return False
