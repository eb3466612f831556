"""The server API's request and response bodies: validated on the way in, documented in OpenAPI.

The results a gateway reports (`ConnectionInfo`, `ChannelCount`, `NodeInfo`)
are the control channel's own types (core/infra/control.py), so what a node
answers is what the caller gets, field for field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from core.infra.control import ChannelCount, ConnectionInfo, NodeInfo
from gateway.presence import PresenceEntry
from proto import CloseCode, HistoryItem
from proto.frames import MAX_ID, Channel

__all__ = [
    "ActionOut",
    "BroadcastIn",
    "BroadcastOut",
    "BroadcastResult",
    "ChannelIn",
    "ChannelsIn",
    "ChannelsOut",
    "ConnectionsIn",
    "ConnectionsOut",
    "DisconnectIn",
    "HistoryIn",
    "HistoryOut",
    "InfoIn",
    "InfoOut",
    "PresenceOut",
    "PresenceStatsOut",
    "PublishIn",
    "PublishOut",
    "SubscriptionIn",
    "UnblockIn",
]

#: A token's ``sub``.
User = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00]+(?![\s\S])")]
#: A connection's id (as in presence).
ClientId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[0-9a-f]+(?![\s\S])")]
#: Seconds to wait for every live gateway's answer.
Timeout = Annotated[float, Meta(gt=0, le=30, description="Seconds to wait for every gateway.")]


class PublishIn(msgspec.Struct, forbid_unknown_fields=True):
    ch: Channel
    data: msgspec.Raw


class PublishOut(msgspec.Struct, omit_defaults=True):
    """Where the publication stands in the channel's history (history channels only)."""

    offset: int | None = None
    epoch: str | None = None


class BroadcastIn(msgspec.Struct, forbid_unknown_fields=True):
    channels: Annotated[list[Channel], Meta(min_length=1, max_length=1000)]
    data: msgspec.Raw


class BroadcastResult(msgspec.Struct, omit_defaults=True):
    """One channel of a broadcast: its position (history channels), or why it failed."""

    ch: str
    offset: int | None = None
    epoch: str | None = None
    error: str | None = None


class BroadcastOut(msgspec.Struct):
    results: list[BroadcastResult]


class _Target(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """All connections of ``user`` (a token's ``sub``), or only its connection ``client``."""

    user: User
    client: ClientId | None = None
    timeout: Timeout = 2.0


class DisconnectIn(_Target, kw_only=True):
    code: Annotated[int, Meta(ge=4000, le=4999)] = int(CloseCode.DISCONNECTED)
    #: cut to 123 bytes of UTF-8 (what a close frame carries); "": the code's own
    reason: Annotated[str, Meta(max_length=123)] = ""
    #: refuse the user's new connections for this long (0: do not)
    block_seconds: Annotated[float, Meta(ge=0, le=31_536_000)] = 0.0


class UnblockIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    user: User
    timeout: Timeout = 2.0


class SubscriptionIn(_Target, kw_only=True):
    ch: Channel


class ConnectionsIn(_Target, kw_only=True):
    pass


class ChannelsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: a glob (``room:*``), as in grants
    pattern: Annotated[str, Meta(min_length=1, max_length=200)] = "*"
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100
    timeout: Timeout = 2.0


class InfoIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    timeout: Timeout = 2.0


class ChannelIn(msgspec.Struct, forbid_unknown_fields=True):
    ch: Channel


class HistoryIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ch: Channel
    since: Annotated[int, Meta(ge=0, le=MAX_ID)] = 0
    limit: Annotated[int, Meta(ge=1, le=100)] = 100


class _Fanned(msgspec.Struct, kw_only=True):
    """``missing``: live gateways that did not answer in time; ``failed``: those that
    answered with an error (node -> what went wrong)."""

    missing: list[str]
    failed: dict[str, str]


class ActionOut(_Fanned, kw_only=True):
    """How many connections the action applied to, in all and by gateway."""

    count: int
    nodes: dict[str, int]


class ConnectionsOut(_Fanned, kw_only=True):
    connections: list[ConnectionInfo]
    #: a gateway held more than it lists (1,000)
    truncated: bool


class ChannelsOut(_Fanned, kw_only=True):
    """Channels with subscribers, busiest first, counts summed over every gateway."""

    channels: list[ChannelCount]
    truncated: bool


class InfoOut(_Fanned, kw_only=True):
    nodes: list[NodeInfo]


class PresenceOut(msgspec.Struct):
    presence: list[PresenceEntry]


class PresenceStatsOut(msgspec.Struct):
    num_clients: int
    num_users: int


class HistoryOut(msgspec.Struct, omit_defaults=True):
    """A page, oldest first; ``next``: the ``since`` of the next page (absent on the last)."""

    publications: list[HistoryItem]
    offset: int | None = None
    epoch: str | None = None
    next: int | None = None
