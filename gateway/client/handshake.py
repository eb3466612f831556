"""The client's side of the opening handshake (RFC 6455 §4.1), sans I/O.

`handshake_request` builds the upgrade request (the load tool sends it as
is); `parse_response` reads the server's response head and `check_upgrade`
verifies a 101 against the request's key and offered subprotocols. A refusal
(401, 403, 429, 503…) becomes a `HandshakeError` carrying the gateway's
JSON error message and ``Retry-After``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from gateway.client.errors import HandshakeError

__all__ = [
    "Response",
    "accept_value",
    "check_upgrade",
    "handshake_request",
    "new_key",
    "parse_response",
    "refusal",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode()


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def handshake_request(
    host: str,
    path: str,
    token: str | None,
    extra: str = "",
    *,
    key: str | None = None,
    subprotocols: Sequence[str] = (),
) -> bytes:
    """The upgrade request; the token travels in ``Authorization`` (never logged)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    offer = f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}\r\n" if subprotocols else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key or new_key()}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}{offer}{extra}\r\n"
    ).encode()


class Response(NamedTuple):
    """A response head: status and headers (names lower-cased)."""

    status: int
    headers: dict[str, str]

    @property
    def content_length(self) -> int:
        try:
            return max(0, int(self.headers.get("content-length", "0")))
        except ValueError:
            return 0


def parse_response(head: bytes) -> Response:
    """The status and headers of a response head (without the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HandshakeError(0, f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Response(int(parts[1]), headers)


def check_upgrade(response: Response, key: str, offered: Sequence[str]) -> str | None:
    """The subprotocol the server chose for a valid 101; `HandshakeError` otherwise."""
    if response.status != 101:
        raise refusal(response, b"")
    h = response.headers
    if h.get("upgrade", "").lower() != "websocket" or h.get("sec-websocket-accept") != accept_value(
        key
    ):
        raise HandshakeError(101, "invalid upgrade response (Upgrade or Sec-WebSocket-Accept)")
    chosen = h.get("sec-websocket-protocol")
    if chosen is not None and chosen not in offered:
        raise HandshakeError(101, f"the server chose subprotocol {chosen!r}, which was not offered")
    return chosen


class _ErrorBody(msgspec.Struct):
    message: str = ""


class _Refusal(msgspec.Struct):
    error: _ErrorBody | None = None


def refusal(response: Response, body: bytes) -> HandshakeError:
    """The `HandshakeError` of a refused upgrade, with its JSON body's message."""
    try:
        error = msgspec.json.decode(body, type=_Refusal).error
        message = error.message if error is not None else ""
    except msgspec.DecodeError:
        message = ""
    retry_after: float | None = None
    try:
        retry_after = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        pass
    return HandshakeError(response.status, message or f"HTTP {response.status}", retry_after)
