"""A backend that follows who is online from the gateway's durable event stream.

With ``EVENTS_STREAM=true`` every gateway appends each connect, disconnect,
subscribe and unsubscribe to the Redis Stream ``<REDIS_PREFIX>events``
(docs/events.md). This consumer reads it in a consumer group, so several
copies share the work and none loses an event while it is down: on start it
first takes over entries another consumer read but never acknowledged
(``XAUTOCLAIM``), then reads new ones, acknowledging each once handled.
Delivery is at least once, so handling is idempotent: the online count of a
user is kept per connection id, and an event seen twice changes nothing.

Run it beside gateways started with ``EVENTS_STREAM=true``::

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python examples/events_consumer.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

log = logging.getLogger("events_consumer")

GROUP = "presence-tracker"


class Online:
    """Who is online: each user's open connections (idempotent per event)."""

    def __init__(self) -> None:
        self.connections: dict[str, set[str]] = {}

    def handle(self, event: dict[str, Any]) -> None:
        user, client = event.get("user") or "(anonymous)", event["client"]
        if event["type"] == "connect":
            first = user not in self.connections
            self.connections.setdefault(user, set()).add(client)
            if first:
                log.info("%s is online (%s)", user, event["transport"])
        elif event["type"] == "disconnect":
            held = self.connections.get(user, set())
            held.discard(client)
            if not held and self.connections.pop(user, None) is not None:
                log.info("%s went offline (%s %s)", user, event["code"], event["reason"])


async def consume(
    r: aioredis.Redis,
    stream: str,
    online: Online,
    consumer: str = "worker-1",
    *,
    stop: asyncio.Event | None = None,
    block_ms: int = 5000,
    claim_idle_ms: int = 60_000,
) -> None:
    """Read ``stream`` in the group until ``stop`` is set, handling and acknowledging each event."""
    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:  # BUSYGROUP: it exists already
        if "BUSYGROUP" not in str(exc):
            raise
    # Entries a consumer that died had read but not acknowledged.
    _, claimed, _ = await r.xautoclaim(stream, GROUP, consumer, min_idle_time=claim_idle_ms)
    await _handle(r, stream, online, claimed)
    while stop is None or not stop.is_set():
        read = await r.xreadgroup(GROUP, consumer, {stream: ">"}, count=100, block=block_ms)
        for _, entries in read:
            await _handle(r, stream, online, entries)


async def _handle(
    r: aioredis.Redis, stream: str, online: Online, entries: list[tuple[Any, dict[Any, Any]]]
) -> None:
    for entry_id, fields in entries:
        try:
            online.handle(json.loads(fields[b"event"]))
        except (KeyError, ValueError) as exc:  # not ours, or malformed: skip it, keep going
            log.warning("entry %s ignored: %s", entry_id, exc)
        await r.xack(stream, GROUP, entry_id)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    r = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    stream = os.environ.get("REDIS_PREFIX", "gw:") + "events"
    try:
        await consume(r, stream, Online(), os.environ.get("CONSUMER", "worker-1"))
    finally:
        await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
