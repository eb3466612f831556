"""The Hub: local connections and their channel membership, and fan-out.

Fan-out encodes a publication once per codec and frames it once per
transport kind (`Prepared`), then hands the same bytes object to every
subscriber; sockets that agreed to permessage-deflate share one compressed
frame per codec (`Prepared.ws_frame_deflated`). Members never block and
never change the hub synchronously from `deliver` (a slow consumer
schedules its own close), so broadcast iterates the live member dict
without copying it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Container
from typing import Protocol

from core.infra.metrics import Metrics
from core.infra.throttled import ThrottledLog
from gateway.expiry import ExpiryWheel
from proto import CODECS, CloseCode, Codec, Position, frame
from proto.deflate import Compressor

__all__ = ["EncodeFailed", "Hub", "Member", "Prepared", "PreparedEvent"]

_failures = ThrottledLog(logging.getLogger("gateway.hub"))


class EncodeFailed(Exception):
    """A publication could not be encoded for one codec (its other codecs still work)."""

    def __init__(self, codec: str, detail: str = "failed before") -> None:
        super().__init__(f"{codec}: {detail}")
        self.codec = codec


class _Deflated:
    """One publication in one codec for the sockets with permessage-deflate."""

    __slots__ = ("frame", "plain", "sent", "size")

    def __init__(self, payload: bytes, plain: bytes, codec: Codec, compressor: Compressor) -> None:
        #: Payload bytes: a socket whose window is smaller gets ``plain`` (0: it is anyway).
        self.size = 0
        self.plain = plain
        #: What compressing sockets get: the compressed frame, or ``plain`` when the
        #: payload is too short to be worth it or compressing did not make it smaller.
        self.frame = plain
        self.sent = 0  # deliveries, counted into the compressor's totals once (`settle`)
        if compressor.worth(len(payload)):
            compressed = frame(compressor.compress(payload), codec.binary, compressed=True)
            if len(compressed) < len(plain):
                self.size, self.frame = len(payload), compressed


#: Marks a codec slot whose encoding failed, so it is not retried per subscriber.
_FAILED = b""


class Prepared:
    """One publication, encoded lazily once per codec.

    An encoding that fails raises `EncodeFailed` for that codec's
    subscribers only (and at once after the first), never for the others.
    """

    __slots__ = (
        "_compressor",
        "_deflated",
        "_frames",
        "_payloads",
        "ch",
        "data",
        "epoch",
        "offset",
    )

    def __init__(self, ch: str, data: bytes, position: Position | None = None) -> None:
        self.ch = ch
        self.data = data
        self.offset = position.offset if position is not None else None
        self.epoch = position.epoch if position is not None else None
        self._payloads: list[bytes | None] = [None] * len(CODECS)
        self._frames: list[bytes | None] = [None] * len(CODECS)
        # Made for the first socket with permessage-deflate, then per codec.
        self._deflated: list[_Deflated | None] | None = None
        self._compressor: Compressor | None = None

    def payload(self, codec: Codec) -> bytes:
        """The encoded push (``{"op":"msg",...}``) in this codec."""
        p = self._payloads[codec.index]
        if p is None:
            try:
                p = self._encode(codec)
            except Exception as exc:
                self._payloads[codec.index] = _FAILED
                raise EncodeFailed(codec.name, str(exc)) from exc
            self._payloads[codec.index] = p
        elif p is _FAILED:
            raise EncodeFailed(codec.name)
        return p

    def _encode(self, codec: Codec) -> bytes:
        return codec.encode_push(self.ch, self.data, self.offset, self.epoch)

    def ws_frame(self, codec: Codec) -> bytes:
        """The push as a complete, unmasked WebSocket frame."""
        f = self._frames[codec.index]
        if f is None:
            f = self._frames[codec.index] = frame(self.payload(codec), codec.binary)
        return f

    def ws_frame_deflated(self, codec: Codec, compressor: Compressor, max_bytes: int) -> bytes:
        """The push as a frame for a socket with permessage-deflate: compressed once per codec.

        The plain frame when the payload is too short (`Compressor.worth`) or
        longer than ``max_bytes`` (that client's `Agreement.max_bytes`), or
        when compressing did not make it smaller.
        """
        entries = self._deflated
        if entries is not None:
            entry = entries[codec.index]
            if entry is not None:  # every socket but the first: a few lookups and a count
                if entry.size > max_bytes:
                    return entry.plain
                entry.sent += 1
                return entry.frame
        else:
            entries = self._deflated = [None] * len(CODECS)
            self._compressor = compressor
        entries[codec.index] = _Deflated(
            self.payload(codec), self.ws_frame(codec), codec, compressor
        )
        return self.ws_frame_deflated(codec, compressor, max_bytes)

    def settle(self) -> None:
        """Count this fan-out's compressed deliveries in the compressor's totals (once)."""
        compressor, entries = self._compressor, self._deflated
        if compressor is None or entries is None:
            return
        for entry in entries:
            if entry is not None and entry.sent and entry.frame is not entry.plain:
                compressor.delivered += entry.sent
                compressor.delivered_plain += entry.sent * len(entry.plain)
                compressor.delivered_bytes += entry.sent * len(entry.frame)
        self._compressor = None  # counted once


class PreparedEvent(Prepared):
    """A push other than a publication (join, leave), encoded once per codec."""

    __slots__ = ("event",)

    def __init__(self, ch: str, event: object) -> None:
        super().__init__(ch, b"")
        self.event = event

    def _encode(self, codec: Codec) -> bytes:
        return codec.encode(self.event)


class Member(Protocol):
    """What the hub needs of a connection (the session implements it)."""

    @property
    def transport_kind(self) -> str:
        """``websocket``, ``sse`` or ``longpoll``."""

    @property
    def subject(self) -> str:
        """Who is on it: the token's ``sub`` (``apikey:<id>`` for an API key)."""

    @property
    def client_id(self) -> str:
        """The connection's id (in presence and connection events)."""

    def deliver(self, prepared: Prepared) -> None:
        """Queue a publication; must neither block nor touch the hub."""

    def close(self, code: CloseCode) -> None:
        """Ask the connection to close; it leaves the hub once closed."""

    def expiring(self) -> None:
        """Its token expires soon: tell the client to refresh it."""

    def gap(self, ch: str) -> None:
        """Publications on ``ch`` may have been missed: tell the client."""

    def heartbeat(self, now: float, dead_after: float) -> None:
        """Ping the peer, or drop it if nothing came from it for ``dead_after`` seconds."""

    def drain(self) -> None:
        """The process is going away: refuse new subscriptions from now on."""


class Hub:
    """Local connections, their channels, and when their tokens run out.

    A connection whose token expires at ``exp`` is told so (``expiring``)
    ``notice`` seconds before, and closed with 4002 at ``exp + grace``.
    """

    def __init__(self, metrics: Metrics, *, notice: float = 60.0, grace: float = 5.0) -> None:
        self._metrics = metrics
        self._notice = notice
        self._grace = grace
        self._notices: ExpiryWheel[Member] = ExpiryWheel()
        self._channels: dict[str, dict[Member, None]] = {}
        self._connections: set[Member] = set()
        self._rounds: collections.deque[Member] = collections.deque()  # liveness walk
        self._credit = 0.0  # visits owed to the walk, a fraction of one
        self._subscriptions = 0
        self._expiry: ExpiryWheel[Member] = ExpiryWheel()
        self._by_session: dict[str, set[Member]] = {}
        #: Connections per user (`core.infra.identity.principal`), for
        #: MAX_CONNECTIONS_PER_USER: one entry per user, none per connection.
        self._per_user: dict[str, int] = {}
        #: The revoked login sessions (core/infra/revocation.py), for a connection that
        #: joins after its session was revoked while it was being admitted.
        self.revoked: Container[str] = frozenset()
        self._idle: asyncio.Event | None = None
        metrics.watch(
            connections=self.count_by_transport,
            channels=lambda: len(self._channels),
            subscriptions=lambda: self._subscriptions,
        )

    # -- connections -------------------------------------------------------

    def connect(
        self, member: Member, exp: float | None = None, sid: str | None = None, user: str = ""
    ) -> None:
        """Register a connection; one with ``exp`` is closed when it passes,
        one with a login session ``sid`` when the session is revoked; ``user``
        counts it for `user_count`."""
        if member in self._connections:
            return
        self._connections.add(member)
        self._schedule(member, exp, sid)
        if user:
            self._per_user[user] = self._per_user.get(user, 0) + 1

    def disconnect(
        self, member: Member, exp: float | None = None, sid: str | None = None, user: str = ""
    ) -> None:
        """Forget a connection `connect` registered, with the same arguments."""
        if member not in self._connections:
            return
        self._connections.discard(member)
        self._unschedule(member, exp, sid)
        if user:
            left = self._per_user.pop(user, 1) - 1
            if left > 0:
                self._per_user[user] = left
        if not self._connections and self._idle is not None:
            self._idle.set()

    def user_count(self, user: str) -> int:
        """The connections of ``user`` here (what `connect` counted)."""
        return self._per_user.get(user, 0)

    def reidentify(
        self,
        member: Member,
        old: tuple[float | None, str | None],
        new: tuple[float | None, str | None],
    ) -> None:
        """A connection continues under a new token: move its (exp, sid) schedule."""
        self._unschedule(member, *old)
        self._schedule(member, *new)

    def _schedule(self, member: Member, exp: float | None, sid: str | None) -> None:
        if exp is not None:
            self._expiry.add(member, exp + self._grace)
            self._notices.add(member, exp - self._notice)
        if sid is not None:
            self._by_session.setdefault(sid, set()).add(member)

    def _unschedule(self, member: Member, exp: float | None, sid: str | None) -> None:
        if exp is not None:
            self._expiry.discard(member, exp + self._grace)
            self._notices.discard(member, exp - self._notice)
        if sid is not None:
            members = self._by_session.get(sid)
            if members is not None:
                members.discard(member)
                if not members:
                    del self._by_session[sid]

    async def wait_idle(self) -> None:
        """Return once no connection is left."""
        if self._connections:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def drain(self) -> None:
        """Put every connection in the draining state (new subscriptions refused)."""
        for member in self._connections:
            member.drain()

    def close_expired(self, now: float) -> int:
        """Warn connections whose token expires soon; close those past it (4002)."""
        for member in self._notices.pop_due(now):
            member.expiring()
        due = self._expiry.pop_due(now)
        for member in due:
            member.close(CloseCode.TOKEN_EXPIRED)
        return len(due)

    def close_session(self, sid: str) -> int:
        """Close every connection of a revoked login session."""
        members = list(self._by_session.get(sid, ()))
        for member in members:
            member.close(CloseCode.SESSION_REVOKED)
        return len(members)

    def close_subject(self, sub: str, code: CloseCode) -> int:
        """Close every connection of ``sub`` (a revoked API key): rare, so a scan."""
        members = [member for member in self._connections if member.subject == sub]
        for member in members:
            member.close(code)
        return len(members)

    @property
    def connections(self) -> frozenset[Member]:
        return frozenset(self._connections)

    def connection_count(self) -> int:
        return len(self._connections)

    def transport_counts(self) -> dict[str, int]:
        """Connections by transport, in one pass (for the server API and the console)."""
        return dict(collections.Counter(m.transport_kind for m in self._connections))

    def count_by_transport(self, transport: str) -> int:
        """Connections on ``transport`` (``websocket``, ``sse``, ``longpoll``), for metrics."""
        return sum(1 for member in self._connections if member.transport_kind == transport)

    # -- membership --------------------------------------------------------

    def add(self, ch: str, member: Member) -> bool:
        """Add a subscriber; True when it is the channel's first."""
        members = self._channels.get(ch)
        if members is None:
            self._channels[ch] = {member: None}
            self._subscriptions += 1
            return True
        if member not in members:
            members[member] = None
            self._subscriptions += 1
        return False

    def remove(self, ch: str, member: Member) -> bool:
        """Remove a subscriber; True when the channel has none left."""
        members = self._channels.get(ch)
        if members is None or member not in members:
            return False
        del members[member]
        self._subscriptions -= 1
        if members:
            return False
        del self._channels[ch]
        return True

    def heartbeat(self, now: float, interval: float, timeout: float, tick: float = 1.0) -> int:
        """One tick of liveness: visit the next share of connections, round-robin.

        Each connection is visited about every ``interval`` seconds: pinged,
        or dropped when silent for ``interval + timeout``. No connection has a
        timer of its own; the cost per tick is ``connections * tick / interval``.
        """
        if not self._rounds:
            self._rounds.extend(self._connections)
        if interval <= 0:
            return 0
        # Fractional shares carry over, so a handful of connections is still
        # visited once per interval (not once per tick).
        credit = self._credit + len(self._connections) * tick / interval
        share = int(credit)
        self._credit = min(credit - share, 1.0)
        # A connection is visited every `interval`, or every tick if that is longer.
        dead_after = max(interval, tick) + timeout
        visited = 0
        while visited < share and self._rounds:
            member = self._rounds.popleft()
            if member in self._connections:
                member.heartbeat(now, dead_after)
                visited += 1
        return visited

    def notify_gap(self) -> int:
        """Tell every subscriber of every channel that it may have missed publications."""
        return sum(self.gap(ch) for ch in list(self._channels))

    def gap(self, ch: str) -> int:
        """Tell the subscribers of ``ch`` that they may have missed publications on it."""
        members = list(self._channels.get(ch, ()))
        for member in members:
            member.gap(ch)
        return len(members)

    def has_subscribers(self, ch: str) -> bool:
        return ch in self._channels

    def subscriber_count(self, ch: str) -> int:
        return len(self._channels.get(ch, ()))

    def channels(self) -> list[str]:
        return list(self._channels)

    def channel_count(self) -> int:
        return len(self._channels)

    def subscription_count(self) -> int:
        return self._subscriptions

    def subscriber_counts(self) -> dict[str, int]:
        """Every channel with its local subscriber count (a copy)."""
        return {ch: len(members) for ch, members in self._channels.items()}

    # -- fan-out -----------------------------------------------------------

    def broadcast_event(self, ch: str, event: object) -> int:
        """Push ``event`` (a proto frame) to every local subscriber of ``ch``."""
        members = self._channels.get(ch)
        if not members:
            return 0
        prepared = PreparedEvent(ch, event)
        n = self._fan_out(members, prepared)
        prepared.settle()
        return n

    def broadcast(self, ch: str, data: bytes, position: Position | None = None) -> int:
        """Deliver ``data`` (JSON bytes) to every local subscriber of ``ch``."""
        members = self._channels.get(ch)
        if not members:
            return 0
        started = time.perf_counter()
        prepared = Prepared(ch, data, position)
        n = self._fan_out(members, prepared)
        prepared.settle()
        self._metrics.messages_out.inc(n)
        self._metrics.fanout_seconds.observe(time.perf_counter() - started)
        return n

    def _fan_out(self, members: dict[Member, None], prepared: Prepared) -> int:
        """Hand ``prepared`` to every member; one that cannot take it costs no one else."""
        failed = 0
        for member in members:
            try:
                member.deliver(prepared)
            except Exception as exc:
                failed += 1
                if failed == 1:  # counted and logged once per publication
                    codec = exc.codec if isinstance(exc, EncodeFailed) else "unknown"
                    self._metrics.encode_failures.labels(codec).inc()
                    _failures.warning("delivery on %r failed: %s", prepared.ch, exc)
        return len(members) - failed
