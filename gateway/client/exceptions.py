"""What the client raises: one base class, and one class per way a call can fail.

* `ReplyError`: the gateway refused one command (an error reply); the
  connection goes on. ``temporary`` says whether retrying may help.
* `ConnectionClosed`: the socket ended. Raised to the commands in flight when
  it drops (the client reconnects by itself when the close code allows), and
  to everything, subscriptions included, once the client has stopped for good.
* `HandshakeError`: the gateway refused the upgrade over HTTP (401, 403, 429,
  503…): before any socket existed.
* `SubscriptionEnded`: the gateway ended one subscription itself (an
  ``unsubscribed`` push, e.g. a refreshed token no longer allows the channel).
"""

from __future__ import annotations

import msgspec

from proto import ErrorBody, ErrorCode, should_reconnect

__all__ = ["ClientError", "ConnectionClosed", "HandshakeError", "ReplyError", "SubscriptionEnded"]


class ClientError(Exception):
    """Base class of every error the gateway client raises."""


class ReplyError(ClientError):
    """A command failed with an error reply (`proto.ErrorCode`)."""

    def __init__(self, code: int, message: str, temporary: bool = False) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.temporary = temporary

    @classmethod
    def from_body(cls, body: ErrorBody | None) -> ReplyError:
        if body is None:
            return cls(int(ErrorCode.INTERNAL), "error reply without an error", True)
        return cls(body.code, body.message, body.temporary)


class ConnectionClosed(ClientError):
    """The socket closed with ``code`` (1006: dropped without a close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed with {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason

    @property
    def reconnects(self) -> bool:
        """Whether a client reconnects after this code (`proto.should_reconnect`)."""
        return should_reconnect(self.code)


class HandshakeError(ClientError):
    """The upgrade was refused with HTTP ``status`` (0: the peer does not speak HTTP)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def refused(cls, status: int, body: bytes, retry_after: str | None) -> HandshakeError:
        """A refusal over HTTP: the message of the gateway's JSON error body, ``Retry-After``.

        For the socket's upgrade and the long-poll fallback's session alike.
        """
        try:
            error = msgspec.json.decode(body, type=_Refusal).error
            message = error.message if error is not None else ""
        except msgspec.DecodeError:
            message = ""
        try:
            delay = float(retry_after) if retry_after is not None else None
        except ValueError:
            delay = None
        return cls(status, message or f"HTTP {status}", delay)

    @property
    def retryable(self) -> bool:
        """Whether the same handshake may succeed later (overload, draining, a gateway down)."""
        return self.status in (408, 429, 500, 502, 503, 504)


class _RefusalBody(msgspec.Struct):
    message: str = ""


class _Refusal(msgspec.Struct):
    error: _RefusalBody | None = None


class SubscriptionEnded(ClientError):
    """The gateway ended the subscription to ``channel`` (reply error ``code``)."""

    def __init__(self, channel: str, code: int, message: str) -> None:
        super().__init__(f"subscription to {channel} ended: {code} {message}")
        self.channel = channel
        self.code = code
        self.message = message
