"""The signature on the gateway's requests to backends (HOOK_SECRET).

``X-Gateway-Timestamp`` is the Unix time in seconds; ``X-Gateway-Signature``
is ``sha256=`` and the hex HMAC-SHA256, keyed with the secret, of the
timestamp, a dot and the body exactly as sent. A backend recomputes it,
compares in constant time and refuses old timestamps (docs/events.md).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["signature_headers"]


def signature_headers(secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The two headers that sign ``body`` sent at ``timestamp``."""
    signed = b"%d.%s" % (timestamp, body)
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return {"X-Gateway-Timestamp": str(timestamp), "X-Gateway-Signature": f"sha256={mac}"}
