"""Process plumbing shared by ``python -m gateway`` and ``python -m core``."""

from __future__ import annotations

import asyncio
import resource
import signal
from collections.abc import Coroutine
from typing import Any

__all__ = [
    "FILE_RESERVE",
    "LISTEN_BACKLOG",
    "STOP_SIGNALS",
    "connection_limit",
    "raise_file_limit",
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


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
