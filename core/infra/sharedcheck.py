"""One check for many askers: `SharedCheck` runs a check at most once per ``fresh`` seconds.

Readiness (``/readyz``) is anyone's to ask, without a token. Each answer
used to run its own checks: a PostgreSQL ``select 1`` on the pool the REST
calls use, a Redis ``PING`` on the publishing connection and, behind
``CORE_URL``, a request to the core (which ran its own ``select 1``). 200
anonymous connections asking in a loop made ~1,000 of each a second, and the
checks that waited past their one second opened the database's breaker:
every user's REST call was then ``503``, and readiness red. Now the askers
of one moment wait for the same check, and an answer is reused for
``fresh`` seconds: a flood costs one check a second, as a probe does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["SharedCheck"]

T = TypeVar("T")


class SharedCheck(Generic[T]):
    def __init__(self, check: Callable[[], Awaitable[T]], fresh: float = 1.0) -> None:
        self._check = check
        self._fresh = fresh
        self._last: tuple[float, T] | None = None  # (monotonic time it ended, outcome)
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        """The outcome of a check that ended less than ``fresh`` seconds ago, or of the next."""
        last = self._last
        if last is not None and time.monotonic() - last[0] < self._fresh:
            return last[1]
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(self._run())
            running.add_done_callback(_retrieved)
        # An asker that gives up (its client went away) does not cancel the others' check.
        return await asyncio.shield(running)

    async def _run(self) -> T:
        try:
            outcome = await self._check()
        finally:
            self._running = None
        self._last = (time.monotonic(), outcome)
        return outcome


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A check that raised after all its askers left is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()
