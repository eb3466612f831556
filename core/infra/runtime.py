"""Process plumbing shared by ``python -m gateway`` and ``python -m core``."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import signal
from collections.abc import Coroutine
from typing import Any

__all__ = [
    "FILE_RESERVE",
    "LARGE_ALLOCATION",
    "LISTEN_BACKLOG",
    "STOP_SIGNALS",
    "connection_limit",
    "raise_file_limit",
    "return_large_allocations",
    "run",
    "wait_for_stop_signal",
]

#: Signals that ask a process to stop gracefully (drain, then exit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


#: Pending connections the kernel queues per listening socket (capped by
#: net.core.somaxconn). Tornado's default of 128 drops SYNs in a reconnect
#: storm, and each dropped SYN costs its client a 1 s retransmission.
LISTEN_BACKLOG = 4096

#: Descriptors kept for what is not a client socket (listeners, Redis, database, files).
FILE_RESERVE = 256


def connection_limit(configured: int) -> int:
    """``MAX_CONNECTIONS``, or the open-file limit less `FILE_RESERVE` when it is 0."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FILE_RESERVE)


def raise_file_limit() -> int:
    """Lift the soft open-file limit to the hard one; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


#: Allocations of this many bytes or more get their own mapping, returned when freed.
LARGE_ALLOCATION = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_allocations() -> bool:
    """Have glibc's malloc give large allocations back to the system when they are freed.

    By default glibc maps an allocation of 128 KiB or more apart, but raises
    that threshold (up to 32 MiB) to the size of each such block freed, so
    after the first large answer the later ones come from the heap, which
    keeps their pages once freed between smaller live objects. Slow readers
    holding ~9.6 MB pages until `ANSWER_BUFFER_TOTAL_BYTES` reset them grew
    a gateway by 162 MB for the 66 MB held; with the threshold fixed at
    `LARGE_ALLOCATION`, by 116 MB (bench/answers.py, medians of 3). What is smaller is
    untouched. An operator's ``MALLOC_MMAP_THRESHOLD_`` wins. False where
    there is no glibc (musl's ``mallopt`` does nothing) or it refused.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION))


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop (large
    allocations given back when freed: `return_large_allocations`)."""
    return_large_allocations()
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
