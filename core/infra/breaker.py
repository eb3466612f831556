"""A circuit breaker: stop calling a service that keeps failing, and probe it again later.

``closed``: calls go through; ``failures`` failures in a row open it.
``open``: calls are refused for ``open_for`` seconds (`refuse` says how long
is left, for ``Retry-After``). Then ``half_open``: one call goes through as a
probe while the others are still refused; its success closes the breaker,
its failure opens it again, and a probe that ends with neither (refused
before it was sent, or given up) is `abandon`ed: the next call probes.
Time is passed in, so the states are tested without waiting.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Breaker"]

State = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(self, failures: int, open_for: float) -> None:
        self.threshold = failures
        self.open_for = open_for
        self.state: State = "closed"
        self.failures = 0
        #: How many probes have gone: a probe's number, for `abandon`.
        self.probes = 0
        self._until = 0.0

    def refuse(self, now: float) -> float | None:
        """None when a call may go now, else the seconds until one may."""
        if self.state == "closed":
            return None
        if self.state == "open":
            if now < self._until:
                return self._until - now
            self.state = "half_open"  # this caller is the probe
            self.probes += 1
            return None
        return 1.0  # half open: the probe's answer decides (within CORE_TIMEOUT)

    def abandon(self, probe: int) -> None:
        """Probe number ``probe`` (`probes` as it went) ended with no verdict on the
        service: the next call is the probe, unless a verdict came meanwhile or a later
        probe is under way.

        Without this, a half-open breaker whose probe never reported (a request
        refused before it was sent, a cancelled call) refused every call for good.
        """
        if self.state == "half_open" and probe == self.probes:
            self.state = "open"
            self._until = 0.0

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0

    def failure(self, now: float) -> bool:
        """Count a failure; True when this one opened the breaker."""
        self.failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.failures >= self.threshold
        ):
            self.state = "open"
            self._until = now + self.open_for
            return True
        return False
