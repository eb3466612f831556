"""Change events: every successful write is published to the resource's channels.

A write to project 7 publishes one event to ``projects`` and to
``projects:7``::

    {"type": "updated", "id": 7, "version": 3, "data": {...the project...}}

``data`` is null for ``deleted``. Events go through the gateway's Broker, so
a socket subscribed on any gateway process sees them.

No event is lost once its write committed: the write's own statement stores
it in the outbox (core/outbox.py), the writer publishes it right after the
commit and deletes the row, and a row left behind (the broker was down, the
process died) is published by a relay on any process (core/relay.py). A
broker failure is logged and counted, never turned into a failed write.

Delivery is at least once. On a history channel (``HISTORY_CHANNELS``) a
row published again carries its outbox call id and the history script
publishes it once, unless more than 8 other publications came on that
channel between the two attempts; on a channel without history a relayed
event may arrive twice. Events of one resource may also arrive out of
order (each process publishes after its own commit; a relayed event comes
late), an update after the deletion that followed it. Clients apply a
change event only if its ``version`` is newer than the one they hold, and
keep the version of each id they saw deleted (a deletion's is the last
version the resource had; ids are never reused): a later event of that id
that is not newer is stale (docs/rest.md, gateway/static/demo.js).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Literal

from core.infra.broker.base import EachPublisher, Publisher
from core.outbox import Outbox

__all__ = ["ChangeKind", "Events"]

log = logging.getLogger("core.events")

ChangeKind = Literal["created", "updated", "deleted"]


class Events:
    def __init__(self, publisher: Publisher | None, outbox: Outbox | None = None) -> None:
        self._publisher = publisher
        # The node and HistoryPublisher check an event once and send its
        # channels in one round trip, without a task per channel.
        self._each = publisher if isinstance(publisher, EachPublisher) else None
        self.outbox = outbox if publisher is not None else None
        self.failures = 0

    @property
    def queues(self) -> bool:
        """Whether writes store their events in the outbox (only with a publisher and an outbox)."""
        return self.outbox is not None

    async def changed(
        self,
        resource: str,
        kind: ChangeKind,
        id: int,
        version: int,
        data: bytes | None,
        event: int | None = None,
        call: str | None = None,
    ) -> None:
        """Publish a committed write's event; ``event`` and ``call``: its outbox row and call id.

        The row is deleted once every channel has the event, else left to the relay.
        """
        if self._publisher is None:
            return
        payload = b"".join(
            (
                b'{"type":"',
                kind.encode(),
                b'","id":',
                str(id).encode(),
                b',"version":',
                str(version).encode(),
                b',"data":',
                b"null" if data is None else data,
                b"}",
            )
        )
        failed = await self.publish((resource, f"{resource}:{id}"), payload, call)
        if not failed and event is not None and self.outbox is not None:
            self.outbox.published(event)

    async def publish(
        self, channels: Sequence[str], payload: bytes, call: str | None = None
    ) -> list[Exception]:
        """Publish ``payload`` on each of ``channels``: the failures, logged and counted
        (none: every channel has it). ``call``: the id of this call, the same when it is
        made again (history channels publish it once)."""
        assert self._publisher is not None
        outcomes: Sequence[object]
        if self._each is not None:
            try:
                # Both at once: with a Redis broker they share one pipeline (one round trip).
                outcomes = await self._each.publish_each(channels, payload, call=call)
            except Exception as exc:  # not publishable: on no channel
                outcomes = [exc] * len(channels)
        else:
            publisher = self._publisher
            outcomes = await asyncio.gather(
                *(publisher.publish(ch, payload) for ch in channels), return_exceptions=True
            )
        failed: list[Exception] = []
        for ch, outcome in zip(channels, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self.failures += 1
                failed.append(outcome)
                log.warning("change event on %s not published: %s", ch, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        return failed
