"""FastAPI peer of the gateway's fan-out, for the WebSocket benchmark.

Written the way FastAPI's WebSockets docs show it: a ``ConnectionManager``
with ``active_connections: list[WebSocket]`` whose ``broadcast`` awaits
``connection.send_text(message)`` for each connection in turn, and a
dependency that raises ``WebSocketException(1008)`` for a bad token. It speaks
just enough of the gateway's protocol for ``gateway.loadtest``:

* ``/ws`` takes a JWT (HS256) in ``?token=`` or ``Authorization: Bearer``; one
  that does not verify is refused before the upgrade (uvicorn answers 403);
* a text frame ``{"op":"sub","ch":"load","id":1}`` adds the socket to channel
  ``load``; every frame with an ``id`` is answered ``{"id":1,"ok":true}``;
* each Redis publication on ``gw:<ch>`` (one ``PSUBSCRIBE gw:*``) is sent to
  the channel's connections as ``{"op":"msg","ch":"<ch>","data":<payload>}``;
* ``GET /healthz`` answers ``{"status": "ok"}``.

uvicorn runs with its defaults: one worker, uvloop and httptools when they are
installed, and its default WebSocket implementation (built on ``websockets``).

    JWT_SECRET=bench-secret-0123456789abcdef-0123456789 REDIS_URL=redis://127.0.0.1:6379/0 \\
    python -m bench.peers.fastapi_broadcast --port 8003
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated

import jwt
import redis.asyncio as aioredis
import uvicorn
from fastapi import (
    Depends,
    FastAPI,
    Header,
    Query,
    WebSocket,
    WebSocketDisconnect,
    WebSocketException,
    status,
)
from redis.asyncio.client import PubSub

PREFIX = "gw:"


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []
        self.channels: dict[str, set[WebSocket]] = {}

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def subscribe(self, websocket: WebSocket, ch: str) -> None:
        self.channels.setdefault(ch, set()).add(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        self.active_connections.remove(websocket)
        for connections in self.channels.values():
            connections.discard(websocket)

    async def broadcast(self, ch: str, message: str) -> None:
        # A copy: sockets leave the channel while we await their sends.
        for connection in list(self.channels.get(ch, ())):
            try:
                await connection.send_text(message)
            except (WebSocketDisconnect, RuntimeError):
                pass  # closed meanwhile; its endpoint calls disconnect()


manager = ConnectionManager()


async def relay(pubsub: PubSub) -> None:
    """Broadcast every publication on ``gw:<ch>`` to the connections on ``<ch>``."""
    async for message in pubsub.listen():
        if message["type"] != "pmessage":
            continue
        ch = message["channel"].decode().removeprefix(PREFIX)
        data = message["data"].decode()
        await manager.broadcast(ch, '{"op":"msg","ch":' + json.dumps(ch) + ',"data":' + data + "}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.jwt_secret = os.environ.get("JWT_SECRET", "bench-secret-0123456789abcdef-0123456789")
    redis = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(PREFIX + "*")
    relaying = asyncio.create_task(relay(pubsub))
    try:
        yield
    finally:
        relaying.cancel()
        with suppress(asyncio.CancelledError):
            await relaying
        await pubsub.aclose()
        await redis.aclose()


app = FastAPI(title="broadcast (FastAPI peer)", lifespan=lifespan)


async def verify_token(
    websocket: WebSocket,
    token: Annotated[str | None, Query()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    if token is None and authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = credentials
    try:
        jwt.decode(token or "", websocket.app.state.jwt_secret, algorithms=["HS256"])
    except jwt.InvalidTokenError:
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION) from None


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws", dependencies=[Depends(verify_token)])
async def websocket_endpoint(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        while True:
            try:
                frame = json.loads(await websocket.receive_text())
            except (KeyError, ValueError):  # a binary frame (no "text"), or not JSON
                continue
            if not isinstance(frame, dict) or "id" not in frame:
                continue
            ch = frame.get("ch")
            if frame.get("op") == "sub" and isinstance(ch, str):
                manager.subscribe(websocket, ch)
            await websocket.send_json({"id": frame["id"], "ok": True})
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(websocket)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="FastAPI broadcast peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()
    raise_file_limit()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
