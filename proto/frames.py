"""Frame types of protocol v1.

Client commands are a tagged union on ``op``. ``data`` is kept as
``msgspec.Raw`` so that what a client publishes reaches subscribers byte for
byte, without a decode/encode round trip.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = [
    "CALL_METHOD_PATTERN",
    "CHANNEL_PATTERN",
    "MAX_CHANNEL_LENGTH",
    "MAX_ID",
    "Call",
    "Channel",
    "ClientFrame",
    "Command",
    "ErrorBody",
    "Expiring",
    "Gap",
    "History",
    "HistoryItem",
    "Join",
    "Leave",
    "Ping",
    "Position",
    "PresenceInfo",
    "PresenceQuery",
    "PresenceStats",
    "Pub",
    "Push",
    "Refresh",
    "Reply",
    "Rpc",
    "Sub",
    "Subscribed",
    "Unsub",
    "Unsubscribed",
]

MAX_ID: Final = 2**53 - 1  # the largest integer a JavaScript client holds exactly
MAX_CHANNEL_LENGTH: Final = 200
#: Printable ASCII less space, quotes, backslash and the glob characters
#: ``* ? [ ]`` (which belong to grant patterns, never to names). Patterns end
#: with ``(?![\s\S])``, "no character follows", in Python and in JSON Schema
#: (ECMA-262) alike: ``$`` would let a trailing newline through (msgspec uses
#: ``re.search``) and ``\Z`` is Python's alone.
CHANNEL_PATTERN: Final = r"^[A-Za-z0-9_.:@/#=+,;!$%&'()<>^`{|}~-]+(?![\s\S])"

CommandId = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
Channel = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=MAX_CHANNEL_LENGTH, pattern=CHANNEL_PATTERN),
]


class Position(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a channel's stream stands: the last ``offset`` in ``epoch``.

    Offsets count a history channel's publications (1, 2, 3…); the epoch
    names one unbroken run of them and changes when history is lost.
    """

    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
    epoch: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Sub(
    msgspec.Struct,
    tag_field="op",
    tag="sub",
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Subscribe this connection to a channel, recovering what it missed ``since``.

    ``data`` (any value) is handed to the subscribe hook's backend, when the
    gateway has one for the channel (docs/hooks.md); absent: none.
    """

    id: CommandId
    ch: Channel
    since: Position | None = None
    data: msgspec.Raw = msgspec.Raw()


class Unsub(msgspec.Struct, tag_field="op", tag="unsub", frozen=True, forbid_unknown_fields=True):
    """Leave a channel."""

    id: CommandId
    ch: Channel


class Pub(msgspec.Struct, tag_field="op", tag="pub", frozen=True, forbid_unknown_fields=True):
    """Publish ``data`` (any JSON value) to every subscriber of ``ch``."""

    id: CommandId
    ch: Channel
    data: msgspec.Raw


class Ping(msgspec.Struct, tag_field="op", tag="ping", frozen=True, forbid_unknown_fields=True):
    """Application-level ping; the reply proves the command path is alive."""

    id: CommandId


RpcMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
RpcPath = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=r"^/api/")]
RpcHeaders = Annotated[dict[str, str], msgspec.Meta(max_length=16)]


class Rpc(msgspec.Struct, tag_field="op", tag="rpc", frozen=True, forbid_unknown_fields=True):
    """Call the REST core as the connection's identity: ``method`` ``path`` with ``body``.

    ``path`` may carry a query string (``/api/projects?limit=5``); ``headers``
    carries request headers such as ``If-Match`` or ``Idempotency-Key``. An
    empty ``body`` means none.
    """

    id: CommandId
    method: RpcMethod
    path: RpcPath
    body: msgspec.Raw = msgspec.Raw()
    headers: RpcHeaders = {}


#: What a ``call``'s method may be named: it is logged, so printable and plain.
CALL_METHOD_PATTERN: Final = r"^[A-Za-z0-9_.:/-]+(?![\s\S])"
CallMethod = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_CHANNEL_LENGTH, pattern=CALL_METHOD_PATTERN)
]


class Call(
    msgspec.Struct,
    tag_field="op",
    tag="call",
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Call the application's backend (the call hook, docs/hooks.md): ``method`` with ``data``.

    The reply carries the backend's answer as ``data``, or its error. An
    empty ``data`` means none.
    """

    id: CommandId
    method: CallMethod
    data: msgspec.Raw = msgspec.Raw()


class Refresh(
    msgspec.Struct, tag_field="op", tag="refresh", frozen=True, forbid_unknown_fields=True
):
    """Continue the connection under a new access token (same ``sub``), before ``exp``."""

    id: CommandId
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]


