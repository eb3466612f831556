"""The Node joins the Hub (local members) to the Broker (other processes).

It subscribes the broker to a channel once, when the channel's first local
member arrives, and unsubscribes when the last one leaves. Members who join
while that first SUBSCRIBE is in flight wait for its outcome; if it fails,
every member that joined meanwhile is removed again in one step (no await in
between), so the hub never holds members of a channel the broker does not
deliver.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import msgspec

from gateway.broker import CONTROL, Broker, Entry, Position
from gateway.history import HistoryPolicy, publish
from gateway.hub import Hub, Member
from gateway.metrics import Metrics
from gateway.presence import Presence, decode_change
from proto import Join, Leave, PresenceInfo

__all__ = ["Node", "as_json"]

log = logging.getLogger("gateway.node")

_raw_json = msgspec.json.Decoder(msgspec.Raw)
_encode = msgspec.json.encode


def as_json(data: bytes) -> tuple[bytes, bool]:
    """A publication's JSON form, and whether it was JSON to begin with.

    Backends may ``PUBLISH`` anything. Valid JSON passes through (surrounding
    whitespace trimmed); anything else is delivered as a JSON string of its
    UTF-8 text, so subscribers always receive well-formed frames.
    """
    try:
        return bytes(_raw_json.decode(data)), True
    except msgspec.DecodeError:
        return _encode(data.decode("utf-8", "replace")), False


class _Pending:
    __slots__ = ("future", "joined")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.joined: list[Member] = []


class Node:
    def __init__(
        self,
        hub: Hub,
        broker: Broker,
        metrics: Metrics,
        history: HistoryPolicy | None = None,
        presence: tuple[tuple[str, ...], float, bool] = ((), 60.0, True),
    ) -> None:
        self.hub = hub
        self.broker = broker
        self.presence = Presence(broker, *presence)
        self.history_policy = history if history is not None else HistoryPolicy((), 1, 1.0)
        self._metrics = metrics
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._was_down = False
        #: Called with each message on the control channel (revocations).
        self.on_control: Callable[[bytes], None] | None = None

    async def start(self) -> None:
        await self.broker.start(self._on_publication, self._on_state)
        log.info("using the %s", self.broker.description)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.close()

    # -- membership --------------------------------------------------------

    async def subscribe(self, ch: str, member: Member) -> None:
        """Make ``member`` receive ``ch``; raises `BrokerUnavailable`."""
        if not self.hub.add(ch, member):
            pending = self._pending.get(ch)
            if pending is not None:
                pending.joined.append(member)
                await asyncio.shield(pending.future)
            return
        pending = self._pending[ch] = _Pending()
        try:
            await self.broker.subscribe(ch)
        except BaseException as exc:
            del self._pending[ch]
            for m in (member, *pending.joined):
                self.hub.remove(ch, m)
            if isinstance(exc, Exception):
                pending.future.set_exception(exc)
                pending.future.exception()  # each waiter re-raises it
            else:
                pending.future.cancel()
            raise
        del self._pending[ch]
        pending.future.set_result(None)
        if not self.hub.has_subscribers(ch):
            # Everyone left while SUBSCRIBE was in flight.
            await self.broker.unsubscribe(ch)

    def unsubscribe(self, ch: str, member: Member) -> None:
        if self.hub.remove(ch, member) and ch not in self._pending:
            self._spawn(self.broker.unsubscribe(ch))

    def leave_all(self, member: Member, channels: Iterable[str]) -> None:
        for ch in channels:
            self.unsubscribe(ch, member)

    async def publish(self, ch: str, data: bytes) -> Position | None:
        """Publish JSON bytes to every subscriber of ``ch`` on every node.

        On a history channel the publication is also kept, and its position
        returned.
        """
        return await publish(self.broker, self.history_policy, ch, data)

    async def history(
        self, ch: str, after: int, limit: int
    ) -> tuple[list[Entry], Position | None]:
        """Kept publications of ``ch`` after offset ``after``, and where it stands."""
        return await self.broker.history(ch, after, limit)

    # -- broker side -------------------------------------------------------

    def _on_state(self, up: bool) -> None:
        self._metrics.broker_state(up)
        if not up:
            self._was_down = True
        elif self._was_down:
            # Whatever was published while the link was down did not reach us.
            n = self.hub.notify_gap()
            log.info("broker link back: %d subscriptions told they may have a gap", n)

    def _on_publication(self, ch: str, data: bytes, position: Position | None) -> None:
        if ch == CONTROL:
            if self.on_control is not None:
                self.on_control(data)
            return
        change = decode_change(data)
        if change is not None:
            info = PresenceInfo(change.user, change.client, change.info)
            event = Join(ch, info) if change.op == "join" else Leave(ch, info)
            self.hub.broadcast_event(ch, event)
            return
        self._metrics.publications.inc()
        if not self.hub.has_subscribers(ch):
            return
        payload, was_json = as_json(data)
        if not was_json:
            self._metrics.invalid_publications.inc()
            log.debug("publication on %s was not JSON; delivered as a string", ch)
        self.hub.broadcast(ch, payload, position)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

