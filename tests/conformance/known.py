"""Cases the gateway fails today, each with what it does wrong (issue 14).

tests/test_conformance.py marks these ``xfail(strict=True)``: when a fix
lands, the case passes, the strict mark fails the run, and the entry is
removed here. Nothing else may fail.
"""

from __future__ import annotations

from tests.conformance.cases import CASES, Closes

__all__ = ["GATEWAY_FAILS", "READ_DEPENDENT"]

_SAME_READ = (
    "issue 14: frames that precede a violation in the same read get no reply (read_frames raises "
    "before returning them; a reply still queued is dropped by the close)"
)
_AFTER_FAIL = (
    "issue 14: after failing the connection the gateway parses the bytes that follow as frames, "
    "never sees the client's close, and holds TCP for CLOSE_TIMEOUT"
)
_BAD_CLOSE = (
    "issue 14: a malformed close frame is answered with 1002, then the gateway waits CLOSE_TIMEOUT "
    "for another close instead of ending TCP"
)
_REASON = "issue 14: close reasons are not checked for UTF-8 (1007 or 1002)"
_UTF8 = (
    "issue 14: text messages are not checked for UTF-8 (1007); an error reply comes back instead"
)
_KEY = "issue 14: Sec-WebSocket-Key is checked for its length only, not as base64 of 16 bytes (400)"
_EARLY = (
    "issue 14: bytes sent right behind the upgrade request are lost when the socket leaves "
    "Tornado's stream"
)

GATEWAY_FAILS: dict[str, str] = {
    **{
        case: _SAME_READ
        for case in ("1.3.6", "3.2", "3.11", "4.1.3", "4.1.4", "4.2.3", "4.2.4", "5.15")
    },
    **{case: _AFTER_FAIL for case in ("3.4", "4.1.5", "4.2.5", "9.7")},
    **{c.id: _UTF8 for c in CASES if c.group == "6" and isinstance(c.expect, Closes)},
    "7.1.7": "issue 14: a close read with a message is answered before the message's reply",
    "7.3.2": _BAD_CLOSE,
    "7.3.6": _BAD_CLOSE,
    "7.5.1": _REASON,
    "7.5.2": _REASON,
    "7.5.3": _REASON,
    "7.9.4": "issue 14: a close frame carrying 1005 is answered with 1000, not 1002",
    "H.3": _KEY,
    "H.4": _KEY,
    "H.6": "issue 14: an HTTP/1.0 upgrade request is accepted (RFC 6455 §4.1: HTTP/1.1 or higher)",
    "H.16": _EARLY,
    "H.17": _EARLY,
}

#: Known failures whose outcome today depends on how the gateway's reads
#: split the bytes that follow a violation (it parses them as frames and may
#: or may not swallow the client's close): marked xfail without ``strict``,
#: or the suite would be flaky. They pass every time once input is
#: discarded after a failure.
READ_DEPENDENT: frozenset[str] = frozenset({"3.4", "4.1.5", "4.2.5", "9.7"})
