"""The signature on the gateway's requests to backends (HOOK_SECRET).

``X-Gateway-Timestamp`` is the Unix time in seconds; ``X-Gateway-Signature``
is ``sha256=`` and the hex HMAC-SHA256, keyed with the secret, of the
timestamp, a dot and the body exactly as sent. A backend recomputes it,
compares in constant time and refuses old timestamps (docs/events.md).
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["signed_headers"]


def signed_headers(secret: str | bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """The two headers that sign ``body``, sent now (or at ``now``)."""
    timestamp = str(int(time.time() if now is None else now))
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Gateway-Timestamp": timestamp, "X-Gateway-Signature": f"sha256={mac}"}
