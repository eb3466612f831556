"""One pipelined Redis connection for the broker's publishing commands.

A write's change events are two ``EVALSHA``s; through redis-py each batch of
them took a pooled connection, built command objects, packed them, went
through the retry wrapper and parsed the replies in Python (about a quarter
of the gateway's CPU per POST). A `RespLink` does only what publishing
needs: it packs a batch with hiredis (in C), writes it on one connection
and hands the replies, parsed by hiredis, back in order. Batches do not
wait for each other: Redis answers a connection's commands in order, so
several can be in flight on it at once.

What it keeps from the pool it replaces: the connection opens on first use
and again after it is lost (``AUTH`` and ``SELECT`` from the URL); a batch
whose connection is lost before its replies come is sent once more on a new
one, as redis-py's one retry did (after a Redis restart the first write meets
the closed socket; what ran before the loss runs again, so the broker's
history scripts carry an id that makes a second run answer the first one's
position); replies are awaited for ``timeout`` seconds at most (one
timer per connection, not per batch), after which the connection is dropped
and every batch on it fails, not retried. An error reply fails its command
alone; ``NOSCRIPT`` comes as redis-py's `NoScriptError`, which makes the
broker load its script again.

Plain TCP and Unix sockets only; a TLS URL keeps redis-py (`RedisBroker`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

__all__ = ["RespLink", "link_for", "refused_by_replica"]

#: A command's words: what hiredis packs.
Command = Sequence[bytes | str | int]

#: hiredis's packer (its stub types the argument as a 1-tuple, though it takes any tuple).
_pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


def link_for(
    kind: type,
    kwargs: dict[str, Any],
    timeout: float,
    on_replica: Callable[[], object] | None = None,
) -> RespLink | None:
    """A link to where a redis-py pool's connections go (its ``connection_class``
    and ``connection_kwargs``); None for one it does not speak (TLS).
    ``on_replica``: as for `RespLink`."""
    address: str | tuple[str, int]
    if kind is UnixDomainSocketConnection:
        address = str(kwargs["path"])
    elif kind is Connection:
        address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))
    else:
        return None
    return RespLink(
        address,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db") or 0),
        timeout=timeout,
        on_replica=on_replica,
    )


class _Batch:
    __slots__ = ("count", "replies", "sent", "waiter")

    def __init__(self, count: int, sent: float, waiter: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.sent = sent
        self.waiter = waiter


class _Protocol(asyncio.Protocol):
    """Replies in order to the batches that wait for them.

    One timer per connection, not one per batch, watches that the oldest batch
    waits less than ``timeout`` seconds (replies come in order, so the oldest
    is the one that waited longest).
    """

    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        #: Each batch on the wire, oldest first.
        self.waiting: collections.deque[_Batch] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._watch: asyncio.TimerHandle | None = None

    def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write ``data`` (``count`` commands); the future of their replies."""
        assert self.transport is not None
        waiter: asyncio.Future[list[Any]] = self._loop.create_future()
        self.waiting.append(_Batch(count, self._loop.time(), waiter))
        self.transport.write(data)
        if self._watch is None:
            self._watch = self._loop.call_later(self.timeout, self._check)
        return waiter

    def _check(self) -> None:
        self._watch = None
        if not self.waiting:
            return
        waited = self._loop.time() - self.waiting[0].sent
        if waited >= self.timeout:
            self.fail(TimeoutError(f"Redis answered nothing in {self.timeout:.1f}s"))
        else:
            self._watch = self._loop.call_later(self.timeout - waited, self._check)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while waiting:
            batch = waiting[0]
            replies = batch.replies
            while len(replies) < batch.count:
                try:
                    reply = self.reader.gets()
                except hiredis.ProtocolError as exc:
                    self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                    return
                if reply is False:
                    return
                replies.append(reply)
            waiting.popleft()
            if not batch.waiter.done():  # its caller may have gone (cancelled)
                batch.waiter.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Connection closed by server ({exc or 'EOF'})"))

    def fail(self, exc: Exception) -> None:
        """Drop the connection; every batch on it fails with ``exc``."""
        self.lost = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            waiter = self.waiting.popleft().waiter
            if not waiter.done():
                waiter.set_exception(exc)


