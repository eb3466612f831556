"""Redis pub/sub broker: one subscriber connection per process.

Channel ``room:1`` is the Redis channel ``<prefix>room:1`` (prefix ``gw:`` by
default), so a backend publishes with a plain ``PUBLISH gw:room:1 '{...}'``.

The subscriber connection always holds ``<prefix>__control``, which keeps it
established while no client channel is subscribed (redis-py's PubSub has no
connection until its first SUBSCRIBE) and gives later features a node-wide
control channel. A reader task owns the connection; when it is lost, the task
drops it, waits with jittered exponential backoff, opens a new one and
resubscribes every channel in one SUBSCRIBE.

`RedisClusterBroker` (cluster.py) is this broker for a Redis Cluster: the
same commands and scripts, sharded pub/sub instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    ExecAbortError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from core.infra.backoff import Backoff
from core.infra.broker.base import (
    CONTROL,
    Broker,
    BrokerUnavailable,
    Entry,
    EventBatch,
    Position,
    PublicationHandler,
    StateListener,
)
from core.infra.broker.resp import RespLink, link_for, refused_by_replica
from core.infra.coalesce import Coalescer
from core.infra.ids import unique_hex
from core.infra.lua import script
from core.infra.tasks import TaskSet
from core.infra.throttled import ThrottledLog

__all__ = [
    "BACKEND_ERRORS",
    "PRESENCE",
    "PUBLISH_WITH_HISTORY",
    "SUBSCRIBE_ERRORS",
    "LinkStalled",
    "RedisBroker",
]

log = logging.getLogger("core.infra.broker")
_dropped = ThrottledLog(log)
T = TypeVar("T")

#: What a lost or refusing backend raises (redis-py's cluster errors are not RedisErrors).
BACKEND_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
#: What makes a subscription fail (TimeoutError is an OSError).
SUBSCRIBE_ERRORS: tuple[type[Exception], ...] = (*BACKEND_ERRORS, BrokerUnavailable)


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


#: Seconds a command (a publication) waits for Redis before it fails.
PUBLISH_TIMEOUT = 5.0

#: Channels per PUBSUB NUMSUB when the node reconciles its subscriptions.
VERIFY_BATCH = 500

#: Hex digits of the id each call of a history script carries, so that one sent again
#: after its connection was lost (it may have run) publishes nothing twice
#: (lua/publish_with_history.lua); 64 bits: no two calls on a channel share one.
PUBLICATION_ID_DIGITS = 16

#: Publications with history reach subscribers as ``\x1e<offset> <epoch> <data>``:
#: a byte no JSON starts with, so plain PUBLISHes pass untouched.
_HISTORY_MARK = b"\x1e"

#: Append to a channel's history and publish, atomically (lua/publish_with_history.lua).
PUBLISH_WITH_HISTORY = script("publish_with_history")
#: The same for one message on several channels, in one call (lua/publish_each_with_history.lua).
PUBLISH_EACH_WITH_HISTORY = script("publish_each_with_history")
#: Where a channel's history stands, with a new epoch where it cannot be trusted (lua/history_top.lua).
HISTORY_TOP = script("history_top")
#: `HISTORY_TOP` that also reads the entries (ARGV: fresh epoch, first id, count), for
#: where a MULTI of it and XRANGE cannot go: a cluster's pipelines carry no script, and
#: past ``maxmemory`` (noeviction) Redis refuses every command queued in a MULTI.
HISTORY_READ = HISTORY_TOP.replace(
    "return {meta[1], meta[2]}",
    "return {meta[1], meta[2], redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', ARGV[3])}",
).replace("return {epoch, 0}", "return {epoch, 0, {}}")
assert HISTORY_READ.count("'XRANGE'") == 1 and HISTORY_READ.count("0, {}}") == 1


#: A channel's presence: add, remove, read or count its entries, dropping the expired
#: ones first (lua/presence.lua).
PRESENCE = script("presence")

#: The connection events' scripts (lua/events_*.lua, docs/events.md).
EVENTS_APPEND = script("events_append")
EVENTS_LOST = script("events_lost")
EVENTS_CLAIM = script("events_claim")
#: An expiring set's members, the expired forgotten by the earlier of two clocks (lua/expiring_read.lua).
EXPIRING_READ = script("expiring_read")
#: Lost nodes one `lost_nodes` call returns at most.
LOST_NODES_LIMIT = 100
#: Seconds between two moves of the subscriber link after Redis refused a write as a
#: replica (a failover): while the name still points at the old primary, commands keep
#: being refused, and the link moves again (the last move comes after the last refusal).
RELINK_EVERY = 2.0


class LinkStalled(RedisConnectionError):
    """A subscriber link answered nothing within its health timeout."""


class _Shared:
    """A callback that every copy of a retry calls (redis-py deep-copies it per connection)."""

    __slots__ = ("call",)

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class _ReplicaRetry(Retry):
    """redis-py's one retry (it reconnects first), telling who asked of READONLY refusals."""

    def __init__(self, on_replica: Callable[[], object]) -> None:
        super().__init__(NoBackoff(), 1)
        self._on_replica = _Shared(on_replica)

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> T:
        async def attempt() -> T:
            try:
                return await do()
            except ResponseError as exc:
                if refused_by_replica(exc) and not isinstance(exc, ReadOnlyError):
                    raise ReadOnlyError(str(exc)) from exc  # a script's, on Redis 6
                raise

        async def failed(error: Exception, *rest: Any) -> Any:
            if isinstance(error, ReadOnlyError):
                self._on_replica.call()
            return await fail(error, *rest)

        return await super().call_with_retry(attempt, failed, *args, **kwargs)


