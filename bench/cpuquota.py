"""Hold a set of processes to a fraction of a CPU with a cgroup's CPU quota.

This machine has two cores for everything: the server under test, its
peers, PostgreSQL, Redis and the load client. A scaling figure ("two
workers do 1.7x one", "two core processes behind one gateway do 1.6x one")
then measures how the load client and the servers share two cores, not
whether the servers scale. A quota gives each server process the same
slice of CPU in both runs (say 0.4 of a core), so the remaining CPU goes to
the client and whatever is not under test, and the ratio says what the
servers do with the CPU they are given, as they would on hosts of their
own. Benchmarks report quota runs beside unlimited ones, never instead.

Needs root and the ``cpu`` controller: cgroup v1 (``/sys/fs/cgroup/cpu``)
or v2 (``cpu`` in ``/sys/fs/cgroup/cgroup.controllers``).

    with CpuQuota("bench-core", cores=0.4) as quota:
        quota.add(pid)
        ...
        print(quota.throttled_seconds())   # CPU use: read the pids' /proc stat
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

__all__ = ["CpuQuota", "available"]

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


def _version() -> int:
    """1 or 2 for the hierarchy whose ``cpu`` controller we may use, 0 if none."""
    if (_V1 / "cpu.cfs_quota_us").exists() and os.access(_V1, os.W_OK):
        return 1
    controllers = _V2 / "cgroup.controllers"
    if (
        controllers.exists()
        and "cpu" in controllers.read_text().split()
        and os.access(_V2, os.W_OK)
    ):
        return 2
    return 0


def available() -> bool:
    """True when a quota can be set here (root and a ``cpu`` controller)."""
    return _version() != 0


class CpuQuota:
    """A cgroup whose processes together get at most ``cores`` CPUs."""

    def __init__(self, name: str, cores: float) -> None:
        if cores <= 0:
            raise ValueError("cores must be positive")
        self.version = _version()
        if not self.version:
            raise RuntimeError("no writable cgroup cpu controller (needs root)")
        root = _V1 if self.version == 1 else _V2
        self.path = root / f"{name}-{os.getpid()}"
        self.root = root
        self.cores = cores

    def __enter__(self) -> CpuQuota:
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(self.cores * _PERIOD_US))
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {_PERIOD_US}")
        return self

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def _stat(self) -> dict[str, int]:
        stat: dict[str, int] = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
        return stat

    def throttled_seconds(self) -> float:
        """Seconds the group spent held back by its quota."""
        stat = self._stat()
        if self.version == 1:
            return stat.get("throttled_time", 0) / 1e9
        return stat.get("throttled_usec", 0) / 1e6

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Move any process still inside back to the root group, then remove it."""
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass
