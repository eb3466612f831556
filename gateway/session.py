"""A client session: one authenticated connection, whatever its transport.

The transport hands the session every frame the client sent; the session
runs it through the protocol state (`proto.Connection`), executes the
command against the node, and sends the reply back through the transport.
It never raises into the transport: protocol errors become error replies,
a lost broker becomes a temporary ``UNAVAILABLE`` error, and anything else
is logged and becomes ``INTERNAL`` with no internals sent to the peer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Container, Coroutine, Mapping
from typing import Any, ClassVar, Protocol

from core.infra.broker import BrokerUnavailable
from core.infra.control import ConnectionInfo
from core.infra.identity import AuthError, Identity, principal
from core.infra.metrics import Metrics
from core.infra.rate import Rate
from core.infra.ratelimit import local_hit, local_spend
from core.infra.throttled import ThrottledLog
from core.request import Request, Response
from gateway.hub import Prepared
from gateway.node import Node
from gateway.recovery import MAX_HELD, history, subscribe_recovering
from proto import (
    Call,
    CloseCode,
    Codec,
    Command,
    Connection,
    ErrorCode,
    Expiring,
    Gap,
    History,
    InvalidData,
    Ping,
    Position,
    PresenceInfo,
    PresenceQuery,
    PresenceStats,
    ProtocolError,
    Pub,
    Refresh,
    Reply,
    Rpc,
    State,
    Sub,
    Subscribed,
    Unsub,
    Unsubscribed,
)

__all__ = ["Dispatch", "Session", "Transport", "Verify"]

log = logging.getLogger("gateway.session")
#: Commands the broker could not serve: a line a second, whatever the sockets' pace
#: (Redis past maxmemory refuses every publication with history, for as long as it lasts).
_unavailable = ThrottledLog(log)

#: Refusals by a rate limit have an allowance too: the rate's count per this
#: many of its periods. Past it the connection is closed with 4503.
REFUSALS_PERIODS = 10
#: A `presence` reply counts as one more command for each of this many
#: entries past its first: a big room's list costs what as many commands do.
PRESENCE_ENTRIES_PER_COMMAND = 100


class Transport(Protocol):
    """What a session needs from the I/O side."""

    #: ``websocket``, ``sse`` or ``longpoll`` (core.infra.metrics.TRANSPORTS)
    kind: ClassVar[str]

    def send(self, payload: bytes) -> None:
        """Queue one encoded reply; never blocks."""

    def deliver(self, prepared: Prepared, codec: Codec) -> None:
        """Queue one publication; never blocks nor touches the hub."""

    def disconnect(self, code: int, reason: str | None = None) -> None:
        """End the connection with a close code (idempotent); ``reason``: the code's own.

        ``code`` is a `CloseCode`, or one a hook's backend chose (4000-4999).
        """

    def heartbeat(self, now: float, dead_after: float) -> None:
        """Ping the peer, or drop it when nothing arrived for ``dead_after`` seconds."""


#: The REST core's entry point (`core.service.Core.dispatch`).
Dispatch = Callable[[Request], Awaitable[Response]]
#: Token verification (`core.infra.verify.Verifier.verify`); raises `AuthError`.
Verify = Callable[[str], Identity]

_clock: list[int] = [0]


def _second() -> int:
    """The Unix second now, one shared int per second (a socket's ``opened`` costs a slot)."""
    now = int(time.time())
    if now != _clock[0]:
        _clock[0] = now
    return _clock[0]


class Session:
    __slots__ = (
        "_commands_tat",
        "_publishes_tat",
        "_refused_tat",
        "client_id",
        "codec",
        "commands",
        "conn",
        "dispatch",
        "held",
        "identity",
        "metrics",
        "node",
        "opened",
        "publishes",
        "remote_ip",
        "server_held",
        "subscribing",
        "transport",
        "verify",
    )

    def __init__(
        self,
        transport: Transport,
        conn: Connection,
        identity: Identity,
        node: Node,
        metrics: Metrics,
        dispatch: Dispatch | None = None,
        verify: Verify | None = None,
        *,
        commands: Rate | None = None,
        publishes: Rate | None = None,
        remote_ip: str = "",
        client_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.codec = conn.codec
        self.identity = identity
        self.node = node
        self.metrics = metrics
        self.dispatch = dispatch
        self.verify = verify
        # The per-connection limits: the settings' rates, shared, and this
        # session's TATs as plain ints (no object per socket for the collector).
        self.commands = commands or None
        self.publishes = publishes or None
        self._commands_tat = self._publishes_tat = 0
        self._refused_tat = 0  # the refusals' own allowance, for the abuse close (`_refuse`)
        self.held: dict[str, list[Prepared]] | None = None  # channels being recovered
        #: Channels whose subscription is under way (a ``sub``, the server API's), so
        #: that no second one begins meanwhile; None while there is none.
        self.subscribing: set[str] | None = None
        #: Channels the server API subscribed this connection to (no refresh ends them).
        self.server_held: set[str] | None = None
        #: This connection, in presence (and to hooks, which named it before it opened).
        self.client_id = client_id if client_id is not None else secrets.token_hex(8)
        self.remote_ip = remote_ip  # the client's IP, for the core's per-IP limits (rpc)
        self.opened = _second()  # when, in Unix seconds (the server API lists it)

    @property
    def transport_kind(self) -> str:
        return self.transport.kind

    @property
    def subject(self) -> str:
        return self.identity.sub

    def open(self) -> None:
        hub, sid = self.node.hub, self.identity.sid
        hub.connect(self, self.identity.exp, sid, principal(self.identity))
        self.metrics.handshakes.labels(self.transport.kind).inc()
        if self.node.events is not None:
            self.node.events.connected(self)
        if sid is not None and sid in hub.revoked:
            # Revoked after its token was checked, while it was admitted (a connect hook
            # answering): the revocation found no connection of it to close.
            self.close(CloseCode.SESSION_REVOKED)

    def boot(
        self, positions: Mapping[str, Position] | None = None
    ) -> Coroutine[Any, Any, None] | None:
        """What must run once opened, before the client's first command (None: nothing).

        The transport awaits it, then runs the client's commands; a hooked
        session subscribes there to the channels its connect hook named,
        recovering those of ``positions`` (the client's, from its request).
        """
        return None

    async def handle(self, data: bytes | str) -> None:
        """Run one client frame to completion; never raises."""
        conn = self.conn
        try:
            cmd = conn.receive(data)
        except ProtocolError as exc:
            # Counted like a command: a frame that is not one costs as much to
            # decode and answer, and must not be a way past the limit.
            if self._frame_allowed():
                self._reply_error(conn.error(exc), exc.code)
            return
        if not self._allowed(cmd):
            return
        received, seconds = self.metrics.command(type(cmd).__name__.lower())
        received.inc()
        started = time.perf_counter()
        try:
            await self._run(cmd)
        finally:
            seconds.observe(time.perf_counter() - started)

    async def _run(self, cmd: Command) -> None:
        conn = self.conn
        try:
            if isinstance(cmd, Sub):
                await self._subscribe(cmd)
                return
            if isinstance(cmd, Unsub):
                conn.unsubscribed(cmd.ch)
                self._left(cmd.ch)
                self.node.presence.leave(cmd.ch, self.client_id)
            elif isinstance(cmd, Pub):
                await self.node.publish(cmd.ch, self.codec.data_to_json(cmd.data), checked=True)
            elif isinstance(cmd, Rpc):
                await self._rpc(cmd)
                return
            elif isinstance(cmd, Refresh):
                self._refresh(cmd)
                return
            elif isinstance(cmd, History):
                await history(self, cmd)
                return
            elif isinstance(cmd, PresenceQuery | PresenceStats):
                await self._presence(cmd)
                return
            elif isinstance(cmd, Call):
                code = ErrorCode.UNAVAILABLE
                self._reply_error(conn.error_reply(cmd, code, "no call handler here"), code)
                return
            else:
                assert isinstance(cmd, Ping)
        except Exception as exc:
            self._failed(cmd, exc)
            return
        if not conn.closed:
            self.transport.send(conn.ok(cmd))

    async def _subscribe(
        self, cmd: Sub, data_json: bytes | None = None, info: bytes | None = None
    ) -> None:
        """Subscribe and reply (with ``data_json`` when given); enter presence with ``info``."""
        code = self._claim(cmd.ch)
        if code is not None:
            self._reply_error(self.conn.error_reply(cmd, code, cmd.ch), code)
            return
        try:
            await self._subscribe_claimed(cmd, data_json, info)
        finally:
            self._unclaim(cmd.ch)

    async def _subscribe_claimed(
        self, cmd: Sub, data_json: bytes | None, info: bytes | None
    ) -> None:
        conn = self.conn
        if self.node.history_policy.applies(cmd.ch):
            cid, data = cmd.id, None if data_json is None else self.codec.json_to_raw(data_json)
            await subscribe_recovering(
                self,
                cmd.ch,
                cmd.since,
                lambda recovered, top: Reply(
                    id=cid,
                    ok=True,
                    recovered=recovered,
                    offset=top.offset if top is not None else None,
                    epoch=top.epoch if top is not None else None,
                    data=data,
                ),
            )
            await self._join(cmd.ch, info)
            return
        await self.node.subscribe(cmd.ch, self)
        if conn.closed:
            # The socket went away while SUBSCRIBE was in flight.
            self.node.unsubscribe(cmd.ch, self)
            return
        conn.subscribed(cmd.ch)
        await self._join(cmd.ch, info)
        if not conn.closed:
            reply = conn.ok(cmd) if data_json is None else self.codec.data_reply(cmd.id, data_json)
            self.transport.send(reply)

    def _claim(self, ch: str) -> ErrorCode | None:
        """Begin a subscription to ``ch``; the error if it is held, under way or one too many.

        Commands of one socket run one at a time, but the server API's, a
        long-poll session's concurrent polls and a subscribe hook's wait can
        overlap a ``sub``: two subscriptions of one channel at once would share
        its recovery's held publications (`subscribe_recovering`).
        """
        conn = self.conn
        subscribing = self.subscribing
        if ch in conn.subscriptions or (subscribing is not None and ch in subscribing):
            return ErrorCode.ALREADY_SUBSCRIBED
        under_way = len(subscribing) if subscribing is not None else 0
        if len(conn.subscriptions) + under_way >= conn.max_subscriptions:
            return ErrorCode.LIMIT_EXCEEDED
        if subscribing is None:
            subscribing = self.subscribing = set()
        subscribing.add(ch)
        return None

    def _unclaim(self, ch: str) -> None:
        subscribing = self.subscribing
        if subscribing is not None:
            subscribing.discard(ch)
            if not subscribing:
                self.subscribing = None

    def _failed(self, cmd: Command, exc: Exception) -> None:
        """The error reply for a command that raised ``exc``."""
        conn = self.conn
        if isinstance(exc, InvalidData):
            code = ErrorCode.INVALID_DATA
            self._reply_error(conn.error_reply(cmd, code, exc.reason), code)
        elif isinstance(exc, BrokerUnavailable):
            _unavailable.warning("command %s failed: %s", type(cmd).__name__, exc)
            self._reply_error(conn.error_reply(cmd, ErrorCode.UNAVAILABLE), ErrorCode.UNAVAILABLE)
        else:
            name, sub = type(cmd).__name__, self.identity.sub
            log.error("command %s failed for %s", name, sub, exc_info=exc)
            self._reply_error(conn.error_reply(cmd, ErrorCode.INTERNAL), ErrorCode.INTERNAL)

    def _allowed(self, cmd: Command) -> bool:
        """Per-connection rate limits; a client that keeps going once told is closed."""
        for publish in (False, True) if isinstance(cmd, Pub) else (False,):
            rate = self.publishes if publish else self.commands
            if rate is None:
                continue
            if publish:
                decision, self._publishes_tat = local_hit(rate, self._publishes_tat)
            else:
                decision, self._commands_tat = local_hit(rate, self._commands_tat)
            if decision.allowed:
                continue
            scope = "socket_publish" if publish else "socket_commands"
            if self._refuse(rate, scope):
                detail = f"retry in {decision.retry_after:.2f} s"
                code = ErrorCode.RATE_LIMITED
                self._reply_error(self.conn.error_reply(cmd, code, detail), code)
            return False
        return True

    def _frame_allowed(self) -> bool:
        """`_allowed` for a frame that is no command: counted against `commands`, unanswered past it."""
        rate = self.commands
        if rate is None:
            return True
        decision, self._commands_tat = local_hit(rate, self._commands_tat)
        if decision.allowed:
            return True
        self._refuse(rate, "socket_commands")
        return False

    def _refuse(self, rate: Rate, scope: str) -> bool:
        """Count a refusal; False once the connection is closed for them (4503).

        Refusals have an allowance of their own: ``rate.limit`` of them per ten
        periods. A client that sends on regardless passes it, however it paces
        itself (an allowed command between refusals does not start it anew).
        """
        self.metrics.rate_limited.labels(scope).inc()
        refusals = Rate(rate.limit, rate.period * REFUSALS_PERIODS)
        decision, self._refused_tat = local_hit(refusals, self._refused_tat)
        if decision.allowed:
            return True
        log.warning("closing %s: kept sending while rate limited", self.identity.sub)
        self.transport.disconnect(CloseCode.RATE_LIMITED)
        return False

    def _refresh(self, cmd: Refresh) -> None:
        """Continue under a new token: new expiry and grants, same subject."""
        conn = self.conn
        if self.verify is None:
            self._reply_error(conn.error_reply(cmd, ErrorCode.UNAVAILABLE), ErrorCode.UNAVAILABLE)
            return
        try:
            identity = self.verify(cmd.token)
        except AuthError as exc:
            self._reply_error(
                conn.error_reply(cmd, ErrorCode.TOKEN_INVALID, exc.message), ErrorCode.TOKEN_INVALID
            )
            return
        if principal(identity) != principal(self.identity):  # the same user, vouched for alike
            self._reply_error(
                conn.error_reply(cmd, ErrorCode.PERMISSION_DENIED, "token is for another subject"),
                ErrorCode.PERMISSION_DENIED,
            )
            return
        old, self.identity = self.identity, self._adopt(identity)
        identity = self.identity
        self.node.hub.reidentify(self, (old.exp, old.sid), (identity.exp, identity.sid))
        for ch in conn.regrant(identity.grants, self._server_channels()):
            message = "the refreshed token does not allow this channel"
            self._drop(ch, ErrorCode.PERMISSION_DENIED, message)
        self.transport.send(conn.ok(cmd))

    def _drop(self, ch: str, code: ErrorCode, message: str) -> None:
        """End the subscription to ``ch`` from this side, with an ``unsubscribed`` push."""
        self.conn.unsubscribed(ch)
        self._left(ch)
        self.node.presence.leave(ch, self.client_id)
        if not self.conn.closed:
            self.transport.send(self.codec.encode(Unsubscribed(ch, int(code), message)))

    # -- the server API's actions (gateway/serverapi/agent.py) ------------------

    def kick(self, code: int, reason: str) -> None:
        """Close on the server API's word, with its code and reason."""
        self.transport.disconnect(code, reason)

    async def server_subscribe(self, ch: str) -> bool:
        """Subscribe on the server API's word (grants are not asked): True when done.

        The client is told with a ``subscribed`` push (and, on a history
        channel, where the channel stands) before the publications that follow.
        False for a connection that holds ``ch`` already, is at its limit, or is
        draining or closed. Raises `BrokerUnavailable` as a ``sub`` would.
        """
        conn = self.conn
        if conn.state is not State.OPEN or self._claim(ch) is not None:
            return False
        try:
            done = await self._server_subscribe_claimed(ch)
        finally:
            self._unclaim(ch)
        if done:
            if self.server_held is None:
                self.server_held = set()
            self.server_held.add(ch)
        return done

    async def _server_subscribe_claimed(self, ch: str, since: Position | None = None) -> bool:
        conn = self.conn
        if self.node.history_policy.applies(ch):
            await subscribe_recovering(
                self,
                ch,
                since,
                lambda recovered, top: Subscribed(
                    ch, top.offset if top else None, top.epoch if top else None, recovered
                ),
            )
        else:
            await self.node.subscribe(ch, self)
            if conn.closed:
                self.node.unsubscribe(ch, self)
                return False
            conn.subscribed(ch)
            self.transport.send(self.codec.encode(Subscribed(ch)))
        await self._join(ch)
        return ch in conn.subscriptions

    def server_unsubscribe(self, ch: str) -> bool:
        """End the subscription on the server API's word (``unsubscribed``, code 118)."""
        if ch not in self.conn.subscriptions:
            return False
        self._drop(ch, ErrorCode.UNSUBSCRIBED, "unsubscribed by the server")
        return True

    def describe(self, node: str) -> ConnectionInfo:
        """This connection as the server API lists it."""
        return ConnectionInfo(
            client=self.client_id,
            user=self.identity.sub,
            transport=self.transport.kind,
            codec=self.codec.name,
            node=node,
            remote=self.remote_ip,
            since=float(self.opened),
            subscriptions=sorted(self.conn.subscriptions),
        )

    def _adopt(self, identity: Identity) -> Identity:
        """The identity to continue under after an in-band refresh verified ``identity``."""
        return identity

    def _server_channels(self) -> Container[str]:
        """Channels the server subscribed this connection to, which no regrant ends."""
        return self.server_held or ()

    async def _join(self, ch: str, info: bytes | None = None) -> None:
        """Once subscribed to ``ch``: record the event, and enter presence (if ``ch`` keeps
        presence), shown with ``info``."""
        if ch not in self.conn.subscriptions:
            return
        if self.node.events is not None:
            self.node.events.subscribed(self, ch)
        presence = self.node.presence
        if not presence.applies(ch):
            return
        if info is None:
            info = self.identity.info
        try:
            await presence.join(ch, self.identity.sub, self.client_id, info)
        except Exception as exc:  # presence is best effort; the subscription stands
            _unavailable.warning("presence join on %s failed: %s", ch, exc)

    def _left(self, ch: str) -> None:
        """The subscription to ``ch`` ended: its unsub, or a refresh that no longer allows it."""
        self.node.unsubscribe(ch, self)
        if self.server_held is not None:
            self.server_held.discard(ch)
        if self.node.events is not None:
            self.node.events.unsubscribed(self, ch)

    async def _presence(self, cmd: PresenceQuery | PresenceStats) -> None:
        if not self.node.presence.applies(cmd.ch):
            code = ErrorCode.NO_PRESENCE
            self._reply_error(self.conn.error_reply(cmd, code, cmd.ch), code)
            return
        if isinstance(cmd, PresenceStats):
            clients, users = await self.node.presence.stats(cmd.ch)
            reply = Reply(id=cmd.id, ok=True, num_clients=clients, num_users=users)
        else:
            entries = await self.node.presence.who(cmd.ch)
            who = [PresenceInfo(e.user, e.client, e.info) for e in entries]
            reply = Reply(id=cmd.id, ok=True, presence=who)
            extra = (len(who) - 1) // PRESENCE_ENTRIES_PER_COMMAND
            if extra > 0 and self.commands is not None:
                self._commands_tat = local_spend(self.commands, self._commands_tat, extra)
        if not self.conn.closed:
            self.transport.send(self.codec.encode(reply))

    def heartbeat(self, now: float, dead_after: float) -> None:
        self.transport.heartbeat(now, dead_after)

    def gap(self, ch: str) -> None:
        """The broker link was down: publications on ``ch`` may be missing."""
        if not self.conn.closed:
            self.transport.send(self.codec.encode(Gap(ch)))

    def expiring(self) -> None:
        """Tell the client its token runs out soon (hub's notice)."""
        exp = self.identity.exp
        if exp is not None and not self.conn.closed:
            self.transport.send(self.codec.encode(Expiring(int(exp))))

    async def _rpc(self, cmd: Rpc) -> None:
        if self.dispatch is None:
            self._reply_error(
                self.conn.error_reply(cmd, ErrorCode.UNAVAILABLE, "no REST core"),
                ErrorCode.UNAVAILABLE,
            )
            return
        path, _, query = cmd.path.partition("?")
        body = self.codec.data_to_json(cmd.body) if len(cmd.body) else b""
        req = Request(
            cmd.method,
            path,
            headers={k.lower(): v for k, v in cmd.headers.items()},
            body=body,
            caller=self.identity,
            client=self.remote_ip,
            query_string=query,
        )
        resp = await self.dispatch(req)
        if not self.conn.closed:
            self.transport.send(self.codec.rpc_reply(cmd.id, resp.status, resp.headers, resp.body))

    def _reply_error(self, payload: bytes, code: ErrorCode) -> None:
        self.metrics.errors.labels(str(int(code))).inc()
        if not self.conn.closed:
            self.transport.send(payload)

    def deliver(self, prepared: Prepared) -> None:
        held = self.held
        if held is not None and prepared.ch in held:
            buffer = held[prepared.ch]
            if len(buffer) >= MAX_HELD:
                log.warning(
                    "closing %s: recovery of %s fell too far behind", self.identity.sub, prepared.ch
                )
                self.transport.disconnect(CloseCode.SLOW_CONSUMER)
                return
            buffer.append(prepared)
            return
        self.transport.deliver(prepared, self.codec)

    def drain(self) -> None:
        """The gateway drains: new ``sub``s get the temporary ``113 CLOSING``."""
        if self.conn.state is State.OPEN:
            self.conn.transition(State.DRAINING)

    def close(self, code: CloseCode) -> None:
        """Server-initiated close (expiry, drain, slow consumer)."""
        self.transport.disconnect(code)

    def closed(self, code: int = 1006, reason: str = "") -> None:
        """The transport is gone (``code``: the close code sent or received, 1006 if none):
        leave every channel. Idempotent: the first call's code is the one recorded."""
        if self.conn.state is State.CLOSED:
            return
        self.conn.transition(State.CLOSED)
        self.node.leave_all(self, self.conn.subscriptions)
        for ch in self.conn.subscriptions:
            self.node.presence.leave(ch, self.client_id)
        self.conn.subscriptions.clear()
        self.node.hub.disconnect(
            self, self.identity.exp, self.identity.sid, principal(self.identity)
        )
        if self.node.events is not None:
            self.node.events.disconnected(self, code, reason)
