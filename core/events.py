"""Change events: every successful write is published to the resource's channels.

A write to project 7 publishes one event to ``projects`` and to
``projects:7``::

    {"type": "updated", "id": 7, "version": 3, "data": {...the project...}}

``data`` is null for ``deleted``. Events go through the gateway's Broker, so
a socket subscribed on any gateway process sees them. The write is already
committed when its event is published: a broker failure is logged and
counted, never turned into a failed write (delivery that survives broker
loss is the history work of issue 5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Literal

from core.infra.broker.base import EachPublisher, Publisher

__all__ = ["ChangeKind", "Events"]

log = logging.getLogger("core.events")

ChangeKind = Literal["created", "updated", "deleted"]


class Events:
    def __init__(self, publisher: Publisher | None) -> None:
        self._publisher = publisher
        # The node and HistoryPublisher check an event once and send its
        # channels in one round trip, without a task per channel.
        self._each = publisher if isinstance(publisher, EachPublisher) else None
        self.failures = 0

    async def changed(
        self, resource: str, kind: ChangeKind, id: int, version: int, data: bytes | None
    ) -> None:
        if self._publisher is None:
            return
        event = b"".join(
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
        # Both at once: with a Redis broker they share one pipeline (one round trip).
        channels = (resource, f"{resource}:{id}")
        outcomes: Sequence[object]
        if self._each is not None:
            try:
                outcomes = await self._each.publish_each(channels, event)
            except Exception as exc:  # not publishable: on no channel
                outcomes = [exc] * len(channels)
        else:
            outcomes = await asyncio.gather(
                *(self._publisher.publish(ch, event) for ch in channels), return_exceptions=True
            )
        for ch, outcome in zip(channels, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self.failures += 1
                log.warning("change event %s %s not published: %s", kind, ch, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
