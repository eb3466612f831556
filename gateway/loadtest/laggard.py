"""Laggards: load sockets that stop reading (*stalled*) or read at a capped rate (*slow*).

``--stall N`` makes N of the run's sockets stop reading once subscribed
(their transport's reading is paused; the socket stays open and the kernel
stops acknowledging once its receive buffer is full), and ``--slow N
--slow-rate BYTES`` makes N read at most BYTES a second (reading paused and
resumed on a timer). They are what the gateway's send-buffer bounds are for:
the server should close them with 4001 (or drop them) and keep its memory,
while every other socket (a *reader*) gets everything, exactly once.

Laggards are spread evenly over the sockets (`roles`), so over the channels
too; they never reconnect, and their deliveries are counted apart
(`account`): the report's exactly-once figures are the readers'.

On loopback a socket's MSS is about 64 KiB and Linux then gives it a send
buffer of ~4 MB at once, so a stalled loopback socket hides ~4 MB in the
kernel before the server's own buffer grows (1,000 of them would be 4 GB of
the machine's TCP memory). ``--laggard-mss`` and ``--laggard-rcvbuf`` set
``TCP_MAXSEG`` and ``SO_RCVBUF`` on the laggards' sockets before they
connect, as a client across a network would have (1448, 16384: ~230 KB in
the kernel per stalled socket).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Iterable
from typing import Any

from gateway.loadtest.ledger import Ledger
from gateway.loadtest.wsclient import WSClient

__all__ = [
    "READER",
    "ROLES",
    "SLOW",
    "STALLED",
    "LaggardClient",
    "Throttle",
    "account",
    "merge",
    "roles",
]

READER, STALLED, SLOW = 0, 1, 2
#: ``tcpi_state`` (the first byte of ``TCP_INFO``) of a connection the peer reset or closed
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8
#: Role names by role, as the report says them.
ROLES = ("reader", "stalled", "slow")


def roles(n: int, stalled: int, slow: int) -> list[int]:
    """Each of ``n`` sockets' role: the laggards evenly spaced, stalled and slow interleaved."""
    out = [READER] * n
    laggards = stalled + slow
    for j in range(laggards):
        # the j-th laggard is stalled when the share of stalled ones steps up at j
        role = STALLED if (j + 1) * stalled // laggards > j * stalled // laggards else SLOW
        out[j * n // laggards] = role
    return out


class Throttle:
    """How long to stop reading so that what was read stays within ``rate`` bytes a second."""

    __slots__ = ("rate", "start", "taken")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start: float | None = None
        self.taken = 0

    def restart(self, now: float) -> None:
        self.start = now
        self.taken = 0

    def pause_for(self, nbytes: int, now: float) -> float:
        """Seconds to pause after reading ``nbytes`` more at ``now`` (0: read on)."""
        if self.start is None:
            self.start = now
        self.taken += nbytes
        return max(0.0, self.start + self.taken / self.rate - now)


class LaggardClient(WSClient):
    """A load socket that stalls once subscribed, or reads through a `Throttle`."""

    __slots__ = ("ended", "nbytes", "role", "subscribed_at", "throttle")

    def __init__(self, *args: Any, role: int, rate: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role = role
        self.throttle = Throttle(rate) if role == SLOW else None
        self.nbytes = 0  # bytes read, handshake included
        self.subscribed_at = 0.0
        self.ended = 0.0  # when the connection ended, 0 while open

    def finish(self, ok: bool, error: str | None = None) -> None:
        first = not self.done.done()
        super().finish(ok, error)
        if not (ok and first and self.transport is not None):
            return
        self.subscribed_at = now = time.monotonic()
        if self.role == STALLED:
            self.transport.pause_reading()
        elif self.throttle is not None:
            self.throttle.restart(now)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        super().data_received(data)
        throttle, transport = self.throttle, self.transport
        if throttle is None or transport is None or throttle.start is None:
            return
        pause = throttle.pause_for(len(data), time.monotonic())
        if pause > 0.001:
            transport.pause_reading()
            asyncio.get_running_loop().call_later(pause, self._resume)

    def _resume(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = self.ended or time.monotonic()
        super().connection_lost(exc)

    def probe(self) -> None:
        """A stalled socket's loop does not look at it: ask the kernel whether it ended.

        The server drops a stalled socket with a reset (or closes it): the
        kernel knows at once, but with reading paused nothing reads the
        error. Found so, the socket is dropped (its unread bytes were never
        read, its close frame neither) and closed here.
        """
        transport = self.transport
        if self.role != STALLED or transport is None or self.ended:
            return
        sock = transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except (OSError, AttributeError):
            return
        if state in (_TCP_CLOSE, _TCP_CLOSE_WAIT):
            self.ended = time.monotonic()
            transport.abort()


def account(clients: Iterable[tuple[LaggardClient, Ledger]], sent: list[int]) -> dict[str, Any]:
    """What one process's laggards of one role got, for `merge`."""
    out: dict[str, Any] = {"sockets": 0, "subscribed": 0, "closed": {}, "dropped": 0, "open": 0,
                           "publications": [], "bytes": [], "lived": []}  # fmt: skip
    for client, ledger in clients:
        out["sockets"] += 1
        if not client.subscribed_at:
            continue
        out["subscribed"] += 1
        got = sum(ledger.got(slot, sent[c]) for slot, c in enumerate(ledger.chans))
        out["publications"].append(got)
        out["bytes"].append(client.nbytes)
        if not client.ended:
            out["open"] += 1
            continue
        out["lived"].append(round(client.ended - client.subscribed_at, 3))
        if client.code:
            out["closed"][str(client.code)] = out["closed"].get(str(client.code), 0) + 1
        else:
            out["dropped"] += 1
    return out


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes' accounts of one role as one summary (medians, not lists)."""
    closed: dict[str, int] = {}
    for part in parts:
        for code, count in part["closed"].items():
            closed[code] = closed.get(code, 0) + count
    got = [x for part in parts for x in part["publications"]]
    nbytes = [x for part in parts for x in part["bytes"]]
    lived = [x for part in parts for x in part["lived"]]

    def summary(values: list[Any]) -> dict[str, float]:
        if not values:
            return {"min": 0, "median": 0, "max": 0}
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "sockets": sum(p["sockets"] for p in parts),
        "subscribed": sum(p["subscribed"] for p in parts),
        "closed": closed,
        "dropped": sum(p["dropped"] for p in parts),
        "open_at_end": sum(p["open"] for p in parts),
        "publications": {**summary(got), "total": sum(got)},
        "bytes": {**summary(nbytes), "total": sum(nbytes)},
        "seconds_subscribed": summary(lived),
    }
