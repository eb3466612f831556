"""Connection events (EVENTS_STREAM): a durable stream of connects, disconnects,
subscribes and unsubscribes, and an optional webhook; docs/events.md."""

from __future__ import annotations

from gateway.events.recorder import EventRecorder, Recorded, node_name, reason_for
from gateway.events.schema import (
    NODE_LOST,
    Connect,
    Disconnect,
    Event,
    Subscribe,
    Unsubscribe,
    json_schema,
)
from gateway.events.webhook import Webhook

__all__ = [
    "NODE_LOST",
    "Connect",
    "Disconnect",
    "Event",
    "EventRecorder",
    "Recorded",
    "Subscribe",
    "Unsubscribe",
    "Webhook",
    "json_schema",
    "node_name",
    "reason_for",
]