class History(
    msgspec.Struct, tag_field="op", tag="history", frozen=True, forbid_unknown_fields=True
):
    """Page through a history channel: up to ``limit`` publications after offset ``since``."""

    id: CommandId
    ch: Channel
    since: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 100


class PresenceQuery(
    msgspec.Struct, tag_field="op", tag="presence", frozen=True, forbid_unknown_fields=True
):
    """Who is subscribed to ``ch`` (on a presence channel), on every process."""

    id: CommandId
    ch: Channel


class PresenceStats(
    msgspec.Struct, tag_field="op", tag="presence_stats", frozen=True, forbid_unknown_fields=True
):
    """How many clients and users are subscribed to ``ch``: cheap for big rooms."""

    id: CommandId
    ch: Channel


class PresenceInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One present client: its user (``sub``), connection, and the token's ``info``."""

    user: str
    client: str
    info: dict[str, Any] | None = None


class Join(msgspec.Struct, frozen=True, tag_field="op", tag="join"):
    """Someone entered the presence of ``ch`` (pushed on presence channels)."""

    ch: str
    info: PresenceInfo


class Leave(msgspec.Struct, frozen=True, tag_field="op", tag="leave"):
    """Someone left the presence of ``ch``."""

    ch: str
    info: PresenceInfo


class HistoryItem(msgspec.Struct, frozen=True):
    offset: int
    data: msgspec.Raw


Command = Sub | Unsub | Pub | Ping | Rpc | Call | Refresh | History | PresenceQuery | PresenceStats


class ClientFrame(msgspec.Struct):
    """The lenient shape used only to report errors for a frame that failed."""

    id: Any = None
    op: Any = None


class ErrorBody(msgspec.Struct, frozen=True):
    code: int
    message: str
    temporary: bool = False


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """``{"id": 1, "ok": true}`` or ``{"id": 1, "ok": false, "error": {...}}``.

    ``id`` is null when the failed frame carried no usable id. The reply to
    an ``rpc`` adds the REST core's answer: ``status``, ``headers`` (when
    any) and ``body`` (absent for 204/304). The reply to a ``call`` carries
    the backend's ``data``, as may the reply to a ``sub`` its subscribe hook
    answered.
    """

    id: int | None
    ok: bool
    error: ErrorBody | None = None
    status: int | None = None
    headers: dict[str, str] | None = None
    body: msgspec.Raw | None = None
    #: ``sub`` on a history channel: whether ``since`` was recovered, and the
    #: channel's position when the subscription took effect.
    recovered: bool | None = None
    offset: int | None = None
    epoch: str | None = None
    #: ``history``: the page, oldest first.
    publications: list[HistoryItem] | None = None
    #: ``presence`` and ``presence_stats``.
    presence: list[PresenceInfo] | None = None
    num_clients: int | None = None
    num_users: int | None = None
    #: ``call`` (and ``sub`` through a subscribe hook): the backend's answer.
    data: msgspec.Raw | None = None


class Push(msgspec.Struct, frozen=True, tag_field="op", tag="msg", omit_defaults=True):
    """A publication delivered to a subscriber; history channels add its position."""

    ch: str
    data: Any
    offset: int | None = None
    epoch: str | None = None


class Expiring(msgspec.Struct, frozen=True, tag_field="op", tag="expiring"):
    """The token expires at ``exp`` (Unix seconds): send ``refresh`` before then."""

    exp: int


class Gap(msgspec.Struct, frozen=True, tag_field="op", tag="gap"):
    """Publications on ``ch`` may have been missed (the broker link was down).

    Recover: ``history`` (or ``sub`` with ``since``) from the last offset on a
    history channel; reload the state otherwise.
    """

    ch: str


class Unsubscribed(msgspec.Struct, frozen=True, tag_field="op", tag="unsubscribed"):
    """The server ended a subscription (e.g. a refreshed token no longer allows it)."""

    ch: str
    code: int
    message: str


class Subscribed(msgspec.Struct, frozen=True, tag_field="op", tag="subscribed", omit_defaults=True):
    """The server subscribed this connection to ``ch`` (the server API or a connect hook).

    On a history channel, ``offset`` and ``epoch`` say where the channel
    stood when the subscription took effect: the pushes that follow come
    after it, and a client that reconnects recovers from it (``sub`` with
    ``since``) as from any position it saw. ``recovered``: the subscription
    was made from a position the client gave (an event stream's
    ``Last-Event-ID``), and whether what was missed since follows.
    """

    ch: str
    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None
