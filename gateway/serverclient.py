"""The gateways' server API from a backend: `ServerClient`, over HTTP.

::

    from gateway.publisher import ServerClient

    async with ServerClient("http://127.0.0.1:8888", api_key) as api:
        await api.disconnect(user="42", reason="banned", block=3600)
        await api.subscribe("room:7", user="42")
        for conn in (await api.connections(user="42")).connections:
            print(conn.node, conn.transport, conn.subscriptions)

Any gateway answers for all of them (docs/operations.md, "Server API"). The
credential is an API key with the ``server`` scope (or an admin's token).
Answers are the server API's own types (gateway/serverapi/schemas.py); a
refusal raises `ServerError` with the status, code and message of the error
body. Requests share one keep-alive connection pool. ``wait`` is how long
the gateways wait for every live gateway to act (the API's ``timeout``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import msgspec

from gateway.presence import PresenceEntry
from gateway.serverapi.schemas import (
    ActionOut,
    BroadcastOut,
    ChannelsOut,
    ConnectionsOut,
    HistoryOut,
    InfoOut,
    PresenceOut,
    PresenceStatsOut,
    PublishOut,
)
from proto import CloseCode, Position

__all__ = ["Closing", "ServerClient", "ServerError"]

T = TypeVar("T")


class ServerError(Exception):
    """The server API refused a call: ``status``, ``code`` and ``message`` of its error body."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class Closing:
    """``async with`` closes it: `close` is all a subclass writes."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class ServerClient(Closing):
    def __init__(self, url: str, credential: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def call(self, name: str, body: dict[str, Any]) -> Any:
        """``POST /api/server/<name>`` with ``body``: the decoded answer, or `ServerError`."""
        return msgspec.json.decode(await self._post(name, body))

    async def _typed(
        self, name: str, body: dict[str, Any], kind: type[T], key: str | None = None
    ) -> T:
        return msgspec.json.decode(await self._post(name, body, key), type=kind)

    async def _post(self, name: str, body: dict[str, Any], key: str | None = None) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        url = f"{self.url}/api/server/{name}"
        headers = None if key is None else {"Idempotency-Key": key}
        async with self._session.post(url, data=msgspec.json.encode(body), headers=headers) as resp:
            raw = await resp.read()
            status = resp.status
        if status == 200:
            return raw
        try:
            error = msgspec.json.decode(raw).get("error", {})
        except (msgspec.DecodeError, AttributeError):
            error = {}
        message = error.get("message") or raw[:200].decode(errors="replace")
        raise ServerError(status, error.get("code", "http_error"), message, error)

    @staticmethod
    def _target(user: str, client: str | None) -> dict[str, Any]:
        return {"user": user} if client is None else {"user": user, "client": client}

    # -- the calls -------------------------------------------------------------------

    async def publish(self, ch: str, data: Any, *, key: str | None = None) -> Position | None:
        """Publish ``data`` on ``ch``; its position on a history channel, else None.

        ``key`` (an ``Idempotency-Key``): the same publication sent again with the same
        key, because its answer did not come, is published once (history channels only).
        """
        out = await self._typed("publish", {"ch": ch, "data": data}, PublishOut, key)
        return Position(out.offset, out.epoch) if out.offset is not None and out.epoch else None

    async def broadcast(
        self, channels: list[str], data: Any, *, key: str | None = None
    ) -> BroadcastOut:
        """``data`` on each of ``channels``; ``key`` as `publish`'s, for each channel."""
        body = {"channels": channels, "data": data}
        return await self._typed("broadcast", body, BroadcastOut, key)

    async def disconnect(
        self,
        user: str,
        client: str | None = None,
        *,
        code: int = int(CloseCode.DISCONNECTED),
        reason: str = "",
        block: float = 0.0,
        wait: float = 2.0,
    ) -> ActionOut:
        """Close a user's connections everywhere (only ``client``, when given); ``block``:
        refuse the user's new ones for that many seconds."""
        body = {**self._target(user, client), "code": code, "reason": reason, "timeout": wait}
        if block:
            body["block_seconds"] = block
        return await self._typed("disconnect", body, ActionOut)

    async def unblock(self, user: str, *, wait: float = 2.0) -> ActionOut:
        """End a block of ``user`` (`disconnect`'s ``block``) on every gateway."""
        return await self._typed("unblock", {"user": user, "timeout": wait}, ActionOut)

    async def subscribe(
        self, ch: str, user: str, client: str | None = None, *, wait: float = 2.0
    ) -> ActionOut:
        body = {**self._target(user, client), "ch": ch, "timeout": wait}
        return await self._typed("subscribe", body, ActionOut)

    async def unsubscribe(
        self, ch: str, user: str, client: str | None = None, *, wait: float = 2.0
    ) -> ActionOut:
        body = {**self._target(user, client), "ch": ch, "timeout": wait}
        return await self._typed("unsubscribe", body, ActionOut)

    async def connections(
        self, user: str, client: str | None = None, *, wait: float = 2.0
    ) -> ConnectionsOut:
        body = {**self._target(user, client), "timeout": wait}
        return await self._typed("connections", body, ConnectionsOut)

    async def channels(self, pattern: str = "*", limit: int = 100) -> ChannelsOut:
        return await self._typed("channels", {"pattern": pattern, "limit": limit}, ChannelsOut)

    async def presence(self, ch: str) -> list[PresenceEntry]:
        return (await self._typed("presence", {"ch": ch}, PresenceOut)).presence

    async def presence_stats(self, ch: str) -> PresenceStatsOut:
        return await self._typed("presence_stats", {"ch": ch}, PresenceStatsOut)

    async def history(self, ch: str, since: int = 0, limit: int = 100) -> HistoryOut:
        body = {"ch": ch, "since": since, "limit": limit}
        return await self._typed("history", body, HistoryOut)

    async def info(self, *, wait: float = 2.0) -> InfoOut:
        return await self._typed("info", {"timeout": wait}, InfoOut)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
