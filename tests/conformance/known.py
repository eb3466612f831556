"""Cases the gateway fails today, each with what it does wrong (issue 14).

tests/test_conformance.py marks these ``xfail(strict=True)``: when a fix
lands, the case passes, the strict mark fails the run, and the entry is
removed here. Nothing else may fail.
"""

from __future__ import annotations

__all__ = ["GATEWAY_FAILS"]

_KEY = "issue 14: Sec-WebSocket-Key is checked for its length only, not as base64 of 16 bytes (400)"
_EARLY = (
    "issue 14: bytes sent right behind the upgrade request are lost when the socket leaves "
    "Tornado's stream"
)

GATEWAY_FAILS: dict[str, str] = {
    "7.1.7": (
        "issue 14: a close read in the same write as a message is answered before the message's "
        "reply, which is then dropped"
    ),
    "H.3": _KEY,
    "H.4": _KEY,
    "H.6": "issue 14: an HTTP/1.0 upgrade request is accepted (RFC 6455 §4.1: HTTP/1.1 or higher)",
    "H.16": _EARLY,
    "H.17": _EARLY,
}
