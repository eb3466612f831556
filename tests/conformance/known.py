"""Cases the gateway fails today, each with what it does wrong (issue 14).

tests/test_conformance.py marks these ``xfail(strict=True)``: when a fix
lands, the case passes, the strict mark fails the run, and the entry is
removed here. Nothing else may fail. Empty since 9c89ed1 (7.1.7, the last
one: a close in the same write as a command now lets the command answer).
A case added for a behaviour the gateway lacks goes here with
``"issue N: what it does wrong"``.
"""

from __future__ import annotations

__all__ = ["GATEWAY_FAILS"]

GATEWAY_FAILS: dict[str, str] = {}
