"""The server API's operations: ``POST /api/server/<call>`` with a JSON body.

Every call is a POST with a JSON body (``{}`` at least), as each is a
command to the whole deployment rather than a resource to cache. Which
gateway receives the call does not matter:

* ``publish`` and ``broadcast`` go through the node's `HistoryPublisher`
  (history kept per channel, as for any publication) and the broker reaches
  every gateway;
* ``presence``, ``presence_stats`` and ``history`` read the broker (Redis),
  which holds them for every gateway;
* ``disconnect``, ``unblock``, ``subscribe``, ``unsubscribe``,
  ``connections``, ``channels`` and ``info`` ask every live gateway through the control
  channel (gateway/serverapi/fleet.py) and answer once each has acted, or
  the ``timeout`` passed: ``missing`` names the gateways that did not answer,
  ``failed`` those that answered with an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from core.access import Access
from core.idempotency import checked_key
from core.infra import control
from core.infra.broker import BrokerUnavailable
from core.infra.errors import ApiError, ErrorDetail, NotFound, Unavailable
from core.infra.history import ChannelPatterns, call_of
from core.infra.identity import principal
from core.request import Request, Response
from core.routing import Route
from gateway.context import Context
from gateway.presence import Presence
from gateway.serverapi.fleet import Answers
from gateway.serverapi.operations import Operations
from gateway.serverapi.schemas import (
    ActionOut,
    BroadcastIn,
    BroadcastOut,
    BroadcastResult,
    ChannelIn,
    ChannelsIn,
    ChannelsOut,
    ConnectionsIn,
    ConnectionsOut,
    DisconnectIn,
    HistoryIn,
    HistoryOut,
    InfoIn,
    InfoOut,
    PresenceOut,
    PresenceStatsOut,
    PublishIn,
    PublishOut,
    SubscriptionIn,
    UnblockIn,
)
from proto import RESERVED_PREFIX, HistoryItem, InvalidData, reason_for
from proto.codes import CLOSE_REASON_MAX_BYTES
from proto.publication import check_json

__all__ = ["PREFIX", "ServerRoutes", "caller_name"]

PREFIX = "/api/server/"
#: Channels of one broadcast published at once.
BROADCAST_CONCURRENCY = 32

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


def caller_name(caller: Any) -> str:
    """Who made a call, for the logs: ``42 (admin)``, ``apikey:… (service)``."""
    return f"{caller.sub} ({getattr(caller, 'role', 'user')})"


def _call(req: Request, payload: bytes) -> str | None:
    """The history script's call id of a publication of ``payload`` that the request's
    ``Idempotency-Key`` names (None without one), kept apart per caller."""
    key = req.header("idempotency-key")
    if key is None:
        return None
    owner = principal(req.caller) if req.caller is not None else ""
    return call_of(owner, checked_key(key), payload)


def _ok(body: msgspec.Struct) -> Response:
    return Response(200, _encoder.encode(body))


def _invalid(path: str, message: str) -> ApiError:
    return ApiError(
        422, "validation_error", "invalid request body", details=[ErrorDetail(path, message)]
    )


class ServerRoutes:
    def __init__(self, ctx: Context, ops: Operations) -> None:
        self.ctx = ctx
        self.ops = ops
        self._core_channels = ChannelPatterns(ctx.settings.core_channels)

    def routes(self) -> list[Route]:
        def post(
            name: str,
            handler: Callable[[Request], Awaitable[Response]],
            summary: str,
            body: type,
            out: type,
            description: str = "",
            errors: tuple[str, ...] = (),
        ) -> Route:
            op = "server" + "".join(p.title() for p in name.split("_"))
            return Route(
                "POST",
                PREFIX + name,
                handler,
                summary,
                op,
                "server",
                responses={200: out},
                body=body,
                access=Access.SERVER,
                description=description,
                errors=errors,
            )

        fanned = " Answered once every live gateway has acted, or after `timeout`."
        return [
            post(
                "publish",
                self.publish,
                "Publish to a channel",
                PublishIn,
                PublishOut,
                "History is kept on history channels (HISTORY_CHANNELS). Sent again with the "
                "same `Idempotency-Key` header (after a lost answer), a publication on a "
                "history channel answers the first one's position and is published once.",
            ),
            post(
                "broadcast",
                self.broadcast,
                "Publish one payload to many channels",
                BroadcastIn,
                BroadcastOut,
                "Each channel keeps history as a publish would, and its `Idempotency-Key` "
                "too: sent again, each history channel that had it answers its position "
                "and publishes nothing more.",
            ),
            post(
                "disconnect",
                self.disconnect,
                "Disconnect a user's connections (or one of them) everywhere",
                DisconnectIn,
                ActionOut,
                "Every transport, every gateway; `block_seconds` refuses the user's new "
                "connections (403 `blocked`) for that long." + fanned,
            ),
            post(
                "unblock",
                self.unblock,
                "Take a blocked user's connections again",
                UnblockIn,
                ActionOut,
                "Ends a `disconnect`'s block at once, on every gateway." + fanned,
            ),
            post(
                "subscribe",
                self.subscribe,
                "Subscribe a user's connections (or one of them)",
                SubscriptionIn,
                ActionOut,
                "Server-side subscriptions: the client gets a `subscribed` push. A system "
                "channel (`__…`) is 403." + fanned,
            ),
            post(
                "unsubscribe",
                self.unsubscribe,
                "Unsubscribe a user's connections (or one of them)",
                SubscriptionIn,
                ActionOut,
                "The client gets an `unsubscribed` push with code 118. A system channel "
                "(`__…`, such as the admins' consoles' `__admin`) is 403." + fanned,
            ),
            post(
                "connections",
                self.connections,
                "The open connections of a user",
                ConnectionsIn,
                ConnectionsOut,
                fanned.strip(),
            ),
            post(
                "channels",
                self.channels,
                "Active channels, busiest first",
                ChannelsIn,
                ChannelsOut,
                "Subscriber counts are summed over gateways." + fanned,
            ),
            post(
                "presence",
                self.presence,
                "Who is in a presence channel",
                ChannelIn,
                PresenceOut,
                "404 on a channel that keeps no presence (PRESENCE_CHANNELS).",
                ("not_found",),
            ),
            post(
                "presence_stats",
                self.presence_stats,
                "How many are in a presence channel",
                ChannelIn,
                PresenceStatsOut,
                "404 on a channel that keeps no presence (PRESENCE_CHANNELS).",
                ("not_found",),
            ),
            post(
                "history",
                self.history,
                "A page of a channel's history",
                HistoryIn,
                HistoryOut,
                "Oldest first; `next` is the `since` of the next page. 404 on a channel that "
                "keeps no history (HISTORY_CHANNELS).",
                ("not_found",),
            ),
            post(
                "info",
                self.info,
                "Every gateway: version, load, memory, health",
                InfoIn,
                InfoOut,
                fanned.strip(),
            ),
        ]

    # -- publishing ----------------------------------------------------------

    def _may_publish(self, ch: str, path: str) -> None:
        if ch.startswith(RESERVED_PREFIX):
            raise ApiError(403, "forbidden", f"{path}: {ch} is a system channel")
        if self._core_channels.applies(ch):
            raise ApiError(403, "forbidden", f"{path}: only the REST core publishes on {ch}")

    def _checked(self, data: msgspec.Raw) -> bytes:
        try:
            return check_json(bytes(data), self.ctx.settings.max_publication_bytes)
        except InvalidData as exc:
            raise _invalid("$.data", exc.reason) from None

    async def publish(self, req: Request) -> Response:
        body: PublishIn = req.data
        self._may_publish(body.ch, "$.ch")
        payload = self._checked(body.data)
        call = _call(req, payload)
        try:
            position = await self.ctx.node.publish(body.ch, payload, checked=True, call=call)
        except BrokerUnavailable as exc:
            raise Unavailable(f"broker unavailable, retry later: {exc}") from None
        if position is None:
            return _ok(PublishOut())
        return _ok(PublishOut(position.offset, position.epoch))

    async def broadcast(self, req: Request) -> Response:
        body: BroadcastIn = req.data
        channels = list(dict.fromkeys(body.channels))
        for i, ch in enumerate(channels):
            self._may_publish(ch, f"$.channels[{i}]")
        payload = self._checked(body.data)
        call = _call(req, payload)
        gate = asyncio.Semaphore(BROADCAST_CONCURRENCY)

        async def one(ch: str) -> BroadcastResult:
            async with gate:
                try:
                    position = await self.ctx.node.publish(ch, payload, checked=True, call=call)
                except BrokerUnavailable:
                    return BroadcastResult(ch, error="broker unavailable")
            if position is None:
                return BroadcastResult(ch)
            return BroadcastResult(ch, position.offset, position.epoch)

        return _ok(BroadcastOut(list(await asyncio.gather(*(one(ch) for ch in channels)))))

    # -- every gateway ---------------------------------------------------------

    async def _ask(self, req: Request, action: control.Action, within: float) -> Answers:
        return await self.ops.fleet.ask(action, caller_name(req.caller), within)

    async def disconnect(self, req: Request) -> Response:
        body: DisconnectIn = req.data
        reason = body.reason or reason_for(body.code) or "disconnected by the server"
        # What a close frame carries, cut at a character (never inside one).
        reason = reason.encode()[:CLOSE_REASON_MAX_BYTES].decode(errors="ignore")
        until = None
        if body.block_seconds:
            until = time.time() + body.block_seconds
            try:  # the shared list first: a gateway that starts meanwhile reads it
                await self.ops.blocks.block(body.user, until)
            except BrokerUnavailable as exc:
                raise Unavailable(f"broker unavailable, retry later: {exc}") from None
        action = control.Disconnect(
            user=body.user, client=body.client, code=body.code, reason=reason, block_until=until
        )
        return _ok(_counted(await self._ask(req, action, body.timeout)))

    async def unblock(self, req: Request) -> Response:
        body: UnblockIn = req.data
        try:  # the shared list first: a gateway that syncs meanwhile reads it
            await self.ops.blocks.unblock(body.user)
        except BrokerUnavailable as exc:
            raise Unavailable(f"broker unavailable, retry later: {exc}") from None
        return _ok(_counted(await self._ask(req, control.Unblock(user=body.user), body.timeout)))

    @staticmethod
    def _not_system(ch: str) -> None:
        """A system channel's subscribers are the gateway's own (admins' consoles on
        ``__admin``): the server API neither adds nor removes any."""
        if ch.startswith(RESERVED_PREFIX):
            raise ApiError(403, "forbidden", f"$.ch: {ch} is a system channel")

    async def subscribe(self, req: Request) -> Response:
        body: SubscriptionIn = req.data
        self._not_system(body.ch)
        action = control.Subscribe(user=body.user, client=body.client, ch=body.ch)
        return _ok(_counted(await self._ask(req, action, body.timeout)))

    async def unsubscribe(self, req: Request) -> Response:
        body: SubscriptionIn = req.data
        self._not_system(body.ch)
        action = control.Unsubscribe(user=body.user, client=body.client, ch=body.ch)
        return _ok(_counted(await self._ask(req, action, body.timeout)))

    async def connections(self, req: Request) -> Response:
        body: ConnectionsIn = req.data
        answers = await self._ask(
            req, control.Connections(user=body.user, client=body.client), body.timeout
        )
        lists, failed = _results(answers, control.ConnectionList)
        found = sorted(
            (c for r in lists.values() for c in r.connections),
            key=lambda c: (c.user, c.since, c.client),
        )
        truncated = any(r.truncated for r in lists.values())
        return _ok(
            ConnectionsOut(
                connections=found, truncated=truncated, missing=answers.missing, failed=failed
            )
        )

    async def channels(self, req: Request) -> Response:
        body: ChannelsIn = req.data
        answers = await self._ask(req, control.Channels(pattern=body.pattern), body.timeout)
        lists, failed = _results(answers, control.ChannelList)
        counts: dict[str, int] = {}
        for found in lists.values():
            for c in found.channels:
                counts[c.ch] = counts.get(c.ch, 0) + c.subscribers
        busiest = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        listed = [control.ChannelCount(ch, n) for ch, n in busiest[: body.limit]]
        truncated = len(busiest) > body.limit or any(r.truncated for r in lists.values())
        return _ok(
            ChannelsOut(
                channels=listed, truncated=truncated, missing=answers.missing, failed=failed
            )
        )

    async def info(self, req: Request) -> Response:
        body: InfoIn = req.data
        answers = await self._ask(req, control.Info(), body.timeout)
        nodes, failed = _results(answers, control.NodeInfo)
        return _ok(InfoOut(nodes=list(nodes.values()), missing=answers.missing, failed=failed))

    # -- what the broker holds -----------------------------------------------------

    async def presence(self, req: Request) -> Response:
        body: ChannelIn = req.data
        return _ok(PresenceOut(await self._presence_of(body.ch, Presence.who)))

    async def presence_stats(self, req: Request) -> Response:
        body: ChannelIn = req.data
        clients, users = await self._presence_of(body.ch, Presence.stats)
        return _ok(PresenceStatsOut(clients, users))

    async def _presence_of(self, ch: str, read: Callable[[Presence, str], Awaitable[T]]) -> T:
        presence = self.ctx.node.presence
        if not presence.applies(ch):
            raise NotFound(f"{ch} keeps no presence (PRESENCE_CHANNELS)")
        try:
            return await read(presence, ch)
        except BrokerUnavailable as exc:
            raise Unavailable(f"broker unavailable, retry later: {exc}") from None

    async def history(self, req: Request) -> Response:
        body: HistoryIn = req.data
        node = self.ctx.node
        if not node.history_policy.applies(body.ch):
            raise NotFound(f"{body.ch} keeps no history (HISTORY_CHANNELS)")
        try:
            entries, top, span = await node.history(body.ch, body.since, body.limit)
        except BrokerUnavailable as exc:
            raise Unavailable(f"broker unavailable, retry later: {exc}") from None
        items = [HistoryItem(offset, msgspec.Raw(data)) for offset, data in entries]
        # Where this page's read ended, entries left out included: a page short of
        # them still leads on to the next.
        following = (
            span[1] if span is not None and top is not None and span[1] < top.offset else None
        )
        return _ok(
            HistoryOut(
                publications=items,
                offset=top.offset if top is not None else None,
                epoch=top.epoch if top is not None else None,
                next=following,
            )
        )


def _results(answers: Answers, kind: type[T]) -> tuple[dict[str, T], dict[str, str]]:
    """Each answering gateway's result as ``kind``, and the errors of the others."""
    results: dict[str, T] = {}
    failed: dict[str, str] = {}
    for node, reply in answers.replies.items():
        if reply.error is not None:
            failed[node] = reply.error
            continue
        try:
            results[node] = msgspec.json.decode(reply.result, type=kind)
        except msgspec.DecodeError:
            failed[node] = "malformed answer"
    return results, failed


def _counted(answers: Answers) -> ActionOut:
    counts, failed = _results(answers, control.Count)
    nodes = {node: c.count for node, c in counts.items()}
    return ActionOut(count=sum(nodes.values()), nodes=nodes, missing=answers.missing, failed=failed)
