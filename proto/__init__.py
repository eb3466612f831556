"""Wire protocol v1 of the gateway: frames, codecs and per-connection state.

Pure library: no I/O, no event loop (tests/test_proto_purity.py checks the
imports). See docs/protocol.md for the frames on the wire.
"""

from proto.codec import CODECS, Codec, JsonCodec, MsgpackCodec, ProtocolError, select_codec
from proto.codec import JSON as JSON_CODEC
from proto.codec import MSGPACK as MSGPACK_CODEC
from proto.codes import (
    APP_CLOSES,
    APP_ERRORS,
    CLOSE_REASON_MAX_BYTES,
    CloseCode,
    ErrorCode,
    close_reason,
    error_message,
    is_temporary,
    should_reconnect,
)
from proto.connection import RESERVED_PREFIX, TRANSITIONS, Connection, State, StateError
from proto.frames import (
    Call,
    Command,
    ErrorBody,
    Expiring,
    Gap,
    History,
    HistoryItem,
    Join,
    Leave,
    Ping,
    Position,
    PresenceInfo,
    PresenceQuery,
    PresenceStats,
    Pub,
    Push,
    Refresh,
    Reply,
    Rpc,
    Sub,
    Unsub,
    Unsubscribed,
)
from proto.grants import Grants, InvalidGrants
from proto.publication import InvalidData
from proto.wsframe import frame

__all__ = [
    "APP_CLOSES",
    "APP_ERRORS",
    "CLOSE_REASON_MAX_BYTES",
    "CODECS",
    "JSON_CODEC",
    "MSGPACK_CODEC",
    "RESERVED_PREFIX",
    "TRANSITIONS",
    "Call",
    "CloseCode",
    "Codec",
    "Command",
    "Connection",
    "ErrorBody",
    "ErrorCode",
    "Expiring",
    "Gap",
    "Grants",
    "History",
    "HistoryItem",
    "InvalidData",
    "InvalidGrants",
    "Join",
    "JsonCodec",
    "Leave",
    "MsgpackCodec",
    "Ping",
    "Position",
    "PresenceInfo",
    "PresenceQuery",
    "PresenceStats",
    "ProtocolError",
    "Pub",
    "Push",
    "Refresh",
    "Reply",
    "Rpc",
    "State",
    "StateError",
    "Sub",
    "Unsub",
    "Unsubscribed",
    "close_reason",
    "error_message",
    "frame",
    "is_temporary",
    "select_codec",
    "should_reconnect",
]
