"""Hooks: the application's backend takes part in connections, over signed HTTP calls.

Each hook is optional and set by environment (``HOOK_CONNECT_URL``,
``HOOK_SUBSCRIBE_URL``, ``HOOK_PUBLISH_URL``, ``HOOK_CALL_URL``,
``HOOK_REFRESH_URL``); docs/hooks.md describes what each is asked, what it
may answer, and what happens when it cannot. A backend checks that a request
came from the gateway with `verify_signature`::

    from gateway.hooks import verify_signature

    ok = verify_signature(secret, request.headers.get("X-Gateway-Timestamp"), body,
                          request.headers.get("X-Gateway-Signature"))

Only the signature helpers are imported here (standard library only); the
gateway's side lives in `gateway.hooks.service`, `.client`, `.connect` and
`.session`.
"""

from gateway.hooks.signature import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    signed_headers,
    verify_signature,
)

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "sign", "signed_headers", "verify_signature"]
