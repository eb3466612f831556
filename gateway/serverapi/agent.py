"""What one gateway does with a server API request: act on its own connections, and answer.

Every gateway receives each `ServerRequest` on the control channel; the
`Agent` carries its action out on the connections of this process (a scan
of the hub: these calls are rare, and an index per user would cost memory
on every connection) and publishes a `ServerReply` on the asking gateway's
inbox. Each action is logged here with who asked for it.

* ``disconnect``: closes the matching connections (every transport) with
  the code and reason given; a block is noted before anything else, so the
  user's next connection is refused here even if it races the close.
* ``subscribe`` / ``unsubscribe``: server-side subscriptions
  (`Session.server_subscribe`), told to the client as ``subscribed`` /
  ``unsubscribed`` pushes.
* ``connections``, ``channels``, ``info``: what this gateway holds.

A failure answers with an ``error`` that names no internals (the log has
them); nothing here raises into the node.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from core.infra import control
from core.infra.broker import BrokerUnavailable
from core.infra.tasks import TaskSet
from gateway.node import Node
from gateway.nodestats import NodeStats
from gateway.serverapi.blocks import BlockList
from gateway.serverapi.fleet import INBOX_PREFIX
from gateway.session import Session
from proto import RESERVED_PREFIX

__all__ = ["MAX_CHANNELS", "MAX_LISTED", "Agent", "Health"]

log = logging.getLogger("gateway.serverapi")

#: Connections one gateway lists in one answer; channels likewise.
MAX_LISTED = 1000
MAX_CHANNELS = 10_000

#: Whether Redis answers, PostgreSQL (None: no database here), and each hook's backend.
Health = Callable[[], Awaitable[tuple[bool, bool | None, dict[str, bool]]]]

_encoder = msgspec.json.Encoder()


class Agent:
    def __init__(self, node: Node, stats: NodeStats, blocks: BlockList, health: Health) -> None:
        self.node = node
        self.node_id = stats.node
        self.stats = stats
        self.blocks = blocks
        self._health = health
        #: Told of each ``console_watched`` message (gateway/console/).
        self.on_watched: Callable[[float], None] | None = None
        self._tasks = TaskSet(log)

    def on_control(self, message: control.ControlMessage) -> None:
        if isinstance(message, control.ConsoleWatched):
            if self.on_watched is not None:
                self.on_watched(message.seconds)
            return
        if not isinstance(message, control.ServerRequest):
            return
        if not message.reply_to.startswith(INBOX_PREFIX):
            log.warning("server request %s ignored: reply_to %r", message.id, message.reply_to[:80])
            return
        action = message.action
        if isinstance(action, control.Disconnect) and action.block_until:
            self.blocks.note(action.user, action.block_until)
        elif isinstance(action, control.Unblock):
            self.blocks.forget(action.user)
        self._tasks.spawn(self._serve(message), "server-request")

    async def _serve(self, request: control.ServerRequest) -> None:
        name = control.action_name(request.action)
        try:
            result = await self.run(request.action)
        except BrokerUnavailable as exc:
            log.warning("server API %s (by %s) failed here: %s", name, request.caller, exc)
            reply = control.ServerReply(
                id=request.id, node=self.node_id, error="broker unavailable"
            )
        except Exception:
            log.exception("server API %s (by %s) failed here", name, request.caller)
            reply = control.ServerReply(id=request.id, node=self.node_id, error="internal error")
        else:
            reply = control.ServerReply(
                id=request.id, node=self.node_id, result=msgspec.Raw(_encoder.encode(result))
            )
            if not isinstance(
                request.action, control.Connections | control.Channels | control.Info
            ):
                log.info(
                    "server API %s by %s (via %s): %s, %s",
                    name,
                    request.caller,
                    request.origin,
                    _target(request.action),
                    _summary(result),
                    extra={"user": request.caller},
                )
        try:
            await self.node.broker.publish(request.reply_to, control.encode(reply))
        except BrokerUnavailable as exc:
            log.warning("server API %s: the answer was not sent: %s", name, exc)

    async def run(self, action: control.Action) -> Any:
        """Carry ``action`` out here; its result (`Count`, `ConnectionList`, ...)."""
        if isinstance(action, control.Disconnect):
            sessions = self._find(action.user, action.client)
            for session in sessions:
                session.kick(action.code, action.reason)
            return control.Count(len(sessions))
        if isinstance(action, control.Subscribe):
            done = 0
            for session in self._find(action.user, action.client):
                done += await session.server_subscribe(action.ch)
            return control.Count(done)
        if isinstance(action, control.Unsubscribe):
            sessions = self._find(action.user, action.client)
            return control.Count(sum(s.server_unsubscribe(action.ch) for s in sessions))
        if isinstance(action, control.Unblock):
            return control.Count(0)  # done on receipt (`on_control`): no connection to act on
        if isinstance(action, control.Connections):
            sessions = self._find(action.user, action.client)
            listed = [s.describe(self.node_id) for s in sessions[:MAX_LISTED]]
            return control.ConnectionList(connections=listed, truncated=len(sessions) > MAX_LISTED)
        if isinstance(action, control.Channels):
            return self._channels(action.pattern)
        assert isinstance(action, control.Info)
        return self.stats.info(*await self._health())

    def _find(self, user: str, client: str | None) -> list[Session]:
        """This gateway's connections of ``user`` (only ``client``, when given)."""
        return [
            m
            for m in self.node.hub.connections
            if isinstance(m, Session)
            and m.subject == user
            and (client is None or m.client_id == client)
        ]

    def _channels(self, pattern: str) -> control.ChannelList:
        match = re.compile(fnmatch.translate(pattern)).match
        found = [
            control.ChannelCount(ch, n)
            for ch, n in self.node.hub.subscriber_counts().items()
            if not ch.startswith(RESERVED_PREFIX) and match(ch)
        ]
        found.sort(key=lambda c: (-c.subscribers, c.ch))
        return control.ChannelList(
            channels=found[:MAX_CHANNELS], truncated=len(found) > MAX_CHANNELS
        )

    async def close(self) -> None:
        await self._tasks.wait(1.0)
        await self._tasks.cancel()


def _target(
    action: control.Disconnect | control.Subscribe | control.Unsubscribe | control.Unblock,
) -> str:
    if isinstance(action, control.Unblock):
        return f"user {action.user!r}"
    who = f"user {action.user!r}" + (f" client {action.client!r}" if action.client else "")
    if isinstance(action, control.Disconnect):
        block = f", blocked until {action.block_until:.0f}" if action.block_until else ""
        return f"{who} with {action.code} {action.reason!r}{block}"
    return f"{who} on {action.ch!r}"


def _summary(result: Any) -> str:
    return f"{result.count} connection(s) here" if isinstance(result, control.Count) else ""
