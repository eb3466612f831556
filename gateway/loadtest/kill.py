"""Kill a server mid-run: SIGKILL local processes, or run a command, once.

The moment is ``after`` seconds past the first publication (`Kill.arm`);
the driver calls `Kill.check` whenever it looks at its client processes,
about ten times a second, so the kill lands within ~0.1 s of it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from dataclasses import dataclass

__all__ = ["Kill"]


@dataclass
class Kill:
    """SIGKILL local server processes (or run a command) once, ``after`` seconds into publishing."""

    after: float | None
    pids: list[int]
    cmd: str | None
    due: float | None = None
    done_at: float | None = None
    outcome: str = ""

    def arm(self, now: float) -> None:
        if self.after is not None:
            self.due = now + self.after

    def check(self, now: float) -> None:
        if self.due is None or self.done_at is not None or now < self.due:
            return
        self.done_at = now - self.due + (self.after or 0.0)
        outcomes = []
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                outcomes.append(f"SIGKILL {pid}")
            except OSError as exc:
                outcomes.append(f"SIGKILL {pid} failed: {exc.strerror}")
        if self.cmd:
            try:
                done = subprocess.run(shlex.split(self.cmd), timeout=30, check=False)
                outcomes.append(f"{self.cmd!r} exited {done.returncode}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                outcomes.append(f"{self.cmd!r} failed: {exc}")
        self.outcome = "; ".join(outcomes)
