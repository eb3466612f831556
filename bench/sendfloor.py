"""The kernel's floor under fan-out: one send() per socket, nothing else.

Opens ``n`` loopback TCP connections and times one 60-byte ``send`` on each
server-side socket, as a broadcast must (every WebSocket is its own TCP
connection, so no server can do fewer system calls for one publication).
The receivers do not read during the timed loop, so this is the sender's
cost alone: the least time any server on this machine needs to reach ``n``
subscribers once. Medians over ``--rounds``.

    taskset -c 0 .venv/bin/python -m bench.sendfloor -n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import time

__all__ = ["measure"]


def _hold_clients(address: tuple[str, int], n: int, ctl: socket.socket) -> None:
    """Child process: open ``n`` connections, then drain them each time the parent asks."""
    clients = [socket.create_connection(address) for _ in range(n)]
    ctl.sendall(b"r")
    while ctl.recv(1) == b"d":
        for c in clients:
            c.recv(128)
        ctl.sendall(b"k")
    os._exit(0)


def measure(n: int, rounds: int = 5) -> float:
    """Median seconds to send one 60-byte frame on each of ``n`` loopback sockets.

    The client ends live in a child process (each side then needs only
    ``n`` descriptors), which reads nothing while the parent is timed.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    address = listener.getsockname()
    ctl, child_ctl = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        listener.close()
        _hold_clients(address, n, child_ctl)
    servers = [listener.accept()[0] for _ in range(n)]
    assert ctl.recv(1) == b"r"
    try:
        frame = b"\x81\x3a" + b"x" * 58
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for s in servers:
                s.send(frame)
            times.append(time.perf_counter() - started)
            ctl.sendall(b"d")
            assert ctl.recv(1) == b"k"
        return statistics.median(times)
    finally:
        ctl.sendall(b"q")
        os.waitpid(pid, 0)
        for s in servers:
            s.close()
        listener.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    seconds = measure(args.n, args.rounds)
    print(
        json.dumps(
            {
                "sockets": args.n,
                "ms": round(seconds * 1000, 1),
                "us_per_send": round(seconds / args.n * 1e6, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
