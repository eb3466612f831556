"""Signed hook requests: what the gateway sends, and what a backend checks.

Every request the gateway makes to a hook backend carries two headers::

    X-Gateway-Timestamp: 1767225600
    X-Gateway-Signature: sha256=<hex of HMAC-SHA256(HOOK_SECRET, timestamp + "." + body)>

``timestamp`` is Unix seconds, as decimal digits; ``body`` the exact bytes of
the request body. A backend recomputes the HMAC over what it received and
compares it in constant time, and refuses a timestamp more than ``max_age``
seconds away from its own clock, so a recorded request cannot be replayed
later. (A backend that must refuse a replay even within that window keeps the
signatures it accepted for ``max_age`` seconds and refuses one seen again.)

This module uses only the standard library, so a backend can import it
without the gateway's dependencies mattering (docs/hooks.md shows the same
check in other languages).
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNATURE_PREFIX",
    "TIMESTAMP_HEADER",
    "sign",
    "signed_headers",
    "verify_signature",
]

TIMESTAMP_HEADER = "X-Gateway-Timestamp"
#: Digits of a timestamp at most (Unix seconds have 10 until the year 2286).
_MAX_TIMESTAMP_DIGITS = 12
SIGNATURE_HEADER = "X-Gateway-Signature"
SIGNATURE_PREFIX = "sha256="


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Gateway-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(_key(secret), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def signed_headers(secret: str | bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two headers that sign ``body``, sent now (or at ``now``)."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify_signature(
    secret: str | bytes,
    timestamp: str | None,
    body: bytes,
    signature: str | None,
    max_age: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp``, within ``max_age`` seconds of now.

    ``timestamp`` and ``signature`` are the headers' values as received (None
    when missing: False). The comparison takes the same time whatever the
    signature, and a timestamp too old, or too far ahead, is refused.
    """
    if not timestamp or not signature or not timestamp.isascii() or not timestamp.isdigit():
        return False
    if len(timestamp) > _MAX_TIMESTAMP_DIGITS:  # int() of 4,301 digits raises ValueError
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > max_age:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature.strip().encode("utf-8", "replace"))
