"""Which channels keep history, and how much.

Channels matching ``HISTORY_CHANNELS`` (glob patterns, as in grants) keep
their last ``HISTORY_SIZE`` publications for ``HISTORY_TTL`` seconds after
the last one (the broker's stream expires as a whole, as in Centrifugo).
Their publications carry an offset and an epoch, and a subscriber that comes
back can recover what it missed (gateway/recovery.py).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proto.publication import DEFAULT_MAX_BYTES, InvalidData, check_json

if TYPE_CHECKING:
    from core.infra.broker.base import Broker, Position

__all__ = ["ChannelPatterns", "HistoryPolicy", "HistoryPublisher", "call_of"]


def call_of(owner: str, key: str, data: bytes) -> str:
    """The history script's call id of a publication of ``data`` its caller named
    ``key`` (``Idempotency-Key``): a publication sent again after a lost answer (a
    gateway killed, drained or timed out before it answered) is then published once.
    Kept apart per ``owner`` (`core.infra.identity.principal`), so one caller's key
    never stops another's publication, and per ``data``, so a key used again for
    other data publishes that data rather than answer for the first and drop it."""
    digest = hashlib.sha256(f"{owner}\0{key}\0".encode())
    digest.update(data)
    return digest.hexdigest()[:16]


class ChannelPatterns:
    """Glob patterns (as in grants) deciding which channels a feature is on for."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self._match = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match
            if patterns
            else None
        )
        self.applies = functools.lru_cache(maxsize=65536)(self._applies)

    def _applies(self, ch: str) -> bool:
        return self._match is not None and self._match(ch) is not None


class HistoryPolicy(ChannelPatterns):
    def __init__(self, patterns: tuple[str, ...], size: int, ttl: float) -> None:
        super().__init__(patterns)
        self.size = size
        self.ttl = ttl


class HistoryPublisher:
    """The one way anything publishes: with history on the channels the policy names.

    The gateway's node, ``python -m core`` (its change events) and
    `gateway.publisher.Publisher` (a backend service) all publish through
    one of these, so a publication on a history channel always carries an
    offset and an epoch, and sockets that reconnect can recover it.
    """

    def __init__(
        self, broker: Broker, policy: HistoryPolicy, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.max_bytes = max_bytes

    async def publish(
        self,
        ch: str,
        data: bytes,
        *,
        checked: bool = False,
        history: bool = True,
        call: str | None = None,
    ) -> Position | None:
        """Publish JSON ``data`` on ``ch``, through history when the policy says so (its position).

        Every writer comes through here, so nothing reaches the broker (or
        history) that not every codec can carry: raises `proto.InvalidData`.
        ``checked``: a codec's `data_to_json` already checked ``data``.
        ``history=False``: live only, even on a history channel (a publish hook's
        ``skip_history``). ``call``: the publication's id on a history channel
        (`Broker.publish_history`: the same id again publishes nothing twice).
        """
        if not checked:
            data = check_json(data, self.max_bytes)
        elif len(data) > self.max_bytes:
            raise InvalidData(f"data over {self.max_bytes} bytes")
        policy = self.policy
        if history and policy.applies(ch):
            return await self.broker.publish_history(ch, data, policy.size, policy.ttl, call)
        await self.broker.publish(ch, data)
        return None

    async def publish_each(
        self, channels: Sequence[str], data: bytes, *, call: str | None = None
    ) -> list[Position | Exception | None]:
        """`publish` ``data`` on each of ``channels`` (checked once, sent in one
        round trip where the broker can): each one's position, None, or its error.

        Raises `proto.InvalidData` (for all) when ``data`` is not publishable.
        ``call``: the id of this publication on history channels (`Broker.publish_history`).
        """
        data = check_json(data, self.max_bytes)
        policy = self.policy
        history = (policy.size, policy.ttl)
        return await self.broker.publish_many(
            [(ch, history if policy.applies(ch) else None) for ch in channels], data, call
        )
