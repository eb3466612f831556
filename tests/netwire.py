"""A network cable with delay and loss, in user space: two TAP devices and a copier between them.

The kernel of the development and CI machines has no ``sch_netem`` (``tc qdisc add ... netem``
answers "Specified qdisc kind is unknown"), so a shaped link of tests/netns.py is this process:
it opens a TAP device in each of two network namespaces (the devices live as long as it does),
prints ``ready``, and copies every Ethernet frame from one to the other after ``delay`` seconds,
dropping a fraction ``loss`` of them at random, in each direction, in order. Commands on stdin
change the shaping at any time: ``shape DELAY LOSS`` (``shape 0.1 0.02``: 100 ms each way, 2 %
lost), ``cut`` (drop everything, as ``loss 1``), ``heal`` (no delay, no loss). Run as::

    python -m tests.netwire NS_A:IFNAME_A NS_B:IFNAME_B

Root only (``setns`` and ``/dev/net/tun``). No pytest here.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time

__all__ = ["open_tap", "setns"]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def setns(namespace: str) -> None:
    """Move the calling thread into the named network namespace (``ip netns`` names)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(namespace: str, name: str) -> int:
    """A new TAP device ``name`` in ``namespace``: the returned fd reads and writes its frames."""
    setns(namespace)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Wire:
    def __init__(self, a: int, b: int) -> None:
        self.peer = {a: b, b: a}
        self.delay = 0.0
        self.loss = 0.0
        self.queue: list[tuple[float, int, int, bytes]] = []
        self.seq = 0

    def command(self, line: str) -> None:
        words = line.split()
        if words[:1] == ["shape"] and len(words) == 3:
            self.delay, self.loss = float(words[1]), float(words[2])
        elif words == ["cut"]:
            self.loss = 1.0
        elif words == ["heal"]:
            self.delay = self.loss = 0.0

    def frame(self, source: int, frame: bytes, now: float) -> None:
        if self.loss and random.random() < self.loss:
            return
        self.seq += 1
        heapq.heappush(self.queue, (now + self.delay, self.seq, self.peer[source], frame))

    def flush(self, now: float) -> float | None:
        """Write the frames that are due; the seconds until the next one, or None."""
        while self.queue and self.queue[0][0] <= now:
            _, _, target, frame = heapq.heappop(self.queue)
            try:
                os.write(target, frame)
            except BlockingIOError:
                pass  # a full device queue drops the frame, as a busy link would
            except OSError:
                pass  # the namespace is being deleted
        return self.queue[0][0] - now if self.queue else None


def main(argv: list[str]) -> None:
    ends = [arg.split(":", 1) for arg in argv]
    a, b = (open_tap(ns, name) for ns, name in ends)
    wire = Wire(a, b)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        wait = wire.flush(time.monotonic())
        readable, _, _ = select.select([a, b, stdin], [], [], wait)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return  # whoever started it is gone: the devices go with this process
                for line in chunk.decode().splitlines():
                    wire.command(line)
                continue
            try:
                wire.frame(fd, os.read(fd, FRAME), now)
            except OSError:
                pass


if __name__ == "__main__":
    main(sys.argv[1:])
