"""The load run's publisher: publications spread over the channels, at a rate.

Each publication is ``{"s": seq, "t": send time, "c": channel index}``:
``s`` counts that channel's publications from 0, so every subscriber can
check it got each exactly once and in order (`gateway.loadtest.ledger`).

Three ways to send: plain Redis ``PUBLISH`` (no history), Redis through
the gateways' history script (`gateway.publisher.Publisher`, when the
channels match ``history_channels``: needed for recovery), or the gateways'
``POST /api/publish`` (history as the server is configured), trying the next
URL when one does not answer. A publication that cannot be sent within
`RETRY_SECONDS` is counted as a publish error and its sequence number is
used again by the channel's next publication, so a failed send is never
mistaken for a lost delivery.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["RETRY_SECONDS", "Publishing", "publish_all"]

#: How long one publication is retried before it is given up.
RETRY_SECONDS = 5.0

Send = Callable[[str, bytes], Awaitable[None]]


@dataclass
class Publishing:
    """What to publish and how; the outcome is filled in as it goes."""

    names: list[str]
    messages: int
    rate: float
    via: str  # "redis" or "http"
    spread: str = "round-robin"  # or "random"
    payload_bytes: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "gw:"
    history_channels: tuple[str, ...] = ()
    history_size: int = 100
    history_ttl: float = 300.0
    urls: list[str] = field(default_factory=list)
    token: str | None = None
    pad_json: bytes = b""  # a JSON value sent as each publication's "pad" (--payload-json)
    #: per channel: publications sent (the next sequence number)
    sent: list[int] = field(default_factory=list)
    #: (channel << 32 | seq) -> wall-clock send time
    times: dict[int, float] = field(default_factory=dict)
    errors: int = 0


async def _sender(p: Publishing) -> tuple[Send, Callable[[], Awaitable[None]]]:
    if p.via == "redis" and p.history_channels:
        from gateway.publisher import Publisher

        publisher = Publisher(
            p.redis_url,
            p.prefix,
            history_channels=p.history_channels,
            history_size=p.history_size,
            history_ttl=p.history_ttl,
        )

        async def send_history(ch: str, data: bytes) -> None:
            await publisher.publish(ch, data)

        return send_history, publisher.close
    if p.via == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(p.redis_url)

        async def send_plain(ch: str, data: bytes) -> None:
            await client.publish(p.prefix + ch, data)

        return send_plain, client.aclose
    from tornado.httpclient import AsyncHTTPClient

    http = AsyncHTTPClient(force_instance=True)
    headers = {"Content-Type": "application/json"}
    if p.token:
        headers["Authorization"] = f"Bearer {p.token}"
    current = [0]

    async def post(ch: str, data: bytes) -> None:
        body = b'{"ch":' + json.dumps(ch).encode() + b',"data":' + data + b"}"
        url = p.urls[current[0]].rstrip("/") + "/api/publish"
        try:
            await http.fetch(url, method="POST", headers=headers, body=body, request_timeout=5)
        except Exception:
            current[0] = (current[0] + 1) % len(p.urls)  # as a load balancer would
            raise

    async def close() -> None:
        http.close()

    return post, close


async def publish_all(
    p: Publishing, tick: Callable[[], None], started: Callable[[float], None]
) -> None:
    """Send ``p.messages`` publications at ``p.rate``.

    ``started`` is called with the monotonic time of the first publication;
    ``tick`` about ten times a second.
    """
    send, close = await _sender(p)
    p.sent = [0] * len(p.names)
    pad = b',"pad":"' + b"x" * p.payload_bytes + b'"' if p.payload_bytes else b""
    if p.pad_json:
        pad = b',"pad":' + p.pad_json
    start = time.monotonic()
    started(start)
    next_tick = start
    try:
        for k in range(p.messages):
            due = start + k / p.rate
            while True:
                now = time.monotonic()
                if now >= next_tick:
                    tick()
                    next_tick = now + 0.1
                if now >= due:
                    break
                await asyncio.sleep(min(due - now, 0.05))
            c = k % len(p.names) if p.spread == "round-robin" else random.randrange(len(p.names))
            await _one(p, send, c, pad, tick)
    finally:
        await close()


async def _one(p: Publishing, send: Send, c: int, pad: bytes, tick: Callable[[], None]) -> None:
    seq = p.sent[c]
    give_up = time.monotonic() + RETRY_SECONDS
    while True:
        t = time.time()
        try:
            await send(p.names[c], b'{"s":%d,"t":%.6f,"c":%d%s}' % (seq, t, c, pad))
        except Exception:
            if time.monotonic() >= give_up:
                p.errors += 1
                return
            tick()
            await asyncio.sleep(0.1)
            continue
        p.sent[c] = seq + 1
        p.times[c << 32 | seq] = t
        return