class _Liveness:
    """When a subscriber link was last heard from, and when it was pinged."""

    __slots__ = ("heard", "pinged")

    def __init__(self) -> None:
        self.heard = asyncio.get_running_loop().time()
        self.pinged: float | None = None


class RedisBroker(Broker):
    #: The script behind `publish_history`; the cluster broker's SPUBLISHes.
    publish_with_history = PUBLISH_WITH_HISTORY
    #: The script behind `history`; the cluster broker's reads the entries too.
    history_top = HISTORY_TOP
    #: How a plain publication is sent; the cluster broker's is SPUBLISH.
    publish_command = "PUBLISH"
    #: What `description` calls this broker.
    kind = "Redis"

    def __init__(
        self,
        url: str,
        prefix: str = "gw:",
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        subscribe_timeout: float = 5.0,
        health_interval: float = 3.0,
        health_timeout: float = 2.0,
        pool_size: int = 64,
        pool_timeout: float = 15.0,
    ) -> None:
        """``health_interval``: ping a subscriber link quiet for that long (0: never);
        ``health_timeout``: seconds for anything to come back before the link
        counts as lost (a stalled Redis is a lost link: gap pushes, reconnect);
        ``pool_size``: connections for commands (history, presence, publishing),
        beyond which a command waits up to ``pool_timeout`` seconds for one
        instead of failing."""
        self._url = url
        self._prefix = prefix
        self._prefix_b = prefix.encode()
        self._control = (prefix + CONTROL).encode()
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._subscribe_timeout = subscribe_timeout
        self._health = (health_interval, health_timeout)
        self._pool_size = (pool_size, pool_timeout)
        self._on_state: StateListener | None = None
        self._handler: PublicationHandler | None = None
        self._channels: set[str] = set()
        #: Channels a `resubscribe` is subscribing again, until one leaves them.
        self._resubscribing: set[str] = set()
        self._confirm: dict[bytes, list[asyncio.Future[None]]] = {}
        self._pubsub: PubSub | None = None
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._first_connect: asyncio.Event = asyncio.Event()
        self.reconnects = 0
        self._relinked = -math.inf
        self._relink: asyncio.TimerHandle | None = None
        self._tasks = TaskSet(log)
        # Publishing goes through a small pool; subscribing through one
        # dedicated connection with retries off, so that a lost connection
        # surfaces at once in the reader loop, which owns recovery.
        self._pub_client: aioredis.Redis | RedisCluster = self._publisher(url)
        self._sub_client: aioredis.Redis = aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 0), socket_keepalive=True, socket_connect_timeout=5
        )
        self._publish_script = self._pub_client.register_script(self.publish_with_history)
        self._publish_each_script = self._pub_client.register_script(PUBLISH_EACH_WITH_HISTORY)
        self._history_top = self._pub_client.register_script(self.history_top)
        self._history_read = self._pub_client.register_script(HISTORY_READ)
        self._presence = self._pub_client.register_script(PRESENCE)
        self._events_append = self._pub_client.register_script(EVENTS_APPEND)
        self._events_lost = self._pub_client.register_script(EVENTS_LOST)
        self._events_claim = self._pub_client.register_script(EVENTS_CLAIM)
        self._expiring_read = self._pub_client.register_script(EXPIRING_READ)
        # Publications made at once (a write's change events, a burst of
        # socket publishes) share one pipeline: one round trip, one read and
        # one reply on Redis for many (core/infra/coalesce.py). Not on a
        # cluster, whose channels live on different nodes.
        # They go on one connection of their own, packed and parsed by
        # hiredis (resp.py), unless the URL is one it does not speak (TLS).
        self._publishes: Coalescer[tuple[Any, ...], Any] | None = None
        self._link: RespLink | None = None
        if isinstance(self._pub_client, aioredis.Redis):
            pool = self._pub_client.connection_pool
            self._link = link_for(
                pool.connection_class, pool.connection_kwargs, PUBLISH_TIMEOUT, self._replica_seen
            )
            self._publishes = Coalescer(
                self._pipeline if self._link is None else self._link.execute,
                max_batch=256,
                max_inflight=2,
                what="publications",
            )

    def _publisher(self, url: str) -> aioredis.Redis | RedisCluster:
        # One retry on a lost connection: after a Redis restart every pooled
        # connection is stale, and the first command on each would fail. And
        # one on READONLY: a failover demotes the primary without closing its
        # connections (the name moves to the new one), and each would be refused
        # every write for good; the retry reconnects first (redis-py drops the
        # connection before it retries). A refused write did not run.
        size, timeout = self._pool_size
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=size,
            timeout=timeout,
            socket_timeout=PUBLISH_TIMEOUT,
            retry=_ReplicaRetry(self._replica_seen),
            retry_on_error=[RedisConnectionError, ReadOnlyError],
        )
        return aioredis.Redis.from_pool(pool)

    @property
    def command_client(self) -> aioredis.Redis | None:
        """The client of the command pool, for other Redis users of the process (None on a cluster)."""
        client = self._pub_client
        return client if isinstance(client, aioredis.Redis) else None

    def pool_usage(self) -> tuple[int, int, int]:
        """The command pool's connections in use, its size, and commands waiting for one."""
        pool = getattr(self._pub_client, "connection_pool", None)  # none on a cluster client
        if not isinstance(pool, aioredis.BlockingConnectionPool):
            return 0, 0, 0
        condition = getattr(pool, "_condition", None)
        waiters = len(getattr(condition, "_waiters", None) or ())
        return len(getattr(pool, "_in_use_connections", ())), pool.max_connections, waiters

    def _channel_key(self, ch: str) -> bytes:
        """The Redis channel that carries ``ch``."""
        return (self._prefix + ch).encode()

    def _channel_of(self, key: bytes) -> str | None:
        """The channel a Redis channel carries, or None when it is not ours."""
        if not key.startswith(self._prefix_b):
            return None
        return key[len(self._prefix_b) :].decode("utf-8", "replace")

    @property
    def description(self) -> str:
        return f"{self.kind} broker at {_redact(self._url)} (prefix {self._prefix!r})"

    @property
    def connected(self) -> bool:
        return self._connected

    async def healthy(self) -> bool:
        """The subscriber link is up and Redis answers PING within a second."""
        if not self._connected:
            return False
        try:
            async with asyncio.timeout(1.0):
                await self._pub_client.ping()
        except BACKEND_ERRORS:
            return False
        return True

    async def start(
        self, handler: PublicationHandler, on_state: StateListener | None = None, wait: float = 5.0
    ) -> None:
        self._handler = handler
        self._on_state = on_state
        self._task = asyncio.create_task(self._run(), name="redis-broker-reader")
        # Give a reachable Redis the chance to be ready before the first
        # client arrives; an unreachable one does not stop the gateway.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_connect.wait(), wait)
        if self._first_connect.is_set():
            await self._check_replication_id()

    async def _check_replication_id(self) -> None:
        """Warn when Redis has no replication id: the history scripts tell failovers by it."""
        client = self.command_client
        if client is None:  # a Redis Cluster: Redis 7 or later, which has one
            return
        try:
            async with asyncio.timeout(2.0):
                info = await client.info("replication")
        except BACKEND_ERRORS:  # TimeoutError is an OSError
            return
        if "master_replid" not in info:
            log.warning(
                "this Redis reports no master_replid (INFO replication): after a failover or "
                "a restart, history channels would carry on under the same epoch, and a "
                "publication the old primary acknowledged but lost would go unnoticed "
                "(docs/protocol.md, 'Failovers and snapshots')"
            )

    def _replica_seen(self) -> None:
        """Redis refused a write as a replica: a failover demoted the server this process
        is connected to, and moved the URL's name to the new primary. Commands reconnect
        by themselves (their retry); the subscriber link, which a replica would keep
        serving, moves too (at most once every `RELINK_EVERY` seconds, and once after the
        last refusal), so that it hears what the commands' server does: its subscribers
        are told of a gap, as after any reconnect."""
        if self._relink is not None or self._task is None or self._handler is None:
            return
        loop = asyncio.get_running_loop()
        wait = max(0.0, self._relinked + RELINK_EVERY - loop.time())
        self._relink = loop.call_later(wait, self._move_link)

    def _move_link(self) -> None:
        self._relink = None
        if self._task is None or self._handler is None:
            return
        self._relinked = asyncio.get_running_loop().time()
        log.warning(
            "Redis refused a write as a replica (READONLY: a failover); reconnecting to %s",
            _redact(self._url),
        )
        self._task.cancel()
        self._task = asyncio.create_task(self._run(), name="redis-broker-reader")
        # The idle pooled connections too: each would be refused once (and move the
        # link again, a gap on every channel) whenever it is next used.
        pool = getattr(self._pub_client, "connection_pool", None)
        if isinstance(pool, aioredis.ConnectionPool):
            self._tasks.spawn(pool.disconnect(inuse_connections=False), name="redis-pool-drop")

    async def close(self) -> None:
        self._handler = None
        if self._relink is not None:
            self._relink.cancel()
            self._relink = None
        await self._tasks.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_confirmations()
        if self._link is not None:
            await self._link.close()
        await self._pub_client.aclose()
        await self._sub_client.aclose()

    # -- commands ----------------------------------------------------------

    async def subscribe(self, ch: str) -> None:
        if ch in self._channels:
            return
        pubsub = self._pubsub
        if pubsub is None or not self._connected:
            raise BrokerUnavailable("Redis is not connected")
        key = self._channel_key(ch)
        waiter = self._expect(key)
        self._channels.add(ch)
        try:
            await pubsub.subscribe(key)
            await asyncio.wait_for(waiter, self._subscribe_timeout)
        except SUBSCRIBE_ERRORS as exc:
            self._channels.discard(ch)
            raise BrokerUnavailable(f"SUBSCRIBE failed: {exc}") from exc
        finally:
            self._unexpect(key, waiter)

    def _expect(self, key: bytes) -> asyncio.Future[None]:
        """A future that the subscription confirmation of ``key`` resolves."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(key, []).append(waiter)
        return waiter

    def _unexpect(self, key: bytes, waiter: asyncio.Future[None]) -> None:
        waiters = self._confirm.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self._confirm[key]

    async def unsubscribe(self, ch: str) -> None:
        await self.unsubscribe_many([ch])

    async def verify(self, channels: list[str]) -> list[str]:
        """Channels this broker does not hold, or that have no subscriber on the server.

        ``PUBSUB NUMSUB`` counts every process's subscriber, so a channel held
        elsewhere too passes: what this finds for sure is a channel nobody
        delivers (the divergence a lost UNSUBSCRIBE race leaves).
        """
        missing = [ch for ch in channels if ch not in self._channels]
        held = [ch for ch in channels if ch in self._channels]
        for start in range(0, len(held), VERIFY_BATCH):
            batch = held[start : start + VERIFY_BATCH]
            try:
                counts = await self._pub_client.pubsub_numsub(
                    *(self._channel_key(c) for c in batch)
                )
            except BACKEND_ERRORS as exc:
                raise BrokerUnavailable(f"PUBSUB NUMSUB failed: {exc}") from exc
            missing += [ch for ch, (_, n) in zip(batch, counts, strict=True) if not n]
        return missing

    async def resubscribe(self, ch: str) -> None:
        if self._pubsub is None or not self._connected:
            # Kept: the link's reconnect subscribes every channel held. Forgotten here
            # (a reconciliation that met a link being lost), it was left out of the
            # reconnect and its members got nothing, with no gap, until the next one.
            raise BrokerUnavailable("Redis is not connected")
        self._channels.discard(ch)
        self._resubscribing.add(ch)
        try:
            await self.subscribe(ch)
        except BrokerUnavailable:
            # The same, for a link lost (or a SUBSCRIBE unanswered) meanwhile; unless the
            # channel was left meanwhile: its UNSUBSCRIBE follows the SUBSCRIBE on the link,
            # and a channel held that Redis does not deliver answers its next member's
            # `subscribe` at once, with nothing (held elsewhere too, no reconciliation
            # finds it).
            if ch in self._resubscribing:
                self._channels.add(ch)
            raise
        finally:
            self._resubscribing.discard(ch)

    async def unsubscribe_many(self, channels: list[str]) -> None:
        keys = [self._channel_key(ch) for ch in channels if ch in self._channels]
        self._channels.difference_update(channels)
        self._resubscribing.difference_update(channels)
        pubsub = self._pubsub
        if pubsub is None or not keys:
            return  # not resubscribed on reconnect: nothing to undo
        try:
            await pubsub.unsubscribe(*keys)
        except BACKEND_ERRORS as exc:
            log.debug(
                "UNSUBSCRIBE of %d channels failed (%s); the reconnect drops them", len(keys), exc
            )

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run ``commands`` in one round trip; each one's reply or error."""
        if len(commands) == 1:
            return [await self._pub_client.execute_command(*commands[0])]
        client = self._pub_client
        assert isinstance(client, aioredis.Redis)
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        refused = [i for i, reply in enumerate(replies) if refused_by_replica(reply)]
        if refused:
            # A pipeline's error replies are no errors to its retry: reconnect here, as
            # the publishing link does (resp.py), and run the refused ones once more.
            self._replica_seen()
            await client.connection_pool.disconnect(inuse_connections=False)
            again = await asyncio.gather(
                *(self._pub_client.execute_command(*commands[i]) for i in refused),
                return_exceptions=True,
            )
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        return replies

    async def _command(self, *command: Any) -> Any:
        """One publishing command, in a shared pipeline when there is one."""
        if self._publishes is None:
            return await self._pub_client.execute_command(*command)
        return await self._publishes.submit(command)

    async def publish(self, ch: str, data: bytes) -> None:
        try:
            await self._command(self.publish_command, self._channel_key(ch), data)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"{self.publish_command} failed: {exc}") from exc

    def _history_keys(self, ch: str) -> list[str]:
        # One hash tag: a channel's stream and meta share a Redis Cluster slot.
        return [f"{self._prefix}h:{{{ch}}}", f"{self._prefix}m:{{{ch}}}"]

    def _history_call(
        self, ch: str, data: bytes, size: int, ttl: float, call: str | None = None
    ) -> tuple[list[str], list[bytes | str | int]]:
        """The keys and arguments of the history script publishing ``data`` on ``ch``."""
        args: list[bytes | str | int] = [
            self._channel_key(ch), data, size, max(1, math.ceil(ttl)), unique_hex(8),
            call or unique_hex(PUBLICATION_ID_DIGITS),
        ]  # fmt: skip
        return self._history_keys(ch), args

    async def publish_history(
        self, ch: str, data: bytes, size: int, ttl: float, call: str | None = None
    ) -> Position:
        keys, args = self._history_call(ch, data, size, ttl, call)
        try:
            offset, epoch = await self._publish_with_history(keys, args)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"publish with history failed: {exc}") from exc
        return Position(int(offset), epoch.decode())

    async def _publish_with_history(self, keys: list[str], args: list[bytes | str | int]) -> Any:
        script = self._publish_script
        if self._publishes is None:
            return await script(keys=keys, args=args)
        try:
            return await self._publishes.submit(("EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:  # Redis restarted or flushed its scripts: load it again
            return await script(keys=keys, args=args)

    async def publish_many(
        self,
        channels: Sequence[tuple[str, tuple[int, float] | None]],
        data: bytes,
        call: str | None = None,
    ) -> list[Position | Exception | None]:
        """All in the shared pipeline: no task per channel, one round trip."""
        if self._publishes is None:
            return await super().publish_many(channels, data, call)
        history = channels[0][1] if channels else None
        if len(channels) > 1 and history is not None and all(h == history for _, h in channels):
            chs = [ch for ch, _ in channels]
            return await self._publish_each_with_history(chs, data, *history, call)
        sha = self._publish_script.sha
        calls: list[tuple[list[str], list[bytes | str | int]] | None] = []
        commands: list[tuple[Any, ...]] = []
        for ch, history in channels:
            if history is None:
                calls.append(None)
                commands.append((self.publish_command, self._channel_key(ch), data))
            else:
                keys, args = self._history_call(ch, data, *history, call)
                calls.append((keys, args))
                commands.append(("EVALSHA", sha, len(keys), *keys, *args))
        outcomes: list[Position | Exception | None] = []
        for scripted, outcome in zip(
            calls, await self._publishes.submit_many(commands), strict=True
        ):
            if isinstance(outcome, NoScriptError) and scripted is not None:
                try:  # Redis restarted or flushed its scripts: load it again
                    outcome = await self._publish_script(keys=scripted[0], args=scripted[1])
                except BACKEND_ERRORS as exc:
                    outcome = exc
            if isinstance(outcome, BACKEND_ERRORS):
                what = "publish with history" if scripted else self.publish_command
                outcomes.append(BrokerUnavailable(f"{what} failed: {outcome}"))
            elif isinstance(outcome, Exception) or scripted is None:
                outcomes.append(outcome if isinstance(outcome, Exception) else None)
            else:
                offset, epoch = outcome
                outcomes.append(Position(int(offset), epoch.decode()))
        return outcomes

    async def _publish_each_with_history(
        self, channels: list[str], data: bytes, size: int, ttl: float, call: str | None = None
    ) -> list[Position | Exception | None]:
        """``data`` on every channel, each with history, in one script call."""
        assert self._publishes is not None
        keys = [key for ch in channels for key in self._history_keys(ch)]
        args: list[bytes | str | int] = [data, size, max(1, math.ceil(ttl)), unique_hex(8)]
        args += [self._channel_key(ch) for ch in channels]
        args.append(call or unique_hex(PUBLICATION_ID_DIGITS))
        script = self._publish_each_script
        (outcome,) = await self._publishes.submit_many(
            [("EVALSHA", script.sha, len(keys), *keys, *args)]
        )
        if isinstance(outcome, NoScriptError):  # Redis restarted or flushed its scripts
            try:
                outcome = await script(keys=keys, args=args)
            except BACKEND_ERRORS as exc:
                outcome = exc
        if isinstance(outcome, BACKEND_ERRORS):
            outcome = BrokerUnavailable(f"publish with history failed: {outcome}")
        if isinstance(outcome, Exception):
            return [outcome] * len(channels)
        return [
            Position(int(outcome[i]), outcome[i + 1].decode()) for i in range(0, len(outcome), 2)
        ]

    def _presence_keys(self, ch: str) -> list[str]:
        """The entries (hash), their expiry (zset) and each user's count (hash)."""
        return [f"{self._prefix}{kind}:{{{ch}}}" for kind in ("p", "pz", "pu")]

    async def presence_add(self, ch: str, entries: dict[str, bytes], ttl: float) -> None:
        args: list[bytes | str | int] = ["add", 0, max(1, round(ttl * 1000))]
        for client, info in entries.items():
            args += [client, info]
        try:
            await self._presence(keys=self._presence_keys(ch), args=args)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"presence update failed: {exc}") from exc

    async def put_value(self, key: str, data: bytes) -> None:
        try:
            await self._pub_client.set(f"{self._prefix}v:{key}", data)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"storing {key} failed: {exc}") from exc

    async def get_value(self, key: str) -> bytes | None:
        try:
            value = await self._pub_client.get(f"{self._prefix}v:{key}")
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"reading {key} failed: {exc}") from exc
        return value.encode() if isinstance(value, str) else value

    def _expiring_key(self, key: str) -> str:
        return f"{self._prefix}z:{key}"

    async def expiring_add_many(self, key: str, members: Mapping[str, float]) -> None:
        if not members:
            return
        try:
            await self._pub_client.zadd(self._expiring_key(key), dict(members))
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"updating {key} failed: {exc}") from exc

    async def expiring_remove(self, key: str, member: str) -> None:
        try:
            await self._pub_client.zrem(self._expiring_key(key), member)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"updating {key} failed: {exc}") from exc

    async def expiring_members(self, key: str, now: float) -> dict[str, float]:
        try:
            flat = await self._expiring_read(keys=[self._expiring_key(key)], args=[repr(now)])
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"reading {key} failed: {exc}") from exc
        live: dict[str, float] = {}
        for i in range(0, len(flat), 2):
            member, until = flat[i], float(flat[i + 1])
            if until > now:
                live[member.decode() if isinstance(member, bytes) else str(member)] = until
        return live

    async def expiring_members_from(self, key: str, until: float) -> dict[str, float]:
        try:
            rows = await self._pub_client.zrangebyscore(
                self._expiring_key(key), until, "+inf", withscores=True
            )
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"reading {key} failed: {exc}") from exc
        return {
            (row[0].decode() if isinstance(row[0], bytes) else str(row[0])): float(row[1])
            for row in rows
        }

    async def presence_remove(self, ch: str, clients: list[str]) -> None:
        if not clients:
            return
        try:
            await self._presence(keys=self._presence_keys(ch), args=["remove", 0, *clients])
        except BACKEND_ERRORS as exc:
            log.debug("presence removal on %s failed (%s); the entries expire", ch, exc)

    async def presence(self, ch: str) -> dict[str, bytes]:
        flat = await self._presence_op(ch, "read")
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    async def presence_stats(self, ch: str) -> tuple[int, int]:
        clients, users = await self._presence_op(ch, "stats")
        return int(clients), int(users)

    async def _presence_op(self, ch: str, op: str) -> Any:
        try:
            return await self._presence(keys=self._presence_keys(ch), args=[op, 0])
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"presence read failed: {exc}") from exc

    def _events_keys(self, node: str | None = None) -> list[str]:
        """The event stream, the nodes' marks, and ``node``'s live connections."""
        keys = [f"{self._prefix}events", f"{self._prefix}events:nodes"]
        return keys if node is None else [*keys, f"{self._prefix}events:node:{node}"]

    async def append_events(self, node: str, batch: EventBatch, ttl: float, maxlen: int) -> bool:
        args: list[bytes | str | int] = [node, max(1, round(ttl * 1000)), maxlen, len(batch.events)]
        args += batch.events
        args.append(len(batch.opened))
        for client, event in batch.opened.items():
            args += [client, event]
        args += batch.closed
        try:
            absent = await self._events_append(keys=self._events_keys(node), args=args)
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"appending events failed: {exc}") from exc
        return bool(absent)

    async def lost_nodes(self) -> list[str]:
        try:
            nodes = await self._events_lost(keys=self._events_keys()[1:], args=[LOST_NODES_LIMIT])
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"reading lost nodes failed: {exc}") from exc
        return [node.decode() for node in nodes]

    async def claim_node(self, node: str, maxlen: int, limit: int) -> tuple[list[bytes], bool]:
        try:
            events, done = await self._events_claim(
                keys=self._events_keys(node), args=[node, maxlen, limit]
            )
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"claiming node {node} failed: {exc}") from exc
        return list(events), bool(done)

    async def forget_node(self, node: str) -> None:
        _, nodes, live = self._events_keys(node)
        try:
            async with self._pub_client.pipeline(transaction=True) as pipe:
                pipe.zrem(nodes, node)
                pipe.delete(live)
                await pipe.execute()
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"forgetting node {node} failed: {exc}") from exc

    async def read_events(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        try:
            rows: list[tuple[bytes, dict[bytes, bytes]]] = await self._pub_client.xrange(
                self._events_keys()[0], f"({after}", "+", limit
            )  # type: ignore[assignment]  # redis-py types every reply as bytes | str
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"reading events failed: {exc}") from exc
        return [(id.decode(), fields[b"event"]) for id, fields in rows]

    async def history(self, ch: str, after: int, limit: int) -> tuple[list[Entry], Position | None]:
        try:
            top, rows = await self._read_history(
                self._history_keys(ch), unique_hex(8), f"{after + 1}-0", limit
            )
        except BACKEND_ERRORS as exc:
            raise BrokerUnavailable(f"history read failed: {exc}") from exc
        if not top:
            return [], None
        position = Position(int(top[1]), top[0].decode())
        entries: list[Entry] = []
        for id, data in rows:
            offset = _offset(id)
            if data is None or offset is None or offset > position.offset:
                # Not a publication: no field d, an id of a backend's own (past the
                # top, from XADD *: the next publication starts the history again,
                # publish_with_history.lua), or one beside a publication's offset.
                self._fault("malformed")
                _dropped.warning(
                    "dropped a history entry %r on %r not written by a publication", id, ch
                )
                continue
            entries.append((offset, data))
        return entries, position

    async def _read_history(
        self, keys: list[str], fresh: str, start: str, limit: int
    ) -> tuple[list[Any], list[tuple[bytes, bytes | None]]]:
        """Where the history stands (``[]`` or epoch and offset) and its rows from
        ``start``, at once: each row's id and its field ``d`` (None if it has none)."""
        client = self._pub_client
        assert isinstance(client, aioredis.Redis)
        for attempt in (1, 2):
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.evalsha(self._history_top.sha, len(keys), *keys, fresh)
                    pipe.xrange(keys[0], start, "+", count=limit)
                    top, rows = await pipe.execute()
                return top, [(id, fields.get(b"d")) for id, fields in rows]
            except NoScriptError:  # Redis restarted or flushed its scripts: load it again
                if attempt == 2:
                    raise
                await client.script_load(self.history_top)
            except (OutOfMemoryError, ExecAbortError):
                # Past maxmemory Redis refuses whatever is queued in a MULTI, reads too,
                # and every `sub` of a history channel failed: one script reads instead.
                return await self._read_history_scripted(keys, fresh, start, limit)
        raise AssertionError("unreachable")

    async def _read_history_scripted(
        self, keys: list[str], fresh: str, start: str, limit: int
    ) -> tuple[list[Any], list[tuple[bytes, bytes | None]]]:
        """`_read_history` in one script (`HISTORY_READ`): entries come as ``[id, ['d', data]]``."""
        reply = await self._history_read(keys=keys, args=[fresh, start, limit])
        if not reply:
            return [], []
        return reply[:2], [(id, _field_d(fields)) for id, fields in reply[2]]

    # -- reader ------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            pubsub = self._sub_client.pubsub()
            try:
                keys = [self._control, *(self._channel_key(c) for c in self._channels)]
                await pubsub.subscribe(*keys)
                self._pubsub = pubsub
                live = _Liveness()
                while True:
                    message = await self._next_message(pubsub, live)
                    if message is not None:
                        if self._dispatch(message):
                            attempt = 0
            except asyncio.CancelledError:
                self._set_connected(False)
                await self._drop(pubsub)
                raise
            except Exception as exc:  # the reader survives anything (base.py)
                self._set_connected(False)
                self._fail_confirmations()
                delay = self._backoff.delay(attempt)
                attempt += 1
                if isinstance(exc, BACKEND_ERRORS):
                    log.warning("Redis pub/sub connection lost (%s); retrying in %.2fs", exc, delay)
                else:
                    self._fault("reader")
                    log.exception("Redis pub/sub reader failed; restarting in %.2fs", delay)
                await self._drop(pubsub)
                await asyncio.sleep(delay)

    async def _next_message(self, pubsub: PubSub, live: _Liveness) -> dict[str, Any] | None:
        """The link's next message (None: none yet), pinging it when it is quiet.

        Raises `LinkStalled` when nothing, not even the pong, came back within
        the health timeout of a ping.
        """
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Asked to stop, but the cancellation was lost: on Python 3.11 a read
            # timeout expiring as cancel() comes can turn it into a TimeoutError,
            # which redis-py reads as "no message yet". Stop all the same.
            raise asyncio.CancelledError
        interval, timeout = self._health
        if interval <= 0:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=None)
            return message
        loop = asyncio.get_running_loop()
        message = await pubsub.get_message(timeout=interval if live.pinged is None else timeout)
        now = loop.time()
        if message is not None:
            live.heard, live.pinged = now, None
            return message
        if live.pinged is not None:
            if now - live.pinged >= timeout:
                raise LinkStalled(f"no answer to PING within {timeout:.1f}s")
        elif now - live.heard >= interval:
            await pubsub.ping()
            live.pinged = now
        return None

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Handle one pub/sub message; True when it proves the link is up."""
        kind = message["type"]
        channel: bytes = message["channel"]
        if kind == "message":
            self._deliver(channel, message["data"])
            return False
        if kind == "subscribe":
            if channel == self._control:
                self._set_connected(True)
                return True
            self._confirmed(channel)
        return False

    def _deliver(self, channel: bytes, data: bytes) -> None:
        """Hand one publication to the handler; never raises (one bad message is dropped)."""
        handler = self._handler
        ch = self._channel_of(channel)
        if handler is None or ch is None:
            return
        position = None
        if data[:1] == _HISTORY_MARK:
            try:
                offset, epoch, data = data[1:].split(b" ", 2)
                position = Position(int(offset), epoch.decode())
            except ValueError:  # also UnicodeDecodeError
                self._fault("malformed")
                _dropped.warning("dropped a malformed history publication on %r", ch)
                return
        try:
            handler(ch, data, position)
        except Exception:
            self._fault("handler")
            _dropped.warning("publication handler failed on %r", ch, exc_info=True)

    def _fault(self, kind: str) -> None:
        if self.on_fault is not None:
            self.on_fault(kind)

    def _confirmed(self, channel: bytes) -> None:
        for waiter in self._confirm.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _set_connected(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            if self.reconnects or self._first_connect.is_set():
                log.info("Redis pub/sub reconnected; %d channels resubscribed", len(self._channels))
            self._first_connect.set()
        else:
            self._pubsub = None
            self.reconnects += 1
        if self._on_state is not None:
            self._on_state(up)

    def _fail_confirmations(self, keys: Iterable[bytes] | None = None) -> None:
        """Fail the subscriptions waiting for a confirmation (on ``keys``, or all)."""
        if keys is None:
            confirm, self._confirm = self._confirm, {}
        else:
            confirm = {key: self._confirm.pop(key) for key in keys if key in self._confirm}
        for waiters in confirm.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("Redis connection lost"))
                    waiter.exception()  # retrieved: the subscriber reports it

    @staticmethod
    async def _drop(pubsub: PubSub) -> None:
        with contextlib.suppress(*BACKEND_ERRORS):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _offset(entry_id: bytes) -> int | None:
    """The offset of a history entry's id as the script writes it (``<offset>-1``), or
    None for another id (a backend's own entry, which would repeat an offset)."""
    offset, dash, seq = entry_id.partition(b"-")
    return int(offset) if dash and seq == b"1" and offset.isdigit() else None


def _field_d(fields: list[bytes]) -> bytes | None:
    """Field ``d`` of a stream entry's ``[name, value, ...]`` (as a script returns it), or None."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"d":
            return fields[i + 1]
    return None
