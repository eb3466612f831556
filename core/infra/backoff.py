"""Reconnect delays: exponential backoff with full jitter, the one backoff of the product.

After attempt ``n`` (0, 1, 2…) the wait is a uniformly random time in
``[0, min(cap, base * 2**n)]`` ("full jitter", as AWS's architecture blog
names it): when a draining gateway closes twenty thousand sockets, their
clients come back spread over the window instead of at once, and brokers
whose Redis came back do not reconnect in step. A server's ``Retry-After``
raises the wait, up to ``cap``. A pure function of its inputs: tests pass
their own ``random``. Used by the Python client (gateway.client) and the
brokers' reconnect loops (core/infra/broker/).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 30.0

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        window = min(self.cap, self.base * 2.0 ** min(attempt, 62))
        wait = rand() * window
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cap))
        return wait
