"""The kernel's floor under fan-out: one send() per socket, nothing else.

Opens ``n`` loopback TCP connections and times one 60-byte ``send`` on each
server-side socket, as a broadcast must (every WebSocket is its own TCP
connection, so no server can do fewer system calls for one publication).
The receivers do not read during the timed loop, so this is the sender's
cost alone: the least time any server on this machine needs to reach ``n``
subscribers once. Medians over ``--rounds``.

``--live`` keeps the receivers reading (one epoll in the child, pinned to
another CPU than the sender's) while the sender is timed, as real
subscribers do: a ``send`` to a socket whose reader waits in ``epoll_wait``
also wakes it, which the idle floor does not pay. It also prints the
sender's CPU per send (``time.process_time``), so that a run where the
sender was descheduled shows it.

    taskset -c 0 .venv/bin/python -m bench.sendfloor -n 10000
    taskset -c 0 .venv/bin/python -m bench.sendfloor -n 19500 --live
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

__all__ = ["measure"]


#: Connections the child opens before it waits for the parent to accept them: well under
#: the listen backlog. Opened all at once, 19,500 overflowed the accept queue of a busy
#: machine; the client side of a connection whose last ACK was dropped there believes it
#: is open, and the parent waited in accept() for good.
BATCH = 1000
#: Seconds between looks at whether the client process still lives, while accepting.
_ACCEPT_CHECK = 1.0


def _connect(address: tuple[str, int], n: int, ctl: socket.socket) -> list[socket.socket]:
    """Child process: ``n`` connections, `BATCH` at a time, each batch accepted before the next."""
    clients: list[socket.socket] = []
    while len(clients) < n:
        clients += [socket.create_connection(address) for _ in range(min(BATCH, n - len(clients)))]
        ctl.sendall(b"c")
        if ctl.recv(1) != b"a":
            os._exit(1)
    return clients


def _accept(listener: socket.socket, n: int, ctl: socket.socket, child: int) -> list[socket.socket]:
    """The server sides of `_connect`'s connections, a batch at a time.

    Raises RuntimeError, with the connections accepted so far closed, if the client
    process ``child`` ends before it has opened them all: a connect that failed there
    (its traceback is on stderr) left this process waiting in accept() for good.
    """
    servers: list[socket.socket] = []
    listener.settimeout(_ACCEPT_CHECK)  # (the sockets accepted are blocking all the same)
    try:
        while len(servers) < n:
            batch = min(BATCH, n - len(servers))
            while batch:
                try:
                    servers.append(listener.accept()[0])
                    batch -= 1
                except TimeoutError:
                    if os.waitpid(child, os.WNOHANG)[0]:
                        raise RuntimeError(
                            f"the client process ended after {len(servers):,} connections"
                        ) from None
            if ctl.recv(1) != b"c":
                raise RuntimeError("the client process stopped connecting")
            ctl.sendall(b"a")
    except BaseException:
        for s in servers:
            s.close()
        raise
    return servers


def _child(target: Callable[[tuple[str, int], int, socket.socket], None],
           address: tuple[str, int], n: int, ctl: socket.socket) -> NoReturn:  # fmt: skip
    """The forked client process: ``target``, then exit, whatever happens (an exception
    must not go on in a copy of the caller: its stack, a test runner's too)."""
    try:
        target(address, n, ctl)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _hold_clients(address: tuple[str, int], n: int, ctl: socket.socket) -> None:
    """Child process: open ``n`` connections, then drain them each time the parent asks."""
    clients = _connect(address, n, ctl)
    ctl.sendall(b"r")
    while ctl.recv(1) == b"d":
        for c in clients:
            c.recv(128)
        ctl.sendall(b"k")
    os._exit(0)


def _read_always(address: tuple[str, int], n: int, ctl: socket.socket) -> None:
    """Child process (``--live``): open ``n`` connections, then read whatever comes, at once."""
    others = sorted(os.sched_getaffinity(0) ^ set(range(os.cpu_count() or 1)))
    if others:  # the sender is pinned (taskset): read on another CPU, as a client would
        os.sched_setaffinity(0, {others[0]})
    clients = _connect(address, n, ctl)
    poll = select.epoll()
    by_fd = {}
    for c in clients:
        c.setblocking(False)
        poll.register(c.fileno(), select.EPOLLIN)
        by_fd[c.fileno()] = c
    poll.register(ctl.fileno(), select.EPOLLIN)
    ctl.sendall(b"r")
    while True:
        for fd, _ in poll.poll(1.0, 1024):
            if fd == ctl.fileno():
                os._exit(0)
            try:
                by_fd[fd].recv(4096)
            except BlockingIOError:
                pass


def measure(n: int, rounds: int = 5, live: bool = False) -> tuple[float, float]:
    """Median seconds to send one 60-byte frame on each of ``n`` loopback sockets, and the
    sender's median CPU seconds for it.

    The client ends live in a child process (each side then needs only
    ``n`` descriptors), which reads nothing while the parent is timed,
    unless ``live`` (then it reads all the time, on another CPU).
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
        _child(_read_always if live else _hold_clients, address, n, child_ctl)
    child_ctl.close()
    try:
        servers = _accept(listener, n, ctl, pid)
    except BaseException:
        with contextlib.suppress(ChildProcessError):  # (raised when `_accept` reaped it)
            if not os.waitpid(pid, os.WNOHANG)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        ctl.close()
        listener.close()
        raise
    assert ctl.recv(1) == b"r"
    try:
        frame = b"\x81\x3a" + b"x" * 58
        times, cpu = [], []
        for _ in range(rounds):
            if live:
                time.sleep(0.3)  # the reader has taken the last round's frames
            started, started_cpu = time.perf_counter(), time.process_time()
            for s in servers:
                s.send(frame)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            if not live:
                ctl.sendall(b"d")
                assert ctl.recv(1) == b"k"
        return statistics.median(times), statistics.median(cpu)
    finally:
        ctl.sendall(b"q")
        os.waitpid(pid, 0)
        ctl.close()
        for s in servers:
            s.close()
        listener.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--live", action="store_true", help="the receivers read all the time")
    args = p.parse_args()
    seconds, cpu = measure(args.n, args.rounds, args.live)
    print(
        json.dumps(
            {
                "sockets": args.n,
                "live": args.live,
                "ms": round(seconds * 1000, 1),
                "us_per_send": round(seconds / args.n * 1e6, 2),
                "cpu_us_per_send": round(cpu / args.n * 1e6, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
