"""The load tool's opening handshake (RFC 6455 §4.1): the upgrade request, as bytes.

A load socket writes it as soon as it connects and reads no more of the
response than its status (`gateway.loadtest.stream.StreamClient.head`): the
gateway under test is the one whose answers are checked, by the test suite.
"""

from __future__ import annotations

import base64
import os

__all__ = ["OFFER", "handshake_request", "new_key"]

#: What Chromium offers (RFC 7692).
OFFER = "permessage-deflate; client_max_window_bits"


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode()


def handshake_request(
    host: str, path: str, token: str | None, *, key: str | None = None, compression: bool = False
) -> bytes:
    """The upgrade request (JSON, the default subprotocol); the token travels in ``Authorization``.

    ``compression``: it offers permessage-deflate as Chromium does.
    """
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    if compression:
        auth += f"Sec-WebSocket-Extensions: {OFFER}\r\n"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key or new_key()}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    ).encode()
