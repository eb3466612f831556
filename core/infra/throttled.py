"""A log line that repeats at most once per interval, however often its event happens.

Loops that serve everyone (a broker reader, an accept loop) must say when
something goes wrong without letting one party flood the log: the first
occurrence is logged at once, later ones within ``interval`` are counted and
reported with the next line.
"""

from __future__ import annotations

import logging
import time

__all__ = ["ThrottledLog"]


class ThrottledLog:
    __slots__ = ("_interval", "_last", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def warning(
        self, msg: str, *args: object, exc_info: bool = False, now: float | None = None
    ) -> bool:
        """Log ``msg`` unless one was logged within the interval; True when logged."""
        return self.log(logging.WARNING, msg, *args, exc_info=exc_info, now=now)

    def log(
        self, level: int, msg: str, *args: object, exc_info: bool = False, now: float | None = None
    ) -> bool:
        """`warning` at another ``level``."""
        now = time.monotonic() if now is None else now
        if now - self._last < self._interval:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (and %d more like it since the last such line)"
            args = (*args, self._suppressed)
        self._last, self._suppressed = now, 0
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True
