"""bench/sendfloor.py, both floors: the measurement runs to its end and cleans up.

Its child process, which holds or reads the client ends, must exit when told (or
the call hangs), every socket must be closed (pytest turns a leaked one into a
failure), and a time and a CPU time come back. No timing is checked.
"""

from __future__ import annotations

import pytest

from bench import sendfloor


@pytest.mark.parametrize("live", [False, True], ids=["idle-readers", "live-readers"])
def test_the_floor_is_measured_and_its_readers_exit(live: bool) -> None:
    seconds, cpu = sendfloor.measure(200, rounds=2, live=live)
    assert seconds > 0 and cpu >= 0
