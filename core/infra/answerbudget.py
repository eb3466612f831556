"""One budget for the HTTP answer bytes a process holds unsent (``ANSWER_BUFFER_TOTAL_BYTES``).

``WRITE_TIMEOUT`` bounds how long one answer may stall; it does not bound how
many stall at once. A reader that keeps taking the 2 KiB/s the deadline asks
for holds its whole answer in the process for as long as it reads: an
ordinary account asking ``GET /api/projects?limit=100`` of large projects
(~9.6 MB, ~6.4 MB of it left in the process once the kernel's buffers are
full) on 120 kept-alive connections, reading none of it, left 768 MB
unsent and grew a gateway by 1,091 MB (bench/answers.py); its ``RATE_REST``
allows 20 such requests a second. With the default budget (64 MiB): 66 MB
held, +116 MB.

`AnswerBudget` sums what the stalled connections hold (`Listener.stalled`
hands them over) at most every `CHECK_EVERY` seconds while answers stall,
and past the budget resets the largest answer of the client (its address,
an IPv6 one by its /64; behind a trusted proxy, the one it forwards for the
request answered) holding the most in all, again and again until the
rest fit: the connections a client made large are cut, a reader a moment
behind with an ordinary answer is not, even when the client spread what it
holds over many answers each smaller than that reader's (largest first
whoever held it: 100 answers of 700 KB from one client had another user's
1 MB answer reset first). It is the sockets'
``SEND_BUFFER_TOTAL_BYTES`` rule (gateway/transport/wsconn.py `Coalescer`),
for HTTP. Event streams are HTTP answers too and count in both.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol

from prometheus_client import Counter

from core.infra.throttled import ThrottledLog

__all__ = ["CHECK_EVERY", "AnswerBudget", "Held"]

log = logging.getLogger("core.infra.listener")

#: Seconds between two sums of the stalled answers, at most (none while nothing stalls).
CHECK_EVERY = 0.1


class Held(Protocol):
    """A connection holding answer bytes its socket would not take."""

    def client(self) -> str:
        """Whom it serves: the client's address (``limit_key``), "" when unknown."""

    def unsent(self) -> int:
        """Bytes of its answers the process holds (0: drained, or closed)."""

    def reset(self) -> None:
        """Close it with a TCP reset, dropping what is unsent."""


class AnswerBudget:
    """Resets stalled answers, the largest of the client holding the most first, while all
    of them together exceed ``budget`` bytes."""

    def __init__(
        self,
        budget: int,
        stalled: Callable[[], Collection[Held]],
        forget: Callable[[Held], None],
        shed: Counter,
    ) -> None:
        self.budget = budget
        self._stalled = stalled  # the connections holding unsent answer bytes now
        self._forget = forget  # one of them is reset: no deadline for it any more
        self._shed = shed  # gateway_answer_budget_resets
        self._checked = 0.0
        self._due = False
        self._log = ThrottledLog(log)

    def held(self) -> int:
        """Bytes the stalled answers hold now (``gateway_answer_buffered_bytes``)."""
        return sum(conn.unsent() for conn in self._stalled())

    def stalled(self) -> None:
        """An answer stalled: check the sum soon (now, if none was checked lately)."""
        if self._due:
            return
        self._due = True
        wait = self._checked + CHECK_EVERY - time.monotonic()
        loop = asyncio.get_running_loop()
        # Never inside the write that stalled: a reset there would close under its caller.
        if wait > 0:
            loop.call_later(wait, self.check)
        else:
            loop.call_soon(self.check)

    def check(self) -> int:
        """Sum the stalled answers; past the budget reset the largest of the client holding
        the most, again until the rest fit. Returns how many."""
        self._due = False
        self._checked = time.monotonic()
        sizes = [(conn.unsent(), conn) for conn in self._stalled()]
        total = sum(size for size, _ in sizes)
        if total <= self.budget:
            return 0
        clients: dict[str, list[tuple[int, Held]]] = {}
        for size, conn in sizes:
            clients.setdefault(conn.client(), []).append((size, conn))
        # (-what the client holds, its name, its answers largest last): the most held first
        heap = []
        for name, held in clients.items():
            held.sort(key=lambda item: item[0])
            heap.append((-sum(size for size, _ in held), name, held))
        heapq.heapify(heap)
        before, shed = total, 0
        while total > self.budget and heap:
            most, name, held = heapq.heappop(heap)
            size, conn = held.pop()
            self._forget(conn)
            conn.reset()
            total -= size
            shed += 1
            if held:
                heapq.heappush(heap, (most + size, name, held))
        self._shed.inc(shed)
        self._log.log(logging.WARNING, "reset %d connection(s) of the clients holding the most: "
                      "%d bytes unsent in the process, over ANSWER_BUFFER_TOTAL_BYTES (%d)",
                      shed, before, self.budget)  # fmt: skip
        return shed
