"""bench/sendfloor.py, both floors: the measurement runs to its end and cleans up.

Its child process, which holds or reads the client ends, must exit when told (or
the call hangs), every socket must be closed (pytest turns a leaked one into a
failure), and a time and a CPU time come back. No timing is checked.
"""

from __future__ import annotations

import errno
import socket

import pytest

from bench import sendfloor


@pytest.mark.parametrize("live", [False, True], ids=["idle-readers", "live-readers"])
def test_the_floor_is_measured_and_its_readers_exit(live: bool) -> None:
    seconds, cpu = sendfloor.measure(200, rounds=2, live=live)
    assert seconds > 0 and cpu >= 0


def test_a_client_process_that_fails_to_connect_ends_the_measurement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child's connect fails (as EADDRNOTAVAIL, ports all taken) after a few
    connections: the parent says so, rather than wait in accept() for good."""

    def few_then_fail(address: tuple[str, int], n: int, ctl: socket.socket) -> list[socket.socket]:
        opened = [socket.create_connection(address) for _ in range(3)]
        raise OSError(errno.EADDRNOTAVAIL, f"cannot assign requested address ({len(opened)} open)")

    monkeypatch.setattr(sendfloor, "_connect", few_then_fail)
    with pytest.raises(RuntimeError, match="client process ended after 3 connections"):
        sendfloor.measure(200, rounds=1)
