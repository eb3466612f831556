"""The connection events, as backends read them (docs/events.md has their JSON Schema).

Each event is one JSON object with a ``type``; the Redis Stream holds one
per entry (field ``event``), the webhook posts them in ``{"events": [...]}``.
`json_schema` is generated from these types, so the document and the bytes
cannot disagree. ``ts`` is always the last member: a node's recorded
disconnect event is stored without it, and whoever reports the node lost
adds it (core/infra/lua/events_claim.lua).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = [
    "NODE_LOST",
    "Batch",
    "Connect",
    "Disconnect",
    "Event",
    "Subscribe",
    "Unsubscribe",
    "encode",
    "json_schema",
    "unstamped",
]

#: The ``reason`` of a disconnect reported for a node that died (its code is 1006).
NODE_LOST = "node_lost"

Id = Annotated[
    str,
    msgspec.Meta(
        description="Unique per event; an event appended twice (a retry) carries the same id."
    ),
]
Node = Annotated[str, msgspec.Meta(description="The gateway process that held the connection.")]
Client = Annotated[
    str, msgspec.Meta(description="The connection, as in presence (one per socket or stream).")
]
User = Annotated[str, msgspec.Meta(description="The token's sub (apikey:<id> for an API key).")]
Transport = Annotated[
    str,
    msgspec.Meta(
        description="How the client is connected.",
        extra_json_schema={"enum": ["websocket", "sse", "longpoll"]},
    ),
]
Channel = Annotated[str, msgspec.Meta(description="The channel.")]
Ts = Annotated[
    int,
    msgspec.Meta(
        description="When it happened, Unix milliseconds (for node_lost: when it was reported)."
    ),
]


class _Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    id: Id
    node: Node
    client: Client
    user: User
    transport: Transport


class Connect(_Event, tag="connect", frozen=True, kw_only=True):
    """A connection was admitted: a socket opened, an SSE stream or a long-poll session began."""

    ts: Ts


class Disconnect(_Event, tag="disconnect", frozen=True, kw_only=True):
    """A connection ended; every subscription it held ended with it (no unsubscribe events)."""

    code: Annotated[
        int,
        msgspec.Meta(
            description="The close code (docs/protocol.md): the peer's, the gateway's, 1006 when "
            "the connection was lost without one (also for node_lost)."
        ),
    ]
    reason: Annotated[
        str,
        msgspec.Meta(
            description="Why: the close reason sent or received, or node_lost when the process "
            "holding the connection died and another reported it."
        ),
    ]
    ts: Ts


class Subscribe(_Event, tag="subscribe", frozen=True, kw_only=True):
    """The connection subscribed to a channel (the reply said ok)."""

    channel: Channel
    ts: Ts


class Unsubscribe(_Event, tag="unsubscribe", frozen=True, kw_only=True):
    """The connection left a channel: its unsub, or a refreshed token that no longer allows it."""

    channel: Channel
    ts: Ts


Event = Connect | Disconnect | Subscribe | Unsubscribe


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """The body of one webhook POST: events in the order they were appended."""

    events: list[Event]


_encoder = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


_NO_TS = b',"ts":0}'


def unstamped(event: Disconnect) -> bytes:
    """``event`` (with ``ts=0``) as JSON without its ``ts``, for a node's record."""
    encoded = _encoder.encode(event)
    assert encoded.endswith(_NO_TS), "ts is the last member, and 0"
    return encoded[: -len(_NO_TS)] + b"}"


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of an event, and of a webhook body in its ``$defs``."""
    (event, _), defs = msgspec.json.schema_components([Event, Batch])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **event, "$defs": defs}
