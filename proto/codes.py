"""The two error vocabularies of protocol v1.

A *reply error* fails one command and keeps the socket open. A *close code*
ends the connection. Both tables are data: every code has a fixed name, a
message safe to show a peer, and whether retrying makes sense.

Close-code ranges tell a client what to do without knowing every code:

* 1000-2999 are RFC 6455 codes (1009 "message too big" is sent by the
  transport when a frame exceeds the configured limit).
* 4000-4499: the server ended the connection for a reason that a reconnect
  may cure (drain, slow consumer, token expiry, internal error). Clients
  reconnect with backoff, refreshing their token first on 4002.
* 4500-4999: reconnecting with the same credentials will fail the same way
  (bad protocol use, revoked access). Clients must not reconnect blindly.

Which of them each command and each transport can meet is data too
(`COMMAND_ERRORS`, `COMMAND_CLOSES`, `SERVER_CLOSES`...): the AsyncAPI
document lists them per operation from these tables, and a test holds the
tables to what the gateway's code sends.

The application's backend (a hook, docs/hooks.md) speaks both vocabularies
too: its reply errors use codes `APP_ERRORS` (400-1999), passed to the client
unchanged, and its disconnects codes `APP_CLOSES` (4000-4999), whose ranges
mean what they mean above.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "ANY_COMMAND_ERRORS",
    "APP_CLOSES",
    "APP_ERRORS",
    "CLOSE_REASON_MAX_BYTES",
    "COMMAND_CLOSES",
    "COMMAND_ERRORS",
    "FRAME_ERRORS",
    "LONGPOLL_CLOSES",
    "SERVER_CLOSES",
    "SSE_CLOSES",
    "CloseCode",
    "ErrorCode",
    "close_reason",
    "error_message",
    "is_temporary",
    "reason_for",
    "should_reconnect",
]

#: RFC 6455 limits a close frame's payload to 125 bytes: 2 for the code.
CLOSE_REASON_MAX_BYTES = 123
#: Reply error codes a backend may answer with; any other is sent as 103.
APP_ERRORS = range(400, 2000)
#: Close codes a backend may end a connection with.
APP_CLOSES = range(4000, 5000)


class ErrorCode(enum.IntEnum):
    """Reply error codes (``{"ok": false, "error": {"code": ...}}``)."""

    BAD_FRAME = 100
    UNKNOWN_OP = 101
    INVALID_CHANNEL = 102
    PERMISSION_DENIED = 103
    ALREADY_SUBSCRIBED = 104
    NOT_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    PAYLOAD_TOO_LARGE = 107
    UNAVAILABLE = 110
    INTERNAL = 111
    RATE_LIMITED = 112
    CLOSING = 113
    TOKEN_INVALID = 114
    NO_HISTORY = 115
    NO_PRESENCE = 116
    INVALID_DATA = 117
    UNSUBSCRIBED = 118


class CloseCode(enum.IntEnum):
    """WebSocket close codes sent by the gateway."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    SERVER_ERROR = 1011
    # 4000-4499: reconnect.
    SHUTDOWN = 4000
    SLOW_CONSUMER = 4001
    TOKEN_EXPIRED = 4002
    INTERNAL = 4003
    UNAVAILABLE = 4004
    # 4500-4999: do not reconnect blindly.
    BAD_REQUEST = 4500
    FORBIDDEN = 4501
    SESSION_REVOKED = 4502
    RATE_LIMITED = 4503
    KEY_REVOKED = 4510
    DISCONNECTED = 4511


class _Error(NamedTuple):
    message: str
    temporary: bool


_ERRORS: dict[ErrorCode, _Error] = {
    ErrorCode.BAD_FRAME: _Error("malformed frame", False),
    ErrorCode.UNKNOWN_OP: _Error("unknown op", False),
    ErrorCode.INVALID_CHANNEL: _Error("invalid channel name", False),
    ErrorCode.PERMISSION_DENIED: _Error("permission denied", False),
    ErrorCode.ALREADY_SUBSCRIBED: _Error("already subscribed", False),
    ErrorCode.NOT_SUBSCRIBED: _Error("not subscribed", False),
    ErrorCode.LIMIT_EXCEEDED: _Error("limit exceeded", False),
    ErrorCode.PAYLOAD_TOO_LARGE: _Error("payload too large", False),
    ErrorCode.UNAVAILABLE: _Error("service unavailable, retry later", True),
    ErrorCode.INTERNAL: _Error("internal error", True),
    ErrorCode.RATE_LIMITED: _Error("rate limited", True),
    ErrorCode.CLOSING: _Error("connection is closing", True),
    ErrorCode.TOKEN_INVALID: _Error("token refused", False),
    ErrorCode.NO_HISTORY: _Error("this channel keeps no history", False),
    ErrorCode.NO_PRESENCE: _Error("this channel keeps no presence", False),
    ErrorCode.INVALID_DATA: _Error("data cannot be published", False),
    ErrorCode.UNSUBSCRIBED: _Error("the server ended this subscription", False),
}

_CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.SERVER_ERROR: "server error",
    CloseCode.SHUTDOWN: "server shutting down, reconnect",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.INTERNAL: "internal error, reconnect",
    CloseCode.UNAVAILABLE: "a subscription could not be made now, reconnect",
    CloseCode.BAD_REQUEST: "bad request",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.SESSION_REVOKED: "session revoked, log in again",
    CloseCode.RATE_LIMITED: "too many commands after being told to slow down",
    CloseCode.KEY_REVOKED: "API key revoked",
    CloseCode.DISCONNECTED: "disconnected by the server",
}


E = ErrorCode
#: Errors a frame can get before it is any command's: not decodable, or an unknown ``op``.
FRAME_ERRORS: tuple[ErrorCode, ...] = (E.BAD_FRAME, E.UNKNOWN_OP)
#: Errors every command can get: a wrongly typed field, a closing connection, the
#: connection's command rate, a failure of the server's own.
ANY_COMMAND_ERRORS: tuple[ErrorCode, ...] = (E.BAD_FRAME, E.CLOSING, E.RATE_LIMITED, E.INTERNAL)
#: The errors of each command besides `ANY_COMMAND_ERRORS`, by ``op``.
COMMAND_ERRORS: dict[str, tuple[ErrorCode, ...]] = {
    "sub": (E.INVALID_CHANNEL, E.PERMISSION_DENIED, E.ALREADY_SUBSCRIBED, E.LIMIT_EXCEEDED,
            E.UNAVAILABLE),
    "unsub": (E.INVALID_CHANNEL, E.NOT_SUBSCRIBED),
    "pub": (E.INVALID_CHANNEL, E.PERMISSION_DENIED, E.PAYLOAD_TOO_LARGE, E.INVALID_DATA,
            E.UNAVAILABLE),
    "ping": (),
    "rpc": (E.INVALID_DATA, E.UNAVAILABLE),
    "refresh": (E.TOKEN_INVALID, E.PERMISSION_DENIED, E.UNAVAILABLE),
    "history": (E.INVALID_CHANNEL, E.PERMISSION_DENIED, E.NO_HISTORY, E.UNAVAILABLE),
    "presence": (E.INVALID_CHANNEL, E.PERMISSION_DENIED, E.NO_PRESENCE, E.UNAVAILABLE),
    "presence_stats": (E.INVALID_CHANNEL, E.PERMISSION_DENIED, E.NO_PRESENCE, E.UNAVAILABLE),
    "call": (E.PERMISSION_DENIED, E.INVALID_DATA, E.UNAVAILABLE),
}  # fmt: skip

C = CloseCode
#: What a client's frames can make a socket close with: broken framing (1002), text that
#: is not UTF-8 (1007), a run of control frames (pings, pongs) without a message past
#: `proto.wsprotocol.MAX_CONTROL_RUN` (1008), a frame over MAX_FRAME_BYTES (1009), commands
#: kept up while rate limited (4503). A close the client starts is answered with its own code.
COMMAND_CLOSES: tuple[CloseCode, ...] = (C.PROTOCOL_ERROR, C.INVALID_DATA, C.POLICY_VIOLATION,
                                         C.MESSAGE_TOO_BIG, C.RATE_LIMITED)  # fmt: skip
#: What the gateway ends any connection with on its own: draining, a client that does not
#: read, an expired token, an ended login session, a revoked API key, the server API's
#: ``disconnect`` (which may also give any code of 4000-4999).
SERVER_CLOSES: tuple[CloseCode, ...] = (C.SHUTDOWN, C.SLOW_CONSUMER, C.TOKEN_EXPIRED,
                                        C.SESSION_REVOKED, C.KEY_REVOKED,
                                        C.DISCONNECTED)  # fmt: skip
#: An event stream also ends when one of its subscriptions could not be made.
SSE_CLOSES: tuple[CloseCode, ...] = (*SERVER_CLOSES, C.UNAVAILABLE)
#: A long-poll session also ends when it is not polled (1001), or keeps sending while limited.
LONGPOLL_CLOSES: tuple[CloseCode, ...] = (*SERVER_CLOSES, C.GOING_AWAY, C.RATE_LIMITED)
del E, C


def error_message(code: ErrorCode) -> str:
    return _ERRORS[code].message


def is_temporary(code: ErrorCode) -> bool:
    """Whether the same command may succeed if retried later."""
    return _ERRORS[code].temporary


def close_reason(code: CloseCode) -> str:
    return _CLOSE_REASONS[code]


def reason_for(code: int) -> str:
    """The reason proto's table gives ``code``; "" for a code it does not name."""
    try:
        return _CLOSE_REASONS[CloseCode(code)]
    except ValueError:
        return ""


def should_reconnect(code: int) -> bool:
    """The client-side rule: reconnect after this close code?

    Unknown 4xxx codes follow their range; RFC codes other than the
    policy/size violations are treated as transient network events.
    """
    if 4000 <= code <= 4499:
        return True
    if 4500 <= code <= 4999:
        return False
    return code not in (1002, 1003, 1007, 1008, 1009, 1010)
