"""Plain Tornado peer of the gateway's fan-out, for the WebSocket benchmark.

Written the way Tornado's websocket chat demo (``demos/websocket/chatdemo.py``)
shows it: a ``WebSocketHandler`` whose class keeps the waiters, and a
classmethod that loops ``waiter.write_message(message)`` over them. It speaks
just enough of the gateway's protocol for ``gateway.loadtest``:

* ``/ws`` takes a JWT (HS256) in ``?token=`` or ``Authorization: Bearer``, and
  answers 401 before upgrading when it does not verify;
* a text frame ``{"op":"sub","ch":"load","id":1}`` adds the socket to channel
  ``load``; every frame with an ``id`` is answered ``{"id": 1, "ok": true}``;
* each Redis publication on ``gw:<ch>`` (one ``PSUBSCRIBE gw:*``) is sent to
  the channel's waiters as ``{"op":"msg","ch":"<ch>","data":<payload>}``;
* ``GET /healthz`` answers ``{"status": "ok"}``.

    JWT_SECRET=bench-secret-0123456789abcdef-0123456789 REDIS_URL=redis://127.0.0.1:6379/0 \\
    python -m bench.peers.tornado_broadcast --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource

import jwt
import redis.asyncio as aioredis
import tornado.web
import tornado.websocket
from redis.asyncio.client import PubSub

PREFIX = "gw:"


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


class BroadcastSocketHandler(tornado.websocket.WebSocketHandler):
    waiters: dict[str, set[BroadcastSocketHandler]] = {}

    def initialize(self, jwt_secret: str) -> None:
        self.jwt_secret = jwt_secret
        self.channels: set[str] = set()

    def prepare(self) -> None:
        token = self.get_query_argument("token", None)
        if token is None:
            scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                token = credentials
        try:
            jwt.decode(token or "", self.jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise tornado.web.HTTPError(401) from None

    def on_message(self, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return
        if not isinstance(frame, dict) or "id" not in frame:
            return
        ch = frame.get("ch")
        if frame.get("op") == "sub" and isinstance(ch, str):
            BroadcastSocketHandler.waiters.setdefault(ch, set()).add(self)
            self.channels.add(ch)
        self.write_message({"id": frame["id"], "ok": True})

    def on_close(self) -> None:
        for ch in self.channels:
            BroadcastSocketHandler.waiters[ch].discard(self)

    @classmethod
    def send_updates(cls, ch: str, message: str) -> None:
        for waiter in cls.waiters.get(ch, ()):
            try:
                waiter.write_message(message)
            except tornado.websocket.WebSocketClosedError:
                pass


def make_app(jwt_secret: str) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler),
            (r"/ws", BroadcastSocketHandler, {"jwt_secret": jwt_secret}),
        ]
    )


async def relay(pubsub: PubSub) -> None:
    """Broadcast every publication on ``gw:<ch>`` to the waiters of ``<ch>``."""
    async for message in pubsub.listen():
        if message["type"] != "pmessage":
            continue
        ch = message["channel"].decode().removeprefix(PREFIX)
        data = message["data"].decode()
        text = '{"op":"msg","ch":' + json.dumps(ch) + ',"data":' + data + "}"
        BroadcastSocketHandler.send_updates(ch, text)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(host: str, port: int) -> None:
    redis = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(PREFIX + "*")
    app = make_app(os.environ.get("JWT_SECRET", "bench-secret-0123456789abcdef-0123456789"))
    app.listen(port, host)
    try:
        await relay(pubsub)
    finally:
        await pubsub.aclose()
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="plain Tornado broadcast peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raise_file_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.host, args.port))
    else:
        uvloop.run(main(args.host, args.port))
