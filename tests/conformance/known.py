"""Cases the gateway fails today, each with what it does wrong (issue 14).

tests/test_conformance.py marks these ``xfail(strict=True)``: when a fix
lands, the case passes, the strict mark fails the run, and the entry is
removed here. Nothing else may fail.
"""

from __future__ import annotations

__all__ = ["GATEWAY_FAILS"]

GATEWAY_FAILS: dict[str, str] = {
    "7.1.7": (
        "issue 14: a close read in the same write as a message is answered at once and the "
        "message's reply dropped (after a violation, earlier commands reply first)"
    ),
}
