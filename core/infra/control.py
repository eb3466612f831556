"""The control channel's messages: every one is defined here, and only here.

Processes (gateways and standalone cores) tell each other about changes
that must apply everywhere at once by publishing on the broker's `CONTROL`
channel, which every process receives whatever it subscribes to:

* ``{"type": "sessions_revoked", "sids": [...]}``: these login sessions
  are revoked (core/infra/revocation.py);
* ``{"type": "api_keys_changed"}``: reload the active API keys
  (core/apikeys.py);
* ``{"type": "server_request", "id", "reply_to", "origin", "caller",
  "action": {"action": "disconnect" | "subscribe" | ..., ...}}``: a call of
  the server API (gateway/serverapi/) that every gateway carries out on its
  own connections. Each answers with a `ServerReply` published on
  ``reply_to`` (the asking gateway's inbox, ``__reply:<node>``), carrying the
  action's result (`Count`, `ConnectionList`, `ChannelList`, `NodeInfo`);
* ``{"type": "console_watched", "seconds": 10}``: someone watches the admin
  console: every gateway publishes its figures on ``__admin`` once a second
  for that long (gateway/console/).

A message this version does not know, or a malformed one, decodes to None
and is ignored (a newer process may send more kinds during a rollout).
"""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec

from core.infra.broker.base import CONTROL, Publisher

__all__ = [
    "CONTROL",
    "Action",
    "ApiKeysChanged",
    "ChannelCount",
    "ChannelList",
    "Channels",
    "ConnectionInfo",
    "ConnectionList",
    "Connections",
    "ConsoleWatched",
    "ControlMessage",
    "Count",
    "Disconnect",
    "Info",
    "NodeInfo",
    "ServerReply",
    "ServerRequest",
    "SessionsRevoked",
    "Subscribe",
    "Unblock",
    "Unsubscribe",
    "action_name",
    "broadcast",
    "decode",
    "decode_reply",
    "encode",
]

log = logging.getLogger("core.infra.control")


class SessionsRevoked(msgspec.Struct, tag_field="type", tag="sessions_revoked"):
    sids: list[str]


class ApiKeysChanged(msgspec.Struct, tag_field="type", tag="api_keys_changed"):
    pass


class ConsoleWatched(msgspec.Struct, tag_field="type", tag="console_watched"):
    """Someone watches the admin console: publish figures for ``seconds`` more."""

    seconds: Annotated[float, msgspec.Meta(gt=0, le=60)]


# -- The server API's actions: what every gateway does with its own connections.
# ``user`` (a token's ``sub``) names all of a user's connections; with
# ``client`` (a connection's id, as in presence), only that one of them.


class Disconnect(msgspec.Struct, tag_field="action", tag="disconnect", kw_only=True):
    """Close the connections with ``code`` and ``reason``; ``block_until`` (Unix
    seconds) refuses the user's new connections until then."""

    user: str
    client: str | None = None
    code: int
    reason: str
    block_until: float | None = None


class Subscribe(msgspec.Struct, tag_field="action", tag="subscribe", kw_only=True):
    user: str
    client: str | None = None
    ch: str


class Unsubscribe(msgspec.Struct, tag_field="action", tag="unsubscribe", kw_only=True):
    user: str
    client: str | None = None
    ch: str


class Connections(msgspec.Struct, tag_field="action", tag="connections", kw_only=True):
    user: str
    client: str | None = None


class Channels(msgspec.Struct, tag_field="action", tag="channels", kw_only=True):
    """Channels with subscribers here whose name matches the glob ``pattern``."""

    pattern: str = "*"


class Info(msgspec.Struct, tag_field="action", tag="info"):
    pass


class Unblock(msgspec.Struct, tag_field="action", tag="unblock", kw_only=True):
    """Take ``user``'s connections again (a ``disconnect`` blocked them)."""

    user: str


Action = Disconnect | Subscribe | Unsubscribe | Connections | Channels | Info | Unblock


class ServerRequest(msgspec.Struct, tag_field="type", tag="server_request", kw_only=True):
    """One server API call, for every gateway; ``caller`` is who made it (for the logs)."""

    id: str
    reply_to: str
    origin: str
    caller: str
    action: Action


ControlMessage = SessionsRevoked | ApiKeysChanged | ServerRequest | ConsoleWatched


# -- Replies, and what they carry.


class ServerReply(msgspec.Struct, kw_only=True):
    """A gateway's answer to `ServerRequest` ``id``: the result, or what went wrong."""

    id: str
    node: str
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: str | None = None


class Count(msgspec.Struct):
    """How many connections the action applied to."""

    count: int


class ConnectionInfo(msgspec.Struct, kw_only=True):
    """One open connection, as its gateway knows it."""

    client: str
    user: str
    transport: str
    codec: str
    node: str
    remote: str
    #: when it was opened, Unix seconds
    since: float
    subscriptions: list[str]


class ConnectionList(msgspec.Struct, kw_only=True):
    connections: list[ConnectionInfo]
    #: more connections matched than one gateway lists
    truncated: bool = False


class ChannelCount(msgspec.Struct):
    ch: str
    subscribers: int


class ChannelList(msgspec.Struct, kw_only=True):
    channels: list[ChannelCount]
    truncated: bool = False


class NodeInfo(msgspec.Struct, kw_only=True):
    """A gateway process: what it runs, what it holds, how busy and healthy it is."""

    node: str
    version: str
    #: Unix seconds it started, and seconds since
    started: float
    uptime: float
    #: open connections by transport (websocket, sse, longpoll)
    connections: dict[str, int]
    subscriptions: int
    channels: int
    #: over the last second
    deliveries_per_second: float
    connects_per_second: float
    #: resident memory
    memory_bytes: int
    redis: bool
    #: None where no database is configured here
    postgres: bool | None
    #: each configured hook (gateway/hooks/): whether its backend's breaker is closed
    hooks: dict[str, bool] = {}


_decoder = msgspec.json.Decoder(ControlMessage)
_replies = msgspec.json.Decoder(ServerReply)
_encoder = msgspec.json.Encoder()


def action_name(action: Action) -> str:
    """``disconnect``, ``subscribe``…: the action's tag, as logs and metrics name it."""
    tag = type(action).__struct_config__.tag
    return tag if isinstance(tag, str) else type(action).__name__


def decode(data: bytes) -> ControlMessage | None:
    """The message in ``data``, or None for one this version does not know."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        log.debug("control message ignored: %r", data[:200])
        return None


def decode_reply(data: bytes) -> ServerReply | None:
    """The reply in ``data`` (read from a gateway's inbox), or None when it is none."""
    try:
        return _replies.decode(data)
    except msgspec.DecodeError:
        log.debug("server reply ignored: %r", data[:200])
        return None


def encode(message: ControlMessage | ServerReply) -> bytes:
    return _encoder.encode(message)


async def broadcast(publisher: Publisher, message: ControlMessage) -> None:
    """Publish ``message`` to every process; raises what the publisher raises."""
    await publisher.publish(CONTROL, _encoder.encode(message))
