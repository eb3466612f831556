"""Redis Cluster broker: sharded pub/sub (SSUBSCRIBE / SPUBLISH, Redis >= 7).

Channel ``room:1`` is the shard channel ``<prefix>{room:1}``. The hash tag
puts it in the slot of the channel's history and presence keys
(``<prefix>h:{room:1}``...), so one shard holds everything about a channel
and the history script can SPUBLISH where it runs (a script may only touch
its own slot). A backend publishes with ``SPUBLISH gw:{room:1} '{...}'``.

Publishing, history and presence go through redis-py's `RedisCluster`, which
sends each command to the primary that owns its slot and follows MOVED.
Subscribing uses one connection per primary that owns a subscribed
channel's slot (a `_ShardLink`), read by its own task, opened with the first
such channel and closed with the last. The control channel is always held,
so its shard always has a link.

A link that fails (connection lost, or an unasked SUNSUBSCRIBE: the shard
gave the slot away) waits with backoff, refreshes the slot map, hands the
channels whose slot moved to their new primary's link, then reconnects and
resubscribes the rest. The broker is connected while every link holding
confirmed channels is up, so a lost shard makes the node tell every
subscription it may have a gap, as with one Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from core.infra.broker.base import CONTROL, BrokerUnavailable
from core.infra.broker.redis import (
    BACKEND_ERRORS,
    HISTORY_READ,
    PUBLISH_WITH_HISTORY,
    SUBSCRIBE_ERRORS,
    RedisBroker,
    _Liveness,
)

__all__ = ["SPUBLISH_WITH_HISTORY", "RedisClusterBroker"]

log = logging.getLogger("core.infra.broker")

#: `PUBLISH_WITH_HISTORY` for a cluster: the same keys and arguments, but the
#: publication goes out with SPUBLISH on the channel's own shard.
SPUBLISH_WITH_HISTORY = PUBLISH_WITH_HISTORY.replace(
    "redis.call('PUBLISH',", "redis.call('SPUBLISH',"
)
assert SPUBLISH_WITH_HISTORY.count("'SPUBLISH'") == 1


class _ShardScript:
    """A Lua script run on its keys' shard alone, as redis-py's `AsyncScript` is called.

    redis-py answers ``NOSCRIPT`` with ``SCRIPT LOAD``, which a cluster client
    sends to every primary: with one primary down, a shard that lacked the
    script (a replica promoted by a failover, a node restarted) could not run
    it, and every publication with history, history read and presence update
    of that healthy shard failed until the down one was back. ``EVAL`` runs it
    on the shard of its keys and leaves it cached there.
    """

    def __init__(self, client: RedisCluster, script: Any) -> None:
        self.client = client
        self.script: str = script if isinstance(script, str) else bytes(script).decode()
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.script, len(keys), *keys, *args)


class _SlotMoved(ResponseError):
    """The shard dropped a channel we hold: its slot now lives elsewhere."""


class _ShardLink:
    """One sharded pub/sub connection to one primary, read by one task.

    ``keys`` are the shard channels placed here; ``held`` those confirmed at
    least once, whose publications subscribers count on. While ``held`` is
    not empty and the link is not ``up``, the broker reports itself down.
    """

    def __init__(self, name: str, client: aioredis.Redis) -> None:
        self.name = name
        self.client = client
        self.keys: set[bytes] = set()
        self.held: set[bytes] = set()
        self.confirming: set[bytes] = set()  # confirmed before this connection is up
        self.leaving: collections.Counter[bytes] = collections.Counter()  # SUNSUBSCRIBEs sent
        self.pubsub: PubSub | None = None  # while connected
        self.up = False  # resubscribed, and every resubscription confirmed
        self.task: asyncio.Task[None] | None = None
        self.retired = False


def _by_slot(keys: set[bytes]) -> list[list[bytes]]:
    # One SSUBSCRIBE may only name channels of one slot (else CROSSSLOT).
    groups: dict[int, list[bytes]] = collections.defaultdict(list)
    for key in keys:
        groups[key_slot(key)].append(key)
    return list(groups.values())


class RedisClusterBroker(RedisBroker):
    publish_with_history = SPUBLISH_WITH_HISTORY
    history_top = HISTORY_READ  # `_read_history` reads with it alone
    publish_command = "SPUBLISH"
    kind = "Redis Cluster"
    reports_lost = True  # one shard's link lost is not every channel's loss

    def __init__(self, url: str, prefix: str = "gw:", **timing: Any) -> None:
        """``url`` names any node of the cluster; ``timing`` as for `RedisBroker`."""
        super().__init__(url, prefix, **timing)
        assert isinstance(self._pub_client, RedisCluster)
        self._cluster: RedisCluster = self._pub_client
        for name, value in list(vars(self).items()):
            if isinstance(value, AsyncScript):
                setattr(self, name, _ShardScript(self._cluster, value.script))
        self._control = self._channel_key(CONTROL)
        self._links: dict[str, _ShardLink] = {}
        self._link_of: dict[bytes, _ShardLink] = {}
        #: Channels held on a link that was lost, until they are held again: then
        #: `on_lost` is told them (and only them) that they may have missed some.
        self._lost: set[bytes] = set()
        self._closed = False

    def _publisher(self, url: str) -> RedisCluster:
        return RedisCluster.from_url(url, socket_timeout=5)

    async def _read_history(
        self, keys: list[str], fresh: str, start: str, limit: int
    ) -> tuple[list[Any], list[tuple[bytes, bytes | None]]]:
        """One script (`HISTORY_READ`): a cluster pipeline carries no script."""
        return await self._read_history_scripted(keys, fresh, start, limit)

    def _named(self, kind: str, ch: str) -> str:
        """``<prefix><kind>{<ch>}``, hashed on ``ch`` (up to its first ``}``).

        A channel that starts with ``}`` would leave the hash tag empty, and
        Redis would hash each whole name to its own slot; such a channel is
        tagged ``{*}`` instead (``*`` is in no channel name).
        """
        tag = f"{{*}}{ch}" if ch[:1] == "}" else f"{{{ch}}}"
        return f"{self._prefix}{kind}{tag}"

    def _channel_key(self, ch: str) -> bytes:
        return self._named("", ch).encode()

    def _channel_of(self, key: bytes) -> str | None:
        if not key.startswith(self._prefix_b):
            return None
        name = key[len(self._prefix_b) :]
        if name.startswith(b"{*}"):
            name = name[3:]
        elif name[:1] == b"{" and name[-1:] == b"}":
            name = name[1:-1]
        else:
            return None
        return name.decode("utf-8", "replace")

    def _history_keys(self, ch: str) -> list[str]:
        return [self._named("h:", ch), self._named("m:", ch)]

    def _presence_keys(self, ch: str) -> list[str]:
        return [self._named(kind, ch) for kind in ("p:", "pz:", "pu:")]

    def _events_keys(self, node: str | None = None) -> list[str]:
        # `<prefix>events` hashes whole; the others are tagged with its name, so all
        # share its slot (the scripts touch them together).
        stream = f"{self._prefix}events"
        keys = [stream, f"{{{stream}}}:nodes"]
        return keys if node is None else [*keys, f"{{{stream}}}:node:{node}"]

    def shard_links(self) -> dict[str, set[str]]:
        """Each primary (``host:port``) this broker subscribes on, and its channels."""
        return {
            name: {ch for key in link.keys if (ch := self._channel_of(key)) is not None}
            for name, link in self._links.items()
        }

    async def close(self) -> None:
        self._closed = True
        await super().close()
        for link in list(self._links.values()):
            await self._retire(link)
        self._set_connected(False)

    # -- subscriptions -----------------------------------------------------

    async def subscribe(self, ch: str) -> None:
        if ch in self._channels:
            return
        key = self._channel_key(ch)
        if self._closed or self._control not in self._link_of:
            raise BrokerUnavailable("Redis Cluster is not connected")
        try:
            node = self._owner(key)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"no shard for {ch}: {exc}") from exc
        link = self._links.get(node.name)
        if link is not None and link.held and not link.up:
            raise BrokerUnavailable(f"Redis Cluster shard {node.name} is not connected")
        waiter = self._expect(key)
        self._channels.add(ch)
        link = self._place(key, node)
        try:
            if link.pubsub is not None:
                await link.pubsub.ssubscribe(key)
            await asyncio.wait_for(waiter, self._subscribe_timeout)
        except SUBSCRIBE_ERRORS as exc:
            self._channels.discard(ch)
            await self._detach(key)
            raise BrokerUnavailable(f"SSUBSCRIBE failed: {exc}") from exc
        finally:
            self._unexpect(key, waiter)

    async def unsubscribe(self, ch: str) -> None:
        await self.unsubscribe_many([ch])

    async def resubscribe(self, ch: str) -> None:
        # Placed per shard: a channel refused here is no longer held, and the next
        # reconciliation (`verify`, against this broker's own view) finds it again.
        self._channels.discard(ch)
        await self.subscribe(ch)

    async def verify(self, channels: list[str]) -> list[str]:
        # Shard channels live on their shards: checked against this broker's own view.
        return [ch for ch in channels if ch not in self._channels]

    async def unsubscribe_many(self, channels: list[str]) -> None:
        leaving = [ch for ch in channels if ch in self._channels]
        self._channels.difference_update(leaving)
        for ch in leaving:
            if ch not in self._channels:  # else subscribed again while we awaited
                await self._detach(self._channel_key(ch))

    def _owner(self, key: bytes) -> ClusterNode:
        """The primary that owns ``key``'s slot in the last slot map."""
        return self._cluster.nodes_manager.get_node_from_slot(key_slot(key))

    def _place(self, key: bytes, node: ClusterNode) -> _ShardLink:
        """Put ``key`` on the link to ``node``, opening the link if needed."""
        link = self._links.get(node.name)
        if link is None:
            link = _ShardLink(node.name, self._node_client(node))
            self._links[node.name] = link
            link.task = asyncio.create_task(self._serve(link), name=f"redis-shard-{node.name}")
        link.keys.add(key)
        self._link_of[key] = link
        return link

    def _node_client(self, node: ClusterNode) -> aioredis.Redis:
        # The URL's subscriber settings (credentials, TLS, no retries), another address.
        template = self._sub_client.connection_pool
        kwargs = {**template.connection_kwargs, "host": node.host, "port": node.port}
        pool = aioredis.ConnectionPool(connection_class=template.connection_class, **kwargs)
        return aioredis.Redis.from_pool(pool)

    def _unplace(self, link: _ShardLink, key: bytes) -> None:
        link.keys.discard(key)
        link.held.discard(key)
        link.confirming.discard(key)
        if self._link_of.get(key) is link:
            del self._link_of[key]

    async def _detach(self, key: bytes) -> None:
        """Stop holding ``key``; close its link if nothing else is on it."""
        link = self._link_of.get(key)
        self._lost.discard(key)
        if link is None:
            return
        self._unplace(link, key)
        if not link.keys:
            await self._retire(link)
            return
        pubsub = link.pubsub
        if pubsub is not None:
            link.leaving[key] += 1
            try:
                await pubsub.sunsubscribe(key)
            except BACKEND_ERRORS as exc:
                log.debug("SUNSUBSCRIBE on %s failed (%s); the reconnect drops it", link.name, exc)
        self._update_state()

    async def _retire(self, link: _ShardLink) -> None:
        if link.retired:
            return
        link.retired = True
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for key in list(link.keys):
            self._unplace(link, key)
        task = link.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*BACKEND_ERRORS):
            await link.client.aclose()
        self._update_state()

    def _restart(self, link: _ShardLink) -> None:
        """Reconnect a link now, resubscribing everything on it."""
        link.up = False
        link.pubsub = None
        if link.task is not None:
            link.task.cancel()
        link.task = asyncio.create_task(self._serve(link), name=f"redis-shard-{link.name}")

    # -- state -------------------------------------------------------------

    def _update_state(self) -> None:
        control = self._link_of.get(self._control)
        up = (
            not self._closed
            and control is not None
            and control.up
            and all(link.up for link in self._links.values() if link.held)
        )
        self._set_connected(up)

    # -- readers -----------------------------------------------------------

    async def _run(self) -> None:
        """Learn the slot map, retrying with backoff, then hold the control channel."""
        attempt = 0
        while True:
            try:
                await self._cluster.initialize()
                node = self._owner(self._control)
                break
            except BACKEND_ERRORS as exc:
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.warning("Redis Cluster unreachable (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        self._place(self._control, node)

    async def _serve(self, link: _ShardLink) -> None:
        attempt = 0
        while True:
            pubsub = link.client.pubsub()
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]
                link.pubsub = pubsub
                link.leaving.clear()
                for group in _by_slot(link.keys):
                    await pubsub.ssubscribe(*group)
                await pubsub.ping()  # answered after every confirmation above
                live = _Liveness()
                while True:
                    message = await self._next_message(pubsub, live)
                    if message is not None and self._on_message(link, message):
                        attempt = 0
            except asyncio.CancelledError:
                if link.pubsub is pubsub:
                    link.pubsub = None
                await self._drop(pubsub)
                raise
            except Exception as exc:  # the reader survives anything (base.py)
                self._lost |= link.held  # their subscribers may miss publications now
                self._lost.discard(self._control)
                link.up = False
                link.pubsub = None
                link.confirming.clear()
                self._fail_confirmations(list(link.keys))
                self._update_state()
                delay = self._backoff.delay(attempt)
                attempt += 1
                if isinstance(exc, BACKEND_ERRORS):
                    log.warning(
                        "Redis Cluster shard %s: sharded pub/sub lost (%s); retrying in %.2fs",
                        link.name, exc, delay,
                    )  # fmt: skip
                else:
                    self._fault("reader")
                    log.exception("Redis Cluster shard %s: reader failed; restarting in %.2fs",
                                  link.name, delay)  # fmt: skip
                await self._drop(pubsub)
                await asyncio.sleep(delay)
                await self._relocate(link)
                if not link.keys:
                    await self._retire(link)
                    return

    def _on_message(self, link: _ShardLink, message: dict[str, object]) -> bool:
        """Handle one message on a link; True when it proves the link is up."""
        kind = message["type"]
        channel = message["channel"]
        if kind == "smessage":
            assert isinstance(channel, bytes) and isinstance(message["data"], bytes)
            self._deliver(channel, message["data"])
        elif kind == "ssubscribe":
            assert isinstance(channel, bytes)
            if channel in link.keys:
                (link.held if link.up else link.confirming).add(channel)
            self._confirmed(channel)
        elif kind == "sunsubscribe":
            assert isinstance(channel, bytes)
            if link.leaving[channel] > 0:
                link.leaving[channel] -= 1
            elif channel in link.keys:
                raise _SlotMoved(f"the shard dropped {channel!r}")
        elif kind == "pong":
            link.up = True
            link.held |= link.confirming
            link.confirming.clear()
            back = self._lost & link.held
            if back:
                self._lost -= back
                self._tell_lost(back)
            self._update_state()
            return True
        return False

    def _tell_lost(self, keys: set[bytes]) -> None:
        on_lost = self.on_lost
        if on_lost is None:
            return
        channels = sorted(ch for key in keys if (ch := self._channel_of(key)) is not None)
        try:
            on_lost(channels)
        except Exception:  # the reader survives anything (base.py)
            self._fault("handler")
            log.exception("the handler of lost channels failed")

    async def _relocate(self, link: _ShardLink) -> None:
        """Refresh the slot map and hand channels whose slot moved to their new shard."""
        try:
            await self._cluster.nodes_manager.initialize()
            owners = {key: self._owner(key) for key in link.keys}
        except BACKEND_ERRORS as exc:
            log.warning("Redis Cluster slot map refresh failed (%s); keeping %s", exc, link.name)
            return
        for key, node in owners.items():
            if node.name == link.name or key not in link.keys:
                continue
            held = key in link.held
            self._unplace(link, key)
            target = self._place(key, node)
            if held:
                target.held.add(key)
            if target.pubsub is not None:
                self._restart(target)  # resubscribes everything, the moved key too
            log.info("Redis Cluster: %r moved from %s to %s", key, link.name, node.name)
        self._update_state()
