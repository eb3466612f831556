"""Asking every gateway at once: one request on the control channel, one reply per node.

`Fleet.ask` reads the live nodes (gateway/serverapi/registry.py), publishes a
`ServerRequest` on the control channel, which every gateway receives, and
waits until each of those nodes has answered on this gateway's inbox, or
until the timeout; the answer says which nodes did not answer in time.

The inbox, ``__reply:<node id>``, is subscribed once at start (and again by
the broker after a reconnect): a request names it in ``reply_to`` and its
id tells the replies apart, so a call costs one PUBLISH out and one per
node back, and no SUBSCRIBE. Replies from a node that was not listed (it
started meanwhile) are kept too; a reply for a request no longer waited for
is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import NamedTuple

from core.infra import control
from core.infra.broker import Broker, BrokerUnavailable
from core.infra.errors import ApiError
from gateway.serverapi.registry import NodeRegistry

__all__ = ["INBOX_PREFIX", "MAX_IN_FLIGHT", "Answers", "Fleet"]

log = logging.getLogger("gateway.serverapi")

INBOX_PREFIX = "__reply:"
#: Requests one gateway waits on at once; past it a call is refused (503).
MAX_IN_FLIGHT = 64


class Answers(NamedTuple):
    """Every reply that came in time (by node id), and the live nodes that sent none."""

    replies: dict[str, control.ServerReply]
    missing: list[str]


class _Waiting:
    __slots__ = ("done", "expected", "replies")

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.replies: dict[str, control.ServerReply] = {}
        self.done = asyncio.get_running_loop().create_future()

    def add(self, reply: control.ServerReply) -> None:
        self.replies[reply.node] = reply
        if self.expected <= self.replies.keys() and not self.done.done():
            self.done.set_result(None)


class Fleet:
    def __init__(self, broker: Broker, registry: NodeRegistry) -> None:
        self._broker = broker
        self.registry = registry
        self.inbox = INBOX_PREFIX + registry.node_id
        self._waiting: dict[str, _Waiting] = {}
        self.listening = False

    async def listen(self) -> None:
        """Subscribe the inbox; raises `BrokerUnavailable` (`tick` tries again)."""
        await self._broker.subscribe(self.inbox)
        self.listening = True

    async def ask(self, action: control.Action, caller: str, within: float) -> Answers:
        """Have every live gateway carry out ``action``; their answers within ``within`` s.

        Raises `ApiError` 503 when the broker cannot take the request or too
        many are under way here.
        """
        if len(self._waiting) >= MAX_IN_FLIGHT:
            raise ApiError(
                503,
                "unavailable",
                "too many server API calls under way here, retry",
                headers={"Retry-After": "1"},
            )
        try:
            if not self.listening:
                await self.listen()
            expected = await self.registry.live()
            rid = secrets.token_hex(8)
            waiting = self._waiting[rid] = _Waiting(expected)
            request = control.ServerRequest(
                id=rid,
                reply_to=self.inbox,
                origin=self.registry.node_id,
                caller=caller,
                action=action,
            )
            try:
                await control.broadcast(self._broker, request)
                await asyncio.wait_for(asyncio.shield(waiting.done), within)
            except TimeoutError:
                pass
            finally:
                del self._waiting[rid]
        except BrokerUnavailable as exc:
            log.warning("server API call not sent: %s", exc)
            raise ApiError(
                503,
                "unavailable",
                "the broker is unavailable, retry later",
                headers={"Retry-After": "1"},
            ) from None
        missing = sorted(expected - waiting.replies.keys())
        if missing:
            log.warning(
                "server API %s: no answer from %s within %.1fs",
                control.action_name(action),
                ", ".join(missing),
                within,
            )
        return Answers(dict(sorted(waiting.replies.items())), missing)

    def on_reply(self, data: bytes) -> None:
        """A publication on the inbox (the node calls this; never raises)."""
        reply = control.decode_reply(data)
        if reply is None:
            return
        waiting = self._waiting.get(reply.id)
        if waiting is not None:
            waiting.add(reply)
