"""`Client`: the commands of protocol v1 over a `Connection` that stays up.

Each command waits for the connection (within ``request_timeout``), gets an
id and a future, and returns the reply's content or raises `ReplyError`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.client.encoding import RpcCommand
from gateway.client.exceptions import ReplyError
from gateway.client.link import Connection, position_of
from gateway.client.subscription import Publication, Subscription
from proto import (
    Call,
    ErrorCode,
    History,
    Ping,
    Position,
    PresenceInfo,
    PresenceQuery,
    PresenceStats,
    Pub,
    Sub,
    Unsub,
)
from proto.frames import RpcMethod

__all__ = ["Client", "HistoryPage", "PresenceCount", "RpcResponse"]


class RpcResponse(NamedTuple):
    """The REST core's answer to an ``rpc``: unpack as ``status, headers, body``."""

    status: int
    headers: dict[str, str]
    body: Any  # the decoded JSON (or MessagePack) body; None for 204/304


class PresenceCount(NamedTuple):
    num_clients: int
    num_users: int


class HistoryPage(NamedTuple):
    publications: list[Publication]  # oldest first
    position: Position | None  # where the channel stands


class Client(Connection):
    """A connection to a gateway's ``/ws``: ``async with Client(url, token=…) as gw``.

    Options: see `Connection`. Public state: ``state``, ``connections``,
    ``wait_closed()``; ``refresh(token)`` continues under a new token.
    """

    async def subscribe(self, channel: str, since: Position | None = None) -> Subscription:
        """Subscribe to ``channel``; with ``since``, recover what came after it.

        Raises `ReplyError` when refused (e.g. 103 permission denied).
        """
        if channel in self._subs:
            raise ReplyError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel}")
        sub = Subscription(channel, since, max_queue=self.max_queue, pause=self._pause,
                           resume=self._resume, unsubscribe=self.unsubscribe)  # fmt: skip
        self._subs[channel] = sub  # before the reply: pushes may follow it at once
        try:
            await self._request(
                lambda id: Sub(id=id, ch=channel, since=since),
                lambda r: sub.subscribed(since, r.recovered, position_of(r)),
            )
        except BaseException as exc:
            if self._subs.get(channel) is sub:
                del self._subs[channel]
            sub.end(exc if isinstance(exc, Exception) else None)
            raise
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Leave ``channel``; its subscription's iterator ends."""
        sub = self._subs.pop(channel, None)
        if sub is None:
            raise ReplyError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}")
        sub.end()
        self._full.discard(sub)
        try:
            await self._request(lambda id: Unsub(id=id, ch=channel))
        except ReplyError as exc:
            if exc.code != ErrorCode.NOT_SUBSCRIBED:  # e.g. already dropped by the gateway
                raise

    async def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` (any JSON/MessagePack value) to ``channel``."""
        raw = self.encoding.raw(data)
        await self._request(lambda id: Pub(id=id, ch=channel, data=raw))

    async def rpc(
        self, method: RpcMethod, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> RpcResponse:
        """Call the REST core as this connection's identity: ``(status, headers, body)``.

        ``body`` None sends no body. Any status is a response (a 404 too);
        only protocol failures raise `ReplyError`.
        """
        hdrs = headers or {}
        if body is None:
            reply = await self._request(
                lambda id: RpcCommand(id=id, method=method, path=path, headers=hdrs)
            )
        else:
            raw = self.encoding.raw(body)
            reply = await self._request(
                lambda id: RpcCommand(id=id, method=method, path=path, body=raw, headers=hdrs)
            )
        value = None if not reply.body else self.encoding.value(reply.body)
        return RpcResponse(reply.status or 0, reply.headers or {}, value)

    async def call(self, method: str, data: Any = None) -> Any:
        """Ask the application's backend (the gateway's call hook): its answer's data.

        ``data`` None sends none; the answer is None when the backend gave no
        data. Raises `ReplyError` when the backend refuses (its own code, e.g.
        404) or does not answer (110, temporary).
        """
        if data is None:  # the default itself, which the encoder leaves out
            reply = await self._request(lambda id: Call(id=id, method=method))
        else:
            raw = self.encoding.raw(data)
            reply = await self._request(lambda id: Call(id=id, method=method, data=raw))
        return self.encoding.value(reply.data) if reply.data else None

    async def presence(self, channel: str) -> list[PresenceInfo]:
        """Who is subscribed to ``channel`` (a presence channel), on every gateway process."""
        reply = await self._request(lambda id: PresenceQuery(id=id, ch=channel))
        return reply.presence or []

    async def presence_stats(self, channel: str) -> PresenceCount:
        reply = await self._request(lambda id: PresenceStats(id=id, ch=channel))
        return PresenceCount(reply.num_clients or 0, reply.num_users or 0)

    async def history(self, channel: str, since: int = 0, limit: int = 100) -> HistoryPage:
        """Up to ``limit`` kept publications after offset ``since``, oldest first."""
        reply = await self._request(lambda id: History(id=id, ch=channel, since=since, limit=limit))
        epoch = reply.epoch
        items = [
            Publication(channel, self.encoding.value(item.data), item.offset, epoch)
            for item in reply.publications or ()
        ]
        return HistoryPage(items, position_of(reply))

    async def ping(self) -> None:
        await self._request(lambda id: Ping(id=id))
