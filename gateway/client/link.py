"""`Connection`: one gateway connection that stays up, under `gateway.client.Client`.

It owns the socket, the commands in flight and the subscriptions' routing;
`Client` adds the commands (``subscribe``, ``rpc``…) on top.

Lifecycle (the legal transitions are the table `TRANSITIONS`):

* ``IDLE``: made, not connected. ``connect()`` (or ``async with``) starts it.
* ``CONNECTING``: the first connection. Refusals that may pass (503 while a
  gateway drains, 429, an unreachable host) are retried with backoff until
  ``open_timeout``; anything else raises from ``connect()``.
* ``OPEN``: commands run. Subscriptions receive their events.
* ``RECONNECTING``: the socket closed with a code that `should_reconnect`
  allows. After a backoff delay (full jitter) the client connects again,
  refreshing the token first on 4002 or a 401, and resubscribes every
  channel with ``since`` = its last position, so history channels replay
  what was missed; where that is not possible the subscription gets a `Gap`.
  Commands wait for ``OPEN`` within their timeout.
* ``CLOSED``: terminal, after ``close()`` or a close code that must not be
  retried (4500-4999, 1009…). Commands raise `ConnectionClosed`;
  subscriptions end (or raise it, when the gateway ended the connection).

Any other transition is a bug here and raises `StateError`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Final, Self

import msgspec
from tornado.httpclient import AsyncHTTPClient

from core.infra.backoff import Backoff
from gateway.client.encoding import ENCODINGS, ServerFrame
from gateway.client.exceptions import (
    ClientError,
    ConnectionClosed,
    HandshakeError,
    ReplyError,
    SubscriptionEnded,
)
from gateway.client.polling import LongPoll, http_base, open_longpoll
from gateway.client.subscription import Gap, GapReason, Publication, Subscription
from gateway.client.transport import Closed, WebSocket, open_websocket
from proto import (
    CloseCode,
    Command,
    ErrorCode,
    Expiring,
    History,
    Join,
    Leave,
    Ping,
    Position,
    Push,
    Refresh,
    Reply,
    Sub,
    Subscribed,
    Unsubscribed,
    should_reconnect,
)
from proto import Gap as GapPush

#: What carries the frames: a socket, or the long-poll fallback.
Link = WebSocket | LongPoll

__all__ = ["TRANSITIONS", "Connection", "State", "StateError", "TokenSource", "position_of"]

#: Tries at one resubscription refused with a temporary error, before it ends.
RESUBSCRIBE_ATTEMPTS: Final = 5
log = logging.getLogger("gateway.client")

TokenSource = Callable[[], Awaitable[str]]
DEFAULT_BACKOFF: Final = Backoff()


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.IDLE: frozenset({State.CONNECTING, State.CLOSED}),
    State.CONNECTING: frozenset({State.OPEN, State.CLOSED}),
    State.OPEN: frozenset({State.RECONNECTING, State.CLOSED}),
    State.RECONNECTING: frozenset({State.OPEN, State.CLOSED}),
    State.CLOSED: frozenset(),
}


class StateError(RuntimeError):
    """An illegal lifecycle transition was requested."""


class Connection:
    """The connection machinery of a `Client` (see the module docstring).

    ``token`` is sent as ``Authorization: Bearer``; ``get_token`` (an async
    callable) gives a fresh one when the gateway announces expiry
    (``expiring``: refreshed in band, the socket stays), after a 4002 close,
    or when a reconnect is refused with 401. ``encoding`` is ``"json"`` or
    ``"msgpack"`` (the ``gw.v1.*`` subprotocols). Commands fail with
    `TimeoutError` after ``request_timeout`` seconds. Every ``ping_interval``
    seconds an app-level ``ping`` proves the gateway alive; no reply within
    ``ping_timeout`` drops the socket and reconnects. ``compression``
    offers permessage-deflate (a gateway with ``COMPRESSION=on`` accepts it;
    gateway/client/transport.py). ``on_subscribed`` is
    called with each `Subscription` the server made (the server API's
    ``subscribe``, a ``subscribed`` push): it is kept, recovered after a
    reconnect and ended like one of the client's own. A connect hook's
    channels come back by themselves on a new connection: what was missed
    meanwhile is read from history. ``headers`` go with every opening
    request (a ``Cookie``, for a connect hook that admits by session).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        encoding: str = "json",
        request_timeout: float = 10.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 10.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_queue: int = 1024,
        max_size: int = 2**24,
        ssl: ssl.SSLContext | None = None,
        compression: bool = True,
        transports: tuple[str, ...] = ("websocket", "longpoll"),
        on_subscribed: Callable[[Subscription], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}")
        self.url = url
        self.encoding = ENCODINGS[encoding]
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff = backoff
        self.max_queue = max_queue
        self.max_size = max_size
        self.ssl = ssl
        self.compression = compression
        #: Headers sent with each opening request (a ``Cookie`` for a gateway whose
        #: connect hook admits clients by their session).
        self.headers = dict(headers or {})
        #: ``longpoll`` after WebSocket failed where plain HTTP works (JSON only).
        self.transports = transports if encoding == "json" else ("websocket",)
        self.transport = "websocket"
        self._ws_failures = 0
        self.state = State.IDLE
        #: How many times a socket was opened (1 + reconnects).
        self.connections = 0
        self._token = token
        self._get_token = get_token
        self._ws: Link | None = None
        self._ids = itertools.count(1)
        # Each command in flight: its future, and what to do with a success
        # before anything received after it (a `sub` reply and its pushes).
        self._pending: dict[int, tuple[asyncio.Future[Reply], Callable[[Reply], None] | None]] = {}
        self._subs: dict[str, Subscription] = {}
        self.on_subscribed = on_subscribed
        self._full: set[Subscription] = set()
        self._odd_frames = 0  # frames of the current connection the client could not use
        self._ready = asyncio.Event()  # OPEN and resubscribed, or CLOSED
        self._stopped: ConnectionClosed | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[ConnectionClosed] | None = None

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise StateError(f"illegal transition {self.state.value} -> {new.value}")
        log.debug("client %s -> %s", self.state.value, new.value)
        self.state = new

    async def connect(self) -> None:
        """Open the first connection; raises what refused it."""
        self._transition(State.CONNECTING)
        self._done = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.open_timeout):
                ws = await self._dial(first=True)
        except BaseException as exc:
            self._stop(ConnectionClosed(1006, f"could not connect: {exc}"))
            raise
        self._opened(ws)
        self._ready.set()
        self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Close the socket (1000) and end every subscription; idempotent."""
        if self.state is State.CLOSED:
            return
        ws = self._ws
        self._stop(ConnectionClosed(CloseCode.NORMAL, "closed by the client"), graceful=True)
        if ws is not None:
            await ws.close(CloseCode.NORMAL)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the client stops for good; returns why (its close code)."""
        if self._done is None:
            raise StateError("the client was never connected")
        return await asyncio.shield(self._done)

    def _stop(self, why: ConnectionClosed, graceful: bool = False) -> None:
        if self.state is State.CLOSED:
            return
        self._transition(State.CLOSED)
        self._stopped = why
        for task in [*self._tasks, *([self._runner] if self._runner else [])]:
            if task is not asyncio.current_task():
                task.cancel()
        self._fail_pending(why)
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.end(None if graceful else why)
        self._ready.set()
        if self._done is not None and not self._done.done():
            self._done.set_result(why)
        if not graceful and self._ws is not None:
            self._ws.abort()

    def _opened(self, ws: Link) -> None:
        self._ws = ws
        self._odd_frames = 0
        self.connections += 1
        self._transition(State.OPEN)
        ws.closed.add_done_callback(lambda closed: self._lost(ws, closed))
        if self._full:
            ws.pause_reading()
        if self.ping_interval:
            self._spawn(self._heartbeat(ws, self.ping_interval))

    async def _dial(self, first: bool) -> Link:
        """A new socket, retrying what may pass with backoff (forever unless ``first``'s timeout)."""
        attempt = 0
        refreshed = False
        retry_after: float | None = None
        while True:
            if attempt or not first:
                await asyncio.sleep(self.backoff.delay(attempt, retry_after))
            attempt += 1
            if self.transport == "longpoll":
                try:
                    async with asyncio.timeout(self.open_timeout):
                        return await open_longpoll(
                            self.url, self._token, self._on_message, self.headers
                        )
                except HandshakeError as exc:
                    if not exc.retryable:
                        raise
                    retry_after = exc.retry_after
                except (OSError, TimeoutError) as exc:
                    retry_after = None
                    log.info("cannot reach the gateway (%s), retrying", exc)
                continue
            try:
                async with asyncio.timeout(self.open_timeout):
                    return await open_websocket(
                        self.url, token=self._token, subprotocols=(self.encoding.name,),
                        on_message=self._on_message, max_size=self.max_size, ssl=self.ssl,
                        compression=self.compression, headers=self.headers,
                    )  # fmt: skip
            except HandshakeError as exc:
                if exc.status == 401 and self._get_token is not None and not refreshed:
                    self._token = await self._get_token()
                    refreshed, attempt = True, 0
                    continue
                if not exc.retryable:
                    raise
                retry_after = exc.retry_after
                log.info("gateway refused the connection (%s), retrying", exc)
            except (OSError, TimeoutError) as exc:
                retry_after = None
                log.info("cannot reach the gateway (%s), retrying", exc)
                await self._maybe_fall_back()

    async def _maybe_fall_back(self) -> None:
        """After two failed upgrades to a gateway that answers plain HTTP, use long-poll."""
        if "longpoll" not in self.transports or not await self._http_answers():
            return
        self._ws_failures += 1
        if self._ws_failures >= 2:
            log.warning("WebSocket fails where HTTP works: falling back to long-poll")
            self.transport = "longpoll"

    async def _http_answers(self) -> bool:
        """Whether the gateway answers plain HTTP; False, not an error, when it is down too."""
        http = AsyncHTTPClient(force_instance=True)
        try:
            resp = await http.fetch(f"{http_base(self.url)}/healthz", raise_error=False,
                                    request_timeout=2.0)  # fmt: skip
        except OSError:  # Tornado raises network errors whatever raise_error says
            return False
        finally:
            http.close()
        return resp.code == 200

    async def _run(self) -> None:
        """Watch the socket; reconnect and resubscribe while the close codes allow."""
        while True:
            assert self._ws is not None
            closed = await asyncio.shield(self._ws.closed)
            if self.state is State.CLOSED:
                return
            why = ConnectionClosed(closed.code, closed.reason)
            self._ready.clear()
            self._fail_pending(why)
            for task in list(self._tasks):
                task.cancel()
            if not should_reconnect(closed.code):
                log.warning(
                    "the gateway closed the connection with %d: not reconnecting", closed.code
                )
                self._stop(why)
                return
            self._transition(State.RECONNECTING)
            log.info("connection closed with %d, reconnecting", closed.code)
            try:
                if closed.code == CloseCode.TOKEN_EXPIRED and self._get_token is not None:
                    self._token = await self._get_token()
                ws = await self._dial(first=False)
            except ClientError as exc:
                log.warning("reconnect refused: %s", exc)
                code = why.code if not isinstance(exc, ConnectionClosed) else exc.code
                self._stop(ConnectionClosed(code, str(exc)))
                return
            except Exception as exc:  # get_token failed: nothing left to retry with
                log.exception("reconnect failed")
                self._stop(ConnectionClosed(why.code, f"reconnect failed: {exc!r}"))
                return
            self._opened(ws)
            await self._resubscribe(ws)
            if not ws.closed.done():
                self._ready.set()

    async def _resubscribe(self, ws: Link) -> None:
        async def ask(sub: Subscription, since: Position | None) -> None:
            await self._call(
                ws,
                lambda id: Sub(id=id, ch=sub.channel, since=since),
                lambda r: sub.subscribed(since, r.recovered, position_of(r), again=True),
            )

        async def one(sub: Subscription) -> None:
            for attempt in range(RESUBSCRIBE_ATTEMPTS):
                try:
                    await ask(sub, sub.position)
                    return
                except ReplyError as exc:
                    if exc.code == ErrorCode.ALREADY_SUBSCRIBED:
                        # The server made it again on this connection (a connect hook's
                        # channel): its `subscribed` push came first, and said where it stands.
                        return
                    if exc.temporary and attempt + 1 < RESUBSCRIBE_ATTEMPTS:
                        # Never a silently dead channel: ask again, with backoff.
                        await asyncio.sleep(self.backoff.delay(attempt))
                        if self._subs.get(sub.channel) is not sub:
                            return
                        continue
                    if self._subs.get(sub.channel) is sub:
                        del self._subs[sub.channel]
                    sub.end(exc)
                    return
                except (ConnectionClosed, TimeoutError):
                    return  # the next round of _run resubscribes

        subs = [sub for sub in self._subs.values() if sub.confirmed]  # others are on their way
        try:
            async with asyncio.timeout(self.request_timeout):
                await asyncio.gather(*(one(sub) for sub in subs))
        except TimeoutError:
            ws.abort()

    def _lost(self, ws: Link, closed: asyncio.Future[Closed]) -> None:
        """``ws`` closed: no command in flight on it will be answered. Failed at once, so
        that a resubscription waiting for its replies (`_run` is then in `_resubscribe`,
        not watching ``closed``) gives way to the next reconnect, not `request_timeout`."""
        if self._ws is ws and not closed.cancelled():
            self._fail_pending(ConnectionClosed(*closed.result()))

    def _fail_pending(self, why: ConnectionClosed) -> None:
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(why)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self, ws: Link, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(self.ping_timeout):
                    await self._call(ws, lambda id: Ping(id=id))
            except TimeoutError:
                log.warning("no reply to ping within %.1fs: reconnecting", self.ping_timeout)
                ws.abort()
                return
            except ClientError:
                return

    # -- requests ----------------------------------------------------------

    async def _request(
        self, make: Callable[[int], Command], on_ok: Callable[[Reply], None] | None = None
    ) -> Reply:
        async with asyncio.timeout(self.request_timeout):
            while not self._ready.is_set() or self.state is not State.OPEN:
                if self.state is State.CLOSED:
                    raise self._stopped or ConnectionClosed(CloseCode.NORMAL, "closed")
                if self.state is State.IDLE:
                    raise StateError("connect() first")
                await self._ready.wait()
            assert self._ws is not None
            return await self._call(self._ws, make, on_ok)

    async def _call(
        self,
        ws: Link,
        make: Callable[[int], Command],
        on_ok: Callable[[Reply], None] | None = None,
    ) -> Reply:
        """Send one command on ``ws``; its reply, or `ReplyError`.

        ``on_ok`` runs as the successful reply is read, before the frames after it.
        """
        cid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = (fut, on_ok)
        try:
            await ws.send(self.encoding.command(make(cid)), self.encoding.binary)
            reply = await fut
        finally:
            self._pending.pop(cid, None)
        if not reply.ok:
            raise ReplyError.from_body(reply.error)
        return reply

    async def refresh(self, token: str) -> None:
        """Continue this connection under ``token`` (same subject); used after reconnects too."""
        await self._request(lambda id: Refresh(id=id, token=token))
        self._token = token

    # -- frames in ---------------------------------------------------------

    def _on_message(self, payload: bytes | str) -> None:
        try:
            frame: ServerFrame = self.encoding.decode(payload)
        except msgspec.DecodeError as exc:
            self._odd("undecodable frame from the gateway: %s", exc)
            return
        if type(frame) is Push:
            sub = self._subs.get(frame.ch)
            if sub is not None:
                sub.publication(Publication(frame.ch, frame.data, frame.offset, frame.epoch))
                if sub.overheld and self._ws is not None:
                    # As the gateway does with its own held ones (4001): the next
                    # connection recovers from sub.position, whatever was held goes.
                    log.warning("a repair of %s fell %d live publications behind: reconnecting",
                                sub.channel, self.max_queue)  # fmt: skip
                    sub.discard_held()
                    self._ws.abort()
        elif isinstance(frame, Reply):
            pending = self._pending.get(frame.id) if frame.id is not None else None
            if pending is not None and not pending[0].done():
                fut, on_ok = pending
                if on_ok is not None and frame.ok:
                    on_ok(frame)
                fut.set_result(frame)
            elif frame.error is not None:
                self._odd("error reply to no pending command: %s", frame.error.message)
        elif isinstance(frame, Join | Leave):
            sub = self._subs.get(frame.ch)
            if sub is not None:
                sub.put(frame)
        elif isinstance(frame, GapPush):
            sub = self._subs.get(frame.ch)
            if sub is not None and sub.position is None:
                sub.put(Gap(frame.ch, "broker", None))
            elif sub is not None and not sub.holding:  # a repair under way covers this one
                sub.hold()
                self._spawn(self._repair(sub))
        elif isinstance(frame, Subscribed):
            self._server_subscribed(frame)
        elif isinstance(frame, Unsubscribed):
            ended = self._subs.pop(frame.ch, None)
            if ended is not None:
                ended.end(SubscriptionEnded(frame.ch, frame.code, frame.message))
        elif isinstance(frame, Expiring):
            if self._get_token is not None:
                self._spawn(self._refresh_token())
            else:
                log.warning("the token expires at %d and no get_token was given", frame.exp)

    def _odd(self, message: str, *args: object) -> None:
        """A frame the client cannot use: one WARNING per connection, DEBUG after it
        (a faulty gateway may send thousands)."""
        self._odd_frames += 1
        if self._odd_frames == 1:
            log.warning(message + " (more on this connection are logged at DEBUG)", *args)
        else:
            log.debug(message, *args)

    def subscription(self, channel: str) -> Subscription | None:
        """The live subscription to ``channel`` (the client's, or one the server made)."""
        return self._subs.get(channel)

    def _server_subscribed(self, frame: Subscribed) -> None:
        """The server subscribed this connection: a subscription like the client's own."""
        now = None
        if frame.offset is not None and frame.epoch is not None:
            now = Position(offset=frame.offset, epoch=frame.epoch)
        kept = self._subs.get(frame.ch)
        if kept is not None:
            self._server_resubscribed(kept, now)
            return
        sub = Subscription(
            frame.ch,
            now,
            max_queue=self.max_queue,
            pause=self._pause,
            resume=self._resume,
            unsubscribe=self.unsubscribe,
            unread=True,  # the application may not know of it: it must not stop the socket
        )
        sub.confirmed = True  # resubscribed with its position after a reconnect
        self._subs[frame.ch] = sub
        if self.on_subscribed is not None:
            try:
                self.on_subscribed(sub)
            except Exception:
                log.exception("on_subscribed failed for %s", frame.ch)

    def _server_resubscribed(self, sub: Subscription, now: Position | None) -> None:
        """A subscription kept across a reconnect, made again by the server (a connect hook's
        channel): what was published meanwhile is read from history, the live pushes held."""
        since = sub.position
        sub.confirmed = True
        if since is None or now is None:
            sub.subscribed(None, None, now, again=True)  # nothing to recover from: a gap
        elif now.epoch != since.epoch:
            sub.subscribed(since, False, now)  # the history was lost: a gap
        elif now.offset <= since.offset:
            sub.recovered = True  # nothing was missed
        else:
            sub.hold()
            self._spawn(self._repair(sub, "not_recovered"))

    async def unsubscribe(self, channel: str) -> None:
        """Leave ``channel``: `Client` has the commands."""
        raise NotImplementedError

    async def _repair(self, sub: Subscription, reason: GapReason = "broker") -> None:
        """Fill a ``gap`` from history: what was missed, in order, then the live pushes held.

        A `Gap` (with ``reason``) when history cannot: another epoch, or more missed than
        it keeps. ``sub.recovered`` says which.
        """
        try:
            while (since := sub.position) is not None:
                reply = await self._request(
                    lambda id: History(id=id, ch=sub.channel, since=since.offset, limit=100)
                )
                now, items = position_of(reply), reply.publications or []
                if (
                    now is None
                    or now.epoch != since.epoch
                    or (bool(items) and items[0].offset > since.offset + 1)
                    or (bool(items) and items[-1].offset <= since.offset)  # no progress
                ):
                    sub.position = now  # live ones continue after it (as after a `sub`)
                    sub.recovered = False
                    sub.put(Gap(sub.channel, reason, now))
                    return
                for item in items:
                    value = self.encoding.value(item.data)
                    sub.publication(
                        Publication(sub.channel, value, item.offset, now.epoch), live=False
                    )
                if not items or items[-1].offset >= now.offset:
                    sub.recovered = True
                    return
        except ConnectionClosed:
            # As when cancelled below: the next connection recovers from sub.position
            # (or the client stopped, and the subscription ended).
            sub.discard_held()
        except (ClientError, TimeoutError) as exc:
            log.warning("could not repair a gap on %s: %s", sub.channel, exc)
            sub.recovered = False
            sub.put(Gap(sub.channel, reason, sub.position))
        except asyncio.CancelledError:
            # The connection closed under the repair: the live pushes held come after
            # a hole; dropped, the next connection recovers from sub.position instead.
            sub.discard_held()
            raise
        finally:
            sub.release()

    async def _refresh_token(self) -> None:
        assert self._get_token is not None
        try:
            await self.refresh(await self._get_token())
        except Exception as exc:  # the gateway closes with 4002 later: reconnect refreshes again
            log.warning("token refresh failed: %s", exc)

    def _pause(self, sub: Subscription) -> None:
        self._full.add(sub)
        if self._ws is not None:
            self._ws.pause_reading()

    def _resume(self, sub: Subscription) -> None:
        self._full.discard(sub)
        if not self._full and self._ws is not None:
            self._ws.resume_reading()


def position_of(reply: Reply) -> Position | None:
    if reply.offset is None or reply.epoch is None:
        return None
    return Position(offset=reply.offset, epoch=reply.epoch)
