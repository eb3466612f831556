"""Publish from a backend service, with history where the channel keeps it.

::

    from gateway.publisher import Publisher

    async with Publisher("redis://127.0.0.1:6379/0", history_channels=("orders:*",)) as pub:
        position = await pub.publish("orders:42", {"status": "paid"})

It writes to the Redis the gateways use, with the same prefix, history
patterns, size and TTL as they are configured with (pass the same values),
so subscribers on every gateway get the publication with its offset, and
clients that reconnect recover it. Channels outside ``history_channels`` get
a plain PUBLISH. No gateway process is involved; Redis must be reachable
(and private).

The rest of the server API (disconnect, subscribe and unsubscribe users,
list connections and channels, presence, history, info) acts on the
gateways' connections, so it goes to a gateway, over HTTP, with an API key
of the ``server`` scope: `ServerClient` (gateway/serverclient.py), exported
here too. It publishes and broadcasts as well, for a backend that reaches
the gateways but not Redis.
"""

from __future__ import annotations

from typing import Any

import msgspec

from core.infra.broker.cluster import RedisClusterBroker
from core.infra.broker.redis import RedisBroker
from core.infra.history import HistoryPolicy, HistoryPublisher, call_of
from gateway.serverclient import Closing, ServerClient, ServerError
from proto import Position
from proto.publication import check_json

__all__ = ["Publisher", "ServerClient", "ServerError"]


class Publisher(Closing):
    def __init__(
        self,
        redis_url: str,
        prefix: str = "gw:",
        *,
        history_channels: tuple[str, ...] = ("projects", "projects:*"),
        history_size: int = 100,
        history_ttl: float = 300.0,
        cluster: bool = False,
    ) -> None:
        # Its publishing side only; SPUBLISH on a Redis Cluster (REDIS_CLUSTER).
        broker = RedisClusterBroker if cluster else RedisBroker
        self._broker = broker(redis_url, prefix)
        policy = HistoryPolicy(history_channels, history_size, history_ttl)
        self._publisher = HistoryPublisher(self._broker, policy)

    async def publish(self, ch: str, data: Any, *, key: str | None = None) -> Position | None:
        """Publish ``data`` (JSON-serializable, or JSON bytes) on ``ch``.

        Returns the publication's position on a history channel, else None.
        Raises `proto.InvalidData` for data that not every codec and client can
        carry (docs/protocol.md, Publishable data): nothing is published. Raises
        `core.infra.broker.BrokerUnavailable` when Redis did not take it in time:
        a Redis that stalled (a slow script, a fork) may still run it once it
        wakes, so send it again with the same ``key`` (any string naming this
        publication): on a history channel it is then published once.
        """
        payload = data if isinstance(data, bytes) else msgspec.json.encode(data)
        call = None if key is None else call_of("", key, payload)
        return await self._publisher.publish(ch, payload, call=call)

    async def broadcast(
        self, channels: list[str], data: Any, *, key: str | None = None
    ) -> list[Position | None]:
        """Publish ``data`` on each of ``channels`` (history kept per channel, as `publish`).

        The positions, in the order of ``channels``. The data is checked once:
        `proto.InvalidData` publishes nothing; a broker failure midway raises
        with the channels before it published: sent again with the same ``key``
        (as `publish`'s), those are not published twice.
        """
        payload = data if isinstance(data, bytes) else msgspec.json.encode(data)
        payload = check_json(payload, self._publisher.max_bytes)
        call = None if key is None else call_of("", key, payload)
        publish = self._publisher.publish
        return [await publish(ch, payload, checked=True, call=call) for ch in channels]

    async def close(self) -> None:
        await self._broker.close()