class RespLink:
    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 5.0,
        on_replica: Callable[[], object] | None = None,
    ) -> None:
        """``address``: a Unix socket's path or (host, port); ``timeout``: seconds for a
        connection to open and for a batch's replies; ``on_replica``: called when Redis
        refused a write as a replica does (READONLY: a failover demoted it)."""
        self._address = address
        self._hello: list[Command] = []
        if password:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._timeout = timeout
        self._on_replica = on_replica
        self._protocol: _Protocol | None = None
        self._opening = asyncio.Lock()
        self.connects = 0  # for tests: connections opened

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply (an error reply: its exception), in order.

        Raises `redis.exceptions.ConnectionError` (or `TimeoutError`) when
        the connection was lost or answered nothing in time: then any of
        ``commands`` may or may not have run.
        """
        try:
            protocol, replies = await self._send(commands)
        except RedisConnectionError:  # once more, on a new connection (not after a timeout)
            protocol, replies = await self._send(commands)
        refused = [i for i, reply in enumerate(replies) if refused_by_replica(reply)]
        if refused:
            replies = await self._moved(protocol, commands, replies, refused)
        return [_raised(reply) if isinstance(reply, ResponseError) else reply for reply in replies]

    async def _moved(
        self,
        protocol: _Protocol,
        commands: Sequence[Command],
        replies: list[Any],
        refused: list[int],
    ) -> list[Any]:
        """The replies once the commands a replica refused (``refused``) ran again.

        A failover demotes the primary without closing its connections (and
        moves its name to the new one): every write on them is refused, for
        good. Those commands did not run, so they are sent again once, on a
        new connection, which goes where the name points now (``protocol``, the
        connection that refused them, is dropped unless another batch did it).
        """
        if not protocol.lost:
            protocol.fail(RedisConnectionError("Redis became a replica"))
        if self._on_replica is not None:
            self._on_replica()
        _, again = await self._send([commands[i] for i in refused])
        replies = list(replies)
        for i, reply in zip(refused, again, strict=True):
            replies[i] = reply
        return replies

    async def _send(
        self, commands: Sequence[Command], protocol: _Protocol | None = None
    ) -> tuple[_Protocol, list[Any]]:
        """The connection ``commands`` went on, and their replies."""
        if protocol is None:
            protocol = self._protocol
            if protocol is None or protocol.lost:
                protocol = await self._open()
        transport = protocol.transport
        if transport is None or transport.is_closing():
            protocol.fail(RedisConnectionError("Redis connection lost"))
            raise RedisConnectionError("Redis connection lost")
        data = b"".join([_pack(c if type(c) is tuple else tuple(c)) for c in commands])
        return protocol, await protocol.send(data, len(commands))

    async def _open(self) -> _Protocol:
        """The connection, opened once however many batches ask for it at the same time."""
        async with self._opening:
            protocol = self._protocol
            if protocol is None or protocol.lost:
                protocol = self._protocol = await self._connect()
            return protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                make = functools.partial(_Protocol, self._timeout)
                if isinstance(self._address, str):
                    _, protocol = await loop.create_unix_connection(make, self._address)
                else:
                    host, port = self._address
                    _, protocol = await loop.create_connection(make, host, port)
        except OSError as exc:
            raise RedisConnectionError(f"connecting to Redis failed: {exc}") from exc
        self.connects += 1
        if self._hello:
            _, replies = await self._send(self._hello, protocol)
            for reply in replies:
                if isinstance(reply, ResponseError):
                    protocol.fail(RedisConnectionError(f"Redis refused the connection: {reply}"))
                    raise reply
        return protocol

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(RedisConnectionError("closed"))


def _raised(error: ResponseError) -> ResponseError:
    """redis-py's class for an error reply (hiredis made it a plain `ResponseError`)."""
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if refused_by_replica(error):
        return ReadOnlyError(message)
    return error


#: What a replica answers to a write (READONLY ...), however it is wrapped.
_REPLICA_REFUSAL = "You can't write against a read only"


def refused_by_replica(reply: object) -> bool:
    """Whether ``reply`` is a replica's refusal of a write: READONLY, or (Redis 6) the
    error of a script whose write was refused, which wraps it (``ERR Error running
    script ... -READONLY You can't write ...``)."""
    return isinstance(reply, ResponseError) and _REPLICA_REFUSAL in str(reply)
